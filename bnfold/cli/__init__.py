"""The `bnfold` command: parse options, call the library, print. No logic lives here.

This module holds the group only. Each command lives in a module that is imported when the
command runs or help lists it (`onnx_commands`: fold, inspect, demo; `verify_commands`;
`deploy_commands`: build, bench; `torch_commands`: export, train, recalibrate), so `bnfold fold`
loads neither the engine registry nor the torch commands. `report_view`, `fold_summary` and
`bench_view` render; `common` holds the console and the one place BnfoldError becomes a
one-line message and exit 1.
"""

from __future__ import annotations

import click

from bnfold import __version__
from bnfold.cli.common import BnfoldGroup

# Command name -> "module:attribute". Explicit: no registration by import side effect.
COMMANDS = {
    "fold": "bnfold.cli.onnx_commands:fold_command",
    "verify": "bnfold.cli.verify_commands:verify_command",
    "inspect": "bnfold.cli.onnx_commands:inspect_command",
    "demo": "bnfold.cli.onnx_commands:demo_command",
    "export": "bnfold.cli.torch_commands:export_command",
    "train": "bnfold.cli.torch_commands:train_command",
    "recalibrate": "bnfold.cli.torch_commands:recalibrate_command",
    "build": "bnfold.cli.deploy_commands:build_command",
    "bench": "bnfold.cli.deploy_commands:bench_command",
}


@click.group(cls=BnfoldGroup, lazy_commands=COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bnfold")
def cli() -> None:
    """Fold BatchNormalization into neighbouring weights in ONNX models, verifiably."""


def main() -> None:
    cli(prog_name="bnfold")


if __name__ == "__main__":
    main()
