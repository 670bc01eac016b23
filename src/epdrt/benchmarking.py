# SPDX-License-Identifier: Apache-2.0
"""Benchmark records (JSON lines, see docs/architecture.md) and a plain-text table."""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Record:
    """One measured case. ``ratio`` is epdrt relative to the baseline, higher is better."""

    bench: str
    case: str
    metric: str
    value: float
    baseline: str
    baseline_value: float
    ratio: float
    device: str = field(default_factory=lambda: device_name())
    date: str = field(default_factory=lambda: _dt.date.today().isoformat())
    commit: str = field(default_factory=lambda: git_commit())
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=False)


def device_name() -> str:
    """The GPU's name when CUDA is available to torch, else "cpu"."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"


def git_commit() -> str:
    """The commit measured: ``EPDRT_COMMIT`` when set (a copied tree on a GPU host has no
    ``.git``; bench/gpu_all.sh passes the caller's), else the short sha of the checkout epdrt
    runs from, else "unknown"."""
    if os.environ.get("EPDRT_COMMIT"):
        return os.environ["EPDRT_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip()


def write_jsonl(records: Iterable[Record], path: str | os.PathLike[str]) -> None:
    """Writes one JSON object per line to ``path`` ("-" for stdout)."""
    text = "".join(r.to_json() + "\n" for r in records)
    if str(path) == "-":
        print(text, end="")
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


def format_table(records: Iterable[Record]) -> str:
    """A fixed-width table: case, value, baseline value, ratio."""
    rows = [("case", "metric", "epdrt", "baseline", "ratio")]
    for r in records:
        rows.append(
            (r.case, r.metric, f"{r.value:.4g}", f"{r.baseline_value:.4g}", f"{r.ratio:.2f}x")
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def model_dir_or_tiny(model_dir: str | None, seed: int = 0, size: str = "tiny") -> tuple[str, Any]:
    """``model_dir``, or a fresh random-weight LLaVA of ``size`` ("tiny" or "small", see
    ``make_tiny_model``) in a temporary directory.

    Returns the directory and the ``TemporaryDirectory`` owning it (None for ``model_dir``);
    the caller keeps it alive while the model is used and calls ``cleanup()`` after.
    """
    if model_dir is not None:
        return model_dir, None
    from epdrt.models import make_tiny_model

    tmp = tempfile.TemporaryDirectory()
    path = str(Path(tmp.name) / f"{size}-llava")
    make_tiny_model(path, "llava", seed=seed, size=size)
    return path, tmp


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system, all threads) process ``pid`` has used: this process's from
    its CPU clock (nanoseconds), another's from /proc (Linux; one clock tick, usually 10 ms).
    Raises OSError when the process is gone."""
    if pid == os.getpid():
        return time.process_time()
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
