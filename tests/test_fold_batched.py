"""The vectorised Conv→BN pass (bnfold.folding.batched) must give exactly what the rules give
pair by pair: the same graph, the same bytes in every tensor, the same report, and leave every
pair it does not take to the rules (which fold it another way or say why not)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import bnfold
from bnfold.folding import batched
from golden import assert_same_outputs, bn_node, bn_params, count_ops, model, rng, tensor

C = 4


def chain(count: int, *, bias_every: int = 2, edits=None) -> onnx.ModelProto:
    """`count` × (Conv 3x3 → BN → Relu), every `bias_every`-th Conv with a bias; `edits(i,
    nodes, inits)` may change pair i."""
    nodes, inits, x = [], [], "x"
    for i in range(count):
        w = rng(10 + i).standard_normal((C, C, 3, 3)).astype(np.float32) * 0.3
        inits.append(tensor(f"w{i}", w))
        conv_inputs = [x, f"w{i}"]
        if i % bias_every == 0:
            inits.append(tensor(f"b{i}", rng(50 + i).normal(0, 0.1, C)))
            conv_inputs.append(f"b{i}")
        nodes.append(helper.make_node("Conv", conv_inputs, [f"c{i}"], name=f"conv{i}",
                                      pads=[1, 1, 1, 1]))
        inits.extend(bn_params(f"bn{i}", C, seed=100 + i))
        nodes.append(bn_node(f"c{i}", f"n{i}", prefix=f"bn{i}", name=f"bn{i}"))
        nodes.append(helper.make_node("Relu", [f"n{i}"], [f"r{i}"], name=f"relu{i}"))
        if edits is not None:
            edits(i, nodes, inits)
        x = nodes[-1].output[0]
    return model(nodes, [("x", [1, C, 6, 6])], [(x, [1, C, 6, 6])], inits)


def folded_both_ways(m: onnx.ModelProto, monkeypatch):
    batched_result = bnfold.fold(m)
    with monkeypatch.context() as patch:
        patch.setattr(batched, "_MIN_PAIRS", 10**9)
        rules_result = bnfold.fold(m)
    return batched_result, rules_result


def canonical(m: onnx.ModelProto):
    """The model with initializers (and their IR<4 input listings) compared as sets: the
    batched pass adds new biases in another order."""
    m2 = onnx.ModelProto()
    m2.CopyFrom(m)
    inits = sorted((t.name, t.SerializeToString()) for t in m2.graph.initializer)
    del m2.graph.initializer[:]
    return m2.SerializeToString(), inits


def report_rows(result):
    """Every entry, in the report's order (which the batched pass must not change)."""
    return [(e.node, e.status, e.rule, e.into, tuple(e.reasons)) for e in result.report.entries]


@pytest.mark.parametrize("chunk, largest, computed", [
    (1 << 20, 16384, [12]),  # one chunk
    (300, 16384, [3] * 4),  # each weight has 144 values: a chunk closes at the third
    (1 << 20, 100, []),  # weights over the limit: all left to the rules
], ids=["one-chunk", "chunks-of-3", "weights-too-large"])
def test_plain_chain_is_bit_identical_to_the_rules(chunk, largest, computed, monkeypatch):
    m = chain(12)
    monkeypatch.setattr(batched, "_CHUNK_VALUES", chunk)
    monkeypatch.setattr(batched, "_MAX_WEIGHT_VALUES", largest)
    sizes = []
    compute = batched._compute
    monkeypatch.setattr(batched, "_compute", lambda pairs: sizes.append(len(pairs)) or compute(pairs))
    fast, slow = folded_both_ways(m, monkeypatch)
    assert sizes == computed
    assert fast.report.folded_count == 12
    assert count_ops(fast.model, "BatchNormalization") == 0
    assert canonical(fast.model) == canonical(slow.model)
    assert report_rows(fast) == report_rows(slow)
    onnx.checker.check_model(fast.model)
    feed = {"x": rng(3).standard_normal((1, C, 6, 6)).astype(np.float32)}
    assert_same_outputs(m, fast.model, feed)


def _negative_var(i, nodes, inits):
    if i == 3:
        var = next(t for t in inits if t.name == "bn3_var")
        var.CopyFrom(tensor("bn3_var", [-2.0, 1.0, 1.0, 1.0]))


def _huge_weight(i, nodes, inits):
    if i == 5:
        w = next(t for t in inits if t.name == "w5")
        w.CopyFrom(tensor("w5", np.full((C, C, 3, 3), 3e36)))


def _bn_before_conv(i, nodes, inits):
    if i == 6:  # conv6 is fed by a BN, which may fold into its input side (bn-conv)
        conv = nodes[-3]
        nodes.insert(len(nodes) - 3, bn_node(conv.input[0], "pre6", prefix="pre6", name="pre6"))
        inits.extend(bn_params("pre6", C, seed=7))
        conv.input[0] = "pre6"


def _identity_between(i, nodes, inits):
    if i == 8:  # Conv → Identity → BN (paddle2onnx): the rules look through it
        nodes.insert(len(nodes) - 2, helper.make_node("Identity", ["c8"], ["c8_id"], name="id8"))
        nodes[-2].input[0] = "c8_id"


def _shared_weight(i, nodes, inits):
    if i == 9:  # conv9 reuses w1: the fold must give conv9 a copy
        nodes[-3].input[1] = "w1"


def _stored_other_ways(i, nodes, inits):
    """Constants the pass cannot read as plain float32 bytes, and BN attributes beyond
    epsilon: each pair must still come out as the rules make it."""
    def replace(name, make):
        found = next(t for t in inits if t.name == name)
        found.CopyFrom(make(onnx.numpy_helper.to_array(found)))

    if i == 0:  # the bias from a Constant node
        found = next(t for t in inits if t.name == "b0")
        inits.remove(found)
        nodes.insert(0, helper.make_node("Constant", [], ["b0"], value=found))
    elif i == 1:
        nodes[-2].attribute.extend([helper.make_attribute("epsilon", 1e-3),
                                    helper.make_attribute("momentum", 0.9)])
    elif i == 2:  # typed float_data, not raw bytes
        replace("bn2_mean", lambda v: helper.make_tensor("bn2_mean", TensorProto.FLOAT,
                                                         v.shape, v.tolist()))
    elif i == 4:
        replace("b4", lambda v: helper.make_tensor("b4", TensorProto.FLOAT, v.shape, v.tolist()))
    elif i == 7:  # training_mode=0, the default: read the general way, folded all the same
        nodes[-2].attribute.extend([helper.make_attribute("training_mode", 0)])
    elif i == 10:  # a BN parameter from a Constant node
        found = next(t for t in inits if t.name == "bn10_scale")
        inits.remove(found)
        nodes.insert(len(nodes) - 3, helper.make_node("Constant", [], ["bn10_scale"],
                                                      value=found))
    elif i == 11:  # batch statistics: the rules refuse it
        nodes[-2].attribute.extend([helper.make_attribute("momentum", 0.9),
                                    helper.make_attribute("training_mode", 1)])
        nodes[-2].output.extend(["bn11_running_mean", "bn11_running_var"])


@pytest.mark.parametrize("edit", [_negative_var, _huge_weight, _bn_before_conv,
                                  _identity_between, _shared_weight, _stored_other_ways])
def test_pairs_the_pass_leaves_go_to_the_rules_with_the_same_outcome(edit, monkeypatch):
    m = chain(12, edits=edit)
    computed = []
    compute = batched._compute
    monkeypatch.setattr(batched, "_compute",
                        lambda pairs: computed.extend(p.bn for p in pairs) or compute(pairs))
    fast, slow = folded_both_ways(m, monkeypatch)
    assert canonical(fast.model) == canonical(slow.model)
    assert report_rows(fast) == report_rows(slow)
    onnx.checker.check_model(fast.model)
    feed = {"x": rng(3).standard_normal((1, C, 6, 6)).astype(np.float32)}
    if edit not in (_huge_weight, _negative_var):  # the original's own outputs are inf/NaN
        assert_same_outputs(m, fast.model, feed)
    if edit is _stored_other_ways:  # every pair but the refused one, taken by the pass
        assert len(computed) == 11
        assert fast.report.folded_count == 11
        assert [e.node for e in fast.report.kept] == ["bn11"]


def test_refused_pair_keeps_its_reason():
    m = chain(10, edits=_negative_var)
    report = bnfold.fold(m).report
    kept = {e.node: e.reasons for e in report.kept}
    assert list(kept) == ["bn3"]
    assert "var+epsilon is not positive" in kept["bn3"][0]
    assert report.folded_count == 9


def test_float16_weights_are_left_to_the_rules(monkeypatch):
    m = chain(9)
    for t in m.graph.initializer:  # the whole model in float16
        t.CopyFrom(tensor(t.name, onnx.numpy_helper.to_array(t), np.float16))
    for value in (*m.graph.input, *m.graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    fast, slow = folded_both_ways(m, monkeypatch)
    assert fast.report.folded_count == 9
    assert canonical(fast.model) == canonical(slow.model)


def test_fold_pauses_the_garbage_collector_only_while_it_runs(tmp_path):
    import gc

    assert gc.isenabled()
    bnfold.fold(chain(2))
    assert gc.isenabled()
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(bnfold.BnfoldError):
        bnfold.fold_file(tmp_path / "bad.onnx", tmp_path / "o.onnx")
    assert gc.isenabled()
    gc.disable()  # a caller that turned it off keeps it off
    try:
        bnfold.fold(chain(2))
        assert not gc.isenabled()
    finally:
        gc.enable()
