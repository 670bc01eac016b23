# SPDX-License-Identifier: Apache-2.0
"""``epdrt make-tiny-model DIR --arch llava|qwen2-vl``: a random-weight model directory.

Writes ``config.json``, weights (``--size tiny``: safetensors; larger sizes: config only, with
weights drawn at load time), a tokenizer and an image processor, all built locally: no download.
"""

from __future__ import annotations

import argparse

from epdrt.commands import add_json_option, write_json


def add_command(sub: argparse._SubParsersAction) -> None:
    # Choices are checked by make_tiny_model: importing transformers here would slow every command.
    p = sub.add_parser(
        "make-tiny-model", help="write a random-weight model directory", description=__doc__
    )
    p.add_argument("dir", help="directory to write (created if missing)")
    p.add_argument("--arch", required=True, help="llava or qwen2-vl")
    p.add_argument(
        "--size",
        default="tiny",
        help="tiny (weights saved), or config-only: small (llava, CPU-sized), and real shapes "
        "7b (llava), 2b or 7b (qwen2-vl)",
    )
    p.add_argument("--seed", type=int, default=0, help="weight seed")
    add_json_option(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from epdrt.models import make_tiny_model

    try:
        info = make_tiny_model(args.dir, args.arch, seed=args.seed, size=args.size)
    except ValueError as exc:
        raise SystemExit(f"epdrt make-tiny-model: {exc}") from exc
    for key, value in info.items():
        print(f"{key:18} {value}")
    if args.json:
        write_json(info, args.json)
    return 0
