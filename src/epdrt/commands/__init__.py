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


def add_cluster_options(parser: argparse.ArgumentParser) -> None:
    """The deployment options of commands that launch a cluster (``cluster_config`` reads
    them)."""
    parser.add_argument(
        "--model", required=True, help="model directory (config, weights, processor)"
    )
    parser.add_argument("--mode", choices=["epd", "pd", "aggregated"], default="epd")
    parser.add_argument("--encode", type=int, default=1, help="encode workers (epd)")
    parser.add_argument(
        "--prefill", type=int, default=1, help="prefill (pd: E+P; aggregated: all) workers"
    )
    parser.add_argument("--decode", type=int, default=1, help="decode workers")
    parser.add_argument("--config", help="EPDConfig as JSON (overrides the flags above)")


def cluster_config(args: argparse.Namespace):
    """The ``EPDConfig`` of ``add_cluster_options``' flags; UsageError when ``--model`` is not
    a model directory."""
    from epdrt.runtime.config import EPDConfig

    if not (Path(args.model) / "config.json").is_file():
        raise UsageError(f"{args.model} is not a model directory (no config.json in it)")
    if args.config:
        return EPDConfig.from_json(args.config)
    return EPDConfig(
        mode=args.mode, num_encode=args.encode, num_prefill=args.prefill, num_decode=args.decode
    )
