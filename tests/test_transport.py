# SPDX-License-Identifier: Apache-2.0
"""Transfer agents and transports: handshake, block transfers (same process, same host over
shared memory, cross-node fallbacks on loopback), notices, argument checks, timeouts."""

import contextlib
import hashlib
import os
import signal
import time

import numpy as np
import pytest
import torch
from leaks import holders, region_inodes

from epdrt import InvalidArgument, Region, TransferError
from epdrt.transfer import TransferAgent, nixl_available
from epdrt.transfer.agent import Wakeup
from epdrt.transfer.scripted_peer import Command, digest, encode, spawn, stop

BLOCK = 4096
NUM_BLOCKS = 64
TIMEOUT_S = 30.0
SEED = 0


def filled(nbytes: int, seed: int = SEED, device: str = "cpu") -> Region:
    region = Region.create(nbytes, device)
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    region.tensor(torch.uint8, (nbytes,)).copy_(data.to(region.device.torch))
    return region


def block_view(region: Region, block: int = BLOCK) -> torch.Tensor:
    return region.tensor(torch.uint8, (region.nbytes // block, block))


@pytest.fixture
def local_pair():
    """Two agents of this process connected by the local transport, each with region "buf"."""
    a, b = TransferAgent(timeout=TIMEOUT_S), TransferAgent(timeout=TIMEOUT_S)
    ra, rb = filled(NUM_BLOCKS * BLOCK, seed=1), Region.create(NUM_BLOCKS * BLOCK)
    a.register("buf", ra, block_nbytes=BLOCK)
    b.register("buf", rb, block_nbytes=BLOCK)
    pa = a.connect(b.address)
    pb = b.accept()
    yield pa, pb, ra, rb
    a.close()
    b.close()


def test_local_handshake_picks_the_local_transport(local_pair):
    pa, pb, _ra, rb = local_pair
    assert pa.transport == pb.transport == "local"
    assert pa.name == pb.agent.name and pb.name == pa.agent.name
    assert pa.regions["buf"].nbytes == rb.nbytes and pa.regions["buf"].block_nbytes == BLOCK
    assert pa.alive and pb.alive


@pytest.mark.parametrize("count", [1, 5, NUM_BLOCKS])
def test_send_blocks_writes_the_peer_region(local_pair, count):
    pa, pb, ra, rb = local_pair
    gen = torch.Generator().manual_seed(count)
    src = torch.randperm(NUM_BLOCKS, generator=gen)[:count]
    dst = torch.randperm(NUM_BLOCKS, generator=gen)[:count]
    handle = pa.send_blocks("req-1", "buf", src, "buf", dst, data=b"meta")
    handle.wait()
    notice = pb.recv("req-1")
    assert notice.region == "buf" and notice.blocks == dst.tolist() and notice.data == b"meta"
    assert notice.nbytes == count * BLOCK and (notice.part, notice.num_parts) == (0, 1)
    assert torch.equal(block_view(rb)[dst], block_view(ra)[src])


def test_parts_of_blocks_and_arrival_order(local_pair):
    pa, pb, ra, rb = local_pair
    half = BLOCK // 2
    handles = [
        pa.send_blocks("seq", "buf", [3, 4], "buf", [10, 11], offset=p * half, nbytes=half,
                       part=p, num_parts=2)
        for p in (1, 0)
    ]  # fmt: skip
    for h in handles:
        h.wait()
    pa.notify("after", blocks=[1, 2], data=b"x")
    got = {pb.recv("seq").part for _ in range(2)}
    assert got == {0, 1}
    notice = pb.recv(None)
    assert (notice.key, notice.blocks, notice.region, notice.data) == ("after", [1, 2], "", b"x")
    assert torch.equal(block_view(rb)[[10, 11]], block_view(ra)[[3, 4]])


def test_write_of_byte_ranges(local_pair):
    pa, pb, ra, rb = local_pair
    pa.write("w", "buf", "buf", [0, 5000], [100, 9000], [10, 300]).wait()
    pb.recv("w")
    flat_a, flat_b = ra.tensor(torch.uint8, (ra.nbytes,)), rb.tensor(torch.uint8, (rb.nbytes,))
    assert torch.equal(flat_b[100:110], flat_a[0:10])
    assert torch.equal(flat_b[9000:9300], flat_a[5000:5300])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"src_region": "nope"}, "no local region"),
        ({"dst_region": "nope"}, "has no region"),
        ({"src_blocks": [NUM_BLOCKS]}, "block ids"),
        ({"dst_blocks": [-1]}, "block ids"),
        ({"src_blocks": [1, 2], "dst_blocks": [3]}, "destination"),
        ({"offset": BLOCK - 8, "nbytes": 16}, "inside a block"),
        ({"src_blocks": [1, 2], "dst_blocks": [3, 3]}, "overlapping"),
    ],
)
def test_invalid_block_sends_are_rejected(local_pair, kwargs, match):
    pa, pb, _ra, rb = local_pair
    args = {"src_region": "buf", "src_blocks": [1], "dst_region": "buf", "dst_blocks": [2]}
    args.update(kwargs)
    with pytest.raises(InvalidArgument, match=match):
        pa.send_blocks("bad", args.pop("src_region"), args.pop("src_blocks"),
                       args.pop("dst_region"), args.pop("dst_blocks"), **args)  # fmt: skip
    with pytest.raises(TimeoutError):
        pb.recv("bad", timeout=0.05)
    assert block_view(rb).count_nonzero() == 0


def test_block_size_and_layout_must_match():
    a, b = TransferAgent(), TransferAgent()
    try:
        a.register("x", Region.create(8192), block_nbytes=4096, layout="kv A")
        a.register("y", Region.create(8192), block_nbytes=4096, layout="kv A")
        b.register("x", Region.create(8192), block_nbytes=2048)
        b.register("y", Region.create(8192), block_nbytes=4096, layout="kv B")
        peer = a.connect(b.address)
        b.accept()
        with pytest.raises(InvalidArgument, match="equal block size"):
            peer.send_blocks("k", "x", [0], "x", [0])
        with pytest.raises(InvalidArgument, match="layouts differ"):
            peer.send_blocks("k", "y", [0], "y", [0])
        with pytest.raises(InvalidArgument, match="before connecting"):
            a.register("z", Region.create(4096))
    finally:
        a.close()
        b.close()


def test_recv_timeout_close_and_send_after_close(local_pair):
    pa, pb, _ra, _rb = local_pair
    with pytest.raises(TimeoutError, match="waiting for 'nothing'"):
        pb.recv("nothing", timeout=0.1)
    pa.send_blocks("last", "buf", [0], "buf", [0]).wait()
    pa.agent.close()
    # What arrived before the close is still received; then the peer is reported gone.
    assert pb.recv("last").blocks == [0]
    with pytest.raises(TransferError, match="closed"):
        pb.recv("more", timeout=5)
    assert not pb.alive
    with pytest.raises(TransferError):
        pb.send_blocks("x", "buf", [0], "buf", [0])
    with pytest.raises(TransferError, match="closed"):
        pa.agent.poll()


def test_connect_to_nobody_times_out():
    with TransferAgent() as a:
        with pytest.raises(TimeoutError, match="connecting"):
            a.connect("ipc://@epdrt-nobody-listens-here", timeout=0.3)
        with pytest.raises(InvalidArgument, match="transport"):
            a.connect("ipc://@x", transport="carrier-pigeon")
        assert a.peers == {}


def test_agent_names_are_unique():
    with TransferAgent("unique-agent"), pytest.raises(InvalidArgument, match="already exists"):
        TransferAgent("unique-agent")


# ---- two processes -------------------------------------------------------------------------


@contextlib.contextmanager
def child_pair(transport: str, *, listen: str | None = None, device: str = "cpu"):
    """This process's agent with region "buf" and a scripted peer process connected to it."""
    agent = TransferAgent(address=listen, timeout=TIMEOUT_S)
    region = filled(NUM_BLOCKS * BLOCK, seed=3, device=device)
    agent.register("buf", region, block_nbytes=BLOCK)
    proc, peer = spawn(
        agent, region_bytes=NUM_BLOCKS * BLOCK, block_bytes=BLOCK, transport=transport,
        device=device, listen=listen, timeout=TIMEOUT_S,
    )  # fmt: skip
    try:
        yield agent, peer, region, proc
        assert stop(proc, peer) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT_S)
        agent.close()


def roundtrip(peer, region: Region) -> None:
    """Sends scattered blocks, checks the child's copy by digest, has it echo them back."""
    gen = torch.Generator().manual_seed(SEED)
    src = torch.randperm(NUM_BLOCKS // 2, generator=gen)[:17]
    dst = torch.randperm(NUM_BLOCKS, generator=gen)[:17]
    peer.send_blocks("data", "buf", src, "buf", dst).wait()
    dst_offsets, sizes = (dst * BLOCK).tolist(), [BLOCK] * len(dst)
    peer.notify("cmd", data=encode(Command(op="digest", dst_offsets=dst_offsets, sizes=sizes)))
    got = peer.recv("digest").data
    assert got == digest(region, (src * BLOCK).tolist(), sizes)
    # The child writes those blocks back into the upper half of this region.
    back = NUM_BLOCKS // 2 + torch.arange(17)
    plan = Command(op="plan", src_offsets=dst_offsets, dst_offsets=(back * BLOCK).tolist(),
                   sizes=sizes)  # fmt: skip
    peer.notify("cmd", data=encode(plan))
    peer.notify("ping")
    notice = peer.recv("pong")
    assert notice.nbytes == 17 * BLOCK
    view = block_view(region)
    assert torch.equal(view[back].cpu(), view[src].cpu())


def test_ipc_between_processes_writes_in_place():
    with child_pair("auto") as (_agent, peer, region, proc):
        assert peer.transport == "ipc" and peer.pid == proc.pid
        roundtrip(peer, region)


def test_dist_fallback_between_processes_on_loopback():
    with child_pair("dist", listen="tcp://127.0.0.1:*") as (_agent, peer, region, _proc):
        assert peer.transport == "dist"
        roundtrip(peer, region)
        # Plain notices stay behind data still in flight.
        peer.send_blocks("d2", "buf", [1], "buf", [2])
        peer.notify("cmd", data=encode(Command(op="digest", dst_offsets=[2 * BLOCK],
                                               sizes=[BLOCK])))  # fmt: skip
        assert peer.recv("digest").data == digest(region, [BLOCK], [BLOCK])


@pytest.mark.skipif(not nixl_available(), reason="needs the nixl package")
def test_nixl_between_processes_on_loopback():
    with child_pair("nixl", listen="tcp://127.0.0.1:*") as (_agent, peer, region, _proc):
        assert peer.transport == "nixl"
        roundtrip(peer, region)


@pytest.mark.skipif(not nixl_available(), reason="needs the nixl package")
def test_nixl_peer_killed_is_reported_in_bounded_time_and_a_wait_times_out():
    """Over NIXL (UCX on this host): bytes checked by digest, a notice that never comes times
    out, and a killed peer fails what is sent to it within seconds instead of hanging."""
    listen = "tcp://127.0.0.1:*"
    agent = TransferAgent(address=listen, timeout=TIMEOUT_S)
    region = filled(NUM_BLOCKS * BLOCK, seed=5)
    agent.register("buf", region, block_nbytes=BLOCK)
    proc, peer = spawn(agent, region_bytes=NUM_BLOCKS * BLOCK, block_bytes=BLOCK,
                       transport="nixl", listen=listen, timeout=TIMEOUT_S)  # fmt: skip
    try:
        assert peer.transport == "nixl"
        roundtrip(peer, region)
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=r"no result after 0\.3 s"):
            peer.recv("never-sent", timeout=0.3)
        assert time.monotonic() - start < 5
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(TIMEOUT_S) == -signal.SIGKILL
        start = time.monotonic()
        with pytest.raises(TransferError):
            peer.send_blocks("late", "buf", [0], "buf", [1]).wait(timeout=10)
            peer.recv(None, timeout=10)
        assert time.monotonic() - start < 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT_S)
        agent.close()


def test_local_transport_is_refused_across_processes():
    agent = TransferAgent(timeout=TIMEOUT_S)
    agent.register("buf", Region.create(BLOCK), block_nbytes=BLOCK)
    try:
        with pytest.raises(TransferError, match="exited"):
            spawn(agent, region_bytes=BLOCK, transport="local", timeout=TIMEOUT_S)
    finally:
        agent.close()


def test_peer_killed_mid_transfer_is_reported_and_leaks_nothing():
    big = 32 << 20
    agent = TransferAgent(timeout=TIMEOUT_S)
    agent.register("buf", Region.create(big))
    own = region_inodes()
    proc, peer = spawn(agent, region_bytes=big, transport="ipc", timeout=TIMEOUT_S)
    try:
        child = region_inodes() - own
        assert len(child) == 1  # the child's region, mapped here
        # Both directions busy: the child writes 32 MiB copies into our region without pause,
        # we have four 32 MiB copies into its region in flight when it is killed.
        stream = Command(op="stream", src_offsets=[0], dst_offsets=[0], sizes=[big], count=0)
        peer.notify("cmd", data=encode(stream))
        peer.recv("s0")
        handles = [peer.write(f"out{i}", "buf", "buf", [0], [0], big) for i in range(4)]
        proc.send_signal(signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(TransferError, match=r"exited|lost"):
            while True:  # notices that arrived before the kill come out first
                peer.recv(None, timeout=10)
        for handle in handles:  # each one finished or failed; none hangs
            with contextlib.suppress(TransferError):
                handle.wait(timeout=10)
        assert time.monotonic() - start < 10
        assert not peer.alive
        with pytest.raises(TransferError):
            peer.write("late", "buf", "buf", [0], [0], BLOCK)
        assert proc.wait(TIMEOUT_S) == -signal.SIGKILL
        deadline = time.monotonic() + 5  # the engine drops the mapping once its copies end
        # (Only the child's mapping is checked: regions of earlier tests may be collected now.)
        while child & region_inodes() and time.monotonic() < deadline:
            agent.poll(0.01)
        assert not child & region_inodes()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT_S)
        agent.close()
    assert holders(child) == set()  # the killed peer's region is gone from every process


@pytest.mark.gpu
def test_cuda_ipc_between_processes():
    with child_pair("auto", device="cuda") as (_agent, peer, region, _proc):
        assert peer.transport == "ipc"
        roundtrip(peer, region)


def test_wakeup_is_readable_once_signalled_and_inert_after_close():
    wake = Wakeup()
    wake.drain()  # nothing pending: no error
    wake.signal()
    wake.signal()
    assert os.eventfd_read(wake.fd) == 2
    wake.close()
    wake.signal()  # a transport thread that outlives the agent writes nowhere
    wake.close()


def test_digest_helper_matches_hashlib():
    region = filled(BLOCK)
    data = bytes(np.asarray(region.tensor(torch.uint8, (BLOCK,))))
    assert (
        digest(region, [0, 100], [10, 20])
        == hashlib.blake2b(data[0:10] + data[100:120], digest_size=16).digest()
    )
