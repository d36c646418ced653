"""`bnfold demo`: the main job on a built-in model — build, fold, verify, report, bench."""

from __future__ import annotations

import os

from rich.console import Console

from bnfold.errors import BnfoldError


def run_demo(out_dir: str, console: Console) -> None:
    from bnfold.fold.api import fold_file
    from bnfold.io import save_model, write_text_atomic
    from bnfold.report_view import render_fold_report, render_verification
    from bnfold.sample_model import build_sample_model

    os.makedirs(out_dir, exist_ok=True)
    original = os.path.join(out_dir, "sample.onnx")
    folded = os.path.join(out_dir, "sample.folded.onnx")
    save_model(build_sample_model(), original)
    console.print(f"[bold]1. built[/] the sample BN network → {original}")
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
    console.print(f"wrote {folded} and {os.path.join(out_dir, 'report.json')}")
