"""Run plain `bnfold fold MODEL -o OUT` and bnfold's peers on third-party models, and show where
bnfold fails or leaves more BatchNormalization than the best peer.

A cell reads "BN left", or "BN+M" where M Mul/Add look like a frozen BN (a constant applied to
a Conv/ConvTranspose/Gemm/MatMul output; count_affine_left). tf2onnx leaves every BN it cannot
merge into a Conv as such a Mul → Add, so its exports have no BatchNormalization node at all.

    .venv/bin/python tools/real_models.py --out real-models/
    .venv-tf/bin/python tools/tf_models.py --out real-models/   (tf2onnx exports, optional)
    .venv-peers/bin/python tools/compare_real.py --models real-models/ --json real.json

Every tool runs once per model in a fresh process (bench_fold's Tool table and run_measured),
killed after --timeout seconds. bnfold runs from the project venv (`python -m bnfold fold`, no
options, so it verifies with its defaults); the peers run with the Python this script runs
under, missing ones show as "not installed". For each model bnfold fails on or folds less than
a peer, `bnfold inspect` is run too and its refusal reasons are tallied, names elided. The
script measures and prints; it asserts nothing.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_fold import (  # noqa: E402
    Tool, _format_table, _source_revision, available_tools, count_batchnorms, run_measured)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BNFOLD = Tool("bnfold fold", (), "bnfold", module_args=("bnfold", "fold", "{src}", "-o", "{dst}"))
SHORT_NAMES = {
    "onnxoptimizer fuse_bn_into_conv": "onnxoptimizer",
    "onnxslim.slim": "onnxslim",
    "onnxsim.simplify": "onnxsim",
    "onnxscript rewriter.rewrite": "rewriter",
    "onnxscript optimizer.optimize": "optimize",
    "ORT offline ENABLE_BASIC": "ORT basic",
    "ORT offline ENABLE_EXTENDED": "ORT ext",
}
_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
           11: "float64", 16: "bfloat16"}


def run_tool(tool: Tool, python: str, model: str, out: str, timeout: float,
             workdir: str) -> dict:
    """Exit code, wall time, first and last stderr lines, and BN left in the output."""
    if os.path.exists(out):
        os.remove(out)
    stderr_path = os.path.join(workdir, "stderr.txt")
    run = run_measured(tool.argv(python, model, out), timeout, stderr_path)
    with open(stderr_path, errors="replace") as f:
        lines = [line.strip() for line in f.read().splitlines() if line.strip()]
    result = {"rc": run.returncode, "seconds": round(run.seconds, 2), "bn_left": None,
              "error": ""}
    if run.returncode != 0:
        # bnfold prints "error: ..." once; a traceback's last line says what was raised
        first = next((line for line in lines if line.lower().startswith("error")),
                     lines[0] if lines else "")
        result["error"] = "timed out" if run.returncode == -9 else (
            first if tool.kind == "bnfold" else run.error_tail) or f"exit {run.returncode}"
        if tool.kind == "bnfold" and not first and run.returncode != -9:
            result["error"] = _stdout_verdict(tool.argv(python, model, out), timeout)
    elif not os.path.exists(out):
        result["error"] = "wrote no output"
    else:
        result["bn_left"] = count_batchnorms(out)
        result["affine_left"] = count_affine_left(out)
    return result


_WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
_SHAPE_ONLY = {"Identity", "Squeeze", "Reshape"}


def count_affine_left(path: str) -> int:
    """Main-graph Mul/Add nodes that look like a frozen BN (tf2onnx writes every BN it cannot
    merge as Mul → Add): one operand a constant, the other from a Conv/ConvTranspose/Gemm/MatMul
    with a constant weight, through Identity/Squeeze/Reshape only, each link read by the next
    alone. An Add after a MatMul is its bias add, not counted. A count of candidates: the
    constant's shape is not checked."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    constants = {t.name for t in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    producer = {o: n for n in graph.node for o in n.output}
    readers = collections.Counter(i for n in graph.node for i in n.input)
    readers.update(o.name for o in graph.output)
    count = 0
    for node in graph.node:
        if node.op_type not in ("Mul", "Add") or len(node.input) != 2:
            continue
        data = [name for name in node.input if name not in constants]
        if len(data) != 1:
            continue
        source = producer.get(data[0]) if readers[data[0]] == 1 else None
        while source is not None and source.op_type in _SHAPE_ONLY and source.input:
            name = source.input[0]
            source = producer.get(name) if readers[name] == 1 else None
        if (source is not None and source.op_type in _WEIGHTED and len(source.input) > 1
                and source.input[1] in constants
                and not (node.op_type == "Add" and source.op_type == "MatMul")):
            count += 1
    return count


def _stdout_verdict(argv: list[str], timeout: float) -> str:
    """bnfold's refusal to write (a failed verification) goes to stdout: run it again for that."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    lines = [line.strip() for line in done.stdout.splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if line.startswith("verification")), 0)
    rows = [line.strip("│┃").replace("│", "|").replace("┃", "|") for line in lines[start:]
            if line.startswith(("│", "┃")) or "equivalent" in line]
    verdict = " / ".join(" ".join(row.split()) for row in rows)
    return f"exit {done.returncode}: {verdict or (lines[-1] if lines else 'no output')}"


def inspect_reasons(python: str, model: str, timeout: float, workdir: str) -> dict:
    """`bnfold inspect` on one model: refusal reasons with quoted names elided, counted."""
    report = os.path.join(workdir, "inspect.json")
    if os.path.exists(report):
        os.remove(report)
    done = subprocess.run([python, "-m", "bnfold", "inspect", model, "--json", report],
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or not os.path.exists(report):
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        return {"error": next((line for line in lines if line.lower().startswith("error")),
                              lines[-1] if lines else f"exit {done.returncode}")}
    with open(report) as f:
        found = json.load(f)
    counts = collections.Counter(
        re.sub(r"'[^']*'", "'…'", reason)
        for entry in found["entries"] if entry["status"] != "folded"
        for reason in entry["reasons"])
    return {"summary": found["summary"], "reasons": dict(counts.most_common())}


def short_reason(error: str) -> str:
    """A traceback's last line without the exception's module path or ORT's status prefix."""
    error = re.sub(r"^(?:[\w]+\.)+(\w+:)", r"\1", error)
    return re.sub(r"\[ONNXRuntimeError\] : \d+ : \w+ : ", "", error)


def describe_model(path: str) -> dict:
    """Inputs, and the exporter habits a fold rule may trip on."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = []
    for value in graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims = [d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?")
                for d in tensor.shape.dim] if tensor.HasField("shape") else None
        dtype = _DTYPES.get(tensor.elem_type, str(tensor.elem_type))
        inputs.append(f"{value.name}:{dtype}" + ("[no shape]" if dims is None
                                                 else f"[{','.join(dims)}]"))
    producers = {out: node for node in graph.node for out in node.output}
    ops = collections.Counter(node.op_type for node in _walk(graph))
    traits = []
    listed = sum(value.name in initializers for value in graph.input)
    if listed:
        traits.append(f"{listed} initializers listed as inputs (IR {model.ir_version})")
    fed = collections.Counter()
    for node in graph.node:
        if node.op_type != "BatchNormalization":
            continue
        for name in node.input[1:]:
            if name in producers:
                fed[f"BN param from {producers[name].op_type}"] += 1
            elif name not in initializers:
                fed["BN param is a graph input"] += 1
        fed.update(f"BN attr {a.name}" for a in node.attribute if a.name != "epsilon")
    traits += [f"{why} x{count}" for why, count in sorted(fed.items())]
    traits += [f"{op} x{ops[op]}" for op in ("Identity", "If", "Loop", "Scan") if ops[op]]
    return {"ir": model.ir_version, "inputs": inputs, "traits": traits}


def _walk(graph):
    """Every node, subgraphs included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] * attr.HasField("g") + list(attr.graphs):
                yield from _walk(sub)


def best(results: dict[str, dict], key: str = "bn_left") -> int | None:
    left = [r[key] for r in results.values() if r.get(key) is not None]
    return min(left) if left else None


def cell(result: dict) -> str:
    if result["bn_left"] is not None:
        affine = result.get("affine_left")
        return f"{result['bn_left']}" + (f"+{affine}" if affine else "")
    return f"error: {short_reason(result['error'])[:32]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", required=True, help="A folder of .onnx files.")
    parser.add_argument("--bnfold-python", default=os.path.join(REPO, ".venv", "bin", "python"),
                        help="The Python whose bnfold runs [the project venv's].")
    parser.add_argument("--timeout", type=float, default=120, help="Seconds per tool and model.")
    parser.add_argument("--json", dest="json_path", help="Also write every result here.")
    args = parser.parse_args(argv)

    paths = sorted(os.path.join(args.models, f) for f in os.listdir(args.models)
                   if f.endswith(".onnx"))
    if not paths:
        parser.error(f"no .onnx files in {args.models}")
    chosen, missing = available_tools(None)
    peers = [t for t in chosen if t.kind in ("python", "ort")]
    print(f"bnfold from {args.bnfold_python} ({_source_revision()}); peers from "
          f"{sys.executable}, timeout {args.timeout:.0f} s", flush=True)
    for name, why in missing.items():
        print(f"{SHORT_NAMES.get(name, name)}: {why}", flush=True)

    results = {}
    with tempfile.TemporaryDirectory(prefix="compare_real_") as workdir:
        out = os.path.join(workdir, "out.onnx")
        for path in paths:
            name = os.path.splitext(os.path.basename(path))[0]
            entry = {"bn_in": count_batchnorms(path), **describe_model(path)}
            entry["bnfold"] = run_tool(BNFOLD, args.bnfold_python, path, out, args.timeout,
                                       workdir)
            entry["peers"] = {SHORT_NAMES.get(t.name, t.name):
                              run_tool(t, sys.executable, path, out, args.timeout, workdir)
                              for t in peers}
            entry["best_peer"] = best(entry["peers"])
            entry["best_peer_affine"] = best(entry["peers"], "affine_left")
            mine = entry["bnfold"]["bn_left"]
            if mine is None or (entry["best_peer"] is not None and mine > entry["best_peer"]):
                entry["inspect"] = inspect_reasons(args.bnfold_python, path, args.timeout,
                                                   workdir)
            results[name] = entry
            print(f"{name}: bnfold rc {entry['bnfold']['rc']}, BN {entry['bn_in']} -> "
                  f"{mine}, best peer {entry['best_peer']}", file=sys.stderr, flush=True)

    print(report(results, [SHORT_NAMES.get(t.name, t.name) for t in peers]))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def report(results: dict[str, dict], peer_names: list[str]) -> str:
    header = ["model", "BN in", "bnfold rc", "left", "s", *peer_names, "best peer"]
    rows = []
    for name, entry in results.items():
        mine = entry["bnfold"]
        rows.append([name, entry["bn_in"], mine["rc"],
                     "-" if mine["bn_left"] is None else cell(mine), f"{mine['seconds']:.1f}",
                     *(cell(entry["peers"][p]) for p in peer_names),
                     "-" if entry["best_peer"] is None else entry["best_peer"]])
    lines = [_format_table(header, rows), "", "== bnfold exits non-zero =="]
    failed = {n: e for n, e in results.items() if e["bnfold"]["rc"] != 0}
    lines += [f"{n} (BN {e['bn_in']}, best peer leaves {e['best_peer']}): {e['bnfold']['error']}"
              for n, e in failed.items()] or ["none"]
    lines += ["", "== bnfold leaves more BatchNormalization than the best peer =="]
    short = {n: e for n, e in results.items() if e["bnfold"]["bn_left"] is not None
             and e["best_peer"] is not None and e["bnfold"]["bn_left"] > e["best_peer"]}
    lines += [f"{n}: {e['bnfold']['bn_left']} left vs {e['best_peer']}"
              for n, e in short.items()] or ["none"]
    lines += ["", "== bnfold leaves more frozen-BN Mul/Add (the +N in a cell) than the best peer =="]
    short = {n: e for n, e in results.items() if e["bnfold"].get("affine_left") is not None
             and e.get("best_peer_affine") is not None
             and e["bnfold"]["affine_left"] > e["best_peer_affine"]}
    lines += [f"{n}: {e['bnfold']['affine_left']} left vs {e['best_peer_affine']}"
              for n, e in short.items()] or ["none"]
    lines += ["", "== bnfold inspect, where it failed or fell short =="]
    for name, entry in results.items():
        if "inspect" in entry:
            found = entry["inspect"]
            lines.append(f"{name}:")
            if "error" in found:
                lines.append(f"  inspect failed: {found['error']}")
            else:
                counts = found["summary"]
                lines[-1] += (f" {counts['batchnorm']} BN, {counts['folded']} would fold, "
                              f"{counts['kept']} kept")
                lines += [f"  {count:3} x {reason}" for reason, count in found["reasons"].items()]
    lines += ["", "== peer errors =="]
    for name, entry in results.items():
        for peer, result in entry["peers"].items():
            if result["error"]:
                lines.append(f"{name} / {peer}: {short_reason(result['error'])}")
    lines += ["", "== inputs and exporter habits =="]
    for name, entry in results.items():
        lines.append(f"{name} (IR {entry['ir']}): {'  '.join(entry['inputs'])}")
        if entry["traits"]:
            lines.append(f"  {'; '.join(entry['traits'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
