"""Your own nn.Module with a checkpoint, through bnfold: load → recalibrate → export → fold → verify.

    python samples/own_model.py --steps 50 --out own-out

`TinyNet` stands for your model and `build` for its factory: bnfold finds it by the spec
"own_model:build" (module:factory), exactly as `bnfold export --model own_model:build
--checkpoint own-out/tiny.pt --input-shape 1x3x16x16 -o tiny.onnx` would from this folder.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

import bnfold
from bnfold.pytorch.export import export_onnx
from bnfold.pytorch.train.files import save_state_dict
from bnfold.pytorch.train.recalibrate import recalibrate_batchnorm
from bnfold.pytorch.zoo import create

INPUT_SHAPE = (1, 3, 16, 16)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn_dw = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4, bias=False)
        self.bn_fc = nn.BatchNorm1d(4)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.bn_dw(self.depthwise(x)))
        return self.bn_fc(self.fc(x.mean(dim=(2, 3))))


def build() -> nn.Module:
    """The factory bnfold calls for the spec 'own_model:build'."""
    return TinyNet()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps on synthetic data")
    parser.add_argument("--out", default="own-out", help="output folder")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    # Stand-in for your training: a few steps on synthetic data, then save the state_dict.
    generator = torch.Generator().manual_seed(0)
    data = 2.0 + 3.0 * torch.randn(512, *INPUT_SHAPE[1:], generator=generator)
    labels = (data.mean(dim=(1, 2, 3)) > 2.0).long()
    model = build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(args.steps):
        index = torch.randint(0, len(data), (32,), generator=generator)
        loss = nn.functional.cross_entropy(model(data[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    checkpoint = save_state_dict(model, os.path.join(args.out, "tiny.pt"))
    print(f"1. trained TinyNet for {args.steps} steps → {checkpoint}")

    try:
        # The same path the CLI takes: module:factory + checkpoint (weights_only load, strict keys).
        loaded = create("own_model:build", checkpoint)
    except bnfold.BnfoldError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    batches = (data[i:i + 64] for i in range(0, len(data), 64))
    recal = recalibrate_batchnorm(loaded, batches)
    print(f"2. recalibrated {recal.bn_modules} BatchNorms over {recal.batches} batches (Algorithm 2)")

    onnx_path = os.path.join(args.out, "tiny.onnx")
    exported = export_onnx(loaded, INPUT_SHAPE, onnx_path)
    print(f"3. exported {onnx_path}: {exported.bn_nodes}/{exported.bn_modules} BatchNorms kept, "
          f"torch vs ORT max abs error {exported.max_abs_error:.2g}")

    folded_path = os.path.join(args.out, "tiny.folded.onnx")
    result = bnfold.fold_file(onnx_path, folded_path, verify=True)
    check = bnfold.verify(onnx_path, folded_path) if result.output_path else None
    print(f"4. folded {result.report.folded_count} of {result.report.batchnorm_count} BatchNorms; "
          f"verified: {check.ok if check else False}")
    for entry in result.report.kept:
        print(f"   kept {entry.node}: {'; '.join(entry.reasons)}")
    if check is None or not check.ok:
        print("error: the folded model did not verify", file=sys.stderr)
        return 1
    print(f"wrote {folded_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
