"""How bnfold's fold time grows with graph size: chains of tiny Conv→BN→Tanh triples.

Builds graphs of 1k, 4k and 16k triples (3k, 12k and 48k nodes; weights are 4x4x1x1, so the
cost is the graph, not the bytes) and times, each in a fresh process, median of --repeat:

- the I/O floor: `onnx.load` + `onnx.save` of the same file;
- `bnfold.fold_file(..., verify=False)`;
- the CLI, `bnfold fold --no-verify`.

It prints time over the floor per size, the time per node, and the CLI over fold_file, so you
can see whether the fold is linear (the per-node time stays flat) and how far it is from the
floor. It measures and prints; it asserts nothing.

    .venv/bin/python tools/bench_scale.py --repeat 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SIZES = (1000, 4000, 16000)
CHANNELS = 4
LOAD_SAVE = "import sys, onnx; onnx.save(onnx.load(sys.argv[1]), sys.argv[2])"
FOLD_FILE = "import sys, bnfold; bnfold.fold_file(sys.argv[1], sys.argv[2], verify=False)"


def build_triples(count: int, seed: int = 0) -> onnx.ModelProto:
    """`count` × (Conv 1x1 → BatchNormalization → Tanh) in a chain, opset 17."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "input"
    for i in range(count):
        w = rng.standard_normal((CHANNELS, CHANNELS, 1, 1)).astype(np.float32) * 0.5
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        for role, values in (("scale", rng.uniform(0.5, 1.5, CHANNELS)),
                             ("bias", rng.normal(0, 0.1, CHANNELS)),
                             ("mean", rng.normal(0, 0.1, CHANNELS)),
                             ("var", rng.uniform(0.5, 2.0, CHANNELS))):
            inits.append(numpy_helper.from_array(values.astype(np.float32), f"bn{i}_{role}"))
        nodes.append(helper.make_node("Conv", [x, f"w{i}"], [f"c{i}"], name=f"conv{i}"))
        nodes.append(helper.make_node(
            "BatchNormalization", [f"c{i}", f"bn{i}_scale", f"bn{i}_bias", f"bn{i}_mean",
                                   f"bn{i}_var"], [f"b{i}"], name=f"bn{i}"))
        nodes.append(helper.make_node("Tanh", [f"b{i}"], [f"t{i}"], name=f"tanh{i}"))
        x = f"t{i}"
    graph = helper.make_graph(
        nodes, "triples", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, CHANNELS, 2, 2])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, CHANNELS, 2, 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    args = parser.parse_args(argv)
    python = sys.executable
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_fold import compile_bnfold

    print(compile_bnfold(python), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for count in args.sizes:
            src = os.path.join(folder, f"triples{count}.onnx")
            onnx.save(build_triples(count), src)
            out = os.path.join(folder, "out.onnx")
            tools = {
                "floor": [python, "-c", LOAD_SAVE, src, out],
                "fold_file": [python, "-c", FOLD_FILE, src, out],
                "cli": [python, "-m", "bnfold", "fold", src, "-o", out, "--no-verify"],
            }
            times: dict[str, list[float]] = {name: [] for name in tools}
            for _ in range(args.repeat):
                for name, command in tools.items():  # interleaved: noise hits all alike
                    times[name].append(timed(command))
            med = {name: statistics.median(values) for name, values in times.items()}
            ranges = {name: (min(v), max(v)) for name, v in times.items()}
            rows.append((count, med, ranges))
    print(f"{'nodes':>7} {'floor s':>8} {'fold_file s':>12} {'/floor':>7} {'ms/node':>8} "
          f"{'cli s':>7} {'/floor':>7} {'cli/fold_file':>14}  ranges (min-max s)")
    for count, med, ranges in rows:
        nodes = 3 * count
        text = "  ".join(f"{k} {lo:.2f}-{hi:.2f}" for k, (lo, hi) in ranges.items())
        print(f"{nodes:>7} {med['floor']:>8.2f} {med['fold_file']:>12.2f} "
              f"{med['fold_file'] / med['floor']:>6.2f}x {1000 * med['fold_file'] / nodes:>8.3f} "
              f"{med['cli']:>7.2f} {med['cli'] / med['floor']:>6.2f}x "
              f"{med['cli'] / med['fold_file']:>13.2f}x  {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
