"""`verify --locate`: the first tensor where a candidate leaves the reference, on ONNX Runtime
and on an engine whose fusions hide the difference once everything is marked; and an engine
that is not repeatable run to run."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

import golden
from bnfold.cli import cli
from bnfold.folding.api import fold
from bnfold.onnxio.files import save_model
from bnfold.verification.runs import verify


def _chain() -> onnx.ModelProto:
    """x → Conv → BN (y1) → Relu (r1) → Conv → BN (y2) → Relu (z); folded, y1 and y2 are made
    by the Convs."""
    rng = golden.rng(5)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
             golden.bn_node("c1", "y1", prefix="bn1", name="bn1"),
             helper.make_node("Relu", ["y1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             golden.bn_node("c2", "y2", prefix="bn2", name="bn2"),
             helper.make_node("Relu", ["y2"], ["z"], name="relu2")]
    weights = [golden.tensor("w1", rng.normal(size=(4, 3, 3, 3))),
               golden.tensor("w2", rng.normal(size=(4, 4, 3, 3)) * 0.3),
               *golden.bn_params("bn1", 4, seed=2), *golden.bn_params("bn2", 4, seed=3)]
    return golden.model(nodes, [("x", [1, 3, 8, 8])], [("z", None)], weights)


def _perturbed(model: onnx.ModelProto, conv: str) -> onnx.ModelProto:
    """`model` with one weight of Conv `conv` off by 0.5."""
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    node = next(n for n in broken.graph.node if n.name == conv)
    init = next(t for t in broken.graph.initializer if t.name == node.input[1])
    weight = numpy_helper.to_array(init).copy()
    weight.reshape(-1)[0] += 0.5
    init.CopyFrom(numpy_helper.from_array(weight, init.name))
    return broken


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("locate")
    original = _chain()
    folded = fold(original).model
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Relu", "Conv", "Relu"]
    paths = {"original": original, "folded": folded,
             "wrong1": _perturbed(folded, "conv1"), "wrong2": _perturbed(folded, "conv2")}
    for name, model in paths.items():
        save_model(model, str(folder / f"{name}.onnx"))
    return {name: str(folder / f"{name}.onnx") for name in paths}


@pytest.mark.parametrize("wrong,tensor,conv,inputs", [
    ("wrong1", "y1", "conv1", [("x", "graph input"), ("w1", "weight")]),
    ("wrong2", "y2", "conv2", [("r1", "agrees"), ("w2", "weight")]),
])
def test_names_the_first_tensor_that_differs_and_the_nodes_that_make_it(files, wrong, tensor,
                                                                      conv, inputs):
    result = verify(files["original"], files[wrong], locate=True, ground_truth=False)
    assert not result.ok
    located = result.located
    assert located["method"] == "every shared tensor marked"
    assert located["compared"] == 4  # y1, r1, y2, z: c1 and c2 are folded away
    first = located["first"]
    assert first["tensor"] == tensor
    assert first["reference_node"]["op_type"] == "BatchNormalization"
    assert first["candidate_node"] == {"name": conv, "op_type": "Conv"}
    assert [(i["name"], i["status"]) for i in first["inputs"]][:1] == inputs[:1]
    assert first["metrics"]["max_rel_error"] > 1e-3
    # every tensor downstream differs too, listed in node order
    names = [m["name"] for m in located["listed"]]
    assert names == ["y1", "r1", "y2", "z"][["y1", "r1", "y2", "z"].index(tensor):]
    assert located["note"] in result.notes


def test_a_correct_fold_has_nothing_to_locate(files):
    result = verify(files["original"], files["folded"], locate=True, ground_truth=False)
    assert result.ok and result.located is None
    assert "the models agree: --locate had nothing to look for" in result.notes


def test_cli_locate_prints_the_first_tensor_and_without_it_says_how(files, tmp_path):
    runner = CliRunner()
    plain = runner.invoke(cli, ["verify", files["original"], files["wrong2"]],
                          prog_name="bnfold")
    assert plain.exit_code == 1, plain.output
    assert "rerun with --locate" in plain.output
    report = tmp_path / "r.json"
    run = runner.invoke(cli, ["verify", files["original"], files["wrong2"], "--locate",
                              "--json", str(report)], prog_name="bnfold")
    assert run.exit_code == 1, run.output
    text = " ".join(run.output.split())
    assert "first tensor to differ on ONNX Runtime (input set 1): 'y2'" in text
    assert "its input 'r1' agrees" in text
    assert "then: z " in text
    assert "Traceback" not in run.output and "rerun with --locate" not in run.output
    assert json.loads(report.read_text())["located"]["first"]["tensor"] == "y2"


class FusingEngine:
    """ORT on the CPU, except that tensor y2 comes out 1% off while the model is compiled in a
    way `exact` refuses: an engine whose fusion computes y2 differently unless marking the
    tensors around it stops the fusion."""

    name = "fusing"
    exact = staticmethod(lambda outputs: "r1" in outputs)  # marking r1 stops the fusion

    def __init__(self, options):
        from bnfold.deploy.engines.ort import OrtCpuEngine

        self._inner, self.notes = OrtCpuEngine(options), []

    def open(self, label, model, feed):
        if isinstance(model, bytes):
            model = onnx.load_from_string(model)
        elif not isinstance(model, onnx.ModelProto):
            model = onnx.load(model)
        if not self.exact({o.name for o in model.graph.output}):
            model = _scaled(model, "y2", 1.01)
        return self._inner.open(label, model.SerializeToString(), feed)

    def environment(self):
        return {}


class MarkingEngine(FusingEngine):
    """y2 is 1% off unless every shared tensor is an output: bisection finds y2, and its inputs
    marked beside it leave it off (the node itself differs)."""

    name = "marking"
    exact = staticmethod(lambda outputs: len(outputs) >= 4)


def _scaled(model: onnx.ModelProto, tensor: str, factor: float) -> onnx.ModelProto:
    scaled = onnx.ModelProto()
    scaled.CopyFrom(model)
    producer = next(n for n in scaled.graph.node if tensor in n.output)
    producer.output[list(producer.output).index(tensor)] = tensor + "_exact"
    scaled.graph.initializer.append(numpy_helper.from_array(np.float32(factor), "factor"))
    scaled.graph.node.append(helper.make_node("Mul", [tensor + "_exact", "factor"], [tensor]))
    return _sorted(scaled)


def _sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """Nodes in topological order (the appended Mul must run before y2's consumers)."""
    nodes, ready = list(model.graph.node), {i.name for i in model.graph.input} | {
        t.name for t in model.graph.initializer}
    ordered = []
    while nodes:
        node = next(n for n in nodes if all(i in ready for i in n.input if i))
        nodes.remove(node)
        ordered.append(node)
        ready.update(node.output)
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    return model


@pytest.mark.parametrize("engine,verdict", [("fusing", "fusion"), ("marking", "node")])
def test_on_an_engine_whose_fusion_hides_under_marking_bisection_names_the_node(
        monkeypatch, files, engine, verdict):
    from bnfold.deploy import engines

    cls = {"fusing": "FusingEngine", "marking": "MarkingEngine"}[engine]
    monkeypatch.setitem(engines.ENGINES, engine, (__name__, cls, "test"))
    result = verify(files["original"], files["folded"], engine=engine, locate=True,
                    ground_truth=False)
    assert not result.ok
    located = result.located
    assert located["method"] == "one tensor marked at a time"
    assert located["first"]["tensor"] == "y2"
    assert located["first"]["candidate_node"] == {"name": "conv2", "op_type": "Conv"}
    assert located["verdict"] == verdict
    assert 0.009 < located["first"]["metrics"]["max_rel_error"] < 0.011
    # the output alone, then a bisection of 4 ancestors, then y2 with its input r1
    assert located["engine_runs"] <= 5
    note = " ".join(located["note"].split())
    assert note.startswith(f"with every shared tensor marked as an output the outputs agree on "
                           f"{engine} (marking stops fusion)")
    if verdict == "fusion":
        assert "it agrees once its input 'r1' is marked too: a fusion fusing makes" in note
    else:
        assert "still differs with its input 'r1' marked and agreeing: marking computes" in note


class FlickeringEngine(FusingEngine):
    """Each run of a session comes out a little further off: an engine that is not repeatable."""

    name = "flickering"

    def open(self, label, model, feed):
        session = self._inner.open(label, model, feed)
        exact, runs = session.outputs, [0]

        def outputs(feed=None):
            runs[0] += 1
            return {n: v * np.float32(1 + 1e-3 * runs[0]) for n, v in exact(feed).items()}

        session.outputs = outputs
        return session


def test_an_engine_that_is_not_repeatable_is_named(monkeypatch, files):
    from bnfold.deploy import engines

    monkeypatch.setitem(engines.ENGINES, "flickering", (__name__, "FlickeringEngine", "test"))
    result = verify(files["original"], files["folded"], engine="flickering", ground_truth=False)
    assert not result.ok
    drift = result.engine["run_to_run"]["z"]
    assert 5e-4 < drift["max_rel_error"] < 2e-3
    assert any(n.startswith("the candidate's outputs on flickering change from run to run: the "
                            "same input set run twice in one session gives z ") for n in
               result.notes)
    repeatable = verify(files["original"], files["folded"], engine="ort-cpu", ground_truth=False)
    assert repeatable.ok and repeatable.engine["run_to_run"] == {}


def test_a_candidate_folder_that_refuses_scratch_files_falls_back_to_the_system_one(
        monkeypatch, files):
    """`bnfold verify` may be given models in a read-only folder: the marked copies go to the
    system's temporary folder instead of failing with a traceback."""
    import tempfile

    made = []
    real = tempfile.TemporaryDirectory

    def refusing(*args, dir=None, **kwargs):
        if dir is not None:
            raise PermissionError(13, "Permission denied", dir)
        made.append(kwargs.get("prefix"))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryDirectory", refusing)
    result = verify(files["original"], files["wrong2"], locate=True, ground_truth=False)
    assert result.located["first"]["tensor"] == "y2"
    assert made == [".bnfold-locate-"]


def test_bench_warns_of_an_engine_that_is_not_repeatable(monkeypatch, files):
    from bnfold.deploy import engines
    from bnfold.deploy.bench import bench_models, warnings_for

    monkeypatch.setitem(engines.ENGINES, "flickering", (__name__, "FlickeringEngine", "test"))
    result = bench_models([("folded", files["folded"])], "flickering", runs=3, min_time=0,
                          warmup_time=0, reference=files["original"])
    check = result.models[0].check
    assert not check.ok and 5e-4 < check.run_to_run["z"]["max_rel_error"] < 2e-3
    warnings = warnings_for(result)
    assert any(w.startswith("folded: outputs on flickering change from run to run (the same "
                            "input twice: z ") for w in warnings)
    assert any("`bnfold verify REFERENCE MODEL --engine flickering --locate` finds where" in w
               for w in warnings)


def test_the_engine_search_stops_at_its_budget_and_says_where(monkeypatch, files):
    from bnfold.deploy import engines
    from bnfold.verification import locate

    monkeypatch.setitem(engines.ENGINES, "fusing", (__name__, "FusingEngine", "test"))
    monkeypatch.setattr(locate, "MAX_PROBES", 3)  # all marked, the output, one bisection step
    result = verify(files["original"], files["folded"], engine="fusing", locate=True,
                    ground_truth=False)
    assert result.located["first"] is None
    assert "the search stopped after 3 engine runs at " in result.located["note"]
