"""Issue #12 in one run: how far bnfold's fold is from the speed of a file copy.

Every measurement is a fresh process (interpreter start and imports included: what a user
pays), with the child's own peak RSS from `os.wait4`. Tools run interleaved, in a rotated order
each repeat; each ratio is taken within one repeat (so a noisy moment hits both sides) and
quoted as the median with its min-max over the repeats. It prints, and asserts nothing:

(a) graph size: chains of Conv->BN->Tanh triples (bench_scale.py's): the I/O floor (`onnx.load`
    + `onnx.save` in a fresh `python -c`), `fold_file(verify=False)` and `bnfold fold
    --no-verify`; fold_file over the floor, ms per node, the CLI over fold_file; and
    tools/bare_fold.py over the floor, the least any pure-Python fold can cost (no checks);
(b) the CNN set in --models (tools/onnx_models.py): the same three per model, with the
    geomeans the issue targets (CLI and fold_file <= 1.10x the floor; CLI within 10% of
    fold_file);
(c) models of 100 MB and up in --models (--copy-from-mb): the CLI against `cp` of the file
    plus a fresh `python -c "import onnx"`;
(d) peak RSS of fold_file and of the CLI over the floor's, for every model of (a) and (b).

    .venv/bin/python tools/onnx_models.py --out models/
    .venv/bin/python tools/bench_speed.py --models models/ --repeat 3     # ~3 min on 2 cores

The CLI is the console script beside the running Python (`bin/bnfold`), as users run it;
`python -m bnfold` where there is none. This process imports only the standard library: a
child's ru_maxrss starts from its parent's peak RSS, so a heavy parent would inflate (d).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile

TOOLS_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS_DIR)
from bench_fold import (  # noqa: E402
    Run,
    _format_table,
    _geomean,
    _source_revision,
    compile_bnfold,
    run_measured,
)

LOAD_SAVE = "import sys, onnx; onnx.save(onnx.load(sys.argv[1]), sys.argv[2])"
FOLD_FILE = "import sys, bnfold; bnfold.fold_file(sys.argv[1], sys.argv[2], verify=False)"
# Built in a child, so that numpy and onnx never load here (see the docstring on RSS).
WRITE_TRIPLES = ("import sys; sys.path.insert(0, sys.argv[3]); import onnx, bench_scale; "
                 "onnx.save(bench_scale.build_triples(int(sys.argv[1])), sys.argv[2])")
SIZES = (1000, 4000, 16000)
TARGET = 1.10


def cli_command(python: str) -> list[str]:
    script = os.path.join(os.path.dirname(python), "bnfold")
    return [script] if os.access(script, os.X_OK) else [python, "-m", "bnfold"]


def fold_commands(python: str, cli: list[str], src: str,
                  out: dict[str, str]) -> dict[str, list[str]]:
    return {
        "floor": [python, "-c", LOAD_SAVE, src, out["floor"]],
        "fold_file": [python, "-c", FOLD_FILE, src, out["fold_file"]],
        "cli": [*cli, "fold", src, "-o", out["cli"], "--no-verify"],
    }


def bare_command(python: str, src: str, out: dict[str, str]) -> list[str]:
    return [python, os.path.join(TOOLS_DIR, "bare_fold.py"), src, out["bare"]]


def copy_commands(python: str, src: str, out: dict[str, str]) -> dict[str, list[str]]:
    return {"cp": ["cp", src, out["cp"]], "import onnx": [python, "-c", "import onnx"]}


def measure(commands: dict[str, list[str]], outputs: list[str], repeat: int, workdir: str,
            timeout: float) -> dict[str, list[Run]]:
    """Every command `repeat` times, interleaved in a rotated order; `outputs` removed before
    each run (no tool overwrites another's file) and at the end."""
    names = list(commands)
    runs: dict[str, list[Run]] = {name: [] for name in names}
    stderr_path = os.path.join(workdir, "stderr.txt")
    for index in range(repeat):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            _remove(outputs)
            os.sync()  # no dirty pages of the last run to flush on this one's clock
            run = run_measured(commands[name], timeout, stderr_path)
            if run.returncode != 0:
                raise SystemExit(f"{' '.join(commands[name])} failed: {run.error_tail}")
            runs[name].append(run)
    _remove(outputs)
    return runs


def _remove(paths: list[str]) -> None:
    for path in paths:
        if os.path.exists(path):
            os.remove(path)


def _ratios(runs: dict[str, list[Run]], top: str, *bottom: str) -> list[float]:
    """Per repeat: the `top` time over the sum of the `bottom` times of the same repeat."""
    return [run.seconds / sum(runs[name][i].seconds for name in bottom)
            for i, run in enumerate(runs[top])]


def _seconds(runs: list[Run]) -> str:
    values = [r.seconds for r in runs]
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def _ratio(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


RSS_HEADER = ["floor RSS MB", "fold_file RSS", "cli RSS"]


def _rss_columns(runs: dict[str, list[Run]]) -> list[str]:
    peak = {name: max(r.peak_rss for r in runs[name]) for name in ("floor", "fold_file", "cli")}
    return [f"{peak['floor'] / 1e6:.0f}", f"{peak['fold_file'] / peak['floor']:.2f}x",
            f"{peak['cli'] / peak['floor']:.2f}x"]


def chains_table(results: dict[int, dict[str, list[Run]]]) -> str:
    header = ["nodes", "floor s", "fold_file s", "fold_file/floor", "ms/node", "cli s",
              "cli/floor", "cli/fold_file", "bare/floor", *RSS_HEADER]
    rows = []
    for count, runs in results.items():
        nodes = 3 * count
        per_node = 1000 * statistics.median(r.seconds for r in runs["fold_file"]) / nodes
        rows.append([str(nodes), _seconds(runs["floor"]), _seconds(runs["fold_file"]),
                     _ratio(_ratios(runs, "fold_file", "floor")), f"{per_node:.3f}",
                     _seconds(runs["cli"]), _ratio(_ratios(runs, "cli", "floor")),
                     _ratio(_ratios(runs, "cli", "fold_file")),
                     _ratio(_ratios(runs, "bare", "floor")), *_rss_columns(runs)])
    return ("== (a) graph size: Conv->BN->Tanh chains; (d) peak RSS over the floor's ==\n"
            + _format_table(header, rows))


def models_table(results: dict[str, tuple[int, dict[str, list[Run]]]]) -> str:
    header = ["model", "MB", "floor s", "fold_file s", "fold_file/floor", "cli s", "cli/floor",
              "cli/fold_file", *RSS_HEADER]
    rows, medians = [], {"fold_file/floor": [], "cli/floor": [], "cli/fold_file": []}
    for name, (size, runs) in results.items():
        ratios = {"fold_file/floor": _ratios(runs, "fold_file", "floor"),
                  "cli/floor": _ratios(runs, "cli", "floor"),
                  "cli/fold_file": _ratios(runs, "cli", "fold_file")}
        for key, values in ratios.items():
            medians[key].append(statistics.median(values))
        rows.append([name, f"{size / 1e6:.0f}", _seconds(runs["floor"]),
                     _seconds(runs["fold_file"]), _ratio(ratios["fold_file/floor"]),
                     _seconds(runs["cli"]), _ratio(ratios["cli/floor"]),
                     _ratio(ratios["cli/fold_file"]), *_rss_columns(runs)])
    rows.append(["geomean", "", "", "", f"{_geomean(medians['fold_file/floor']):.2f}x", "",
                 f"{_geomean(medians['cli/floor']):.2f}x",
                 f"{_geomean(medians['cli/fold_file']):.2f}x", "", "", ""])
    text = ("== (b) the CNN set: fresh process over the I/O floor; (d) peak RSS over the "
            "floor's ==\n" + _format_table(header, rows))
    text += (f"\ntargets: CLI --no-verify <= {TARGET:.2f}x the floor (geomean "
             f"{_geomean(medians['cli/floor']):.2f}x), within {TARGET:.2f}x of fold_file "
             f"(geomean {_geomean(medians['cli/fold_file']):.2f}x)")
    return text


def copy_table(results: dict[str, tuple[int, dict[str, list[Run]]]]) -> str:
    header = ["model", "MB", "cp s", "import onnx s", "cli s", "cli/(cp + import onnx)"]
    rows = [[name, f"{size / 1e6:.0f}", _seconds(runs["cp"]), _seconds(runs["import onnx"]),
             _seconds(runs["cli"]), _ratio(_ratios(runs, "cli", "cp", "import onnx"))]
            for name, (size, runs) in results.items()]
    return ("== (c) models of 100 MB and up: the CLI against a file copy plus `import onnx` "
            "==\n" + _format_table(header, rows))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="A folder of .onnx files (the CNN set); without it, "
                                         "only (a) runs.")
    parser.add_argument("--repeat", type=int, default=3, help="Timed runs per tool and model.")
    parser.add_argument("--sizes", type=int, nargs="*", default=list(SIZES),
                        help="Triples per chain for (a); none to skip (a).")
    parser.add_argument("--copy-from-mb", type=float, default=100,
                        help="Models of at least this size get (c), the file-copy comparison.")
    parser.add_argument("--timeout", type=float, default=600,
                        help="Seconds before a run is killed.")
    args = parser.parse_args(argv)
    python, cli = sys.executable, cli_command(sys.executable)
    paths = []
    if args.models:
        folder = os.path.abspath(args.models)
        paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".onnx"))
        if not paths:
            parser.error(f"no .onnx files in {args.models}")
    spec = importlib.util.find_spec("bnfold")
    print(f"python {python}, CLI `{' '.join(cli)}`, bnfold from "
          f"{os.path.dirname(spec.origin) if spec else 'nowhere'}, {os.cpu_count()} CPUs, "
          f"repeat {args.repeat}; tools from {_source_revision()}", flush=True)
    print(compile_bnfold(python), flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_speed_") as workdir:
        # `python -c` puts the current folder first on sys.path: run every child from here, so
        # the snippets and the console script all import the same bnfold.
        os.chdir(workdir)
        out = {name: os.path.join(workdir, f"{name.replace(' ', '_')}.out.onnx")
               for name in ("floor", "fold_file", "cli", "cp", "bare")}
        chains: dict[int, dict[str, list[Run]]] = {}
        for count in args.sizes:
            src = os.path.join(workdir, f"triples{count}.onnx")
            run = run_measured([python, "-c", WRITE_TRIPLES, str(count), src, TOOLS_DIR],
                               args.timeout, os.path.join(workdir, "stderr.txt"))
            if run.returncode != 0:
                raise SystemExit(f"building the {count}-triple chain failed: {run.error_tail}")
            commands = fold_commands(python, cli, src, out)
            commands["bare"] = bare_command(python, src, out)
            chains[count] = measure(commands, list(out.values()), args.repeat, workdir,
                                    args.timeout)
            os.remove(src)
        if chains:
            print("\n" + chains_table(chains), flush=True)

        models, copies = {}, {}
        for path in paths:
            name, size = os.path.splitext(os.path.basename(path))[0], os.path.getsize(path)
            with open(path, "rb") as f, open(os.devnull, "wb") as null:
                shutil.copyfileobj(f, null, 1 << 20)  # in the page cache before the first run
            commands = fold_commands(python, cli, path, out)
            big = size >= args.copy_from_mb * 1e6
            if big:
                commands.update(copy_commands(python, path, out))
            runs = measure(commands, list(out.values()), args.repeat, workdir, args.timeout)
            models[name] = (size, runs)
            if big:
                copies[name] = (size, runs)
            print(f"measured {name}", flush=True)
        if models:
            print("\n" + models_table(models), flush=True)
        if copies:
            print("\n" + copy_table(copies), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
