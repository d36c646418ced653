"""`--locate` in bounded memory: inner tensors marked a group at a time, sized by shape
inference at the input set's shapes, with the same answers as marking them all at once."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import golden
from bnfold.verification import marked_values
from bnfold.verification.marked_values import estimated_sizes, plan_groups
from bnfold.verification.runs import verify
from test_locate import _chain, files  # noqa: F401 (files: a fixture)

TENSORS = ["y1", "r1", "y2", "z"]  # what both the chain and its fold compute, 1×4×8×8 each


def test_sizes_come_from_shape_inference_at_the_feed_shapes():
    model = _chain()
    sizes = estimated_sizes(model, {"x": np.zeros((2, 3, 8, 8), np.float32)})
    assert {name: sizes[name] for name in ["c1", *TENSORS]} == {
        name: 2 * 4 * 8 * 8 * 4 for name in ["c1", *TENSORS]}
    # two tensors per run at 2 KiB
    assert plan_groups(model, {"x": np.zeros((1, 3, 8, 8), np.float32)}, TENSORS, 2048) == [
        ["y1", "r1"], ["y2", "z"]]
    assert plan_groups(model, {"x": np.zeros((1, 3, 8, 8), np.float32)}, TENSORS) == [TENSORS]


def test_a_tensor_of_unknown_size_counts_as_the_largest_known():
    """NonZero's output size depends on the values: inference cannot know it."""
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("NonZero", ["a"], ["n"]),
             helper.make_node("Cast", ["n"], ["f"], to=onnx.TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["f"], ["s"], keepdims=0)]
    model = golden.model(nodes, [("x", ["N", 16])], [("s", None)], [])
    feed = {"x": np.ones((4, 16), np.float32)}
    sizes = estimated_sizes(model, feed)
    assert sizes["a"] == 4 * 16 * 4 and sizes["n"] is None and sizes["f"] is None
    assert sizes["s"] == 4  # a float32 scalar
    assert plan_groups(model, feed, ["a", "n", "f", "s"], 260) == [["a"], ["n"], ["f", "s"]]


@pytest.mark.parametrize("budget,runs", [(1500, 4), (2100, 2)])
def test_marking_in_groups_names_what_marking_all_does(monkeypatch, files, budget, runs):
    whole = verify(files["original"], files["wrong1"], locate=True, ground_truth=False).located
    monkeypatch.setattr(marked_values, "GROUP_BYTES", budget)
    grouped = verify(files["original"], files["wrong1"], locate=True, ground_truth=False).located
    assert whole["method"] == "every shared tensor marked"
    assert grouped["method"].startswith(f"every shared tensor marked, in {runs} runs of up to ")
    for key in ("first", "listed", "compared", "differing", "note"):
        assert grouped[key] == whole[key], key
    assert grouped["first"]["tensor"] == "y1" and grouped["compared"] == 4


def test_values_let_go_are_computed_again(monkeypatch, files, tmp_path):
    """With nothing kept between runs, each comparison runs the reference for its own tensors:
    the bisection on an engine and the repro piece still get every value they read."""
    from bnfold.deploy import engines

    monkeypatch.setitem(engines.ENGINES, "fusing", ("test_locate", "FusingEngine", "test"))
    monkeypatch.setattr(marked_values, "CACHE_BYTES", 0)
    calls = []
    real = marked_values.ReferenceValues._run

    def counted(self, index, names):
        calls.append(list(names))
        return real(self, index, names)

    monkeypatch.setattr(marked_values.ReferenceValues, "_run", counted)
    result = verify(files["original"], files["folded"], engine="fusing", repro=str(tmp_path / "r"),
                    ground_truth=False)
    assert result.located["verdict"] == "fusion" and result.located["first"]["tensor"] == "y2"
    assert calls[0] == TENSORS  # step 1: all at once
    assert len(calls) > 3 and all(len(names) <= 3 for names in calls[1:])  # then their own
    assert result.located["repro"]["written"]
    assert (tmp_path / "r" / "test_data_set_0" / "output_0.pb").exists()


def test_on_an_engine_groups_mark_less_and_may_locate_without_bisecting(monkeypatch, files):
    """Marking one group leaves the rest free to fuse: the fusing engine's y2 then differs in
    step 1 already (r1, in another group, is not marked), which names y2 directly."""
    from bnfold.deploy import engines

    monkeypatch.setitem(engines.ENGINES, "fusing", ("test_locate", "FusingEngine", "test"))
    monkeypatch.setattr(marked_values, "GROUP_BYTES", 1500)
    located = verify(files["original"], files["folded"], engine="fusing", locate=True,
                     ground_truth=False).located
    assert located["method"].startswith("every shared tensor marked, in 4 runs")
    assert located["first"]["tensor"] == "y2"
    assert [i["status"] for i in located["first"]["inputs"]][0] == "agrees"  # r1
