# SPDX-License-Identifier: Apache-2.0
"""TransferEngine: bit-exact batched copies, coalescing, validation that copies nothing,
completion (done/wait/timeout/eventfd), thread safety, regions kept alive, CUDA paths."""

import select
import threading

import pytest
import torch

from epdrt import (
    CudaUnavailable,
    InvalidArgument,
    Region,
    Transfer,
    TransferEngine,
    TransferError,
    _core,
)

SEED = 0
# (num_blocks, block_nbytes): one block; a non-power-of-two count; enough bytes (3 MiB) to be
# split over several worker threads; odd sizes that are not a multiple of 8.
GRID = [(1, 4096), (7, 16384), (48, 65536), (13, 1000)]
TIMEOUT_S = 30


def filled_region(nbytes: int, seed: int = SEED) -> Region:
    region = Region.create(nbytes)
    gen = torch.Generator().manual_seed(seed)
    region.tensor(torch.uint8, (nbytes,)).copy_(
        torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    )
    return region


def blocks(region: Region, block_nbytes: int) -> torch.Tensor:
    return region.tensor(torch.uint8, (region.nbytes // block_nbytes, block_nbytes))


@pytest.fixture(scope="module", params=[0, None, 1 << 40], ids=["workers", "default", "inline"])
def engine(request):
    """Every CPU transfer on the worker threads, the default split (up to 256 KiB on the
    submitting thread), and every transfer on the submitting thread."""
    return TransferEngine(num_threads=2, inline_bytes=request.param)


@pytest.mark.parametrize("nbytes", [1, 4096, 256 << 10])
def test_a_small_transfer_is_copied_by_submit_itself(nbytes):
    engine = TransferEngine(num_threads=1)
    assert engine.inline_bytes == 256 << 10
    src, dst = filled_region(nbytes), Region.create(nbytes)
    poller = select.poll()
    poller.register(engine.completion_fd, select.POLLIN)
    t = engine.submit([(src, 0, dst, 0, nbytes)])
    assert t.state == "done" and t.path == "host-inline"  # before any wait: no worker took part
    assert poller.poll(0), "the completion fd was not signalled"
    assert torch.equal(dst.tensor(torch.uint8, (nbytes,)), src.tensor(torch.uint8, (nbytes,)))


@pytest.mark.parametrize(("num_blocks", "block_nbytes"), GRID)
def test_submit_blocks_scatters_exactly(engine, num_blocks, block_nbytes):
    total = 2 * num_blocks + 3
    src = filled_region(total * block_nbytes)
    dst = Region.create(total * block_nbytes)
    gen = torch.Generator().manual_seed(SEED)
    src_ids = torch.randperm(total, generator=gen)[:num_blocks]
    dst_ids = torch.randperm(total, generator=gen)[:num_blocks]
    t = engine.submit_blocks(src, dst, src_ids * block_nbytes, dst_ids * block_nbytes, block_nbytes)
    t.wait(TIMEOUT_S)
    assert t.done() and t.state == "done" and t.error == ""
    assert t.nbytes == num_blocks * block_nbytes and t.num_ops == num_blocks
    s, d = blocks(src, block_nbytes), blocks(dst, block_nbytes)
    assert torch.equal(d[dst_ids], s[src_ids])
    untouched = torch.ones(total, dtype=torch.bool)
    untouched[dst_ids] = False
    assert d[untouched].count_nonzero() == 0


def test_submit_tuples_across_several_regions(engine):
    a, b = filled_region(8192, seed=1), filled_region(8192, seed=2)
    x, y = Region.create(8192), Region.create(8192)
    ops = [(a, 0, x, 4096, 4096), (b, 4096, x, 0, 100), (a, 100, y, 8000, 192), (b, 0, y, 0, 1)]
    engine.submit(ops).wait(TIMEOUT_S)
    for src, so, dst, do, n in ops:
        got = dst.tensor(torch.uint8, (n,), offset=do)
        assert torch.equal(got, src.tensor(torch.uint8, (n,), offset=so))


@pytest.mark.parametrize(
    ("src_ids", "dst_ids", "runs"),
    [
        ([0, 1, 2, 3], [4, 5, 6, 7], 1),  # consecutive on both sides: one copy
        ([3, 2, 1, 0], [7, 6, 5, 4], 1),  # given backwards: still one after sorting
        ([0, 1, 2, 3], [4, 5, 7, 8], 2),  # destination gap
        ([0, 2, 4, 6], [0, 1, 2, 3], 4),  # source gaps
        ([5], [5], 1),
    ],
)
def test_adjacent_ops_are_coalesced(engine, src_ids, dst_ids, runs):
    src, dst = filled_region(16 * 512), Region.create(16 * 512)
    so = [i * 512 for i in src_ids]
    do = [i * 512 for i in dst_ids]
    t = engine.submit_blocks(src, dst, so, do, 512)
    t.wait(TIMEOUT_S)
    assert t.num_runs == runs
    assert torch.equal(blocks(dst, 512)[dst_ids], blocks(src, 512)[src_ids])


def test_many_blocks_in_one_batch(engine):
    # 4096 blocks of 256 B in one submit: coalescing cannot help (random order), the copy is
    # still exact.
    n, size = 4096, 256
    src, dst = filled_region(n * size), Region.create(n * size)
    gen = torch.Generator().manual_seed(SEED)
    perm = torch.randperm(n, generator=gen)
    t = engine.submit_blocks(src, dst, torch.arange(n) * size, perm * size, size)
    t.wait(TIMEOUT_S)
    assert torch.equal(blocks(dst, size)[perm], blocks(src, size))


def _bad_batches(src: Region, dst: Region, closed: Region):
    return {
        "src out of bounds": [(src, 4000, dst, 0, 200)],
        "dst out of bounds": [(src, 0, dst, 4095, 2)],
        "offset past the end": [(src, 1 << 40, dst, 0, 1)],
        "closed source": [(closed, 0, dst, 0, 16)],
        "closed destination": [(src, 0, closed, 0, 16)],
        "overlapping destinations": [(src, 0, dst, 0, 64), (src, 128, dst, 32, 64)],
        "same destination twice": [(src, 0, dst, 512, 8), (src, 8, dst, 512, 8)],
        "reads what another op writes": [(src, 0, src, 1024, 64), (src, 1000, dst, 0, 64)],
        "copy onto itself": [(src, 0, src, 32, 64)],
        "negative offset": [(src, -1, dst, 0, 4)],
        "negative size": [(src, 0, dst, 0, -4)],
        "not a region": [("src", 0, dst, 0, 4)],
        "short tuple": [(src, 0, dst, 0)],
    }


@pytest.mark.parametrize(
    "case",
    [
        "src out of bounds", "dst out of bounds", "offset past the end", "closed source",
        "closed destination", "overlapping destinations", "same destination twice",
        "reads what another op writes", "copy onto itself", "negative offset", "negative size",
        "not a region", "short tuple",
    ],
)  # fmt: skip
def test_invalid_batches_are_rejected_whole(engine, case):
    src, dst = filled_region(4096), Region.create(4096)
    closed = Region.create(4096)
    closed.close()
    good = (src, 2048, dst, 2048, 256)  # a valid op in the same batch must not run either
    src_before = src.tensor(torch.uint8, (4096,)).clone()
    with pytest.raises(InvalidArgument):
        engine.submit([good, *_bad_batches(src, dst, closed)[case]])
    assert dst.tensor(torch.uint8, (4096,)).count_nonzero() == 0
    assert torch.equal(src.tensor(torch.uint8, (4096,)), src_before)


def test_invalid_submit_blocks_arguments(engine):
    src, dst = Region.create(4096), Region.create(4096)
    with pytest.raises(InvalidArgument, match="entries"):
        engine.submit_blocks(src, dst, [0, 64], [0], 64)
    with pytest.raises(InvalidArgument, match="overlapping"):
        engine.submit_blocks(src, dst, [0, 64], [0, 32], 64)
    with pytest.raises(InvalidArgument, match="negative"):
        engine.submit_blocks(src, dst, [0], [-64], 64)
    with pytest.raises(InvalidArgument, match="1-D"):
        engine.submit_blocks(src, dst, [[0]], [[0]], 64)


def test_mixing_cpu_and_cuda_is_rejected_or_cuda_is_unavailable(engine):
    src = Region.create(4096)
    if not torch.cuda.is_available():
        with pytest.raises(CudaUnavailable):
            Region.create(4096, "cuda")
        return
    gpu = Region.create(4096, "cuda")
    with pytest.raises(InvalidArgument, match="mixing"):
        engine.submit([(src, 0, gpu, 0, 64)])


@pytest.mark.parametrize("after_stream", [0, 1, 2, 0x7F00DEADBEEF, (1 << 64) - 1])
def test_cpu_transfers_accept_and_ignore_after_stream(engine, after_stream):
    # Host producers are synchronous: any handle (even one naming no stream) is accepted.
    src, dst = filled_region(8 * 512), Region.create(8 * 512)
    perm = [3, 0, 7, 1]
    engine.submit_blocks(
        src, dst, [i * 512 for i in perm], [0, 512, 1024, 1536], 512, after_stream=after_stream
    ).wait(TIMEOUT_S)
    engine.submit([(src, 0, dst, 4096 - 100, 100)], after_stream=after_stream).wait(TIMEOUT_S)
    d, s = blocks(dst, 512), blocks(src, 512)
    assert torch.equal(d[:4], s[perm])
    assert torch.equal(d[4:7], torch.zeros_like(d[4:7]))
    got = dst.tensor(torch.uint8, (100,), offset=4096 - 100)
    assert torch.equal(got, src.tensor(torch.uint8, (100,)))


@pytest.mark.parametrize("after_stream", ["0", 1.0, True, -1, 1 << 64, object()])
def test_bad_after_stream_is_rejected(engine, after_stream):
    src, dst = filled_region(1024), Region.create(1024)
    with pytest.raises(InvalidArgument, match="after_stream"):
        engine.submit([(src, 0, dst, 0, 1024)], after_stream=after_stream)
    with pytest.raises(InvalidArgument, match="after_stream"):
        engine.submit_blocks(src, dst, [0], [0], 1024, after_stream=after_stream)
    assert dst.tensor(torch.uint8, (1024,)).count_nonzero() == 0


@pytest.mark.parametrize(
    ("src", "dst", "can_access_peer", "path"),
    [
        (0, 0, False, "same_device"),
        (0, 0, True, "same_device"),
        (3, 3, False, "same_device"),
        (0, 1, True, "peer_access"),
        (1, 0, True, "peer_access"),
        (0, 1, False, "peer_memcpy"),
        (2, 0, False, "peer_memcpy"),
    ],
)
def test_copy_path_between_cuda_devices(src, dst, can_access_peer, path):
    assert _core.choose_copy_path(src, dst, can_access_peer) == path


def test_the_path_a_transfer_took_is_recorded():
    engine = TransferEngine(num_threads=2, inline_bytes=4096)
    src, dst = filled_region(1 << 20), Region.create(1 << 20)
    assert engine.submit([(src, 0, dst, 0, 4096)]).path == "host-inline"
    big = engine.submit([(src, 0, dst, 0, 1 << 20)])
    assert big.path == "host-threads"
    big.wait(TIMEOUT_S)
    assert engine.submit([]).path == "none"


def test_empty_batches_complete_at_once(engine):
    src, dst = Region.create(64), Region.create(64)
    for t in (engine.submit([]), engine.submit([(src, 0, dst, 0, 0)])):
        assert t.done() and t.nbytes == 0
        t.wait(0)


def test_wait_timeout_and_completion_fd():
    engine = TransferEngine(num_threads=1)
    nbytes = 64 << 20
    src, dst = Region.create(nbytes), Region.create(nbytes)
    poller = select.poll()
    poller.register(engine.completion_fd, select.POLLIN)
    t = engine.submit([(src, 0, dst, 0, nbytes)])
    if not t.done():  # 64 MiB takes milliseconds: wait(0) times out
        with pytest.raises(TimeoutError, match="not done"):
            t.wait(0)
    assert poller.poll(TIMEOUT_S * 1000), "completion fd never became readable"
    t.wait(TIMEOUT_S)
    assert t.state == "done"
    assert repr(t).startswith("Transfer(done")


def test_regions_stay_alive_until_the_transfer_ends(engine):
    nbytes = 16 << 20
    src = filled_region(nbytes)
    expected = src.tensor(torch.uint8, (nbytes,)).clone()
    dst = Region.create(nbytes)
    view = dst.tensor(torch.uint8, (nbytes,))
    t = engine.submit([(src, 0, dst, 0, nbytes)])
    del src, dst  # the engine holds the regions, not Python
    t.wait(TIMEOUT_S)
    t.release()
    assert torch.equal(view, expected)


def test_submits_from_many_threads(engine):
    n, size = 64, 4096
    src = filled_region(n * size)
    dsts = [Region.create(n * size) for _ in range(4)]
    errors = []

    def worker(dst: Region, seed: int) -> None:
        try:
            gen = torch.Generator().manual_seed(seed)
            handles: list[Transfer] = []
            for _ in range(20):
                perm = torch.randperm(n, generator=gen)
                handles.append(engine.submit_blocks(src, dst, perm * size, perm * size, size))
            for h in handles:
                h.wait(TIMEOUT_S)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(d, i)) for i, d in enumerate(dsts)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(TIMEOUT_S)
    assert not errors and not any(th.is_alive() for th in threads)
    for d in dsts:
        assert torch.equal(d.tensor(torch.uint8, (n * size,)), src.tensor(torch.uint8, (n * size,)))


def test_engine_properties_and_errors_are_exported():
    engine = TransferEngine(num_threads=3)
    assert engine.num_threads == 3
    assert TransferEngine().num_threads >= 1
    assert issubclass(TransferError, Exception)
    with pytest.raises(InvalidArgument):
        _core.TransferEngine(1000)


@pytest.mark.gpu
@pytest.mark.parametrize(("num_blocks", "block_nbytes"), GRID)
def test_cuda_copies_are_exact(num_blocks, block_nbytes):
    engine = TransferEngine()
    total = 2 * num_blocks + 3
    src, dst = (
        Region.create(total * block_nbytes, "cuda"),
        Region.create(total * block_nbytes, "cuda"),
    )
    gen = torch.Generator().manual_seed(SEED)
    data = torch.randint(0, 256, (total, block_nbytes), dtype=torch.uint8, generator=gen)
    src.tensor(torch.uint8, (total, block_nbytes)).copy_(data.cuda())
    dst.tensor(torch.uint8, (total * block_nbytes,)).zero_()
    torch.cuda.synchronize()
    src_ids = torch.randperm(total, generator=gen)[:num_blocks]
    dst_ids = torch.randperm(total, generator=gen)[:num_blocks]
    t = engine.submit_blocks(src, dst, src_ids * block_nbytes, dst_ids * block_nbytes, block_nbytes)
    t.wait(TIMEOUT_S)
    assert t.path == "cuda-same-device"
    got = dst.tensor(torch.uint8, (total, block_nbytes)).cpu()
    assert torch.equal(got[dst_ids], data[src_ids])
    assert t.num_runs <= num_blocks


@pytest.mark.gpu
def test_cuda_streams_per_peer_keep_order():
    engine = TransferEngine()
    n = 1 << 20
    a, b, c = (Region.create(n, "cuda") for _ in range(3))
    a.tensor(torch.uint8, (n,)).fill_(1)
    c.tensor(torch.uint8, (n,)).fill_(2)
    torch.cuda.synchronize()
    # Same peer key: in order, so b ends up as c's bytes.
    engine.submit([(a, 0, b, 0, n)], peer=7)
    engine.submit([(c, 0, b, 0, n)], peer=7).wait(TIMEOUT_S)
    assert int(b.tensor(torch.uint8, (n,)).float().mean().item()) == 2


# Cycles torch.cuda._sleep spins per call: ~10 ms at the clock rates of current GPUs, so ten
# calls keep the producer stream busy for ~0.1 s, far longer than submitting the copy takes.
SLEEP_CYCLES = 20_000_000


@pytest.mark.gpu
@pytest.mark.parametrize("producer", ["default", "side"])
@pytest.mark.parametrize("num_blocks", [1, 64])  # one cudaMemcpyAsync; the block-copy kernel
def test_cuda_copies_wait_for_the_producer_stream(producer, num_blocks):
    engine = TransferEngine()
    block = 16 << 10
    n = num_blocks * block
    src, dst = Region.create(n, "cuda"), Region.create(n, "cuda")
    source = src.tensor(torch.uint8, (num_blocks, block))
    source.fill_(1)
    dst.tensor(torch.uint8, (n,)).zero_()
    torch.cuda.synchronize()
    # Reversed block order: num_blocks runs, so 64 blocks take the kernel path.
    src_offsets = torch.arange(num_blocks) * block
    dst_offsets = src_offsets.flip(0)
    stream = torch.cuda.current_stream() if producer == "default" else torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(10):
            torch.cuda._sleep(SLEEP_CYCLES)
        final = torch.arange(n, device="cuda").remainder_(251).to(torch.uint8).view_as(source)
        source.copy_(final)
        handle = torch.cuda.current_stream().cuda_stream
        t = engine.submit_blocks(src, dst, src_offsets, dst_offsets, block, after_stream=handle)
        want = final.flip(0).cpu()  # waits for the producer stream only
    t.wait(TIMEOUT_S)
    assert t.num_runs == num_blocks
    assert torch.equal(dst.tensor(torch.uint8, (num_blocks, block)).cpu(), want)


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize(("src_device", "dst_device"), [("cuda:0", "cuda:1"), ("cuda:1", "cuda:0")])
@pytest.mark.parametrize("num_blocks", [1, 64])  # one copy; the kernel (or one copy per run)
def test_cuda_copies_between_devices(src_device, dst_device, num_blocks):
    engine = TransferEngine()
    block = 4096
    n = num_blocks * block
    src, dst = Region.create(n, src_device), Region.create(n, dst_device)
    gen = torch.Generator().manual_seed(SEED)
    data = torch.randint(0, 256, (num_blocks, block), dtype=torch.uint8, generator=gen)
    src.tensor(torch.uint8, (num_blocks, block)).copy_(data.to(src_device))
    dst.tensor(torch.uint8, (n,)).zero_()
    for i in range(torch.cuda.device_count()):
        torch.cuda.synchronize(i)
    offsets = torch.arange(num_blocks) * block
    engine.submit_blocks(src, dst, offsets, offsets.flip(0), block).wait(TIMEOUT_S)
    assert torch.equal(dst.tensor(torch.uint8, (num_blocks, block)).cpu(), data.flip(0))


@pytest.mark.gpu
@two_gpus
def test_a_cuda_transfer_reads_from_one_device():
    engine = TransferEngine()
    a, b, c = (Region.create(4096, d) for d in ("cuda:0", "cuda:0", "cuda:1"))
    with pytest.raises(InvalidArgument, match="one device"):
        engine.submit([(a, 0, b, 0, 64), (c, 0, b, 64, 64)])
