# SPDX-License-Identifier: Apache-2.0
"""The path of every connection (epdrt.transfer.links): what carries the bytes, a loud warning
when it is slower than the placement allows, and refusal by a strict agent."""

from __future__ import annotations

import logging
import threading

import pytest

from epdrt import Region, TransferError
from epdrt.transfer import TransferAgent, links

TIMEOUT_S = 30.0


@pytest.fixture
def rdma(tmp_path, monkeypatch):
    """A fake sysfs RDMA directory; returns a function adding a device to it."""
    monkeypatch.setattr(links, "RDMA_SYSFS", str(tmp_path))
    return lambda name: (tmp_path / name).mkdir()


@pytest.mark.parametrize(
    ("tls", "devices", "same_host", "slow"),
    [
        (None, [], True, None),  # one host: UCX's shared memory
        ("tcp", [], True, "leaves out shared memory"),
        ("^sm,posix,sysv,cma,xpmem,knem,shm", [], True, "leaves out shared memory"),
        ("tcp,posix", [], True, None),
        (None, [], False, "no RDMA device"),  # across hosts without RDMA: TCP
        (None, ["mlx5_0"], False, None),
        ("tcp", ["mlx5_0"], False, "leaves out RDMA"),
        ("rc,ud,sm", ["mlx5_0"], False, None),
    ],
)
def test_nixl_paths(monkeypatch, rdma, tls, devices, same_host, slow):
    if tls is None:
        monkeypatch.delenv("UCX_TLS", raising=False)
    else:
        monkeypatch.setenv("UCX_TLS", tls)
    for d in devices:
        rdma(d)
    path = links.describe("nixl", "auto", same_host, "cpu")
    assert path.transport == "nixl" and "UCX_TLS" in path.detail
    assert (path.slow is None) if slow is None else (slow in path.slow)
    assert ("none" in path.detail) == (not devices)


def test_other_paths():
    assert links.describe("local", "auto", True, "cpu").slow is None
    assert links.describe("ipc", "auto", True, "cpu").detail == "memfd shared memory"
    assert links.describe("ipc", "ipc", True, "cuda:1").detail == "CUDA IPC"
    # dist across hosts is slow when it was not asked for (NIXL missing), not when it was.
    assert "not installed" in links.describe("dist", "auto", False, "cpu").slow
    assert links.describe("dist", "dist", False, "cpu").slow is None


def test_a_slow_path_is_a_logged_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="epdrt.transfer"):
        links.report(links.LinkPath("nixl", "x", "no RDMA device"), "p0")
        links.report(links.LinkPath("ipc", "memfd shared memory"), "p1")
    assert [r.getMessage() for r in caplog.records] == [
        "transfers with p0 go over nixl: no RDMA device"
    ]


def _accept_nothing(agent: TransferAgent) -> None:
    with pytest.raises(TimeoutError):
        agent.accept(2.0)


def _agents(**kw) -> tuple[TransferAgent, TransferAgent]:
    a, b = TransferAgent(timeout=TIMEOUT_S), TransferAgent(timeout=TIMEOUT_S, **kw)
    a.register("buf", Region.create(1 << 16))
    b.register("buf", Region.create(1 << 16))
    return a, b


def test_every_connection_reports_its_path_and_what_it_carried():
    a, b = _agents()
    t = threading.Thread(target=b.accept)
    t.start()
    peer = a.connect(b.address, transport="ipc")
    t.join(TIMEOUT_S)
    for _ in range(3):
        peer.write("k", "buf", "buf", [0, 8192], [4096, 0], 4096).wait()
    (link,) = a.links()
    assert link["transport"] == "ipc" and link["path"] == "memfd shared memory"
    assert link["slow"] is None and link["alive"]
    assert (link["transfers"], link["bytes_sent"]) == (3, 3 * 2 * 4096)
    a.close()
    b.close()


def test_a_strict_agent_refuses_a_slower_path_than_the_placement_allows(monkeypatch, rdma):
    # b believes a is on another host; across hosts without RDMA (or without NIXL) the bytes
    # would go over TCP: refused before any transport is set up.
    monkeypatch.delenv("UCX_TLS", raising=False)
    a, b = _agents(strict=True)
    b.host = "another-host/boot"
    t = threading.Thread(target=_accept_nothing, args=(b,))
    t.start()
    with pytest.raises(TransferError, match=r"refused by a strict agent: .*(RDMA|not installed)"):
        a.connect(b.address)
    t.join(TIMEOUT_S)
    assert not b.peers
    a.close()
    b.close()


def test_a_strict_connector_refuses_too(monkeypatch, rdma):
    monkeypatch.delenv("UCX_TLS", raising=False)
    a, b = _agents()
    a.strict = True
    a.host = "another-host/boot"  # b's Welcome then names a different host than a's own
    t = threading.Thread(target=_accept_nothing, args=(b,))
    t.start()
    with pytest.raises(TransferError, match=r"strict: .* would be reached over"):
        a.connect(b.address)
    t.join(TIMEOUT_S)
    assert not any(link["alive"] for link in a.links())
    a.close()
    b.close()
