# SPDX-License-Identifier: Apache-2.0
"""``import epdrt`` needs neither ZeroMQ nor msgspec (a GPU host may lack both): the runtime
and the transports load on first use."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is not installed (blocked by the test)")
sys.meta_path.insert(0, Block())
"""


def _run(code: str, blocked: set[str]) -> subprocess.CompletedProcess:
    script = BLOCKER.format(blocked=blocked) + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("blocked", [{"zmq"}, {"msgspec"}, {"zmq", "msgspec"}])
def test_import_epdrt_without_zeromq_or_msgspec(blocked):
    done = _run(
        """
        import torch, epdrt
        pool = epdrt.BlockPool(8)
        src, dst = epdrt.Region.create(4096), epdrt.Region.create(4096)
        src.tensor(torch.uint8, (4096,)).fill_(7)
        epdrt.TransferEngine(1).submit([(src, 0, dst, 0, 4096)]).wait(10)
        assert bool((dst.tensor(torch.uint8, (4096,)) == 7).all())
        kv = epdrt.PagedKVCache(2, 2, 8, 4, 8, torch.float16)
        print("served", pool.allocate(2), kv.num_free_blocks)
        """,
        blocked,
    )
    assert done.returncode == 0, done.stderr
    assert "served [0, 1] 8" in done.stdout


def test_the_runtime_says_what_it_misses():
    done = _run("import epdrt\nepdrt.EPDCluster\n", {"zmq"})
    assert done.returncode != 0 and "zmq is not installed" in done.stderr


def test_the_checkout_shadows_no_installed_package():
    """A package directory at the top of the checkout is importable under its bare name
    whenever the checkout is on ``sys.path`` (``python -m pytest`` or ``python -m epdrt...``
    from the repository root): it must not share that name with an installed distribution's
    module (a top-level ``kernels/`` once hid the ``kernels`` package ``transformers``
    requires)."""
    from importlib.metadata import packages_distributions
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    ours = {p.parent.name for p in root.glob("*/__init__.py")}
    installed = packages_distributions()
    clashes = {name: installed[name] for name in ours if name in installed}
    assert not clashes, f"top-level packages of the checkout hide installed ones: {clashes}"
    assert "bench" in ours  # the glob sees the checkout's packages
