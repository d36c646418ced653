"""Untrusted models (issue #13): malformed attributes, extreme weights, lying external data,
invalid graphs and signals never give a traceback, an invalid output or a stray file."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from golden import bn_node, bn_params, model, rng, tensor
from onnx import helper

import bnfold


def _kept_reasons(m: onnx.ModelProto) -> str:
    result = bnfold.fold(m)
    assert result.report.folded_count == 0
    return " | ".join(r for e in result.report.kept for r in e.reasons)


def _set_attribute(node: onnx.NodeProto, attr: onnx.AttributeProto) -> None:
    for index, old in enumerate(node.attribute):
        if old.name == attr.name:
            del node.attribute[index]
            break
    node.attribute.append(attr)


def _conv_bn(op="Conv", weight_shape=(4, 3, 3, 3), bn_channels=4, **conv_attrs):
    r = rng(0)
    inits = [tensor("W", r.standard_normal(weight_shape)), *bn_params("bn", bn_channels)]
    nodes = [helper.make_node(op, ["x", "W"], ["c"], name="conv", **conv_attrs),
             bn_node("c", "y")]
    return model(nodes, [("x", [1, 3, 6, 6] if op == "Conv" else [1, 4, 6, 6])], [("y", None)],
                 inits)


def _bn_conv(**conv_attrs):
    r = rng(0)
    inits = [tensor("W", r.standard_normal((4, 4, 1, 1))), *bn_params("bn", 4)]
    nodes = [bn_node("x", "b"), helper.make_node("Conv", ["b", "W"], ["y"], name="conv", **conv_attrs)]
    return model(nodes, [("x", [1, 4, 6, 6])], [("y", None)], inits)


def _gemm_bn(gemm_first=True):
    r = rng(0)
    inits = [tensor("B", r.standard_normal((4, 4))), *bn_params("bn", 4)]
    if gemm_first:
        nodes = [helper.make_node("Gemm", ["x", "B"], ["g"], name="gemm"), bn_node("g", "y")]
    else:
        nodes = [bn_node("x", "g"), helper.make_node("Gemm", ["g", "B"], ["y"], name="gemm")]
    return model(nodes, [("x", [2, 4])], [("y", None)], inits)


WRONG_ATTRIBUTES = [
    # (model builder, node index, attribute, expected words in the refusal)
    (lambda: _conv_bn("ConvTranspose", (4, 4, 3, 3)), 0, helper.make_attribute("group", 0),
     "group=0 is below 1"),
    (lambda: _conv_bn("ConvTranspose", (4, 4, 3, 3)), 0, helper.make_attribute("group", "2"),
     "group is STRING"),
    (lambda: _conv_bn("ConvTranspose", (4, 4, 3, 3)), 0, helper.make_attribute("group", [1, 2]),
     "group is INTS"),
    (_bn_conv, 1, helper.make_attribute("group", 0), "group=0 is below 1"),
    (_bn_conv, 1, helper.make_attribute("group", b"1"), "group is STRING"),
    (_bn_conv, 1, helper.make_attribute("pads", 1.0), "pads is FLOAT"),
    (_bn_conv, 1, onnx.AttributeProto(name="pads"), "pads is UNDEFINED"),
    (_bn_conv, 1, helper.make_attribute("auto_pad", 3), "auto_pad is INT"),
    (_conv_bn, 1, helper.make_attribute("epsilon", "x"), "epsilon is STRING"),
    (_conv_bn, 1, helper.make_attribute("epsilon", [1, 2]), "epsilon is INTS"),
    (_conv_bn, 1, onnx.AttributeProto(name="epsilon"), "epsilon is UNDEFINED"),
    (_conv_bn, 1, helper.make_attribute("epsilon", float("nan")), "is not finite"),
    (_conv_bn, 1, helper.make_attribute("training_mode", "0"), "training_mode is STRING"),
    (lambda: _gemm_bn(False), 1, helper.make_attribute("alpha", "2"), "alpha is STRING"),
    (lambda: _gemm_bn(False), 1, helper.make_attribute("beta", [1.0]), "beta is FLOATS"),
    (lambda: _gemm_bn(True), 0, helper.make_attribute("beta", "1"), "beta is STRING"),
    (lambda: _gemm_bn(True), 0, helper.make_attribute("transB", 1.5), "transB is FLOAT"),
]


@pytest.mark.parametrize("build, index, attr, words", WRONG_ATTRIBUTES,
                         ids=[f"{w[3]}" for w in WRONG_ATTRIBUTES])
def test_wrong_attribute_type_or_value_is_a_refusal(build, index, attr, words):
    m = build()
    _set_attribute(m.graph.node[index], attr)
    assert words in _kept_reasons(m)


def test_weight_near_float32_max_is_refused():
    """Original conv overflows to -inf where the folded one would give -3.4e37: refuse."""
    r = rng(0)
    weight = r.standard_normal((4, 3, 3, 3)).astype(np.float32)
    weight[0, 0, 0, 0] = 3e37
    inits = [tensor("W", weight), *bn_params("bn", 4)]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("c", "y")]
    m = model(nodes, [("x", [1, 3, 6, 6])], [("y", None)], inits)
    assert "within 2**10 of the float32 range" in _kept_reasons(m)


def test_folded_value_near_float32_max_is_refused():
    r = rng(0)
    inits = [tensor("W", r.standard_normal((4, 3, 3, 3)) * 1e30)]
    gamma = np.full(4, 1e10, np.float32)
    inits += [tensor("bn_scale", gamma), tensor("bn_bias", np.zeros(4)),
              tensor("bn_mean", np.zeros(4)), tensor("bn_var", np.ones(4))]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("c", "y")]
    m = model(nodes, [("x", [1, 3, 6, 6])], [("y", None)], inits)
    reasons = _kept_reasons(m)
    assert "within 2**10" in reasons or "not finite" in reasons, reasons


def _external_conv_bn(tmp_path, declared_length: int, file_size: int):
    """Conv→BN plus a 32-byte tensor the fold never reads, external in a sparse data file of
    `file_size` bytes, declaring `declared_length` bytes."""
    m = _conv_bn()
    side = tensor("side", np.arange(8, dtype=np.float32))
    side.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "w.bin"), ("offset", "0"), ("length", str(declared_length))):
        entry = side.external_data.add()
        entry.key, entry.value = key, value
    side.ClearField("raw_data")
    m.graph.initializer.append(side)
    m.graph.node.append(helper.make_node("Identity", ["side"], ["side_out"]))
    m.graph.output.append(helper.make_tensor_value_info("side_out", onnx.TensorProto.FLOAT, [8]))
    with open(tmp_path / "w.bin", "wb") as handle:
        handle.write(np.arange(8, dtype=np.float32).tobytes())
        handle.truncate(file_size)  # sparse: no disk used
    path = tmp_path / "m.onnx"
    path.write_bytes(m.SerializeToString())
    return path


@pytest.mark.parametrize("declared", [20 * 2**30, 16, 36])
def test_external_length_that_does_not_fit_dims_is_refused_before_reading(tmp_path, declared):
    path = _external_conv_bn(tmp_path, declared, max(declared, 32))
    with pytest.raises(bnfold.BnfoldError, match="declares .* bytes of external data") as info:
        bnfold.fold_file(path, tmp_path / "out.onnx", verify=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out.onnx").exists()


def _write(tmp_path, m: onnx.ModelProto, name="in.onnx"):
    path = tmp_path / name
    path.write_bytes(m.SerializeToString())
    return path


def test_nodes_out_of_order_are_sorted_and_reported(tmp_path):
    m = _conv_bn()
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend([helper.make_node("Relu", ["y"], ["z"]), *reversed(nodes)])
    m.graph.output[0].name = "z"
    result = bnfold.fold_file(_write(tmp_path, m), tmp_path / "out.onnx", verify=True)
    assert result.report.folded_count == 1
    assert any("topological order" in note for note in result.report.notes)
    onnx.checker.check_model(onnx.load(tmp_path / "out.onnx"))


def _duplicated_output(m):
    m.graph.node.append(helper.make_node("Relu", ["x"], ["y"]))


def _constant_with_input(m):
    m.graph.node.append(helper.make_node("Constant", ["x"], ["k"], value_float=1.0))


def _ir_version_2(m):
    m.ir_version = 2


@pytest.mark.parametrize("break_model", [_duplicated_output, _constant_with_input, _ir_version_2])
@pytest.mark.parametrize("verify", [True, False])
def test_model_failing_the_checker_is_refused_not_written(tmp_path, break_model, verify):
    m = _conv_bn()
    break_model(m)
    with pytest.raises(bnfold.BnfoldError, match="fails onnx.checker") as info:
        bnfold.fold_file(_write(tmp_path, m), tmp_path / "out.onnx", verify=verify)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


_SIGTERM_DURING_ACCEPT = """
import os, signal, sys
import onnx
from bnfold.onnxio.files import save_model

def accept(staged):
    assert os.path.exists(staged)
    os.kill(os.getpid(), signal.SIGTERM)  # as `kill` would, mid-verification
    return True

try:
    save_model(onnx.load(sys.argv[1]), sys.argv[2], accept=accept)
except SystemExit as exc:
    print(exc.code, signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
"""


def test_sigterm_during_verification_leaves_no_staging(tmp_path):
    """In a process of its own: a real SIGTERM reaches every thread of the process it is sent
    to, and pytest's (ONNX Runtime's and torch's pools) are no place for one."""
    import signal
    import subprocess
    import sys

    source = tmp_path / "in.onnx"
    onnx.save(_conv_bn(), source)
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run([sys.executable, "-c", _SIGTERM_DURING_ACCEPT, str(source),
                           str(out / "out.onnx")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # SystemExit(128 + SIGTERM) came out of save_model, and the default handler is back.
    assert done.stdout.split() == [str(128 + signal.SIGTERM), "True"], done.stdout
    assert list(out.iterdir()) == []


def test_overflowing_fold_math_warns_nothing():
    """Numpy overflow inside the fold is a refusal, not a stray RuntimeWarning on stderr."""
    import warnings

    r = rng(0)
    inits = [tensor("W", r.standard_normal((4, 3, 3, 3)) * 1e30)]
    inits += [tensor("bn_scale", np.full(4, 3e38)), tensor("bn_bias", np.full(4, 3e38)),
              tensor("bn_mean", np.full(4, -3e38)), tensor("bn_var", np.full(4, 1e-30))]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("c", "y")]
    m = model(nodes, [("x", [1, 3, 6, 6])], [("y", None)], inits)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reasons = _kept_reasons(m)
    assert "not finite" in reasons or "within 2**10" in reasons, reasons


def test_ort_engine_sessions_log_nothing():
    from bnfold.deploy.engines.ort import session_options

    assert session_options(None).log_severity_level == 4


@pytest.mark.parametrize("gemm_first", [True, False])
def test_gemm_c_that_does_not_broadcast_to_the_columns_is_refused(gemm_first):
    """Fuzz find: BN→Gemm with a [3] C and 4 output columns raised a numpy broadcast error."""
    m = _gemm_bn(gemm_first)
    m.graph.initializer.append(tensor("C3", np.ones(3)))
    m.graph.node[0 if gemm_first else 1].input.append("C3")
    assert "does not broadcast to 4 columns" in _kept_reasons(m)


@pytest.mark.parametrize("op_type, shape", [("MatMul", [4, 4]), ("Conv", [1, 1, 1, 1])])
def test_tensor_read_in_two_slots_of_the_folded_node_is_kept(op_type, shape):
    # Review find: MatMul(W, W) -> BN folded W' into a copy and forgot that input 0 still reads
    # W, so W was dropped and the model no longer loaded.
    channels = shape[1] if op_type == "MatMul" else 1
    nodes = [helper.make_node(op_type, ["W", "W"], ["p"], name="p"), bn_node("p", "y"),
             helper.make_node("Add", ["y", "x"], ["z"], name="add")]
    inits = [tensor("W", rng(4).standard_normal(shape)), *bn_params("bn", channels)]
    m = model(nodes, [("x", shape)], [("z", shape)], inits)
    result = bnfold.fold(m)
    assert result.report.folded_count == 1
    assert "W" in {t.name for t in result.model.graph.initializer}
    onnx.checker.check_model(result.model)
    from golden import assert_same_outputs

    assert_same_outputs(m, result.model, {"x": rng(5).standard_normal(shape).astype(np.float32)})


def test_folded_weight_holding_raw_and_typed_data_is_written_checked(tmp_path):
    # Review find: a weight holding both raw_data and float_data (onnx.checker refuses it) is
    # rewritten as raw data only, so the written model passes; the check must judge what is
    # written, not the original tensor.
    w = tensor("W", rng(6).standard_normal((4, 3, 1, 1)))
    w.float_data.extend([0.0] * 12)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("c", "y")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 2, 2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 2, 2])],
        [w, *bn_params("bn", 4)])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(m, tmp_path / "m.onnx")
    result = bnfold.fold_file(tmp_path / "m.onnx", tmp_path / "o.onnx", verify=False)
    assert result.report.folded_count == 1
    onnx.checker.check_model(onnx.load(tmp_path / "o.onnx"))
