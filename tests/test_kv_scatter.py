# SPDX-License-Identifier: Apache-2.0
"""kv_scatter: the Triton kernel (interpreted on CPU) and the C++ host copy ("native") against
the torch reference, bit for bit, the reference against a per-token loop, and argument errors
raised before any write."""

import os
import subprocess
import sys

import pytest
import torch
from kernel_utils import CPU_TRITON, DEVICES, bits_equal, random_bits

from epdrt import InvalidArgument, PagedKVCache
from epdrt.kernels import kv_scatter
from epdrt.kernels import reference as refs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
BLOCK_SIZES = [1, 16, 64]
# New tokens per sequence of one flat batch: empty, one token, ragged, more than one tile.
BATCHES = [[], [1], [1, 1, 1], [5, 1, 12], [17, 33, 1, 67], [130]]
LAYERS, HEADS, HEAD_DIM = 3, 3, 24  # rows of 72 elements: not a power of two


def make_cache(block_size, dtype, batch, gen):
    """A cache of random bits with room for ``batch`` (token counts) after random prefixes."""
    num_blocks = 4 + sum(-(-n // block_size) + 1 for n in batch)
    cache = PagedKVCache(LAYERS, HEADS, HEAD_DIM, block_size, num_blocks, dtype)
    cache.storage.copy_(random_bits(cache.storage.shape, dtype, gen))
    return cache


def sequence_slots(cache, batch, gen):
    """Slots of a flat batch: each sequence already holds a random prefix, so writes start
    mid-block, and the sequences' blocks interleave."""
    slots = []
    for i in range(len(batch)):
        cache.reserve(i, int(torch.randint(0, cache.block_size, (1,), generator=gen)))
    for i, n in enumerate(batch):
        slots.append(cache.reserve(i, n))
    return torch.cat(slots) if slots else torch.empty(0, dtype=torch.int64)


def random_slots(cache, n, gen):
    return torch.randperm(cache.num_blocks * cache.block_size, generator=gen)[:n]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("batch", BATCHES, ids=str)
@pytest.mark.parametrize("all_layers", [False, True], ids=["layer", "all_layers"])
@pytest.mark.parametrize(
    ("backend", "device"),
    [("native", "cpu")] + [pytest.param("triton", *d.values, marks=d.marks) for d in DEVICES],
)
def test_kernels_match_reference(dtype, block_size, batch, all_layers, backend, device):
    gen = torch.Generator().manual_seed(len(batch) * 100 + block_size)
    n = sum(batch)
    cache = make_cache(block_size, dtype, batch, gen)
    slots = sequence_slots(cache, batch, gen).to(device)
    shape = (LAYERS, n, HEADS, HEAD_DIM) if all_layers else (n, HEADS, HEAD_DIM)
    key = random_bits(shape, dtype, gen).to(device)
    value = random_bits(shape, dtype, gen).to(device)
    storage = cache.storage.to(device)
    expected = storage.clone()
    target = (lambda s: s) if all_layers else (lambda s: s[:, 1])  # layer 1: a strided view
    refs.kv_scatter(key, value, target(expected), slots)
    kv_scatter(key, value, target(storage), slots, backend=backend)
    assert bits_equal(storage, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", [1, 37])
def test_reference_matches_per_token_loop(dtype, n):
    gen = torch.Generator().manual_seed(n)
    cache = make_cache(16, dtype, [n], gen)
    slots = random_slots(cache, n, gen)
    key = random_bits((LAYERS, n, HEADS, HEAD_DIM), dtype, gen)
    value = random_bits((LAYERS, n, HEADS, HEAD_DIM), dtype, gen)
    expected = cache.storage.clone()
    for i, slot in enumerate(slots.tolist()):
        block, offset = divmod(slot, 16)
        expected[block, :, 0, offset] = key[:, i]
        expected[block, :, 1, offset] = value[:, i]
    one_layer = cache.storage.clone()
    refs.kv_scatter(key[2], value[2], one_layer[:, 2], slots)
    refs.kv_scatter(key, value, cache.storage, slots)
    assert bits_equal(cache.storage, expected)
    assert bits_equal(one_layer[:, 2], expected[:, 2])


@pytest.mark.parametrize(
    "backend", ["auto", "native", "torch", pytest.param("triton", marks=CPU_TRITON)]
)
def test_backends_agree_on_strided_inputs(backend):
    """Key/value strided over tokens (packed [H, D] rows), int32 slots, random slots."""
    gen = torch.Generator().manual_seed(7)
    cache = make_cache(16, torch.bfloat16, [64], gen)
    slots = random_slots(cache, 29, gen)
    big = random_bits((58, HEADS, HEAD_DIM), torch.bfloat16, gen)
    key, value = big[::2], big[1::2]
    expected = cache.storage.clone()
    refs.kv_scatter(key, value, expected[:, 0], slots)
    kv_scatter(key, value, cache.layer(0), slots.to(torch.int32), backend=backend)
    assert bits_equal(cache.storage, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_row_loop_and_tails(monkeypatch, device):
    """Small tiles: several row chunks and token tiles, each with a masked tail."""
    tiles = "epdrt.kernels._triton.kv_scatter.row_tiles"
    monkeypatch.setattr(tiles, lambda row, interpreted: (4, 32))
    gen = torch.Generator().manual_seed(3)
    cache = make_cache(16, torch.float16, [50], gen)
    slots = random_slots(cache, 23, gen).to(device)
    key = random_bits((LAYERS, 23, HEADS, HEAD_DIM), torch.float16, gen).to(device)
    value = random_bits((LAYERS, 23, HEADS, HEAD_DIM), torch.float16, gen).to(device)
    storage = cache.storage.to(device)
    expected = storage.clone()
    refs.kv_scatter(key, value, expected, slots)
    kv_scatter(key, value, storage, slots, backend="triton")
    assert bits_equal(storage, expected)


def test_paged_kv_cache_write_uses_the_kernel_path():
    gen = torch.Generator().manual_seed(1)
    cache = make_cache(16, torch.float32, [9, 20], gen)
    slots = sequence_slots(cache, [9, 20], gen)
    key = random_bits((29, HEADS, HEAD_DIM), torch.float32, gen)
    value = random_bits((29, HEADS, HEAD_DIM), torch.float32, gen)
    expected = cache.storage.clone()
    refs.kv_scatter(key, value, expected[:, 2], slots)
    cache.write(2, slots, key, value)
    assert bits_equal(cache.storage, expected)


def _bad_cases():
    n = 5
    ok = {
        "key": torch.zeros(n, HEADS, HEAD_DIM),
        "value": torch.zeros(n, HEADS, HEAD_DIM),
        "slot_mapping": torch.arange(n),
    }
    transposed = torch.zeros(n, HEAD_DIM, HEADS).transpose(1, 2)
    return {
        "slot too large": {**ok, "slot_mapping": torch.tensor([0, 1, 2, 3, 64])},
        "negative slot": {**ok, "slot_mapping": torch.tensor([0, 1, -1, 3, 4])},
        "repeated slot": {**ok, "slot_mapping": torch.tensor([0, 1, 2, 3, 3])},
        "float slots": {**ok, "slot_mapping": torch.arange(n, dtype=torch.float32)},
        "strided slots": {**ok, "slot_mapping": torch.arange(2 * n)[::2]},
        "short slots": {**ok, "slot_mapping": torch.arange(n - 1)},
        "key dtype": {**ok, "key": torch.zeros(n, HEADS, HEAD_DIM, dtype=torch.float16)},
        "value shape": {**ok, "value": torch.zeros(n, HEADS, HEAD_DIM + 1)},
        "key rank": {**ok, "key": torch.zeros(1, n, HEADS, HEAD_DIM)},
        "unpacked rows": {**ok, "key": transposed},
        "not a tensor": {**ok, "value": [[0.0]]},
    }


@pytest.mark.parametrize("backend", ["native", "torch", "triton"])
@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_arguments_raise_before_writing(case, backend):
    cache = PagedKVCache(1, HEADS, HEAD_DIM, 16, 4, torch.float32)
    cache.storage.fill_(7.0)
    with pytest.raises(InvalidArgument):
        kv_scatter(kv_cache=cache.layer(0), backend=backend, **_bad_cases()[case])
    assert bool((cache.storage == 7.0).all())


def test_bad_cache_and_backend():
    key = torch.zeros(1, HEADS, HEAD_DIM)
    slots = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(InvalidArgument, match="K/V dim"):
        kv_scatter(key, key, torch.zeros(4, 3, 16, HEADS, HEAD_DIM), slots)
    with pytest.raises(InvalidArgument, match="contiguous"):
        kv_scatter(key, key, torch.zeros(4, 2, 16, HEAD_DIM, HEADS).transpose(-1, -2), slots)
    with pytest.raises(InvalidArgument, match="backend"):
        kv_scatter(key, key, torch.zeros(4, 2, 16, HEADS, HEAD_DIM), slots, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("block_size", [1, 16, 128])
@pytest.mark.parametrize("all_layers", [False, True], ids=["layer", "all_layers"])
def test_gpu_triton_matches_reference(dtype, block_size, all_layers):
    gen = torch.Generator().manual_seed(block_size)
    layers, heads, dim, n = 4, 8, 128, 3001
    num_blocks = -(-2 * n // block_size)
    storage = random_bits((num_blocks, layers, 2, block_size, heads, dim), dtype, gen).cuda()
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:n].cuda()
    shape = (layers, n, heads, dim) if all_layers else (n, heads, dim)
    key = random_bits(shape, dtype, gen).cuda()
    value = random_bits(shape, dtype, gen).cuda()
    expected = storage.clone()
    target = (lambda s: s) if all_layers else (lambda s: s[:, 3])
    refs.kv_scatter(key, value, target(expected), slots)
    kv_scatter(key, value, target(storage), slots)
    torch.cuda.synchronize()
    assert bits_equal(storage, expected)


@pytest.mark.gpu
def test_gpu_paged_kv_cache_round_trip():
    cache = PagedKVCache(2, 8, 128, 16, 64, torch.bfloat16, device="cuda")
    key = torch.randn(2, 100, 8, 128, device="cuda").to(torch.bfloat16)
    value = torch.randn(2, 100, 8, 128, device="cuda").to(torch.bfloat16)
    cache.append("s", key, value)
    k, v = cache.read("s")
    assert torch.equal(k, key) and torch.equal(v, value)


@CPU_TRITON
def test_triton_on_cpu_without_the_interpreter_is_a_clear_error():
    code = (
        "import torch\n"
        "from epdrt import EpdrtError\n"
        "from epdrt.kernels import kv_scatter\n"
        "x = torch.zeros(1, 2, 8)\n"
        "try:\n"
        "    kv_scatter(x, x, torch.zeros(2, 2, 4, 2, 8), torch.zeros(1, dtype=torch.long),\n"
        "               backend='triton')\n"
        "except EpdrtError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    assert "TRITON_INTERPRET=1" in out.stdout
