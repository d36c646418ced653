"""Run `bnfold export` then the plain `bnfold fold` on PyTorch networks nobody here wrote, as a
user with their own `module:factory` would, and print what happened to each.

The networks come from third-party packages: pytorchcv (one module per architecture, imported
directly: its model_provider imports torchvision, which does not load against the pinned CPU
torch), efficientnet-pytorch, MONAI and timm. timm imports torchvision at import time (data
transforms, FrozenBatchNorm2d) though none of the models here calls it, so where torchvision
cannot be imported the factories put a stub of it on the import path first (every name it is
asked for is an empty class). Each factory draws the BN
statistics like a trained net's (a fresh BN is the identity, so a wrong fold would pass), puts
the net in eval mode and returns it; `bnfold export` keeps every BN and checks the file against
torch; `bnfold fold` (no options: verification on) folds and verifies. The exported files land
in --out (real-models/, never committed), so tools/compare_real.py can put the peers beside
bnfold on them.

Nothing here belongs in the project's venv; use the peers' one (which has torch==2.13.0):

    .venv-peers/bin/pip install --no-deps pytorchcv==0.0.74 efficientnet-pytorch==0.7.1 \\
        monai==1.6.1 timm==1.0.31
    .venv-peers/bin/pip install pillow pyyaml safetensors huggingface_hub   # timm's imports
    .venv-peers/bin/python tools/torch_zoo.py --out real-models/     # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# name: (factory expression, input shapes as --input-shape takes them, space-separated). The
# expression runs with `torch` imported; the
# architectures differ in what a fold meets (pre-activation BN before a Conv, shared weights,
# grouped and depthwise convs, 1-D and 3-D BN, BN after a Linear, SE blocks, dilations).
NETS = {
    "pytorchcv_resnet18": ("__import__('pytorchcv.models.resnet', fromlist=['x']).resnet18()",
                           "1x3x224x224"),
    "pytorchcv_preresnet18": (
        "__import__('pytorchcv.models.preresnet', fromlist=['x']).preresnet18()", "1x3x224x224"),
    "pytorchcv_mobilenetv3_small": (
        "__import__('pytorchcv.models.mobilenetv3', fromlist=['x']).mobilenetv3_small_w1()",
        "1x3x224x224"),
    "pytorchcv_shufflenetv2": (
        "__import__('pytorchcv.models.shufflenetv2', fromlist=['x']).shufflenetv2_wd2()",
        "1x3x224x224"),
    "pytorchcv_densenet121": (
        "__import__('pytorchcv.models.densenet', fromlist=['x']).densenet121()", "1x3x224x224"),
    "pytorchcv_efficientnet_b0": (
        "__import__('pytorchcv.models.efficientnet', fromlist=['x']).efficientnet_b0()",
        "1x3x224x224"),
    "pytorchcv_ghostnet": ("__import__('pytorchcv.models.ghostnet', fromlist=['x']).ghostnet()",
                           "1x3x224x224"),
    "pytorchcv_regnetx002": (
        "__import__('pytorchcv.models.regnet', fromlist=['x']).regnetx002()", "1x3x224x224"),
    "pytorchcv_dla34": ("__import__('pytorchcv.models.dla', fromlist=['x']).dla34()",
                        "1x3x224x224"),
    "pytorchcv_hrnet_w18_small_v1": (
        "__import__('pytorchcv.models.hrnet', fromlist=['x']).hrnet_w18_small_v1()",
        "1x3x224x224"),
    "pytorchcv_sqnxt23_w1": (
        "__import__('pytorchcv.models.squeezenext', fromlist=['x']).sqnxt23_w1()", "1x3x224x224"),
    "pytorchcv_xception": ("__import__('pytorchcv.models.xception', fromlist=['x']).xception()",
                           "1x3x299x299"),
    "pytorchcv_sknet50": ("__import__('pytorchcv.models.sknet', fromlist=['x']).sknet50()",
                          "1x3x224x224"),
    "pytorchcv_dpn68": ("__import__('pytorchcv.models.dpn', fromlist=['x']).dpn68()",
                        "1x3x224x224"),
    "pytorchcv_igcv3_wd4": ("__import__('pytorchcv.models.igcv3', fromlist=['x']).igcv3_wd4()",
                            "1x3x224x224"),
    "pytorchcv_mixnet_s": ("__import__('pytorchcv.models.mixnet', fromlist=['x']).mixnet_s()",
                           "1x3x224x224"),
    "pytorchcv_peleenet": ("__import__('pytorchcv.models.peleenet', fromlist=['x']).peleenet()",
                           "1x3x224x224"),
    "pytorchcv_vovnet27s": ("__import__('pytorchcv.models.vovnet', fromlist=['x']).vovnet27s()",
                            "1x3x224x224"),
    "pytorchcv_hardnet39ds": (
        "__import__('pytorchcv.models.hardnet', fromlist=['x']).hardnet39ds()", "1x3x224x224"),
    "pytorchcv_bninception": (
        "__import__('pytorchcv.models.bninception', fromlist=['x']).bninception()",
        "1x3x224x224"),
    "pytorchcv_sharesnet18": (
        "__import__('pytorchcv.models.sharesnet', fromlist=['x']).sharesnet18()", "1x3x224x224"),
    "pytorchcv_ibn_resnet50": (
        "__import__('pytorchcv.models.ibnresnet', fromlist=['x']).ibn_resnet50()", "1x3x224x224"),
    "pytorchcv_selecsls42": (
        "__import__('pytorchcv.models.selecsls', fromlist=['x']).selecsls42()", "1x3x224x224"),
    "pytorchcv_diracnet18v2": (
        "__import__('pytorchcv.models.diracnetv2', fromlist=['x']).diracnet18v2()",
        "1x3x224x224"),
    "pytorchcv_octresnet10_ad2": (
        "__import__('pytorchcv.models.octresnet', fromlist=['x']).octresnet10_ad2()",
        "1x3x224x224"),
    "pytorchcv_fishnet99": ("__import__('pytorchcv.models.fishnet', fromlist=['x']).fishnet99()",
                            "1x3x224x224"),
    "pytorchcv_condensenet74_c4_g4": (
        "__import__('pytorchcv.models.condensenet', fromlist=['x']).condensenet74_c4_g4()",
        "1x3x224x224"),
    "pytorchcv_preresnet20_cifar10": (
        "__import__('pytorchcv.models.preresnet_cifar', fromlist=['x']).preresnet20_cifar10()",
        "1x3x32x32"),
    "pytorchcv_quartznet5x5": (
        "__import__('pytorchcv.models.quartznet', fromlist=['x']).quartznet5x5_en_ls("
        "from_audio=False)", "x:1x64x128 x_len:1:int64"),
    "pytorchcv_fastscnn": (
        "__import__('pytorchcv.models.fastscnn', fromlist=['x']).fastscnn_cityscapes("
        "in_size=(192, 384), aux=False)", "1x3x192x384"),
    "pytorchcv_superpointnet": (
        "__import__('pytorchcv.models.superpointnet', fromlist=['x']).superpointnet()",
        "1x1x64x64"),
    "efficientnet_pytorch_b0": (
        "__import__('efficientnet_pytorch').EfficientNet.from_name('efficientnet-b0')",
        "1x3x224x224"),
    "monai_densenet121_3d": (
        "__import__('monai.networks.nets', fromlist=['x']).DenseNet121(spatial_dims=3, "
        "in_channels=1, out_channels=2)", "1x1x32x32x32"),
    "monai_unet_2d": (
        "__import__('monai.networks.nets', fromlist=['x']).UNet(spatial_dims=2, in_channels=1, "
        "out_channels=2, channels=(8, 16, 32), strides=(2, 2), num_res_units=2, norm='batch')",
        "1x1x64x64"),
    # timm: LeViT's Linear → BatchNorm1d over flattened tokens; RepVGG/MobileOne/FastViT
    # before reparameterisation (a BN per branch, one on the identity path); RepViT, MIT's
    # EfficientViT, MobileNetV4, GhostNetV2, HGNetV2, TF-EfficientNet ("same" padding).
    **{f"timm_{name}": (f"_timm().create_model('{name}', pretrained=False)", shape)
       for name, shape in (("levit_128s", "1x3x224x224"), ("repvgg_a0", "1x3x224x224"),
                           ("mobileone_s0", "1x3x224x224"), ("fastvit_t8", "1x3x256x256"),
                           ("repvit_m0_9", "1x3x224x224"), ("efficientvit_b0", "1x3x224x224"),
                           ("mobilenetv4_conv_small", "1x3x224x224"),
                           ("ghostnetv2_100", "1x3x224x224"), ("hgnetv2_b0", "1x3x224x224"),
                           ("tf_efficientnet_b0", "1x3x224x224"))},
}

FACTORIES = '''
import importlib.abc
import importlib.machinery
import sys
import types

import torch


def _timm():
    """timm, importable where torchvision is not (see the module docstring)."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        class Anything(type):
            def __getattr__(cls, name):
                if name.startswith("__"):
                    raise AttributeError(name)
                return Anything(name, (), {})

        class Stub(types.ModuleType):
            def __getattr__(self, name):
                if name.startswith("__"):
                    raise AttributeError(name)
                return Anything(name, (), {})

        class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            def find_spec(self, fullname, path, target=None):
                if fullname.split(".")[0] != "torchvision":
                    return None
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

            def create_module(self, spec):
                module = Stub(spec.name)
                module.__path__ = []
                return module

            def exec_module(self, module):
                pass

        for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
            del sys.modules[name]  # a half-imported real one
        sys.meta_path.insert(0, Finder())
    import timm
    return timm


def _trained_like(net, shapes):
    """BN statistics as a trained net has them: measured on random inputs (so each BN
    normalises what reaches it, as after training), with a scale and shift of its own drawn
    (so no BN is the identity)."""
    generator = torch.Generator().manual_seed(0)
    if hasattr(net, "set_swish"):
        net.set_swish(memory_efficient=False)  # efficientnet-pytorch: a custom autograd op
    norms = [m for m in net.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None  # a plain average over the calibration batches
        if module.affine:
            with torch.no_grad():
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=generator) * 0.2)
    net.train()
    with torch.no_grad():
        for _ in range(4):
            # float inputs: noise; an integer one (a length): the float input's last dim
            net(*[torch.randn((4,) + dims[1:], generator=generator) if dtype == "float32"
                  else torch.full((4,) + dims[1:], shapes[0][0][-1]) for dims, dtype in shapes])
    return net.eval()
'''


def parse_shapes(text: str) -> list[tuple[tuple[int, ...], str]]:
    """'x:1x64x128 x_len:1:int64' -> [((1, 64, 128), 'float32'), ((1,), 'int64')]."""
    shapes = []
    for item in text.split():
        parts = item.split(":")
        dtype = parts[2] if len(parts) == 3 else "float32"
        dims = parts[1] if len(parts) >= 2 else parts[0]
        shapes.append((tuple(int(d) for d in dims.split("x")), dtype))
    return shapes


def write_factories(folder: str) -> str:
    lines = [FACTORIES]
    for name, (expression, _) in NETS.items():
        lines.append(f"\n\ndef {name}():\n    torch.manual_seed(0)\n"
                     f"    return _trained_like({expression}, {parse_shapes(NETS[name][1])})\n")
    path = os.path.join(folder, "torch_zoo_factories.py")
    with open(path, "w") as handle:
        handle.write("".join(lines))
    return path


def run(command: list[str], env: dict, timeout: float) -> tuple[int, str, float]:
    start = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout:.0f} s", time.perf_counter() - start
    text = (done.stdout + done.stderr).strip()
    return done.returncode, text, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="real-models", help="Folder for the exported files.")
    parser.add_argument("--only", nargs="*", help="Just these names (see NETS).")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    bnfold = os.path.join(os.path.dirname(sys.executable), "bnfold")
    names = args.only or list(NETS)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        write_factories(scratch)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [scratch, os.environ.get("PYTHONPATH")])))
        for name in names:
            path = os.path.join(args.out, f"{name}.onnx")
            if not os.path.exists(path):
                shapes = [arg for item in NETS[name][1].split()
                          for arg in ("--input-shape", item)]
                rc, text, seconds = run([bnfold, "export", "--model",
                                         f"torch_zoo_factories:{name}", *shapes, "-o", path],
                                        env, args.timeout)
                if rc != 0:
                    rows.append((name, f"export rc {rc}", text.splitlines()[-1:] or [""]))
                    print(f"{name}: export failed\n{text}\n", file=sys.stderr)
                    continue
            report = os.path.join(scratch, "report.json")
            rc, text, seconds = run([bnfold, "fold", path, "-o",
                                     os.path.join(scratch, "folded.onnx"), "--report", report],
                                    env, args.timeout)
            if rc != 0 or not os.path.exists(report):
                rows.append((name, f"fold rc {rc}", text.splitlines()[-1:] or [""]))
                print(f"{name}: fold failed\n{text}\n", file=sys.stderr)
                continue
            with open(report) as handle:
                data = json.load(handle)
            os.remove(report)
            summary = data["summary"]
            verified = (data.get("verification") or {}).get("ok")
            kept = [f"{e['node']}: {'; '.join(e['reasons'])}" for e in data["entries"]
                    if e["status"] == "kept"]
            rows.append((name, f"BN {summary['batchnorm']} folded {summary['folded']} kept "
                               f"{summary['kept']} verified {verified} {seconds:.1f} s", kept))
    for name, outcome, details in rows:
        print(f"{name:34} {outcome}")
        for line in details[:5]:
            print(f"    {line}")
        if len(details) > 5:
            print(f"    … {len(details) - 5} more")


if __name__ == "__main__":
    main()
