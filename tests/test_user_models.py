"""Users' own models (tests/user_models.py) through export → fold → torch's eval output.

Each idiom of issue #11: several inputs, integer ids, float64, dict/nested outputs, symbolic
dims checked at another size, DataParallel, parametrizations, a BN called twice, an unused
auxiliary head, F.batch_norm without a module — and the one-line refusals with their causes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

import user_models  # noqa: E402

import bnfold  # noqa: E402
from bnfold.errors import BnfoldError  # noqa: E402
from bnfold.pytorch.export import _check_bn_nodes, export_onnx  # noqa: E402
from bnfold.pytorch.export_inputs import InputSpec, parse_input_spec  # noqa: E402
from bnfold.pytorch.export_run import BnUsage  # noqa: E402
from bnfold.pytorch.zoo.prepare import flatten_outputs  # noqa: E402


def run_onnx(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    if any(v.dtype == np.float64 for v in feed.values()):
        from bnfold.verification.float64 import evaluate_float64  # ORT's CPU provider has no float64 Conv

        values = evaluate_float64(model, feed)
        return [values[o.name] for o in model.graph.output]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def torch_outputs(model, tensors) -> list[np.ndarray]:
    with torch.no_grad():
        return [t.double().numpy() for _, t in flatten_outputs(model(*tensors))]


def assert_folded_matches_torch(model, path, feeds, rtol):
    """The folded ONNX equals the user's own model (not our copy) in eval mode, per output."""
    folded = bnfold.fold(path)
    for feed in feeds:
        expected = torch_outputs(model, [torch.from_numpy(v) for v in feed.values()])
        got = run_onnx(folded.model, feed)
        assert len(got) == len(expected)
        for e, g in zip(expected, got):
            assert g.shape == e.shape
            scale = max(np.abs(e).max(), 1e-30)
            assert np.abs(g.astype(np.float64) - e).max() <= rtol * scale
    return folded


def random_feed(specs, sizes=None, seed=3) -> dict:
    """Arrays for the exported inputs; `sizes` overrides symbolic dims by name."""
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in specs:
        dims = tuple((sizes or {}).get(spec.symbols.get(i), d) for i, d in enumerate(spec.dims))
        if spec.dtype.startswith("int"):
            feed[spec.name] = rng.integers(0, 30, dims).astype(spec.dtype)
        else:
            feed[spec.name] = rng.standard_normal(dims).astype(spec.dtype)
    return feed


# (factory, inputs, export options, BN nodes (= eval batch_norm calls), folded), counted by hand.
CASES = {
    # bn called twice on equal conv outputs: the exporter merges the two into one node.
    "two_inputs": ([(2, 3, 8, 8), (2, 5)], {}, 2, 2),
    "token_conv": ([InputSpec((2, 7), "ids", "int64", {1: "length"}), InputSpec((2, 7), "mask", None, {1: "length"})],
                   {"dynamic_batch": True}, 1, 1),
    "shared_conv": ([(1, 4, 6, 6)], {}, 2, 2),
    "aux_head": ([(1, 3, 6, 6)], {}, 2, 2),  # bn twice (Conv→BN→BN chain), aux head unused
    "functional_bn": ([(1, 3, 6, 6)], {}, 1, 1),
    "detector": ([parse_input_spec("batch=1x3xheight=8xwidth=12")], {}, 3, 3),
    # F.batch_norm on statistics made in forward: Constant nodes and Exp(log_var) still fold,
    # statistics reduced from the input are exported as computed and kept.
    "constant_statistics": ([(1, 3, 6, 6)], {}, 1, 1),
    "computed_statistics": ([(1, 3, 6, 6)], {}, 1, 1),
    "input_statistics": ([(2, 3, 6, 6)], {}, 1, 0),
    "weight_norm_conv": ([(1, 3, 8, 8)], {}, 2, 2),
    "spectral_norm_conv": ([(1, 3, 8, 8)], {}, 2, 2),
    "old_weight_norm_conv": ([(1, 3, 8, 8)], {}, 2, 2),
    "data_parallel": ([(1, 3, 8, 8)], {}, 2, 2),
    "float64_conv": ([(1, 3, 8, 8)], {}, 2, 2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_user_model_exports_folds_and_matches_torch(name, tmp_path):
    inputs, options, bn_nodes, folded_count = CASES[name]
    model = getattr(user_models, name)()
    path = str(tmp_path / f"{name}.onnx")
    result = export_onnx(model, inputs, path, **options)

    exported = onnx.load(path)
    onnx.checker.check_model(exported)
    assert sum(n.op_type == "BatchNormalization" for n in exported.graph.node) == bn_nodes
    assert result.bn_nodes == bn_nodes
    assert result.bn_calls == (3 if name == "two_inputs" else bn_nodes)
    assert not any(o.name.isdigit() or o.name.startswith("onnx::") for o in exported.graph.output)
    float64 = name == "float64_conv"
    rtol = 1e-12 if float64 else 1e-5
    assert result.max_rel_error <= (1e-12 if float64 else 1e-4)

    sizes = {symbol: 2 * spec.dims[axis] + 1 for spec in result.inputs
             for axis, symbol in spec.symbols.items()}
    feeds = [random_feed(result.inputs)] + ([random_feed(result.inputs, sizes)] if sizes else [])
    folded = assert_folded_matches_torch(model, path, feeds, rtol)
    assert folded.report.folded_count == folded_count, folded.report.to_dict()


def test_output_and_input_names_follow_the_model(tmp_path):
    path = str(tmp_path / "t.onnx")
    result = export_onnx(user_models.token_conv(),
                         [parse_input_spec("2x7:int64"), parse_input_spec("2x7")], path)
    graph = onnx.load(path).graph
    assert [i.name for i in graph.input] == ["ids", "mask"]
    assert [i.type.tensor_type.elem_type for i in graph.input] == [onnx.TensorProto.INT64,
                                                                   onnx.TensorProto.FLOAT]
    assert [o.name for o in graph.output] == ["output_0", "output_1_0", "output_1_1.last"]
    assert result.output_names == ["output_0", "output_1_0", "output_1_1.last"]

    result = export_onnx(user_models.two_inputs(), [(2, 3, 8, 8), (2, 5)], path,
                         output_names=["s", "m"])
    assert [o.name for o in onnx.load(path).graph.output] == ["s", "m"]
    assert [o.name for o in onnx.load(str(tmp_path / "t.onnx")).graph.output] == ["s", "m"]


def test_int_dict_keys_are_named_like_indices_and_fold(tmp_path):
    model = user_models.int_keyed_heads()
    path = tmp_path / "heads.onnx"
    names = ["output_1_0", "output_1.map", "output_0"]  # dict order, int keys as indices
    result = export_onnx(model, (1, 3, 6, 6), str(path))
    assert result.output_names == names and result.bn_nodes == 2

    folded = bnfold.fold_file(path, tmp_path / "heads.folded.onnx")
    assert folded.report.folded_count == 2
    written = onnx.load(folded.output_path)
    assert [o.name for o in written.graph.output] == names
    assert not any(n.op_type == "BatchNormalization" for n in written.graph.node)
    feed = random_feed(result.inputs)
    expected = torch_outputs(model, [torch.from_numpy(feed["x"])])
    for e, g in zip(expected, run_onnx(written, feed), strict=True):
        assert g.shape == e.shape
        assert np.abs(g - e).max() <= 1e-5 * max(np.abs(e).max(), 1e-30)


def test_dict_keys_other_than_str_or_int_are_refused_by_type(tmp_path):
    class FloatKeyed(torch.nn.Module):
        def forward(self, x):
            return {1.5: x}

    with pytest.raises(BnfoldError, match=r"^the model returns a dict with a float key \(1\.5\) "
                                          r"at its output: key output dicts by str or int$"):
        export_onnx(FloatKeyed(), (1, 2), str(tmp_path / "k.onnx"))


def bn_graph(mean_source: str) -> onnx.ModelProto:
    """x → BatchNormalization with constant scale/bias/var and a mean that is an initializer
    ("initializer"), a Constant node ("constant") or Exp of an initializer ("computed")."""
    mean = np.array([0.5, -1.0], np.float32)
    nodes = [onnx.helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"],
                                   name="bn")]
    tensors = {"s": np.ones(2, np.float32), "b": np.zeros(2, np.float32),
               "v": np.ones(2, np.float32)}
    if mean_source == "initializer":
        tensors["m"] = mean
    elif mean_source == "constant":
        nodes.insert(0, onnx.helper.make_node(
            "Constant", [], ["m"], value=onnx.numpy_helper.from_array(mean, "m")))
    else:
        tensors["log_m"] = np.log(np.abs(mean))
        nodes.insert(0, onnx.helper.make_node("Exp", ["log_m"], ["m"]))
    value = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(
        nodes, "g", [value("x", onnx.TensorProto.FLOAT, [1, 2])],
        [value("y", onnx.TensorProto.FLOAT, [1, 2])],
        [onnx.numpy_helper.from_array(a, n) for n, a in tensors.items()])
    return onnx.helper.make_model(graph)


def usage_with(*means) -> BnUsage:
    usage = BnUsage(calls=len(means))
    for k, mean in enumerate(means):
        usage.statistics[k] = (f"F.batch_norm #{k + 1}", np.array(mean, np.float64), np.ones(2))
    return usage


@pytest.mark.parametrize("mean_source", ["initializer", "constant", "computed"])
def test_bn_statistics_check_reads_constant_nodes_and_allows_computed_ones(mean_source):
    notes = []
    assert _check_bn_nodes(bn_graph(mean_source), usage_with([0.5, -1.0]), notes) == 1
    assert notes == []  # computed from an initializer, not from the input


@pytest.mark.parametrize("mean_source, calls, missing", [
    ("initializer", [[0.5, 1.0]], "F.batch_norm #1"),  # changed values
    ("constant", [[0.5, 1.0]], "F.batch_norm #1"),
    ("computed", [[0.5, -1.0], [0.5, 1.0]], "F.batch_norm #2"),  # one computed node, two calls
])
def test_bn_statistics_check_still_refuses_statistics_no_node_has(mean_source, calls, missing):
    with pytest.raises(BnfoldError, match=rf"the ONNX export has 1 BatchNormalization node\(s\), "
                                          rf"none with the statistics of {missing}: torch's "
                                          "exporter fused or changed them"):
        _check_bn_nodes(bn_graph(mean_source), usage_with(*calls), [])


def test_symbolic_dims_stay_dynamic_on_outputs(tmp_path):
    path = str(tmp_path / "d.onnx")
    export_onnx(user_models.detector(), [(1, 3, 8, 12)], path,
                dynamic=((None, 2, "height"), ("x", 3, None)))
    graph = onnx.load(path).graph
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (*graph.input, *graph.output)]
    assert dims[0] == [1, 3, "height", "x_dim3"]
    assert dims[1][2:] == ["output_0_dim2", "output_0_dim3"]  # H/2: no input symbol of that size
    assert dims[2] == [1, 2, "height", "x_dim3"]  # ConvTranspose ×2 restores H and W


def test_example_inputs_from_npz_by_name_and_order(tmp_path):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 30, (3, 5)).astype(np.int64)
    mask = (rng.random((3, 5)) > 0.3).astype(np.float32)
    by_name, in_order = tmp_path / "named.npz", tmp_path / "ordered.npz"
    np.savez(by_name, mask=mask, ids=ids)  # out of forward order: matched by name
    np.savez(in_order, ids, mask)
    model = user_models.token_conv()
    for npz in (by_name, in_order):
        path = str(tmp_path / "t.onnx")
        result = export_onnx(model, str(npz), path)
        assert [s.describe() for s in result.inputs] == ["ids:3x5:int64", "mask:3x5:float32"]
        assert_folded_matches_torch(model, path, [{"ids": ids, "mask": mask}], 1e-5)


@pytest.mark.parametrize("name, inputs, options, message", [
    ("baked_reshape", [(1, 3, 6, 6)], {"dynamic_batch": True},
     "the model does not run with batch=2 instead of 1 (RuntimeError: mat1 and mat2 shapes "
     "cannot be multiplied (1x128 and 64x5)): the model fixes that size (e.g. reshape(1, -1), "
     "view(8, -1) or int(x.shape[2])); make it size-generic (x.flatten(1), x.shape[0] without "
     "int()) or do not mark that dim dynamic"),
    ("needs_mask", [(1, 2, 4)], {},
     "forward() needs argument 'mask', which was not given: add an input for it (--input-shape "
     "mask:DIMS[:DTYPE], or an array named mask in --inputs)"),
    ("needs_mask", [InputSpec((1, 2, 4), "x"), InputSpec((1, 2, 4), "mask_"), ], {},
     "forward() has no argument 'mask_' (it takes x, mask, scale): name the inputs after "
     "forward's arguments"),
    ("functional_bn", [(1, 3, 4, 4), (1, 3)], {},
     "2 inputs given but forward() takes 1 (x): give one input per forward argument"),
    ("uses_vdot", [(1, 3, 6, 6)], {},
     "torch's ONNX exporter (TorchScript, opset 17) has no ONNX form for aten::vdot: replace it "
     "in the model with supported operations, or register one with "
     "torch.onnx.register_custom_op_symbolic"),
    ("detector", [(1, 3, 8, 8)], {"dynamic": (("image", 2, None),)},
     "--dynamic names input 'image', which is not one of x: use an input name"),
    ("two_inputs", [(2, 3, 8, 8), (2, 5)], {"output_names": ["a"]},
     "1 output names given for 2 outputs (score, map): give one --output-name per output"),
])
def test_refusals_name_the_real_cause(name, inputs, options, message, tmp_path, capfd):
    path = tmp_path / "x.onnx"
    with pytest.raises(BnfoldError) as info:
        export_onnx(getattr(user_models, name)(), inputs, str(path), **options)
    assert str(info.value) == message
    assert not path.exists()
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""  # no TorchScript IR, no torch warnings


def test_the_callers_model_is_untouched(tmp_path):
    model = user_models.old_weight_norm_conv()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, (1, 3, 8, 8), str(tmp_path / "w.onnx"))
    assert hasattr(model[0], "weight_g") and model[0]._forward_pre_hooks
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        model(torch.zeros(1, 3, 8, 8))  # still runs with its hook


def test_notes_say_what_was_adapted(tmp_path):
    result = export_onnx(user_models.data_parallel(), (1, 3, 8, 8), str(tmp_path / "d.onnx"))
    assert result.notes == ["unwrapped DataParallel: exporting its .module"]
    result = export_onnx(user_models.aux_head(), (1, 3, 6, 6), str(tmp_path / "a.onnx"))
    assert result.notes == ["1 BatchNorm module(s) not called by the eval forward (aux.1): "
                            "not in the export"]
    assert (result.bn_modules, result.bn_calls) == (1, 2)
    result = export_onnx(user_models.input_statistics(), (2, 3, 6, 6), str(tmp_path / "i.onnx"))
    assert result.notes == ["1 BatchNormalization node(s) (/BatchNormalization) get statistics "
                            "computed from the inputs (F.batch_norm on tensors derived from "
                            "them): exported as torch runs them, but they cannot be folded; pass "
                            "constant statistics (buffers) to fold them"]
    for factory in (user_models.constant_statistics, user_models.computed_statistics):
        assert export_onnx(factory(), (1, 3, 6, 6), str(tmp_path / "c.onnx")).notes == []
    result = export_onnx(user_models.spectral_norm_conv(), (1, 3, 8, 8), str(tmp_path / "s.onnx"))
    assert result.notes == ["made 1 parametrized weight(s) permanent on the exported copy "
                            "(0.weight)"]
