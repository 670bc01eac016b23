# SPDX-License-Identifier: Apache-2.0
"""``epdrt bench NAME``: run a benchmark; a table on stdout, JSON lines with ``--json``."""

from __future__ import annotations

import argparse

from epdrt.benchmarking import format_table, write_jsonl
from epdrt.commands import add_json_option


def add_command(sub: argparse._SubParsersAction) -> None:
    from epdrt.bench import BENCHMARKS

    bench = sub.add_parser("bench", help="run a benchmark (JSON lines with --json)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    for name, module in BENCHMARKS.items():
        p = bench_sub.add_parser(name, help=module.HELP, description=module.__doc__)
        module.add_arguments(p)
        add_json_option(p)
        p.set_defaults(func=_run, bench_module=module)


def _run(args: argparse.Namespace) -> int:
    records = args.bench_module.run(args)
    print(format_table(records))
    if args.json:
        write_jsonl(records, args.json)
    return 0
