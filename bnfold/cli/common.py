"""What every command module shares: the console, the option parsers, the error boundary.

Command modules (onnx_commands.py, verify_commands.py, torch_commands.py, deploy_commands.py)
only parse, call the library and print. BnfoldError is translated into a one-line message and
exit 1 here, once, by BnfoldGroup, which also imports each command's module only when that
command is needed. rich loads on first use of `console`: `bnfold fold` prints its usual report
without it (bnfold.cli.fold_summary).
"""

from __future__ import annotations

import importlib
import json
import os

import click

from bnfold.errors import BnfoldError


def __getattr__(name: str):
    # `console`: the rich Console of stdout, made on first use (`from ... import console` too).
    if name != "console":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from rich.console import Console

    globals()["console"] = made = Console(highlight=False)
    return made


class BnfoldGroup(click.Group):
    """A click group that turns BnfoldError into 'error: ...' and exit code 1.

    `lazy_commands` maps a command name to "module:attribute"; the module is imported when the
    command runs or help lists it, so one command never pays for another's imports.
    """

    def __init__(self, *args, lazy_commands: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy_commands:
            module, _, attribute = self.lazy_commands[cmd_name].partition(":")
            self.add_command(getattr(importlib.import_module(module), attribute), cmd_name)
        return super().get_command(ctx, cmd_name)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name = args[0] if args else None
        if name not in self.commands and name not in self.lazy_commands:
            # A typo: load every command, so that click's "Did you mean ...?" sees them all.
            for known in self.lazy_commands:
                self.get_command(ctx, known)
        return super().resolve_command(ctx, args)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BnfoldError as exc:
            from rich.console import Console
            from rich.markup import escape

            # Escaped: messages hold text like `pip install bnfold[trt]` that is not markup.
            Console(stderr=True, highlight=False).print(
                f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
            ctx.exit(1)


def parse_shapes(values: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """Parse repeated `--shape name=1x3x224x224` options (click usage error on bad text)."""
    if not values:
        return {}  # without importing bnfold.verification, which `fold --no-verify` never needs
    from bnfold.verification.inputs import parse_shape

    shapes: dict[str, tuple[int, ...]] = {}
    for text in values:
        try:
            name, dims = parse_shape(text)
        except BnfoldError as exc:
            raise click.BadParameter(str(exc), param_hint="--shape") from None
        shapes[name] = dims
    return shapes


def verify_options(f):
    """The options of an ONNX Runtime verification, shared by `fold` and `verify`."""
    f = click.option("--seed", default=0, show_default=True, help="Seed of the random inputs.")(f)
    f = click.option("--runs", default=1, show_default=True, type=click.IntRange(1),
                     help="Random input sets to try.")(f)
    f = click.option("--atol", type=click.FloatRange(0),
                     help="Absolute tolerance (default by dtype).")(f)
    f = click.option("--rtol", type=click.FloatRange(0),
                     help="Tolerance relative to max|output| (fp32 default 1e-5).")(f)
    f = click.option(
        "--shape",
        "shapes",
        multiple=True,
        metavar="NAME=DxD..",
        help="Concrete shape for an input with symbolic dims (verification: a symbolic batch "
             "is 1, other dims take the first size ONNX Runtime runs).",
    )(f)
    f = click.option(
        "--verify-timeout", "timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
        default=300.0, show_default=True,
        help="Seconds one model run may take during verification.",
    )(f)
    f = click.option(
        "--inputs",
        "inputs_path",
        type=click.Path(dir_okay=False),
        help="A .npz file with one array per model input.",
    )(f)
    return f


# verify_options' parameters: what only a verification reads
VERIFY_PARAMETERS = ("seed", "runs", "atol", "rtol", "shapes", "timeout", "inputs_path")


def given_options(ctx: click.Context, names) -> list[str]:
    """The options among parameter `names` that the command line set (not left at a default),
    as the user spelled them (`--runs`)."""
    from click.core import ParameterSource

    given = []
    for parameter in ctx.command.params:
        if parameter.name in names and ctx.get_parameter_source(parameter.name) not in (
                ParameterSource.DEFAULT, None):
            given.append(max(parameter.opts, key=len))
    return given


def require_writable(path: str | None, option: str) -> None:
    """Check an output option's file can be written before any work, so nothing is half done
    (a folded model written, then its report refused)."""
    if path:
        from bnfold.onnxio.staged_files import check_writable

        check_writable(path, option)


def write_json(path: str, data: dict) -> None:
    from bnfold.onnxio.staged_files import write_text_atomic

    write_text_atomic(path, json.dumps(data, indent=2, default=float) + "\n")
