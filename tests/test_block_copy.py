# SPDX-License-Identifier: Apache-2.0
"""block_copy: every backend (C++ host memcpy, Triton interpreted on CPU, torch reference, and
the CUDA kernel on a GPU) against per-block slicing, bit for bit; errors before any copy."""

import pytest
import torch
from kernel_utils import CPU_TRITON, random_bits

from epdrt import CudaUnavailable, InvalidArgument, PagedKVCache, Region, _core
from epdrt.kernels import BlockCopy, block_copy

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
BLOCK_SIZES = [1, 16, 64]  # tokens per block; a block is block_size rows of ROW elements
ROW = 24
CPU_BACKENDS = ["native", pytest.param("triton", marks=CPU_TRITON), "torch"]
PAIR_COUNTS = [0, 1, 7, 40]


def random_pairs(n, num_src, num_dst, gen):
    """Unique destinations; sources drawn with repeats."""
    dst = torch.randperm(num_dst, generator=gen)[:n]
    src = torch.randint(0, num_src, (n,), generator=gen)
    return torch.stack([src, dst], dim=1)


def expected_bytes(src, dst, pairs, block_bytes, src_stride, dst_stride, src_off=0, dst_off=0):
    out = dst.clone()
    for s, d in pairs.tolist():
        a, b = src_off + s * src_stride, dst_off + d * dst_stride
        out[b : b + block_bytes] = src[a : a + block_bytes]
    return out


def as_bytes(t):
    return t.reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("num_pairs", PAIR_COUNTS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_tensor_blocks(dtype, block_size, num_pairs, backend):
    gen = torch.Generator().manual_seed(num_pairs * 10 + block_size)
    src = random_bits((50, block_size, ROW), dtype, gen)
    dst = random_bits((60, block_size, ROW), dtype, gen)
    pairs = random_pairs(num_pairs, 50, 60, gen)
    block_bytes = block_size * ROW * src.element_size()
    want = expected_bytes(
        as_bytes(src), as_bytes(dst), pairs, block_bytes, block_bytes, block_bytes
    )
    block_copy(src, dst, pairs, block_bytes, backend=backend)
    assert torch.equal(as_bytes(dst), want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "block_bytes, stride, src_off, dst_off",
    [(1, 1, 0, 0), (13, 13, 3, 5), (6, 10, 2, 4), (24, 40, 8, 16), (100, 128, 7, 7)],
)
def test_odd_sizes_strides_and_offsets(backend, block_bytes, stride, src_off, dst_off):
    """Byte-sized and misaligned blocks, gaps between blocks, offsets (word widths 1 to 8)."""
    gen = torch.Generator().manual_seed(block_bytes)
    src = random_bits((stride * 30 + src_off,), torch.uint8, gen)
    dst = random_bits((stride * 20 + dst_off,), torch.uint8, gen)
    pairs = random_pairs(15, 30, 20, gen)
    want = expected_bytes(src, dst, pairs, block_bytes, stride, stride, src_off, dst_off)
    BlockCopy(src, dst, pairs, block_bytes, src_stride=stride, dst_stride=stride,
              src_offset=src_off, dst_offset=dst_off, backend=backend).run()  # fmt: skip
    assert torch.equal(dst, want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_one_layer_between_kv_cache_regions(backend):
    """Layer 1 of some blocks from one PagedKVCache region to another: the transfer use."""
    gen = torch.Generator().manual_seed(0)
    a = PagedKVCache(3, 2, 8, 16, 10, torch.bfloat16)
    b = PagedKVCache(3, 2, 8, 16, 12, torch.bfloat16)
    a.storage.copy_(random_bits(a.storage.shape, torch.bfloat16, gen))
    b.storage.copy_(random_bits(b.storage.shape, torch.bfloat16, gen))
    pairs = torch.tensor([[3, 0], [0, 11], [9, 5]], dtype=torch.int32)
    want = b.storage.clone()
    for s, d in pairs.tolist():
        want[d, 1] = a.storage[s, 1]
    block_copy(a.region, b.region, pairs, a.layer_nbytes, src_stride=a.block_nbytes,
               dst_stride=b.block_nbytes, src_offset=a.layer_nbytes,
               dst_offset=b.layer_nbytes, backend=backend)  # fmt: skip
    assert torch.equal(b.storage.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_within_one_region(backend):
    region = Region.create(64 * 100)
    data = region.tensor(torch.uint8, (6400,))
    data.copy_(random_bits((6400,), torch.uint8, torch.Generator().manual_seed(1)))
    pairs = [(0, 5), (0, 6), (7, 1)]
    want = expected_bytes(data, data, torch.tensor(pairs), 64, 64, 64)
    block_copy(region, region, pairs, 64, backend=backend)
    assert torch.equal(data, want)


@pytest.mark.parametrize("num_threads", [1, 3])
def test_host_threads_split_large_copies(num_threads):
    """Totals above the per-thread threshold, including one op larger than a thread's share."""
    gen = torch.Generator().manual_seed(num_threads)
    src = random_bits((6 << 20,), torch.uint8, gen)
    dst = torch.zeros(14 << 20, dtype=torch.uint8)
    pairs = [(0, 0), (1, 2), (2, 4)]
    block_copy(src, dst, pairs, 2 << 20, num_threads=num_threads)
    big_src, big_dst = (
        random_bits((13 << 20,), torch.uint8, gen),
        torch.zeros(13 << 20, dtype=torch.uint8),
    )
    block_copy(big_src, big_dst, [(0, 0)], 13 << 20, num_threads=num_threads)
    want = expected_bytes(
        src, torch.zeros_like(dst), torch.tensor(pairs), 2 << 20, 2 << 20, 2 << 20
    )
    assert torch.equal(dst, want)
    assert torch.equal(big_dst, big_src)


def test_plan_runs_again_and_counts_bytes():
    src, dst = torch.arange(64, dtype=torch.float32), torch.zeros(64)
    plan = BlockCopy(src, dst, [(1, 2), (3, 0)], 64)
    assert plan.nbytes == 128 and plan.num_pairs == 2 and plan.backend == "native"
    plan.run()
    src += 100
    plan.run()
    assert dst[32:48].tolist() == list(range(116, 132)) and dst[:16].tolist() == list(
        range(148, 164)
    )


def _bad_cases():
    src, dst = torch.zeros(8, 16), torch.zeros(4, 16)
    ok = dict(src=src, dst=dst, pairs=[(0, 0)], block_bytes=64)
    closed = Region.create(256)
    closed.close()
    return {
        "source block too large": {**ok, "pairs": [(8, 0)]},
        "destination too large": {**ok, "pairs": [(0, 4)]},
        "negative block": {**ok, "pairs": [(-1, 0)]},
        "repeated destination": {**ok, "pairs": [(0, 1), (2, 1)]},
        "stride below block": {**ok, "src_stride": 32},
        "offset past end": {**ok, "src_offset": 512 - 63},
        "negative offset": {**ok, "dst_offset": -4},
        "zero block": {**ok, "block_bytes": 0},
        "pairs shape": {**ok, "pairs": torch.zeros(2, 3, dtype=torch.int64)},
        "pairs dtype": {**ok, "pairs": torch.zeros(2, 2)},
        "ragged pairs": {**ok, "pairs": [(0, 1), (2,)]},
        "non-contiguous src": {**ok, "src": torch.zeros(16, 8).T},
        "not a buffer": {**ok, "dst": bytearray(256)},
        "closed region": {**ok, "dst": closed},
        "overlapping": {**ok, "src": dst, "pairs": [(0, 1), (1, 2)]},
        "overlap across offset": {**ok, "src": dst, "dst_offset": 32, "pairs": [(1, 0)]},
        "bad backend": {**ok, "backend": "cuda"},
        "bad threads": {**ok, "num_threads": 0},
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_arguments_raise_before_copying(case):
    args = _bad_cases()[case]
    dst = args["dst"]
    before = dst.clone() if isinstance(dst, torch.Tensor) else None
    with pytest.raises(InvalidArgument):
        BlockCopy(**args)
    if before is not None:
        assert torch.equal(dst, before)


def test_cuda_entry_point_without_a_device():
    """No GPU here: the CUDA kernel's entry point reports CudaUnavailable, never crashes."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    ops = torch.zeros(1, 3, dtype=torch.int64)
    _core.block_copy_cuda(ops.data_ptr(), 0, 0)  # nothing to do: no launch
    with pytest.raises(CudaUnavailable):
        _core.block_copy_cuda(ops.data_ptr(), 1, 0)


# ---- GPU -------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["native", "triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("block_size", [1, 16, 128])
@pytest.mark.parametrize("num_pairs", [1, 7, 4096])
def test_gpu_blocks(backend, dtype, block_size, num_pairs):
    gen = torch.Generator().manual_seed(num_pairs + block_size)
    shape = (8, 128)  # KV heads x head dim
    src = random_bits((num_pairs + 5, block_size, *shape), dtype, gen).cuda()
    dst = random_bits((num_pairs + 9, block_size, *shape), dtype, gen).cuda()
    pairs = random_pairs(num_pairs, src.shape[0], dst.shape[0], gen)
    block_bytes = src[0].numel() * src.element_size()
    want = expected_bytes(as_bytes(src).cpu(), as_bytes(dst).cpu(), pairs, block_bytes,
                          block_bytes, block_bytes)  # fmt: skip
    block_copy(src, dst, pairs.cuda(), block_bytes, backend=backend)
    torch.cuda.synchronize()
    assert torch.equal(as_bytes(dst).cpu(), want)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize(
    "block_bytes, src_stride, dst_stride, src_off, dst_off",
    [
        (1, 1, 1, 0, 0),  # bytes
        (3, 7, 5, 1, 2),  # nothing aligned
        (1000, 1001, 1003, 3, 3),  # same misalignment: byte head, 16-byte body, byte tail
        (4100, 4104, 4104, 8, 0),  # 8-byte aligned relative to each other
        (4100, 4100, 4100, 4, 0),  # 4-byte
        (4098, 4098, 4098, 2, 0),  # 2-byte
        (3 << 20, 3 << 20, (3 << 20) + 16, 16, 0),  # large ops split over thread blocks
    ],
)
def test_gpu_alignments_and_large_ops(backend, block_bytes, src_stride, dst_stride, src_off,
                                      dst_off):  # fmt: skip
    gen = torch.Generator().manual_seed(block_bytes)
    n_src, n_dst, n = 9, 11, 8
    src = random_bits((src_off + n_src * src_stride,), torch.uint8, gen)
    dst = random_bits((dst_off + n_dst * dst_stride,), torch.uint8, gen)
    pairs = random_pairs(n, n_src, n_dst, gen)
    want = expected_bytes(src, dst, pairs, block_bytes, src_stride, dst_stride, src_off, dst_off)
    dst_gpu = dst.cuda()
    block_copy(src.cuda(), dst_gpu, pairs, block_bytes, src_stride=src_stride,
               dst_stride=dst_stride, src_offset=src_off, dst_offset=dst_off,
               backend=backend)  # fmt: skip
    torch.cuda.synchronize()
    assert torch.equal(dst_gpu.cpu(), want)


@pytest.mark.gpu
def test_gpu_regions_and_mixed_devices():
    a = PagedKVCache(2, 8, 128, 16, 64, torch.bfloat16, device="cuda")
    b = PagedKVCache(2, 8, 128, 16, 64, torch.bfloat16, device="cuda")
    a.storage.normal_()
    pairs = torch.randperm(64)[:40].view(20, 2)
    block_copy(a.region, b.region, pairs, a.block_nbytes)
    torch.cuda.synchronize()
    assert torch.equal(b.storage[pairs[:, 1].cuda()], a.storage[pairs[:, 0].cuda()])
    with pytest.raises(InvalidArgument, match="src is on"):
        block_copy(torch.zeros(64), b.region, [(0, 0)], 64)
