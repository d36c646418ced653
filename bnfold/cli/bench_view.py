"""Display of benchmark results: a rich table, and an optional latency CDF plot.

Statistics live in `bnfold.deploy.bench`; this module only formats them.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from bnfold.deploy.bench import BenchResult
from bnfold.errors import BnfoldError


def render(result: BenchResult, console: Console) -> None:
    """The comparison table (one column per model and timing), then notes and warnings."""
    columns = []  # (header, model, stats)
    for model in result.models:
        kinds = [("GPU", model.gpu), ("host e2e", model.host), ("enqueue", model.enqueue)]
        if model.gpu is None:
            kinds = [("", model.host)]
        for kind, stats in kinds:
            if stats is not None:
                columns.append((f"{model.label}\n{kind}".rstrip(), model, stats))
    table = Table(title=f"bnfold bench · {result.engine} · latency in ms", title_justify="left")
    table.add_column("")
    for header, _, _ in columns:
        table.add_column(header, justify="right")
    for row in ("p50", "p90", "p95", "p99", "mean", "std"):
        table.add_row(row, *(f"{getattr(stats, row):.3f}" for _, _, stats in columns))
    table.add_row("CoV", *(f"{stats.cov:.1%}" for _, _, stats in columns))
    table.add_row("runs", *(str(stats.runs) for _, _, stats in columns))
    table.add_row("items/s", *(f"{stats.throughput(model.batch):,.0f}"
                               for _, model, stats in columns))
    if any(model.check is not None for model in result.models):
        table.add_row("outputs", *(_check_cell(model) if stats is model.primary else ""
                                   for _, model, stats in columns))
    if len(result.models) > 1:
        base = result.models[0].label
        table.add_row(f"p50 vs {base}", *(
            _speedup_cell(result.speedup(model.label)) if stats is model.primary else ""
            for _, model, stats in columns))
    console.print(table)
    env = result.environment
    device = env.get("device") or env.get("cpu")
    threads = env.get("intra_op_num_threads", env.get("torch_threads", ""))
    shapes = ", ".join(f"{k} {'x'.join(map(str, v))}"
                       for k, v in result.settings.get("input_shapes", {}).items())
    console.print(f"[dim]{device} · python {env.get('python')} · threads {threads} · "
                  f"interleaved side by side on the same inputs ({shapes})[/]")
    for note in result.notes:
        console.print(f"[dim]note:[/] {note}")
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}")


def _check_cell(model) -> str:
    check = model.check
    if check is None:
        return "not checked"
    return (f"[green]ok[/] ({check.precision})" if check.ok
            else f"[red]NOT equivalent[/] ({check.precision})")


def _speedup_cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def plot(result: BenchResult, path: str) -> None:
    """Latency CDF per model (device time on a GPU, host time on a CPU) saved to `path`."""
    try:
        import matplotlib
    except ImportError:
        raise BnfoldError("--plot needs matplotlib: pip install bnfold[plot]") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axes = plt.subplots(figsize=(7, 4))
    for model in result.models:
        key = "gpu" if model.gpu is not None else "host"
        values = np.sort(np.asarray(model.samples[key]))
        axes.plot(values, np.arange(1, values.size + 1) / values.size,
                  label=f"{model.label} (p50 {model.primary.p50:.3f} ms)")
    axes.set_xlabel("latency (ms)")
    axes.set_ylabel("fraction of runs")
    axes.set_title(f"bnfold bench · {result.engine}")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=120)
    except OSError as exc:
        raise BnfoldError(f"cannot write {path!r}: {exc.strerror or exc}") from None
    finally:
        plt.close(figure)
