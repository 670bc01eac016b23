# SPDX-License-Identifier: Apache-2.0
"""The epdrt command: every subcommand has --help and --json."""

import json
import subprocess
import sys

import pytest

from epdrt.cli import build_parser, main


def subcommand_paths(parser=None, prefix=()):
    """Every runnable command path, e.g. ("bench", "block-pool")."""
    parser = parser or build_parser()
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                has_sub = any(a.__class__.__name__ == "_SubParsersAction" for a in sub._actions)
                if has_sub:
                    yield from subcommand_paths(sub, (*prefix, name))
                else:
                    yield (*prefix, name), sub


@pytest.mark.parametrize("path", [p for p, _ in subcommand_paths()], ids=" ".join)
def test_every_command_has_help_and_json(path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*path, "--help"])
    assert exc.value.code == 0
    assert "--json" in capsys.readouterr().out


def test_info_json(tmp_path):
    out = tmp_path / "info.json"
    assert main(["info", "--json", str(out)]) == 0
    info = json.loads(out.read_text())
    assert info["version"] and isinstance(info["cuda_compiled"], bool)


def test_console_script_runs():
    result = subprocess.run(
        [sys.executable, "-m", "epdrt.cli", "info", "--json", "-"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert '"version"' in result.stdout


def test_bench_block_pool_writes_records(tmp_path):
    out = tmp_path / "bp.jsonl"
    assert main(["bench", "block-pool", "--ops", "3000", "--repeat", "1", "--json", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    keys = {"bench", "case", "metric", "value", "baseline", "baseline_value", "ratio", "device"}
    assert records and all(keys <= r.keys() for r in records)
    assert all(r["bench"] == "block-pool" and r["value"] > 0 and r["ratio"] > 0 for r in records)
    assert any(r["case"].startswith("native:") for r in records)
