"""What every command module shares: the console, the option parsers, the error boundary.

Command modules (__init__.py, torch_commands.py, deploy_commands.py) only parse, call the library and print.
BnfoldError is translated into a one-line message and exit 1 here, once, by BnfoldGroup.
"""

from __future__ import annotations

import click
from rich.console import Console
from rich.markup import escape

from bnfold.errors import BnfoldError

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


class BnfoldGroup(click.Group):
    """A click group that turns BnfoldError into 'error: ...' and exit code 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BnfoldError as exc:
            # Escaped: messages hold text like `pip install bnfold[trt]` that is not markup.
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
            ctx.exit(1)


def parse_shapes(values: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """Parse repeated `--shape name=1x3x224x224` options (click usage error on bad text)."""
    from bnfold.verification.inputs import parse_shape

    shapes: dict[str, tuple[int, ...]] = {}
    for text in values:
        try:
            name, dims = parse_shape(text)
        except BnfoldError as exc:
            raise click.BadParameter(str(exc), param_hint="--shape") from None
        shapes[name] = dims
    return shapes
