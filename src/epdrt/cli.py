# SPDX-License-Identifier: Apache-2.0
"""The ``epdrt`` command. Every subcommand has ``--help`` and ``--json PATH``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# One module per command (each has add_command(subparsers)), in --help order.
COMMAND_MODULES = (
    "epdrt.commands.info",
    "epdrt.commands.bench",
    "epdrt.commands.plan",
    "epdrt.commands.run",
    "epdrt.commands.serve",
    "epdrt.commands.demo",
    "epdrt.commands.make_tiny_model",
    "epdrt.commands.profile",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epdrt", description="Encode-Prefill-Decode disaggregated LMM serving runtime."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command. A user's mistake (a missing model directory, an unreadable file, a
    model that cannot be loaded) is one line on stderr and exit status 2, not a traceback."""
    from epdrt.commands import UsageError
    from epdrt.models.errors import ModelLoadError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ModelLoadError) as exc:
        print(f"epdrt {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
