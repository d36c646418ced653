"""Fold realistic models with bnfold and its peers, side by side, and print what each one costs.

Every tool runs in a fresh Python process per measurement (`python -c SNIPPET IN OUT`), so the
wall time includes interpreter start and imports: what a user pays. Times are quoted over the
I/O floor, a fresh process doing `onnx.load` + `onnx.save` of the same model. Peak RSS comes from
the child's own rusage (`os.wait4`). Tools run interleaved per model, in a rotated order each
repeat; medians are quoted with the min–max range. The script measures and prints; it asserts
nothing about timings.

    python tools/onnx_models.py --out models/
    .venv-peers/bin/python tools/bench_fold.py --models models/ --repeat 5

Peers missing from the running Python are reported as "not installed". The error columns are
max|a−b| / max|a| of the tool's output (run in ONNX Runtime with graph optimisation disabled, on
one seeded batch-1 input) against the original run the same way ("err vs orig") and against the
original evaluated in float64 by onnx.reference ("err vs f64", the ground truth; the floor row's
figure is the float32 original's own error).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

_LOAD_SAVE = "import sys, onnx; onnx.save(onnx.load(sys.argv[1]), sys.argv[2])"


@dataclasses.dataclass(frozen=True)
class Tool:
    name: str
    needs: tuple[str, ...]  # modules that must be importable
    kind: str  # "floor", "bnfold", "python" (a Python peer bnfold must beat), "ort", "reference"
    snippet: str | None = None  # run as `python -c snippet IN OUT`
    module_args: tuple[str, ...] = ()  # or as `python -m ...` with {in} / {out} filled in

    def argv(self, python: str, in_path: str, out_path: str) -> list[str]:
        if self.snippet is not None:
            return [python, "-c", self.snippet, in_path, out_path]
        return [python, "-m", *(a.format(src=in_path, dst=out_path) for a in self.module_args)]


TOOLS = (
    Tool("floor: onnx load+save", ("onnx",), "floor", _LOAD_SAVE),
    Tool("python + import onnx", ("onnx",), "reference", "import onnx"),
    Tool("onnx-graphsurgeon import+export", ("onnx", "onnx_graphsurgeon"), "reference",
         "import sys, onnx, onnx_graphsurgeon as gs\n"
         "graph = gs.import_onnx(onnx.load(sys.argv[1]))\n"
         "onnx.save(gs.export_onnx(graph), sys.argv[2])"),
    Tool("bnfold fold_file", ("bnfold",), "bnfold",
         "import sys, bnfold; bnfold.fold_file(sys.argv[1], sys.argv[2], verify=False)"),
    Tool("bnfold CLI --no-verify", ("bnfold",), "bnfold",
         module_args=("bnfold", "fold", "{src}", "-o", "{dst}", "--no-verify")),
    # What a user runs: the fold plus ONNX Runtime verification of the written file. Judged
    # against the peers (which verify nothing), not against the I/O floor.
    Tool("bnfold CLI default (fold + verify)", ("bnfold", "onnxruntime"), "bnfold-default",
         module_args=("bnfold", "fold", "{src}", "-o", "{dst}")),
    Tool("python + import onnxruntime", ("onnxruntime",), "reference",
         "import onnx, onnxruntime"),
    Tool("onnxoptimizer fuse_bn_into_conv", ("onnx", "onnxoptimizer"), "python",
         "import sys, onnx, onnxoptimizer\n"
         "model = onnxoptimizer.optimize(onnx.load(sys.argv[1]), ['fuse_bn_into_conv'])\n"
         "onnx.save(model, sys.argv[2])"),
    Tool("onnxslim.slim", ("onnxslim",), "python",
         "import sys, onnxslim; onnxslim.slim(sys.argv[1], sys.argv[2])"),
    Tool("onnxsim.simplify", ("onnx", "onnxsim"), "python",
         "import sys, onnx, onnxsim\n"
         "model, _ = onnxsim.simplify(onnx.load(sys.argv[1]))\n"
         "onnx.save(model, sys.argv[2])"),
    Tool("onnxscript rewriter.rewrite", ("onnxscript", "onnx_ir"), "python",
         "import sys, onnx_ir as ir, onnxscript.rewriter\n"
         "model = onnxscript.rewriter.rewrite(ir.load(sys.argv[1]))\n"
         "ir.save(model, sys.argv[2])"),
    Tool("onnxscript optimizer.optimize", ("onnxscript", "onnx_ir"), "python",
         "import sys, onnx_ir as ir, onnxscript.optimizer\n"
         "model = onnxscript.optimizer.optimize(ir.load(sys.argv[1]))\n"
         "ir.save(model, sys.argv[2])"),
    Tool("ORT offline ENABLE_BASIC", ("onnxruntime",), "ort",
         "import sys, onnxruntime as ort\n"
         "options = ort.SessionOptions()\n"
         "options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC\n"
         "options.optimized_model_filepath = sys.argv[2]\n"
         "ort.InferenceSession(sys.argv[1], options, providers=['CPUExecutionProvider'])"),
    Tool("ORT offline ENABLE_EXTENDED", ("onnxruntime",), "ort",
         "import sys, onnxruntime as ort\n"
         "options = ort.SessionOptions()\n"
         "options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED\n"
         "options.optimized_model_filepath = sys.argv[2]\n"
         "ort.InferenceSession(sys.argv[1], options, providers=['CPUExecutionProvider'])"),
)

TARGET_TIME, TARGET_RSS, TARGET_ERROR = 1.10, 2.5, 1e-6
# The default command (fold + verify): no slower than the fastest Python peer (geomean), and
# peak RSS <= 3x the model size on models of 30 MB and up.
TARGET_DEFAULT_RSS, DEFAULT_RSS_FROM_BYTES = 3.0, 30_000_000


@dataclasses.dataclass
class Run:
    seconds: float
    peak_rss: int  # bytes
    returncode: int
    error_tail: str = ""


@dataclasses.dataclass
class Outcome:
    """One tool on one model: its timed runs and what its output looks like."""

    runs: list[Run] = dataclasses.field(default_factory=list)
    bn_left: int | None = None
    max_error: float | None = None  # against the float32 original in ORT
    truth_error: float | None = None  # against the original evaluated in float64
    note: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.runs) and all(r.returncode == 0 for r in self.runs)

    def median_seconds(self) -> float:
        return statistics.median(r.seconds for r in self.runs)


def run_measured(argv: list[str], timeout: float, stderr_path: str) -> Run:
    """Run argv to completion; wall time of the whole process and its own peak RSS."""
    with open(stderr_path, "wb") as stderr:
        start = time.perf_counter()
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=stderr)
        killer = threading.Timer(timeout, process.kill)
        killer.start()
        # wait4, unlike RUSAGE_CHILDREN, gives this child's own peak RSS
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        killer.cancel()
    process.returncode = os.waitstatus_to_exitcode(status)  # so Popen never waits on it again
    tail = ""
    if process.returncode != 0:
        with open(stderr_path, errors="replace") as f:
            lines = [line.strip() for line in f.read().splitlines() if line.strip()]
        tail = "timed out" if process.returncode == -9 else (lines[-1] if lines else "")
    return Run(seconds, usage.ru_maxrss * 1024, process.returncode, tail[:160])


def count_batchnorms(path: str) -> int:
    import onnx

    def count(graph) -> int:
        total = 0
        for node in graph.node:
            total += node.op_type == "BatchNormalization"
            for attr in node.attribute:
                total += sum(count(g) for g in attr.graphs)
                total += count(attr.g) if attr.HasField("g") else 0
        return total

    model = onnx.load(path, load_external_data=False)
    return count(model.graph) + sum(
        n.op_type == "BatchNormalization" for f in model.functions for n in f.node)


class Reference:
    """The original model's output in ONNX Runtime with graph optimisation off, and in float64
    (onnx.reference through bnfold.verification.float64) when bnfold is importable: the ground truth that
    both the original's float32 run and every tool's output are measured against."""

    def __init__(self, model_path: str, seed: int = 0) -> None:
        import numpy as np

        session = self._session(model_path)
        rng = np.random.default_rng(seed)
        self.feeds = {}
        for graph_input in session.get_inputs():
            shape = [d if isinstance(d, int) else 1 for d in graph_input.shape]
            self.feeds[graph_input.name] = rng.standard_normal(shape).astype(np.float32)
        self.outputs = session.run(None, self.feeds)
        self.truth = None
        if importlib.util.find_spec("bnfold") is not None:
            from bnfold.verification.float64 import evaluate_float64
            from bnfold.onnxio.files import load_model

            names = [o.name for o in session.get_outputs()]
            truth = evaluate_float64(load_model(model_path), self.feeds)
            self.truth = [truth[name] for name in names]

    @staticmethod
    def _session(path: str):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def max_errors(self, candidate_path: str) -> tuple[float, float | None]:
        """Scale-relative max error against the float32 original and the float64 truth."""
        got = self._session(candidate_path).run(None, self.feeds)
        truth = None if self.truth is None else _relative_error(self.truth, got)
        return _relative_error(self.outputs, got), truth


def _relative_error(expected, got) -> float:
    """max|a−b| / max|a| over every output."""
    import numpy as np

    worst = 0.0
    for a, b in zip(expected, got):
        scale = float(np.abs(a).max()) or 1.0
        worst = max(worst, float(np.abs(a.astype(np.float64) - b).max()) / scale)
    return worst


def judge(model_path: str, candidate_paths: list[str]) -> list[dict]:
    """BN left and max error of each candidate against the original (run in a child process)."""
    reference = Reference(model_path)
    verdicts = []
    for path in candidate_paths:
        verdict = {"bn_left": count_batchnorms(path), "max_error": None, "truth_error": None,
                   "note": ""}
        try:
            verdict["max_error"], verdict["truth_error"] = reference.max_errors(path)
        except Exception as error:  # a peer's output ORT cannot run is a result, not a crash
            verdict["note"] = f"output does not run in ORT: {str(error).splitlines()[0][:120]}"
        verdicts.append(verdict)
    return verdicts


def bench_model(model_path: str, tools: list[Tool], repeat: int, warmup: int, timeout: float,
                workdir: str) -> tuple[dict[str, Outcome], int]:
    """Time every tool on one model; also return the model's own BatchNormalization count."""
    python = sys.executable
    outcomes = {t.name: Outcome() for t in tools}
    out_paths = {t.name: os.path.join(workdir, f"out{i}.onnx") for i, t in enumerate(tools)}
    stderr_path = os.path.join(workdir, "stderr.txt")
    for round_index in range(warmup + repeat):
        shift = round_index % len(tools)
        for tool in tools[shift:] + tools[:shift]:
            out_path = out_paths[tool.name]
            if os.path.exists(out_path):
                os.remove(out_path)
            os.sync()  # no dirty pages left from the last tool to flush on this one's clock
            run = run_measured(tool.argv(python, model_path, out_path), timeout, stderr_path)
            if round_index >= warmup:
                outcomes[tool.name].runs.append(run)
    # Judged in another process: this one must stay small, because a child's ru_maxrss starts
    # from the peak RSS of the process that spawned it (the kernel carries it across exec).
    written = [t.name for t in tools if outcomes[t.name].ok and os.path.exists(out_paths[t.name])]
    judged = subprocess.run(
        [python, os.path.abspath(__file__), "--judge", model_path, model_path,
         *(out_paths[name] for name in written)],
        check=True, capture_output=True, text=True).stdout
    original, *verdicts = json.loads(judged)
    for name, verdict in zip(written, verdicts):
        outcomes[name].bn_left, outcomes[name].max_error = verdict["bn_left"], verdict["max_error"]
        outcomes[name].truth_error = verdict["truth_error"]
        outcomes[name].note = verdict["note"]
        os.remove(out_paths[name])
    for tool in tools:
        outcome = outcomes[tool.name]
        if not outcome.ok:
            failed = next(r for r in outcome.runs if r.returncode != 0)
            outcome.note = f"failed (exit {failed.returncode}): {failed.error_tail}"
    return outcomes, original["bn_left"]


def _format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths))) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def model_table(name: str, size: int, outcomes: dict[str, Outcome], tools: list[Tool],
                missing: dict[str, str], bn_before: int) -> str:
    floor = outcomes[TOOLS[0].name].median_seconds()
    header = ["tool", "time/floor", "min-max", "median s", "RSS/size", "peak MB", "BN left",
              "err vs orig", "err vs f64", "note"]
    rows = []
    for tool in TOOLS:
        if tool.name in missing:
            rows.append([tool.name, "-", "-", "-", "-", "-", "-", "-", "-", missing[tool.name]])
            continue
        if tool.name not in outcomes:
            continue
        outcome = outcomes[tool.name]
        if not outcome.runs:
            continue
        seconds = sorted(r.seconds for r in outcome.runs)
        rss = statistics.median(r.peak_rss for r in outcome.runs)
        rows.append([
            tool.name,
            f"{outcome.median_seconds() / floor:.2f}x",
            f"{seconds[0] / floor:.2f}-{seconds[-1] / floor:.2f}",
            f"{outcome.median_seconds():.2f}",
            f"{rss / size:.2f}",
            f"{rss / 1e6:.0f}",
            "-" if outcome.bn_left is None else str(outcome.bn_left),
            "-" if outcome.max_error is None else f"{outcome.max_error:.1e}",
            "-" if outcome.truth_error is None else f"{outcome.truth_error:.1e}",
            outcome.note,
        ])
    title = (f"== {name}: {size / 1e6:.1f} MB, {bn_before} BatchNormalization, "
             f"floor {floor:.2f} s (median of {len(outcomes[TOOLS[0].name].runs)}) ==")
    return title + "\n" + _format_table(header, rows)


def summary(results: dict[str, tuple[int, dict[str, Outcome]]], tools: list[Tool],
            missing: dict[str, str]) -> str:
    ratios: dict[str, dict[str, float]] = {t.name: {} for t in tools}
    for model, (_, outcomes) in results.items():
        floor = outcomes[TOOLS[0].name].median_seconds()
        for tool in tools:
            if outcomes[tool.name].ok:
                ratios[tool.name][model] = outcomes[tool.name].median_seconds() / floor
    models = list(results)
    header = ["tool", "geomean time/floor", *models, "max RSS/size", "worst err",
              "worst err vs f64"]
    rows = []
    for tool in TOOLS:
        if tool.name in missing:
            rows.append([tool.name, missing[tool.name], *["-"] * (len(models) + 3)])
            continue
        if tool.name not in ratios:
            continue
        by_model = ratios[tool.name]
        mean = _geomean(list(by_model.values())) if len(by_model) == len(models) else None
        rss = [max(r.peak_rss for r in results[m][1][tool.name].runs) / results[m][0]
               for m in models if results[m][1][tool.name].runs]
        errors = [results[m][1][tool.name].max_error for m in models]
        truth_errors = [results[m][1][tool.name].truth_error for m in models]
        rows.append([
            tool.name,
            "-" if mean is None else f"{mean:.2f}x",
            *[f"{by_model[m]:.2f}x" if m in by_model else "failed" for m in models],
            f"{max(rss):.2f}" if rss else "-",
            "-" if any(e is None for e in errors) else f"{max(errors):.1e}",
            "-" if any(e is None for e in truth_errors) else f"{max(truth_errors):.1e}",
        ])
    text = "== summary: median whole-process time over the I/O floor ==\n"
    text += _format_table(header, rows)
    for tool in tools:
        if tool.kind == "bnfold":
            text += "\n\n" + _targets(tool, results, ratios, tools)
        elif tool.kind == "bnfold-default":
            text += "\n\n" + _default_targets(tool, results, ratios, tools)
    return text


def _default_targets(tool: Tool, results, ratios, tools: list[Tool]) -> str:
    models = list(results)
    mine = ratios[tool.name]
    if len(mine) < len(models):
        return f"targets for {tool.name}:\n  FAIL  ran on {len(mine)} of {len(models)} models"
    lines = [f"targets for {tool.name}:"]
    mean = _geomean(list(mine.values()))
    peers = {t.name: _geomean(list(ratios[t.name].values())) for t in tools
             if t.kind == "python" and len(ratios[t.name]) == len(models)}
    if peers:
        fastest = min(peers, key=peers.get)
        lines.append(f"  {_verdict(mean <= peers[fastest])}  time: geomean {mean:.2f}x the floor, "
                     f"fastest Python peer {fastest} {peers[fastest]:.2f}x")
    else:
        lines.append(f"  info  time: geomean {mean:.2f}x the floor (no Python peer ran)")
    baseline = next((t for t in tools if t.name == "python + import onnxruntime"), None)
    for model in models:
        size, outcomes = results[model]
        if size < DEFAULT_RSS_FROM_BYTES:
            continue
        rss = max(r.peak_rss for r in outcomes[tool.name].runs) / size
        extra = ""
        if baseline is not None and outcomes[baseline.name].runs:
            base = statistics.median(r.peak_rss for r in outcomes[baseline.name].runs)
            extra = f", {(rss * size - base) / size:.2f}x above python + import onnxruntime"
        lines.append(f"  {_verdict(rss <= TARGET_DEFAULT_RSS)}  peak RSS on {model}: {rss:.2f}x "
                     f"the model size (target <= {TARGET_DEFAULT_RSS}x{extra})")
    return "\n".join(lines)


def _targets(tool: Tool, results, ratios, tools: list[Tool]) -> str:
    models = list(results)
    mine = ratios[tool.name]
    if len(mine) < len(models):
        return f"targets for {tool.name}:\n  FAIL  ran on {len(mine)} of {len(models)} models"
    lines = [f"targets for {tool.name}:"]
    mean = _geomean(list(mine.values()))
    lines.append(f"  {_verdict(mean <= TARGET_TIME)}  time: geomean {mean:.2f}x the floor "
                 f"(target <= {TARGET_TIME:.2f}x)")
    peers = [t for t in tools if t.kind == "python"]
    slower = []
    for model in models:
        for peer in peers:
            if model in ratios[peer.name] and ratios[peer.name][model] < mine[model]:
                slower.append(f"{peer.name} on {model} ({ratios[peer.name][model]:.2f}x vs "
                              f"{mine[model]:.2f}x)")
    lines.append(f"  {_verdict(not slower)}  never slower than a Python peer"
                 + (": slower than " + "; ".join(slower) if slower else
                    f" ({len(peers)} peers ran)"))
    rss = {m: max(r.peak_rss for r in results[m][1][tool.name].runs) / results[m][0]
           for m in models}
    worst_rss = max(rss, key=rss.get)
    lines.append(f"  {_verdict(rss[worst_rss] <= TARGET_RSS)}  peak RSS: worst {rss[worst_rss]:.2f}x "
                 f"the model size on {worst_rss} (target <= {TARGET_RSS}x, max over repeats)")
    baseline = next((t for t in tools if t.name == "python + import onnx"), None)
    if baseline is not None:
        above = {m: (max(r.peak_rss for r in results[m][1][tool.name].runs)
                     - statistics.median(r.peak_rss for r in results[m][1][baseline.name].runs))
                 / results[m][0] for m in models}
        worst_above = max(above, key=above.get)
        lines.append(f"  info  peak RSS above the python + import onnx baseline: worst "
                     f"{above[worst_above]:.2f}x the model size on {worst_above}")
    errors = {m: results[m][1][tool.name].max_error for m in models}
    if any(e is None for e in errors.values()):
        lines.append("  FAIL  error: some output could not be evaluated")
    else:
        worst = max(errors, key=errors.get)
        lines.append(f"  {_verdict(errors[worst] <= TARGET_ERROR)}  error: worst {errors[worst]:.1e} "
                     f"on {worst} against the float32 original (target <= {TARGET_ERROR:.0e})")
    truth = {m: results[m][1][tool.name].truth_error for m in models}
    if all(e is not None for e in truth.values()):
        worst = max(truth, key=truth.get)
        original = results[worst][1][TOOLS[0].name].truth_error
        lines.append(f"  {_verdict(truth[worst] <= TARGET_ERROR)}  error: worst {truth[worst]:.1e} "
                     f"on {worst} against the float64 truth (the float32 original itself: "
                     f"{original:.1e})")
    return "\n".join(lines)


def _verdict(passed: bool) -> str:
    return "pass" if passed else "FAIL"


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def compile_bnfold(python: str = sys.executable) -> str:
    """Compile bnfold's modules to bytecode beside them, as `pip install` does for a wheel, and
    say so. onnx, numpy, click and rich arrive compiled; an editable bnfold does not, and where
    PYTHONDONTWRITEBYTECODE is set (this workplace sets it) every run would compile bnfold's
    30-odd modules again, ~25 ms that no user of an installed bnfold pays."""
    spec = importlib.util.find_spec("bnfold")
    if spec is None or not spec.origin:
        return "bnfold not importable: nothing compiled"
    folder = os.path.dirname(spec.origin)
    done = subprocess.run([python, "-m", "compileall", "-q", folder], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPYCACHEPREFIX": ""})
    if done.returncode != 0:
        return f"could not compile {folder} ({done.stdout.strip()[-200:]}): runs compile it"
    return f"bnfold compiled to bytecode in {folder}/**/__pycache__, as an install does"


def _source_revision() -> str:
    """The checkout this bench (and an editable bnfold) ran from, as bnfold keeps changing."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = subprocess.run(["git", "-C", repo, "log", "-1", "--format=%h %cI"],
                           capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "-uno", "--", "bnfold"],
                           capture_output=True, text=True).stdout.strip()
    if found.returncode != 0:
        return "not a git checkout"
    return f"checkout {found.stdout.strip()}" + (" (bnfold/ has local edits)" if dirty else "")


def available_tools(names: list[str] | None) -> tuple[list[Tool], dict[str, str]]:
    chosen = [t for t in TOOLS if names is None or t.kind == "floor" or t.name.split()[0] in names]
    ready, missing = [], {}
    for tool in chosen:
        absent = [m for m in tool.needs if importlib.util.find_spec(m) is None]
        if absent:
            missing[tool.name] = f"not installed ({', '.join(absent)})"
        else:
            ready.append(tool)
    return ready, missing


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--judge"]:
        print(json.dumps(judge(argv[1], argv[2:])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", required=True, help="A folder of .onnx files, or one file.")
    parser.add_argument("--repeat", type=int, default=5, help="Timed runs per tool and model.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed rounds first, per model.")
    parser.add_argument("--timeout", type=float, default=600, help="Seconds before a run is killed.")
    parser.add_argument("--tools", nargs="+", metavar="NAME",
                        help="First word of the tools to run (the floor always runs), e.g. bnfold onnxsim.")
    parser.add_argument("--json", dest="json_path", help="Also write every run here.")
    args = parser.parse_args(argv)

    if os.path.isdir(args.models):
        paths = sorted(os.path.join(args.models, f) for f in os.listdir(args.models)
                       if f.endswith(".onnx"))
    else:
        paths = [args.models]
    if not paths:
        parser.error(f"no .onnx files in {args.models}")
    tools, missing = available_tools(args.tools)
    print(f"python {sys.executable} ({sys.version.split()[0]}), {os.cpu_count()} CPUs, "
          f"repeat {args.repeat}, warmup {args.warmup}, {_source_revision()}", flush=True)
    print(compile_bnfold(), flush=True)
    for name, why in missing.items():
        print(f"{name}: {why}", flush=True)

    results: dict[str, tuple[int, dict[str, Outcome]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_fold_") as workdir:
        for path in paths:
            name = os.path.splitext(os.path.basename(path))[0]
            size = os.path.getsize(path)
            outcomes, bn_before = bench_model(path, tools, args.repeat, args.warmup, args.timeout,
                                              workdir)
            results[name] = (size, outcomes)
            print("\n" + model_table(name, size, outcomes, tools, missing, bn_before),
                  flush=True)
    print("\n" + summary(results, tools, missing), flush=True)
    if args.json_path:
        raw = {m: {"size": size, "tools": {t: dataclasses.asdict(o) for t, o in outcomes.items()}}
               for m, (size, outcomes) in results.items()}
        with open(args.json_path, "w") as f:
            json.dump(raw, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
