"""`bnfold demo`: the main job on a built-in model — build, fold, verify, report, bench."""

from __future__ import annotations

import os

from rich.console import Console
from rich.markup import escape

from bnfold.errors import BnfoldError


def run_demo(out_dir: str, console: Console) -> None:
    from bnfold.folding.api import fold_file
    from bnfold.io import save_model, write_text_atomic
    from bnfold.report_view import render_fold_report, render_verification
    from bnfold.sample_model import build_sample_model

    os.makedirs(out_dir, exist_ok=True)
    original = os.path.join(out_dir, "sample.onnx")
    folded = os.path.join(out_dir, "sample.folded.onnx")
    save_model(build_sample_model(), original)
    console.print(f"[bold]1. built[/] the sample BN network → {escape(original)}")
    result = fold_file(original, folded, verify=True, verify_options={"runs": 3})
    console.print("[bold]2. folded[/] and [bold]3. verified[/] it:")
    render_fold_report(result.report, console, title="bnfold fold sample.onnx")
    render_verification(result.report.verification, console)
    import json

    write_text_atomic(
        os.path.join(out_dir, "report.json"),
        json.dumps(result.report.to_dict(), indent=2, default=float) + "\n",
    )
    if result.output_path is None:
        raise BnfoldError("the folded sample did not verify: this is a bnfold bug, please report it")
    console.print(f"wrote {escape(folded)} and {escape(os.path.join(out_dir, 'report.json'))}")
    _bench(original, folded, out_dir, console)


def _bench(original: str, folded: str, out_dir: str, console: Console) -> None:
    """4. Original vs folded, side by side, on the best engine present."""
    import json

    from bnfold.bench import bench_models
    from bnfold.bench_view import render
    from bnfold.engines import best_available
    from bnfold.io import write_text_atomic

    engine, why = best_available()
    console.print(f"[bold]4. bench[/] on [bold]{engine}[/]: {escape(why)}")
    result = bench_models(
        [("original", original), ("folded", folded)], engine,
        shapes={"input": (8, 3, 32, 32)}, runs=200, min_time=1.0,
    )
    render(result, console)
    write_text_atomic(
        os.path.join(out_dir, "bench.json"), json.dumps(result.to_dict(), indent=2, default=float) + "\n"
    )
