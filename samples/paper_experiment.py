"""The BN paper's MNIST experiment offline, end to end: train → export → fold → verify.

    python samples/paper_experiment.py --steps 5000 --out paper-out

1. trains the paper's 3×100 sigmoid MLP with and without BatchNorm on sklearn's digits
   (or --data mnist.npz) and writes curve.csv / curve.png / paper-mlp-bn.pt;
2. exports the BN arm to ONNX with its 3 BatchNormalization nodes kept;
3. folds them into the Gemm/MatMul weights with bnfold and verifies the result with ONNX Runtime.
"""

from __future__ import annotations

import argparse
import os
import sys

import bnfold
from bnfold.pytorch.export import export_onnx
from bnfold.pytorch.train.paper import ARMS, run_paper_experiment
from bnfold.pytorch.zoo import create, model_input_shape


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=60)
    parser.add_argument("--data", default="digits", help="'digits' or an .npz (x_train, y_train, x_test, y_test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="paper-out", help="output folder")
    args = parser.parse_args(argv)

    try:
        experiment = run_paper_experiment(args.out, steps=args.steps, batch_size=args.batch_size,
                                          data=args.data, seed=args.seed)
    except bnfold.BnfoldError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"1. trained on {experiment.data} in {experiment.wall_s:.1f} s "
          f"(SGD lr {experiment.lr:g}, batch {experiment.batch_size})")
    for arm in ARMS:
        reached = ", ".join(f"{t:.0%}: {'step ' + str(s) if s is not None else 'not reached'}"
                            for t, s in experiment.steps_to[arm].items())
        print(f"   {arm:>5}: {reached}; final accuracy {experiment.final_accuracy[arm]:.4f}")

    model = create("paper-mlp", experiment.checkpoint)
    onnx_path = os.path.join(args.out, "paper-mlp-bn.onnx")
    exported = export_onnx(model, model_input_shape("paper-mlp", model), onnx_path, dynamic_batch=True)
    print(f"2. exported {onnx_path}: {exported.bn_nodes} BatchNormalization nodes kept "
          f"(for {exported.bn_modules} modules), torch vs ORT max abs error {exported.max_abs_error:.2g}")

    folded_path = os.path.join(args.out, "paper-mlp-bn.folded.onnx")
    result = bnfold.fold_file(onnx_path, folded_path, verify=True)
    verification = result.report.verification or {}
    worst = max((o["max_abs_error"] for o in verification.get("outputs", [])), default=float("nan"))
    print(f"3. folded {result.report.folded_count} of {result.report.batchnorm_count} BatchNorms, "
          f"kept {len(result.report.kept)}; verified: {verification.get('ok')} "
          f"(max abs error {worst:.2g})")
    if result.output_path is None:
        print("error: the folded model did not verify; nothing was written", file=sys.stderr)
        return 1
    print(f"wrote {folded_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
