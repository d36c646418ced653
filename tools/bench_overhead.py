"""How much the bench harness adds to a measurement, on ort-cpu.

Times the same ONNX Runtime session two ways in one process, interleaved in blocks:
  bare    — a plain loop: perf_counter(); sess.run(); perf_counter()
  harness — bnfold.deploy.bench.measure() driving the ort-cpu engine's session (same session object)
and prints harness p50 / bare p50 (target: within 5%, i.e. a ratio of 0.95..1.05).

    python tools/bench_overhead.py [--rounds 20] [--threads 1] [--batch 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bnfold.deploy.bench import measure
from bnfold.deploy.engines import EngineOptions, get_engine
from bnfold.verification.inputs import make_inputs
from bnfold.sample_model import build_sample_model


def bare_loop(session, names, feed, count: int) -> list[float]:
    samples = []
    clock = time.perf_counter
    for _ in range(count):
        start = clock()
        session.run(names, feed)
        samples.append((clock() - start) * 1e3)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--block", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()

    model = build_sample_model()
    feed = make_inputs(model, {"input": (args.batch, 3, 32, 32)}, seed=0)
    engine = get_engine("ort-cpu", EngineOptions(threads=args.threads))
    wrapped = engine.open("sample", model, feed)
    raw = wrapped._session  # the very same InferenceSession, run bare
    names = [o.name for o in raw.get_outputs()]
    bare_loop(raw, names, feed, 200)  # warm-up
    bare, harness = [], []
    for _ in range(args.rounds):
        bare += bare_loop(raw, names, feed, args.block)
        harness += measure([wrapped], runs=args.block, min_time=0.0, warmup_time=0.0,
                           warmup_runs=0, block=args.block)[0]["host"]
    bare_p50, harness_p50 = float(np.median(bare)), float(np.median(harness))
    ratio = harness_p50 / bare_p50
    print(f"bare sess.run p50   {bare_p50:.4f} ms  ({len(bare)} runs)")
    print(f"harness p50         {harness_p50:.4f} ms  ({len(harness)} timed runs)")
    verdict = "within" if abs(ratio - 1) <= 0.05 else "OUTSIDE"
    print(f"ratio harness/bare  {ratio:.4f}  ({verdict} the 5% target)")


if __name__ == "__main__":
    main()
