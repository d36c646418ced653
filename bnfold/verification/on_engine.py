"""Verify what is deployed: a candidate run on an engine against the ONNX reference.

The reference always runs in ONNX Runtime on the CPU with graph optimisation off (the same
session, inputs and shape ladder as plain `bnfold verify`); the candidate runs on the chosen
engine through the same `Session` that `bnfold bench` times (`session.outputs(feed)`). The two
never coexist: the reference's outputs are kept and its session dropped first.

Tolerances follow the precision the engine reports (`session.precision`, read from TensorRT's
inspector, OpenVINO's compiled model, the graph's own types for ORT), not the one requested:
an fp16 engine is judged with fp16 tolerances, calibrated against the model's own float32
noise as in plain verify, and the result says which precision and tolerance applied.

As in plain verify, the candidate's outputs must be the reference's (none missing, none
extra), and its runs are bounded by the same timeout where the engine can stop a run (ORT,
OpenVINO: `EngineOptions.run_timeout`); TensorRT and torch cannot, and the result notes it.

    >>> verify("model.onnx", "model.folded.onnx", engine="openvino").engine["precision"]
    'float32'
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from bnfold.verification.comparison import (
    OutputMetrics,
    blind_note,
    blind_outputs,
    coarser_precision,
    compare,
    default_tolerance,
)
from bnfold.deploy.engines import PRECISIONS, EngineOptions, get_engine
from bnfold.errors import BnfoldError
from bnfold.verification.model_sources import load_source

# Engines whose runs cannot be interrupted from the host (EngineOptions.run_timeout).
UNBOUNDED_ENGINES = {
    "trt": "TensorRT has no way to stop an enqueued run",
    "torch": "PyTorch cannot interrupt a forward",
}


@dataclass
class OutputCheck:
    """One model's outputs on an engine against the reference, before it is timed."""

    label: str
    ok: bool
    precision: str  # the compute precision read from the engine
    tolerance_precision: str  # whose tolerance judged it
    outputs: list[OutputMetrics] = field(default_factory=list)
    problem: str = ""  # why no comparison was possible (interface mismatch)
    # outputs that differ between two runs of the same input on this session (run_to_run)
    run_to_run: dict = field(default_factory=dict)

    @property
    def worst(self) -> OutputMetrics | None:
        failing = [m for m in self.outputs if not m.ok]
        pool = failing or self.outputs
        return max(pool, key=lambda m: m.max_rel_error) if pool else None

    def summary(self) -> str:
        if self.problem:
            return self.problem
        worst = self.worst
        if worst is None:
            return "no outputs"
        verdict = "within" if worst.ok else "exceeds"
        return (f"{worst.name}: max abs err {worst.max_abs_error:.3g} {verdict} tolerance "
                f"{worst.tolerance:.3g} ({self.tolerance_precision})")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["summary"] = self.summary()
        return data


def verify_on_engine(reference, candidate, engine: str, *, inputs=None, seed: int = 0,
                     runs: int = 1, atol=None, rtol=None, shapes=None, ground_truth=None,
                     timeout=None, options: EngineOptions | None = None,
                     tolerance_precision: str | None = None, torch_checkpoint: str | None = None,
                     locate: bool = False, repro: str | None = None):
    """`bnfold verify REFERENCE CANDIDATE --engine ENGINE` (see bnfold.verification.runs.verify)."""
    from bnfold.verification.ground_truth import record_ground_truth
    from bnfold.verification.ort_runner import OrtRunner
    from bnfold.verification.runs import (
        VerifyResult,
        _feeds,
        judge_outputs,
        locate_into,
        weight_precision,
    )

    _check_precision_name(tolerance_precision)
    ref_model, ref_payload = load_source(reference)
    from bnfold.verification.float64_check import ORT_MIN_OPSET, opset_before_ort

    old_opset = opset_before_ort(ref_model)
    if old_opset is not None:
        raise BnfoldError(
            f"--engine judges the candidate against the reference run in ONNX Runtime, which "
            f"runs opset {ORT_MIN_OPSET} and later; this model is opset {old_opset}: verify it "
            f"without --engine (in float64), or against a test case's stored outputs")
    candidate = _vetted_candidate(candidate, engine)
    runner = OrtRunner(timeout)
    session = runner.session(ref_payload, "reference")
    feeds, notes = _feeds(ref_model, session, runner, inputs, seed, runs, shapes)
    ref_outputs = [runner.run(session, feed, "reference") for feed in feeds]
    del session  # the reference's session goes before the engine loads the candidate
    run = run_candidate(candidate, engine, options, feeds, timeout, torch_checkpoint, notes,
                        list(ref_outputs[0]))
    backend, cand_outputs, precision = run.backend, run.outputs, run.precision
    _check_outputs_match(ref_outputs[0], cand_outputs[0])
    drift = run_to_run(cand_outputs[0], run.again)
    # A model whose weights are float16 computes in float16 on any engine.
    judged_as = tolerance_precision or coarser_precision(precision.compute,
                                                         weight_precision(ref_model))
    metrics = judge_outputs(runner, ref_payload, feeds, ref_outputs, cand_outputs, atol, rtol,
                            judged_as)
    blind = blind_outputs(metrics)
    if blind:
        notes.append(blind_note(blind))
    result = VerifyResult(all(m.ok for m in metrics), metrics, len(feeds), seed, notes=notes,
                          shapes={k: list(v.shape) for k, v in feeds[0].items()})
    result.engine = _engine_record(backend, precision, judged_as, tolerance_precision, atol, rtol,
                                   ref_outputs[0])
    result.engine["run_to_run"] = drift
    if drift:
        result.notes.append(drift_note(engine, drift))
    if not result.ok and _reference_runs_there(engine, candidate):
        record, note = _reference_on_engine(backend, runner, ref_payload, feeds, ref_outputs,
                                            cand_outputs, atol, rtol, judged_as)
        result.engine["reference_on_engine"] = record
        result.notes.append(note)
    if locate and not result.ok and not _reference_runs_there(engine, candidate):
        result.notes.append(f"--locate needs an ONNX candidate: the tensors inside "
                            f"{'a PyTorch module' if engine == 'torch' else 'a built engine'} "
                            f"cannot be marked as outputs")
    elif locate:
        locate_into(result, reference, candidate, feeds, runner, atol, rtol, judged_as, backend,
                    repro)
    record_ground_truth(result, reference, ref_model, ground_truth, feeds[0], ref_outputs[0],
                  cand_outputs[0])
    return result


@dataclass
class EngineRun:
    backend: object
    outputs: list[dict]  # per feed
    again: dict  # the first feed's outputs once more: is the engine repeatable?
    precision: object  # the engine's Precision


def run_candidate(candidate, engine: str, options, feeds, timeout, checkpoint, notes: list,
                  output_names: list[str]) -> EngineRun:
    """The vetted `candidate` opened on `engine` and run on each feed; `notes` gets what the
    timeout cannot bound and torch's fusions. `output_names` name a torch module's outputs."""
    # The candidate's runs get the reference's bound where the engine can interrupt a run.
    backend = get_engine(engine, replace(options or EngineOptions(), run_timeout=timeout))
    if timeout and engine in UNBOUNDED_ENGINES:
        notes.append(f"the candidate's runs on {engine} are not bounded by the {timeout:g} s "
                     f"timeout: {UNBOUNDED_ENGINES[engine]}")
    if engine == "torch" and isinstance(candidate, str):
        from bnfold.deploy.engines.torch_engine import fused_candidate

        candidate, fusion_notes = fused_candidate(candidate, checkpoint, feeds[0])
        notes += fusion_notes
    opened = backend.open("the candidate", candidate, feeds[0])
    try:
        if hasattr(opened, "output_names") and opened.output_names is None:
            opened.output_names = list(output_names)  # torch: outputs in export order
        outputs = [opened.outputs(feed) for feed in feeds]
        return EngineRun(backend, outputs, opened.outputs(feeds[0]), opened.precision)
    finally:
        opened.close()


def drift_note(engine: str, drift: dict) -> str:
    """What run_to_run found, for the report."""
    name = max(drift, key=lambda n: drift[n]["max_rel_error"])
    return (f"the candidate's outputs on {engine} change from run to run: the same input set "
            f"run twice in one session gives {name} {drift[name]['max_abs_error']:.3g} apart "
            f"({drift[name]['max_rel_error']:.3g} scale-relative); {engine} is not repeatable "
            f"on this model, so no comparison with it is finer than that")


def check_sessions(reference, sessions, feed: dict, timeout: float | None = None,
                   tolerance_precision: str | None = None) -> list[OutputCheck]:
    """Each open session's outputs on `feed` against `reference` (an ONNX model) run by ORT on
    the CPU with optimisation off: what `bnfold bench` does once before timing."""
    from bnfold.verification.ort_runner import OrtRunner
    from bnfold.verification.runs import judge_outputs, weight_precision

    _check_precision_name(tolerance_precision)
    ref_model, ref_payload = load_source(reference)
    weights = weight_precision(ref_model)
    runner = OrtRunner(timeout)
    session = runner.session(ref_payload, "reference")
    ref_outputs = [runner.run(session, feed, "reference")]
    del session
    checks = []
    for opened in sessions:
        precision = opened.precision.compute
        judged_as = tolerance_precision or coarser_precision(precision, weights)
        outputs = opened.outputs()
        drift = run_to_run(outputs, opened.outputs())
        try:
            _check_outputs_match(ref_outputs[0], outputs)
        except BnfoldError as exc:
            checks.append(OutputCheck(opened.label, False, precision, judged_as, [], str(exc),
                                      drift))
            continue
        metrics = judge_outputs(runner, ref_payload, [feed], ref_outputs, [outputs], None, None,
                                judged_as)
        checks.append(OutputCheck(opened.label, all(m.ok for m in metrics), precision,
                                  judged_as, metrics, run_to_run=drift))
    return checks


def _reference_runs_there(engine: str, candidate) -> bool:
    """Whether the reference can run where the candidate failed: an ONNX candidate (a TensorRT
    engine file carries build settings the reference would not get; torch runs a module)."""
    if engine == "torch":
        return False
    if isinstance(candidate, (str, os.PathLike)):
        from bnfold.deploy.engines.trt import ENGINE_SUFFIXES

        return not os.fspath(candidate).endswith(ENGINE_SUFFIXES)
    return True


def _reference_on_engine(backend, runner, ref_payload, feeds, ref_outputs, cand_outputs, atol,
                         rtol, judged_as) -> tuple[dict, str]:
    """After a candidate fails on an engine, the reference run there too, to say whose the
    difference is: the engine's (it computes the original model as differently from ONNX
    Runtime, and the candidate matches that run) or the candidate's (the original passes)."""
    from bnfold.verification.runs import judge_outputs

    name = backend.name
    try:
        opened = backend.open("the reference", ref_payload, feeds[0])
        try:
            orig_outputs = [opened.outputs(feed) for feed in feeds]
        finally:
            opened.close()
        _check_outputs_match(ref_outputs[0], orig_outputs[0])
    except BnfoldError as exc:
        return ({"error": str(exc)},
                f"the reference could not run on {name} to tell whose difference it is: {exc}")
    original = judge_outputs(runner, ref_payload, feeds, ref_outputs, orig_outputs, atol, rtol,
                             judged_as)
    versus = judge_outputs(runner, ref_payload, feeds, orig_outputs, cand_outputs, atol, rtol,
                           judged_as, noise_outputs=ref_outputs)
    reference_ok, matches = all(m.ok for m in original), all(m.ok for m in versus)
    if reference_ok:
        note = (f"the reference passes on {name} ({_worst_figure(original)}): the difference "
                f"comes with the candidate")
    elif matches:
        note = (f"the reference itself differs on {name} ({_worst_figure(original)} from ONNX "
                f"Runtime), and there the candidate matches it ({_worst_figure(versus)}): the "
                f"difference is {name}'s, not the candidate's")
    else:
        note = (f"the reference also differs on {name} ({_worst_figure(original)} from ONNX "
                f"Runtime), and there the candidate differs from it too "
                f"({_worst_figure(versus)})")
    record = {"reference_ok": reference_ok, "candidate_matches_reference": matches,
              "reference": [asdict(m) for m in original],
              "candidate_vs_reference": [asdict(m) for m in versus]}
    return record, note


def _worst_figure(metrics: list[OutputMetrics]) -> str:
    """'out: 0.0395 scale-relative' for the worst failing output (the worst one if none fails)."""
    pool = [m for m in metrics if not m.ok] or metrics
    if not pool:
        return "no outputs"
    worst = max(pool, key=lambda m: m.max_rel_error)
    return f"{worst.name}: {worst.max_rel_error:.3g} scale-relative"


def run_to_run(first: dict, second: dict) -> dict[str, dict[str, float]]:
    """Outputs that differ between two runs of the same input (an engine that is not
    repeatable: a race, or memory read before it is written), with how far apart they are."""
    drift = {}
    for name, value in first.items():
        a, b = np.asarray(value), np.asarray(second.get(name))
        if a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=(
                a.dtype.kind in "fc")):
            continue
        metrics = compare(name, a, b, 0.0, 0.0)
        drift[name] = {"max_abs_error": metrics.max_abs_error,
                       "max_rel_error": metrics.max_rel_error}
    return drift


def _check_precision_name(name: str | None) -> None:
    if name is not None and name not in PRECISIONS:
        raise BnfoldError(f"--tolerances {name!r}: choose one of {', '.join(PRECISIONS)}")


def _vetted_candidate(candidate, engine: str):
    """An ONNX candidate path is vetted by bnfold's loader (external data confined to its
    folder) before an engine reads it; TensorRT engine files and torch modules pass as they are."""
    if engine == "torch":
        if isinstance(candidate, os.PathLike) or (isinstance(candidate, str)
                                                   and candidate.endswith(".onnx")):
            raise BnfoldError("--engine torch runs a PyTorch module: give CANDIDATE as a model "
                              "SPEC (zoo name or module:factory, weights with --checkpoint)")
        return candidate
    if isinstance(candidate, (str, os.PathLike)):
        from bnfold.deploy.engines.trt import ENGINE_SUFFIXES

        path = os.fspath(candidate)
        if path.endswith(ENGINE_SUFFIXES):
            if engine != "trt":
                raise BnfoldError(f"{path!r} is a TensorRT engine file: verify it with --engine trt")
            if not os.path.isfile(path):
                raise BnfoldError(f"{path!r} does not exist: give a built engine file")
            return path
        load_source(path)
        return path
    if isinstance(candidate, (bytes,)) or type(candidate).__name__ == "ModelProto":
        return load_source(candidate)[0]
    return candidate  # a torch module


def _check_outputs_match(ref: dict, cand: dict) -> None:
    """The candidate's outputs are the reference's, by name, as plain verify requires of the
    two interfaces: a missing output cannot be judged, an extra one would go unjudged."""
    if set(ref) != set(cand):
        raise BnfoldError(
            f"the models have different outputs ({sorted(ref)} vs {sorted(cand)}): compare a "
            "model with its own folded, converted or built version"
        )


def _engine_record(backend, precision, judged_as, requested, atol, rtol, ref_out: dict) -> dict:
    float_dtypes = [v.dtype for v in ref_out.values() if np.asarray(v).dtype.kind == "f"]
    default_rtol, default_atol = default_tolerance(float_dtypes[0] if float_dtypes
                                                   else np.float32, judged_as)
    return {
        "name": backend.name,
        "precision": precision.compute,
        "precision_source": precision.source,
        "layer_precisions": dict(precision.layers),
        "tolerance_precision": judged_as,
        "tolerance_from": "--tolerances" if requested else "the engine's precision",
        "rtol": default_rtol if rtol is None else rtol,
        "atol": default_atol if atol is None else atol,
        "explicit_tolerance": atol is not None or rtol is not None,
        "notes": list(backend.notes),
    }
