"""`bnfold demo`: the main job on built-in models — export, fold, verify, report, bench.

1. the built-in ONNX sample, which exercises every fold direction and one BN that cannot fold;
2. with torch installed, a ResNet-18-style PyTorch network exported with its BNs kept;
3. original vs folded latency, side by side, on the best engine present;
4. the folded model on the best engine present (openvino on a CPU machine when installed)
   against the original in ONNX Runtime, judged at the precision that engine reports.
"""

from __future__ import annotations

import json
import os

from rich.console import Console
from rich.markup import escape

from bnfold.errors import BnfoldError
from bnfold.onnxio.files import ensure_folder


def run_demo(out_dir: str, console: Console) -> None:
    from bnfold.onnxio.files import save_model
    from bnfold.sample_model import build_sample_model

    ensure_folder(out_dir)
    sample = os.path.join(out_dir, "sample.onnx")
    save_model(build_sample_model(), sample)
    console.rule("[bold]1. the built-in sample: every fold pattern, and one BN that cannot fold")
    console.print(f"built {escape(sample)}")
    sample_folded = _fold_and_verify(sample, out_dir, console)

    console.rule("[bold]2. a PyTorch network, exported with every BatchNorm kept")
    exported = _export_torch_sample(out_dir, console)
    if exported is not None:
        bench_pair = (exported, _fold_and_verify(exported, out_dir, console))
        shape = (8, 3, 64, 64)
    else:
        bench_pair, shape = (sample, sample_folded), (8, 3, 32, 32)

    console.rule("[bold]3. latency, original vs folded, side by side")
    _bench(*bench_pair, shape, out_dir, console)

    console.rule("[bold]4. what is deployed: the folded model on an engine vs the original")
    _cross_engine(*bench_pair, shape, out_dir, console)


def _fold_and_verify(path: str, out_dir: str, console: Console) -> str:
    from bnfold.folding.api import default_output_path, fold_file
    from bnfold.onnxio.staged_files import write_text_atomic
    from bnfold.cli.report_view import render_fold_report, render_verification

    folded = default_output_path(path)
    result = fold_file(path, folded, verify=True, verify_options={"runs": 3})
    render_fold_report(result.report, console, title=f"bnfold fold {os.path.basename(path)}")
    render_verification(result.report.verification, console)
    report_path = os.path.splitext(folded)[0] + ".report.json"
    write_text_atomic(report_path, json.dumps(result.report.to_dict(), indent=2, default=float) + "\n")
    if result.output_path is None:
        raise BnfoldError(f"the folded {path} did not verify: this is a bnfold bug, please report it")
    console.print(f"wrote {escape(folded)} and {escape(report_path)}", soft_wrap=True)
    return folded


def _export_torch_sample(out_dir: str, console: Console) -> str | None:
    """Export zoo resnet18 (with seeded, non-trivial BN statistics); None without torch."""
    try:
        import torch  # noqa: F401  (only probing whether the extra is installed)
    except ImportError:
        console.print("[dim]torch is not installed (pip install 'bnfold[torch]'): skipped[/]")
        return None
    from bnfold.pytorch.export import export_onnx
    from bnfold.pytorch.zoo import create, randomize_batchnorm

    model = randomize_batchnorm(create("resnet18"), seed=0)
    path = os.path.join(out_dir, "resnet18.onnx")
    exported = export_onnx(model, (1, 3, 64, 64), path, dynamic_batch=True)
    console.print(
        f"exported {escape(path)}: {exported.bn_nodes} BatchNormalization nodes kept for "
        f"{exported.bn_modules} BatchNorm modules; torch vs ONNX Runtime max relative error "
        f"{exported.max_rel_error:.2g}"
    )
    return path


def _bench(original: str, folded: str, shape, out_dir: str, console: Console) -> None:
    from bnfold.deploy.bench import bench_models
    from bnfold.cli.bench_view import render
    from bnfold.deploy.engines import best_available
    from bnfold.onnxio.staged_files import write_text_atomic

    from bnfold.verification.inputs import graph_inputs
    from bnfold.onnxio.files import load_model

    engine, why = best_available()
    console.print(f"engine [bold]{engine}[/]: {escape(why)}")
    # The built sample calls its input "input"; an export names it after forward's argument.
    input_name = graph_inputs(load_model(original))[0].name
    result = bench_models(
        [("original", original), ("folded", folded)], engine,
        shapes={input_name: shape}, runs=200, min_time=1.0,
    )
    render(result, console)
    bench_path = os.path.join(out_dir, "bench.json")
    write_text_atomic(bench_path, json.dumps(result.to_dict(), indent=2, default=float) + "\n")
    console.print(f"wrote {escape(bench_path)}", soft_wrap=True)


def deploy_engine() -> tuple[str, str]:
    """The best engine present for the cross-engine check: a GPU engine when there is one,
    else OpenVINO when installed, else ORT CPU with full optimisation."""
    from bnfold.deploy.engines import best_available
    from bnfold.deploy.engines.openvino import available as openvino_available

    engine, why = best_available()
    if engine == "ort-cpu" and openvino_available():
        return "openvino", "no GPU engine; OpenVINO is installed"
    return engine, why


def _cross_engine(original: str, folded: str, shape, out_dir: str, console: Console) -> None:
    from bnfold.verification.inputs import graph_inputs
    from bnfold.onnxio.files import load_model
    from bnfold.onnxio.staged_files import write_text_atomic
    from bnfold.cli.report_view import render_verification
    from bnfold.verification.runs import verify

    engine, why = deploy_engine()
    console.print(f"engine [bold]{engine}[/]: {escape(why)}")
    input_name = graph_inputs(load_model(original))[0].name
    result = verify(original, folded, engine=engine, shapes={input_name: shape},
                    ground_truth=False)
    render_verification(result.to_dict(), console)
    path = os.path.join(out_dir, "verify-engine.json")
    write_text_atomic(path, json.dumps(result.to_dict(), indent=2, default=float) + "\n")
    console.print(f"wrote {escape(path)}", soft_wrap=True)
    if not result.ok:
        raise BnfoldError(f"the folded model is not equivalent on {engine}: please report it "
                          f"with {path}")
