# SPDX-License-Identifier: Apache-2.0
"""``epdrt info``: version, build options, CUDA availability and devices."""

from __future__ import annotations

import argparse

from epdrt.commands import add_json_option, write_json


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help=__doc__.split(":", 1)[1].strip(), description=__doc__)
    add_json_option(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from epdrt.info import build_info

    info = build_info()
    for key, value in info.items():
        print(f"{key:22} {value}")
    if args.json:
        write_json(info, args.json)
    return 0
