# SPDX-License-Identifier: Apache-2.0
"""CLI commands. Each module has ``add_command(subparsers)``; cli.py lists the modules."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


class UsageError(Exception):
    """A mistake on the command line (a missing model directory, an unreadable file): the
    command prints it on one line and exits with status 2."""


def add_json_option(parser: argparse.ArgumentParser) -> None:
    """The ``--json PATH`` option every command has ('-' writes to stdout)."""
    parser.add_argument(
        "--json", metavar="PATH", help="also write machine-readable output to PATH ('-' = stdout)"
    )


def write_json(obj: Any, path: str) -> None:
    """Writes ``obj`` as indented JSON to ``path`` ('-' = stdout)."""
    text = json.dumps(obj, indent=2) + "\n"
    if path == "-":
        print(text, end="")
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
