"""Models ONNX Runtime cannot run (opset before 7): `bnfold fold` and `verify` evaluate both
models in float64 with onnx.reference instead, judged at float32 tolerance."""

from __future__ import annotations

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import helper, numpy_helper

import golden
from bnfold.cli import cli
from bnfold.onnxio.files import save_model
from bnfold.verification.runs import verify


def _opset6(batch="N") -> onnx.ModelProto:
    """Conv → BatchNormalization-6 (is_test) → Add with the legacy broadcast attribute, IR 3
    with the weights listed as inputs, as PyTorch's 2017 exporter wrote them."""
    rng = golden.rng(6)
    inits = [golden.tensor("W", rng.standard_normal((4, 3, 3, 3))),
             *golden.bn_params("bn", 4), golden.tensor("shift", rng.standard_normal(4))]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
             golden.bn_node("c", "b", is_test=1, epsilon=1e-3),
             helper.make_node("Add", ["b", "shift"], ["y"], broadcast=1, axis=1)]
    f32 = onnx.TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "old", [helper.make_tensor_value_info("x", f32, [batch, 3, 8, 8]),
                       *(helper.make_tensor_value_info(t.name, f32, list(t.dims)) for t in inits)],
        [helper.make_tensor_value_info("y", f32, [batch, 4, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 6)], ir_version=3)


def test_fold_of_an_opset6_model_is_verified_in_float64(tmp_path):
    path, out = str(tmp_path / "old.onnx"), str(tmp_path / "old.folded.onnx")
    save_model(_opset6(), path)
    run = CliRunner().invoke(cli, ["fold", path, "--report", str(tmp_path / "r.json")],
                             prog_name="bnfold")
    assert run.exit_code == 0, run.output
    text = " ".join(run.output.split())
    assert "verification (onnx.reference float64)" in text
    assert "this model is opset 6: both models were evaluated in float64" in text
    folded = onnx.load(out)
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Add"]
    result = verify(path, out)
    assert result.ok and result.evaluator == "onnx.reference float64"
    assert result.shapes == {"x": [1, 3, 8, 8]}  # the symbolic batch settled at 1
    # only the float32 rounding of the folded weights is left
    assert 0 < result.outputs[0].max_rel_error < 1e-6


def test_a_wrong_fold_of_an_opset6_model_fails(tmp_path):
    path, wrong = str(tmp_path / "old.onnx"), str(tmp_path / "wrong.onnx")
    model = _opset6()
    save_model(model, path)
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    weight = next(t for t in bad.graph.initializer if t.name == "bn_var")
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(1.1),
                                            "bn_var"))
    save_model(bad, wrong)
    run = CliRunner().invoke(cli, ["verify", path, wrong], prog_name="bnfold")
    assert run.exit_code == 1 and "NOT equivalent" in run.output
    assert "rerun with --locate" not in run.output  # it would need ONNX Runtime
    assert verify(path, wrong).outputs[0].max_rel_error > 1e-3


def test_what_needs_onnx_runtime_says_so_for_an_opset6_model(tmp_path):
    path = str(tmp_path / "old.onnx")
    save_model(_opset6(batch=1), path)
    run = CliRunner().invoke(cli, ["verify", path, path, "--locate"], prog_name="bnfold")
    assert run.exit_code == 1
    assert "--locate and --repro need ONNX Runtime" in run.output
    run = CliRunner().invoke(cli, ["verify", path, path, "--engine", "ort-cpu"],
                             prog_name="bnfold")
    assert run.exit_code == 1 and "this model is opset 6: verify it without --engine" in \
        " ".join(run.output.split())
    assert "Traceback" not in run.output


def test_the_legacy_broadcast_aligns_at_axis_as_onnx_runtime_does_at_opset_7():
    """The opset-6 model in float64 against its opset-13 twin (shift as [4, 1, 1]) in ORT."""
    from bnfold.verification.float64 import evaluate_float64

    old = _opset6(batch=1)
    new = onnx.ModelProto()
    new.CopyFrom(old)
    new.opset_import[0].version, new.ir_version = 13, 7
    del new.graph.input[1:]  # weights are initializers only
    add = new.graph.node[2]
    del add.attribute[:]
    shift = next(t for t in new.graph.initializer if t.name == "shift")
    shift.dims[:] = [4, 1, 1]
    for attr in list(new.graph.node[1].attribute):
        if attr.name == "is_test":
            new.graph.node[1].attribute.remove(attr)
    x = golden.rng(9).standard_normal((1, 3, 8, 8)).astype(np.float32)
    (expected,) = golden.run(new, {"x": x})
    got = evaluate_float64(old, {"x": x})["y"]
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def _zoo_era(opset: int) -> onnx.ModelProto:
    """An AlexNet-era graph at opset 3 (BatchNormalization-1 with consumed_inputs, Clip-1,
    Dropout-1, Reshape-1 with a shape attribute, Gemm-1 with broadcast, Add-1 with axis), or
    the same computation written at opset 13 for ONNX Runtime."""
    rng = golden.rng(12)
    old = opset < 7
    weights = [golden.tensor("W", rng.standard_normal((4, 3, 3, 3))),
               golden.tensor("b", rng.standard_normal(4)), *golden.bn_params("bn", 4),
               golden.tensor("fw", rng.standard_normal((5, 64))),
               golden.tensor("fb", rng.standard_normal(5)),
               golden.tensor("shift", rng.standard_normal(4) if old else
                             rng.standard_normal((4, 1, 1)))]
    bn = {"consumed_inputs": [0, 0, 0, 1, 1], "is_test": 1, "spatial": 1} if old else {}
    nodes = [helper.make_node("Conv", ["x", "W", "b"], ["c"], pads=[1, 1, 1, 1]),
             golden.bn_node("c", "n", **bn),
             helper.make_node("Add", ["n", "shift"], ["a"], **(
                 {"broadcast": 1, "axis": 1} if old else {})),
             helper.make_node("Clip", ["a", *([] if old else ["lo", "hi"])], ["r"],
                              **({"min": -0.5, "max": 2.0} if old else {})),
             helper.make_node("Dropout", ["r"], ["d"], **({"is_test": 1} if old else {})),
             helper.make_node("Reshape", ["d", *([] if old else ["to"])], ["f"],
                              **({"shape": [0, -1]} if old else {})),
             helper.make_node("Gemm", ["f", "fw", "fb"], ["y"], transB=1,
                              **({"broadcast": 1} if old else {}))]
    if not old:
        weights += [golden.tensor("lo", np.float32(-0.5)), golden.tensor("hi", np.float32(2.0)),
                    numpy_helper.from_array(np.array([0, -1], np.int64), "to")]
    f32 = onnx.TensorProto.FLOAT
    listed = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in weights]
    graph = helper.make_graph(nodes, "zoo", [helper.make_tensor_value_info(
        "x", f32, [1, 3, 4, 4]), *(listed if old else [])],
        [helper.make_tensor_value_info("y", f32, [1, 5])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=3 if old else 7)


def test_an_opset3_graph_evaluates_as_its_opset13_twin_and_its_fold_is_verified(tmp_path):
    from bnfold.verification.float64 import evaluate_float64

    x = golden.rng(13).standard_normal((1, 3, 4, 4)).astype(np.float32)
    (expected,) = golden.run(_zoo_era(13), {"x": x})
    got = evaluate_float64(_zoo_era(3), {"x": x})["y"]
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    path = str(tmp_path / "zoo.onnx")
    save_model(_zoo_era(3), path)
    run = CliRunner().invoke(cli, ["fold", path], prog_name="bnfold")
    assert run.exit_code == 0, run.output
    assert "folded 1" in run.output and "verification (onnx.reference float64)" in run.output
    result = verify(path, str(tmp_path / "zoo.folded.onnx"))
    assert result.ok and 0 < result.outputs[0].max_rel_error < 1e-6
