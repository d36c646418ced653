"""BatchNormalizations inside model-local functions are inlined where called, then folded."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from golden import assert_same_outputs, bn_params, count_ops, rng, tensor
from onnx import helper

import bnfold

OPSETS = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]


def _block(name="Block", inner_call=None):
    """A function Conv → BN → Relu whose weights come in as inputs, as torch.onnx's
    export_modules_as_functions writes a module; `inner_call` makes the BN sit one call down."""
    if inner_call:
        nodes = [helper.make_node(inner_call, ["x", "w", "b", "g", "beta", "mean", "var"], ["y"],
                                  domain="local")]
    else:
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
                 helper.make_node("BatchNormalization", ["c", "g", "beta", "mean", "var"], ["n"]),
                 helper.make_node("Relu", ["n"], ["y"])]
    return helper.make_function("local", name, ["x", "w", "b", "g", "beta", "mean", "var"], ["y"],
                                nodes, OPSETS)


def _scale():
    """A function without a BN (inlined with the others when it is called)."""
    return helper.make_function("local", "Scale", ["x"], ["y"],
                                [helper.make_node("Add", ["x", "x"], ["y"])], OPSETS)


def functions_model(nested=False, called=True):
    """Two calls of Block with their own weights, then a call of Scale."""
    r = rng(21)
    inits, nodes = [], []
    source = "x"
    for call in range(2):
        names = [f"w{call}", f"b{call}", *(f"bn{call}_{p}" for p in ("scale", "bias", "mean",
                                                                     "var"))]
        inits += [tensor(f"w{call}", r.standard_normal((4, 4 if call else 3, 3, 3))),
                  tensor(f"b{call}", r.standard_normal(4)), *bn_params(f"bn{call}", 4, call + 2)]
        if called:
            nodes.append(helper.make_node("Outer" if nested else "Block", [source, *names],
                                          [f"h{call}"], domain="local", name=f"/block{call}"))
        else:
            nodes.append(helper.make_node("Conv", [source, f"w{call}", f"b{call}"], [f"h{call}"],
                                          pads=[1, 1, 1, 1]))
        source = f"h{call}"
    nodes.append(helper.make_node("Scale", [source], ["out"], domain="local"))
    functions = [_block(), _scale()] + ([_block("Outer", inner_call="Block")] if nested else [])
    graph = helper.make_graph(
        nodes, "functions", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                           [1, 3, 8, 8])],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    built = helper.make_model(graph, opset_imports=OPSETS, functions=functions)
    onnx.checker.check_model(built)
    return built


@pytest.mark.parametrize("nested", [False, True])
def test_bn_inside_a_called_function_is_inlined_and_folded(nested):
    m = functions_model(nested)
    result = bnfold.fold(m)
    assert result.report.folded_count == 2 and not result.report.kept
    assert count_ops(result.model, "BatchNormalization") == 0
    assert not result.model.functions
    holding = "Block, Outer" if nested else "Block"  # Outer holds its BN through Block
    expected = (f"inlined model-local function(s) {holding}, Scale (3 call(s) from the graph), "
                f"so the BatchNormalization in {holding} could fold")
    assert expected in result.report.notes, result.report.notes
    onnx.checker.check_model(result.model)
    assert_same_outputs(m, result.model,
                        {"x": rng(22).standard_normal((1, 3, 8, 8)).astype(np.float32)}, 1e-5)


def test_functions_without_a_called_bn_are_left_alone():
    m = functions_model(called=False)  # Block is defined but never called
    result = bnfold.fold(m)
    assert result.report.folded_count == 0
    assert sorted(f.name for f in result.model.functions) == ["Block", "Scale"]
    assert not any("inlined" in note for note in result.report.notes)


def test_fold_file_inlines_a_function_whose_weights_are_external(tmp_path):
    source = tmp_path / "in" / "model.onnx"
    source.parent.mkdir()
    onnx.save(functions_model(), source, save_as_external_data=True, size_threshold=0,
              all_tensors_to_one_file=True, location="model.onnx.data")
    before = {p.name: p.read_bytes() for p in source.parent.iterdir()}
    result = bnfold.fold_file(source, tmp_path / "out.onnx")
    assert result.output_path and result.report.verification["ok"] is True
    assert result.report.folded_count == 2
    assert {p.name: p.read_bytes() for p in source.parent.iterdir()} == before


def test_a_function_the_inliner_refuses_is_left_with_a_note(monkeypatch):
    def refuse(model, ids):
        raise RuntimeError("opset mismatch in Block")

    monkeypatch.setattr(onnx.inliner, "inline_selected_functions", refuse)
    m = functions_model()
    result = bnfold.fold(m)
    assert result.report.folded_count == 0
    assert sorted(f.name for f in result.model.functions) == ["Block", "Scale"]
    (note,) = [n for n in result.report.notes if "could not be inlined" in n]
    assert "Block" in note and "opset mismatch in Block" in note
