"""Latency statistics and the side-by-side run of several models on one engine.

Models are measured in one process, interleaved in round-robin blocks on the same inputs, so
drift (thermal, frequency, other load) hits them alike. Warm-up is by time *and* count; the
measurement runs until every model has at least `runs` samples and `min_time` seconds.

    >>> result = bench_models([("original", "m.onnx"), ("folded", folded_proto)], "ort-cpu")
    >>> result.models[1].host.p50          # milliseconds
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bnfold.deploy.engines import EngineOptions, Timing, get_engine
from bnfold.errors import BnfoldError

COV_WARN = 0.025  # coefficient of variation above which a timing is called noisy
MIN_WARMUP_RUNS = 10
MIN_WARMUP_TIME = 0.2
BLOCK_TARGET_S = 0.02  # each round-robin block lasts about this long per model


@dataclass
class Stats:
    """Summary of one series of samples, in milliseconds."""

    p50: float
    p90: float
    p95: float
    p99: float
    mean: float
    std: float
    cov: float  # std / mean
    runs: int
    min: float
    max: float

    @classmethod
    def from_samples(cls, samples_ms) -> Stats:
        values = np.asarray(samples_ms, dtype=np.float64)
        if values.size == 0:
            raise ValueError("no samples")
        p50, p90, p95, p99 = np.percentile(values, [50, 90, 95, 99])
        mean = float(values.mean())
        std = float(values.std(ddof=1)) if values.size > 1 else 0.0
        return cls(float(p50), float(p90), float(p95), float(p99), mean, std,
                   std / mean if mean > 0 else 0.0, int(values.size),
                   float(values.min()), float(values.max()))

    def throughput(self, batch: int) -> float:
        """Items per second at the median (p50) latency: the statistic the speed-up uses too,
        so items/s and the ratio between models always agree."""
        return batch * 1e3 / self.p50 if self.p50 > 0 else float("inf")


@dataclass
class ModelBench:
    label: str
    host: Stats  # end-to-end on the host (perf_counter around the run, synchronised)
    gpu: Stats | None = None  # device time from CUDA events
    enqueue: Stats | None = None  # host time until the run call returned
    batch: int = 1
    samples: dict[str, list[float]] = field(default_factory=dict)
    # Its outputs on this engine against the ONNX reference, checked once before timing
    # (bnfold.verification.on_engine.OutputCheck); None when not checked.
    check: Any = None

    @property
    def equivalent(self) -> bool:
        return self.check is None or self.check.ok

    @property
    def primary(self) -> Stats:
        """The number to compare models by: device time on a GPU, host time on a CPU."""
        return self.gpu or self.host

    @property
    def throughput(self) -> float:
        return self.primary.throughput(self.batch)


@dataclass
class BenchResult:
    engine: str
    models: list[ModelBench]
    environment: dict[str, Any]
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def speedup(self, label: str, baseline: str | None = None) -> float | None:
        """p50 of `baseline` (default: the first model) over p50 of `label`; None when either
        failed its output check: a wrong model's speed is no speed-up."""
        by_label = {m.label: m for m in self.models}
        base, model = by_label[baseline or self.models[0].label], by_label[label]
        if not (base.equivalent and model.equivalent):
            return None
        return base.primary.p50 / model.primary.p50

    @property
    def failed_checks(self) -> list[ModelBench]:
        return [m for m in self.models if not m.equivalent]

    def to_dict(self) -> dict:
        models = []
        for m in self.models:
            entry = {"label": m.label, "batch": m.batch, "throughput_per_s": m.throughput}
            for kind in ("host", "gpu", "enqueue"):
                stats = getattr(m, kind)
                entry[kind] = asdict(stats) if stats is not None else None
            entry.update({k: v for k, v in asdict(m.primary).items()})
            entry["outputs_ok"] = None if m.check is None else m.check.ok
            entry["outputs_check"] = None if m.check is None else m.check.to_dict()
            entry["speedup_vs_first"] = self.speedup(m.label) if len(self.models) > 1 else None
            entry["samples_ms"] = m.samples
            models.append(entry)
        return {
            "engine": self.engine,
            "unit": "ms",
            "models": models,
            "environment": self.environment,
            "settings": self.settings,
            "notes": self.notes,
            "warnings": self.warnings,
        }


def measure(
    sessions: list,
    *,
    runs: int = 100,
    min_time: float = 1.0,
    warmup_time: float = MIN_WARMUP_TIME,
    warmup_runs: int = MIN_WARMUP_RUNS,
    block: int | None = None,
) -> list[dict[str, list[float]]]:
    """Interleave `sessions` in round-robin blocks; per session: host/gpu/enqueue samples (ms).

    Warm-up gives every session at least `warmup_runs` runs and `warmup_time` seconds (the
    floors of 10 runs and 0.2 s apply whatever is asked). Measurement stops once every session
    has at least `runs` samples and `min_time` seconds of measured time.
    """
    if runs < 1:
        raise BnfoldError("--runs must be at least 1")
    if min_time < 0 or warmup_time < 0:
        raise BnfoldError("--min-time and --warmup-time cannot be negative")
    warmup_time = max(warmup_time, MIN_WARMUP_TIME)
    warmup_runs = max(warmup_runs, MIN_WARMUP_RUNS)
    per_run_s = [_warm_up(s, warmup_time, warmup_runs) for s in sessions]
    if block is None:
        # Blocks of about BLOCK_TARGET_S: short enough to interleave, long enough that the
        # switch between models is not what we measure.
        block = max(1, min(50, int(BLOCK_TARGET_S / max(min(per_run_s), 1e-6))))
    results = [{"host": [], "gpu": [], "enqueue": []} for _ in sessions]
    spent = [0.0] * len(sessions)
    clock = time.perf_counter
    while any(len(r["host"]) < runs or t < min_time for r, t in zip(results, spent)):
        for index, session in enumerate(sessions):
            samples = results[index]
            host, gpu, enqueue = samples["host"], samples["gpu"], samples["enqueue"]
            for _ in range(block):
                start = clock()
                timing = session.run()
                elapsed = clock() - start
                host.append(elapsed * 1e3)
                spent[index] += elapsed
                if timing is not None:
                    _record(timing, gpu, enqueue)
    return results


def _record(timing: Timing, gpu: list, enqueue: list) -> None:
    if timing.gpu_ms is not None:
        gpu.append(timing.gpu_ms)
    if timing.enqueue_ms is not None:
        enqueue.append(timing.enqueue_ms)


def _warm_up(session, min_seconds: float, min_runs: int) -> float:
    """Run until both floors are met; returns the mean seconds per run seen."""
    count = 0
    start = time.perf_counter()
    while True:
        session.run()
        count += 1
        elapsed = time.perf_counter() - start
        if count >= min_runs and elapsed >= min_seconds:
            return elapsed / count


def comparison_models(path: str, compare: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    """What `bnfold bench MODEL [--compare ...]` measures, as (label, model) pairs.

    With no --compare and BatchNormalization in MODEL, MODEL is folded in memory and the
    original is compared with the folded version.
    """
    from bnfold.onnxio.files import load_model

    model = load_model(path)
    if compare:
        models = [(os.path.basename(path), model)]
        models += [(os.path.basename(other), load_model(other)) for other in compare]
        labels = [label for label, _ in models]
        if len(set(labels)) != len(labels):
            models = [(f"{i}:{label}", m) for i, (label, m) in enumerate(models)]
        _check_same_inputs(models)
        return models
    if not any(node.op_type == "BatchNormalization" for node in model.graph.node):
        return [(os.path.basename(path), model)]
    from bnfold.folding.api import fold

    folded = fold(model).model
    return [("original", model), ("folded", folded)]


def _check_same_inputs(models: list[tuple[str, Any]]) -> None:
    """Every model takes the first one's inputs (by name): they all get its feed."""
    from bnfold.verification.inputs import graph_inputs

    first_label, first = models[0]
    names = sorted(value.name for value in graph_inputs(first))
    for label, model in models[1:]:
        theirs = sorted(value.name for value in graph_inputs(model))
        if theirs != names:
            raise BnfoldError(
                f"{label} takes inputs {theirs} and {first_label} takes {names}: bench feeds "
                f"every model the same inputs, so compare models with one interface (a model "
                f"and its folded version)")


def bench_models(
    models: list[tuple[str, Any]],
    engine: str,
    *,
    inputs: dict[str, np.ndarray] | str | os.PathLike | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    runs: int = 100,
    min_time: float = 1.0,
    warmup_time: float = MIN_WARMUP_TIME,
    options: EngineOptions | None = None,
    block: int | None = None,
    check: bool = True,
    reference: Any = None,
) -> BenchResult:
    """Measure `models` (label, ModelProto | path | torch module) side by side on `engine`.

    `inputs` is a feed dict or a .npz path; otherwise one seeded random feed is generated from
    the first model's declared inputs (`shapes` fills symbolic dims). All models get that feed.
    With `check`, each ONNX model's outputs on the engine's own session are compared once with
    `reference` (default: the first model) run by ORT on the CPU, optimisation off, before any
    timing; a model that fails is timed but gets no speed-up (bnfold.verification.on_engine).
    """
    if not models:
        raise BnfoldError("nothing to benchmark: give at least one model")
    options = options or EngineOptions()
    backend = get_engine(engine, options)
    feed_notes: list[str] = []
    feed = _feed(models[0][1], inputs, shapes, seed, feed_notes)
    sessions = []
    try:
        for label, model in models:
            sessions.append(backend.open(label, model, feed))
        checks = [None] * len(models)
        if check and _is_onnx(reference if reference is not None else models[0][1]):
            from bnfold.verification.on_engine import check_sessions

            checks = check_sessions(reference if reference is not None else models[0][1],
                                    sessions, feed)
        samples = measure(sessions, runs=runs, min_time=min_time, warmup_time=warmup_time,
                          block=block)
    finally:
        for session in sessions:
            session.close()
    batch = _batch_size(feed)
    results = [_model_bench(label, s, batch) for (label, _), s in zip(models, samples)]
    for result_model, found in zip(results, checks):
        result_model.check = found
    settings = {"runs": runs, "min_time_s": min_time, "warmup_time_s": max(warmup_time,
                MIN_WARMUP_TIME), "warmup_runs_min": MIN_WARMUP_RUNS, "seed": seed,
                "input_shapes": {k: list(np.shape(v)) for k, v in feed.items()},
                "interleaved": True, **asdict(options)}
    settings["outputs_checked"] = checks[0] is not None
    result = BenchResult(engine, results, environment(backend), settings,
                         feed_notes + list(backend.notes))
    if checks[0] is not None:
        result.notes.append("outputs checked once on this engine's sessions against the "
                            "reference in ONNX Runtime CPU, optimisation off, before timing")
    result.warnings = warnings_for(result)
    return result


def _is_onnx(model) -> bool:
    import onnx

    return isinstance(model, (onnx.ModelProto, str, os.PathLike, bytes))


def _feed(model, inputs, shapes, seed, notes: list[str]) -> dict:
    if isinstance(inputs, dict):
        return inputs
    import onnx

    from bnfold.verification.inputs import DEFAULT_BATCH, load_npz_inputs, plan_inputs

    if not isinstance(model, onnx.ModelProto):
        if isinstance(model, (str, os.PathLike)):
            from bnfold.onnxio.files import load_model

            model = load_model(model)
        else:
            raise BnfoldError("give a feed dict as inputs= when benchmarking a non-ONNX model")
    if inputs is not None:
        return load_npz_inputs(model, inputs)
    plan = plan_inputs(model, shapes, DEFAULT_BATCH)
    if plan.open_dims:
        # A symbolic dim other than the batch: settled as `bnfold verify` settles it, by the
        # first ladder size ONNX Runtime (CPU, optimisation off) runs; `notes` says which.
        from bnfold.verification.ort_runner import OrtRunner

        runner = OrtRunner(None)
        session = runner.session(model.SerializeToString(), "the model")
        plan.settle(lambda feed: runner.try_run(session, feed), seed)
        notes.extend(plan.notes)
    plan.check_size()
    return plan.feed(seed, 0)


def _batch_size(feed: dict) -> int:
    first = next(iter(feed.values()), None)
    shape = np.shape(first) if first is not None else ()
    return int(shape[0]) if len(shape) > 0 else 1


def _model_bench(label: str, samples: dict[str, list[float]], batch: int) -> ModelBench:
    kept = {k: v for k, v in samples.items() if v}
    return ModelBench(
        label,
        Stats.from_samples(samples["host"]),
        Stats.from_samples(samples["gpu"]) if samples["gpu"] else None,
        Stats.from_samples(samples["enqueue"]) if samples["enqueue"] else None,
        batch,
        kept,
    )


def warnings_for(result: BenchResult) -> list[str]:
    """Noisy timings (CoV > 2.5%) and GPU runs whose host enqueue dominates device time."""
    found = []
    for m in result.models:
        if not m.equivalent:
            found.append(f"{m.label}: outputs on {result.engine} are NOT equivalent to the "
                         f"reference ({m.check.summary()}); no speed-up reported for it (`bnfold "
                         f"verify REFERENCE MODEL --engine {result.engine} --locate` finds where)")
        drift = m.check.run_to_run if m.check is not None else {}
        if drift:
            name = max(drift, key=lambda n: drift[n]["max_rel_error"])
            found.append(f"{m.label}: outputs on {result.engine} change from run to run (the "
                         f"same input twice: {name} {drift[name]['max_rel_error']:.3g} "
                         f"scale-relative apart); {result.engine} is not repeatable on it")
        if m.primary.cov > COV_WARN:
            found.append(
                f"{m.label}: timings are noisy (CoV {m.primary.cov:.1%} > {COV_WARN:.1%}); "
                f"close other programs, pin --threads, or raise --min-time"
            )
        if m.gpu is not None and m.enqueue is not None and m.enqueue.p50 > m.gpu.p50:
            found.append(
                f"{m.label}: host enqueue ({m.enqueue.p50:.3f} ms) exceeds GPU time "
                f"({m.gpu.p50:.3f} ms): launch overhead dominates; try --cuda-graphs or a "
                f"larger batch"
            )
    return found


def environment(backend) -> dict[str, Any]:
    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "engine": backend.name,
    }
    env.update(backend.environment())
    return env


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
