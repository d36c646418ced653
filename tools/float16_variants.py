"""Write float16 versions of every model in a folder, the way users make them.

onnxconverter-common's `convert_float_to_float16` is what most float16 ONNX files come from. It
writes each model twice: all float16 (`NAME_fp16.onnx`), and with float32 inputs and outputs
(`NAME_fp16_io32.onnx`, `keep_io_types=True`: Casts at the edges, so the outputs are float32
while every Conv computes in float16). It keeps some ops in float32 with Casts around them
(Resize, Upsample, TopK, Range, ...). Run `bnfold fold` (or `compare_real.py`) on the output
folder. onnxconverter-common is a peer-venv package (never a bnfold dependency):

    .venv-peers/bin/pip install onnxconverter-common --no-deps
    .venv-peers/bin/python tools/float16_variants.py --models real-models --out fp16-models
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", required=True, help="folder of .onnx files")
    parser.add_argument("--out", required=True, help="where the float16 versions go")
    parser.add_argument("--only", nargs="*", help="file names to convert (default: all)")
    args = parser.parse_args()
    try:
        import onnx
        from onnxconverter_common import float16
    except ImportError as exc:
        print(f"needs onnx and onnxconverter-common ({exc})", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    names = args.only or sorted(n for n in os.listdir(args.models) if n.endswith(".onnx"))
    for name in names:
        model = onnx.load(os.path.join(args.models, name))
        for keep_io, suffix in ((False, "_fp16"), (True, "_fp16_io32")):
            target = os.path.join(args.out, name[:-len(".onnx")] + suffix + ".onnx")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "values truncated to float16" per tensor
                    converted = float16.convert_float_to_float16(model, keep_io_types=keep_io)
                onnx.save(converted, target)
                print(f"wrote {target}")
            except Exception as exc:  # the converter's own failures: report, go on
                print(f"{name} ({suffix[1:]}): not converted: {type(exc).__name__}: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
