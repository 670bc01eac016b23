# SPDX-License-Identifier: Apache-2.0
"""The ``epdrt`` command: ``info`` and ``bench <name>``. Every command takes ``--json PATH``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from epdrt.benchmarking import format_table, write_jsonl


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json", metavar="PATH", help="also write machine-readable output to PATH ('-' = stdout)"
    )


def _cmd_info(args: argparse.Namespace) -> int:
    from epdrt.info import build_info

    info = build_info()
    for key, value in info.items():
        print(f"{key:22} {value}")
    if args.json:
        text = json.dumps(info, indent=2) + "\n"
        if args.json == "-":
            print(text, end="")
        else:
            Path(args.json).write_text(text)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    records = args.bench_module.run(args)
    print(format_table(records))
    if args.json:
        write_jsonl(records, args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from epdrt.bench import BENCHMARKS

    parser = argparse.ArgumentParser(prog="epdrt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="version, build options, CUDA availability and devices")
    _add_json(info)
    info.set_defaults(func=_cmd_info)

    bench = sub.add_parser("bench", help="run a benchmark (JSON lines with --json)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    for name, module in BENCHMARKS.items():
        p = bench_sub.add_parser(name, help=module.HELP, description=module.__doc__)
        module.add_arguments(p)
        _add_json(p)
        p.set_defaults(func=_cmd_bench, bench_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
