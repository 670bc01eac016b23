# SPDX-License-Identifier: Apache-2.0
"""kv_gather: the Triton kernel (interpreted on CPU) against the torch reference, bit for bit,
the reference against concatenated appends, and argument errors raised before any launch."""

import pytest
import torch
from kernel_utils import CPU_TRITON, DEVICES, bits_equal, random_bits

from epdrt import InvalidArgument, PagedKVCache
from epdrt.kernels import kv_gather
from epdrt.kernels import reference as refs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
BLOCK_SIZES = [1, 16, 64]
# Sequence lengths of one gather: none, an empty one, one token, ragged, exact block multiples.
SEQ_LENS = [[], [0], [1], [1, 0, 1], [17, 1, 40], [64, 128, 3]]
LAYERS, HEADS, HEAD_DIM = 3, 3, 24  # rows of 72 elements: not a power of two


def random_tables(lens, block_size, num_blocks, gen, pad=-1):
    """Distinct random blocks per sequence, rows padded with ``pad`` (never read)."""
    need = [-(-n // block_size) for n in lens]
    width = max(need, default=0) + 1
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(lens), width), pad, dtype=torch.int64)
    used = 0
    for s, k in enumerate(need):
        tables[s, :k] = perm[used : used + k]
        used += k
    return tables


def make_storage(lens, block_size, dtype, gen):
    num_blocks = 2 + sum(-(-n // block_size) for n in lens)
    return random_bits((num_blocks, LAYERS, 2, block_size, HEADS, HEAD_DIM), dtype, gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("lens", SEQ_LENS, ids=str)
@pytest.mark.parametrize("all_layers", [False, True], ids=["layer", "all_layers"])
@pytest.mark.parametrize("device", DEVICES)
def test_triton_matches_reference(dtype, block_size, lens, all_layers, device):
    gen = torch.Generator().manual_seed(len(lens) * 100 + block_size)
    storage = make_storage(lens, block_size, dtype, gen).to(device)
    tables = random_tables(lens, block_size, storage.shape[0], gen).to(device)
    cache = storage if all_layers else storage[:, 1]  # one layer: a strided view
    k_ref, v_ref = refs.kv_gather(cache, tables, lens)
    key, value = kv_gather(cache, tables, lens, backend="triton")
    assert bits_equal(key, k_ref) and bits_equal(value, v_ref)
    assert key.is_contiguous() and value.is_contiguous()
    total = sum(lens)
    assert key.shape == ((LAYERS, total) if all_layers else (total,)) + (HEADS, HEAD_DIM)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=CPU_TRITON)])
def test_appended_sequences_come_back(dtype, block_size, backend):
    """Sequences appended in interleaved chunks come back in order, whole or by layer."""
    gen = torch.Generator().manual_seed(block_size)
    cache = PagedKVCache(LAYERS, HEADS, HEAD_DIM, block_size, 200 // block_size + 8, dtype)
    chunks = {"a": [5, 1, 30], "b": [1], "c": [block_size, 2]}
    keys, values = {s: [] for s in chunks}, {s: [] for s in chunks}
    for i in range(3):
        for seq, sizes in chunks.items():
            if i < len(sizes):
                k = random_bits((LAYERS, sizes[i], HEADS, HEAD_DIM), dtype, gen)
                v = random_bits((LAYERS, sizes[i], HEADS, HEAD_DIM), dtype, gen)
                cache.append(seq, k, v)
                keys[seq].append(k)
                values[seq].append(v)
    order = ["c", "a", "b"]
    lens = [cache.seq_len(s) for s in order]
    tables = random_tables(lens, block_size, cache.num_blocks, gen)  # shape and padding only
    for row, seq in enumerate(order):
        table = cache.block_table(seq)
        tables[row, : len(table)] = torch.tensor(table)
    k_exp = torch.cat([torch.cat(keys[s], dim=1) for s in order], dim=1)
    v_exp = torch.cat([torch.cat(values[s], dim=1) for s in order], dim=1)
    key, value = kv_gather(cache.storage, tables, lens, backend=backend)
    assert bits_equal(key, k_exp) and bits_equal(value, v_exp)
    k2, v2 = kv_gather(cache.layer(2), tables.to(torch.int32), lens, backend=backend)
    assert bits_equal(k2, k_exp[2]) and bits_equal(v2, v_exp[2])
    for seq in order:  # PagedKVCache.read goes through kv_gather
        k, v = cache.read(seq, layer=0)
        assert bits_equal(k, torch.cat(keys[seq], dim=1)[0])


@pytest.mark.parametrize("backend", ["auto", "torch", pytest.param("triton", marks=CPU_TRITON)])
def test_out_tensors_and_tensor_lengths(backend):
    gen = torch.Generator().manual_seed(5)
    lens = [9, 33]
    storage = make_storage(lens, 16, torch.float16, gen)
    tables = random_tables(lens, 16, storage.shape[0], gen).to(torch.int32)
    k_ref, v_ref = refs.kv_gather(storage, tables, lens)
    out = (torch.empty_like(k_ref), torch.empty_like(v_ref))
    got = kv_gather(storage, tables, torch.tensor(lens), out=out, backend=backend)
    assert got[0] is out[0] and got[1] is out[1]
    assert bits_equal(out[0], k_ref) and bits_equal(out[1], v_ref)


@pytest.mark.parametrize("device", DEVICES)
def test_row_loop_and_tails(monkeypatch, device):
    """Small tiles: several row chunks and token tiles, each with a masked tail."""
    monkeypatch.setattr("epdrt.kernels._triton.kv_gather.row_tiles", lambda row, interp: (4, 32))
    gen = torch.Generator().manual_seed(3)
    lens = [13, 1, 22]
    storage = make_storage(lens, 16, torch.bfloat16, gen).to(device)
    tables = random_tables(lens, 16, storage.shape[0], gen).to(device)
    k_ref, v_ref = refs.kv_gather(storage, tables, lens)
    key, value = kv_gather(storage, tables, lens, backend="triton")
    assert bits_equal(key, k_ref) and bits_equal(value, v_ref)


def _bad_cases():
    lens = [5, 20]
    tables = torch.tensor([[0, -1], [1, 2]])
    strided = torch.tensor([[0, 9, 0, 9], [1, 9, 2, 9]])[:, ::2]
    return {
        "block out of range": dict(block_tables=torch.tensor([[0, -1], [1, 4]]), seq_lens=lens),
        "negative block": dict(block_tables=torch.tensor([[-1, 0], [1, 2]]), seq_lens=lens),
        "too few columns": dict(block_tables=tables[:, :1], seq_lens=lens),
        "negative length": dict(block_tables=tables, seq_lens=[5, -1]),
        "length count": dict(block_tables=tables, seq_lens=[5]),
        "float lengths": dict(block_tables=tables, seq_lens=[5.0, 20.0]),
        "float table": dict(block_tables=tables.float(), seq_lens=lens),
        "strided table": dict(block_tables=strided, seq_lens=lens),
        "table rank": dict(block_tables=tables.flatten(), seq_lens=lens),
        "out dtype": dict(
            block_tables=tables,
            seq_lens=lens,
            out=(torch.empty(25, 2, 8, dtype=torch.float16), torch.empty(25, 2, 8)),
        ),
        "out strided": dict(
            block_tables=tables,
            seq_lens=lens,
            out=(torch.empty(25, 8, 2).transpose(1, 2), torch.empty(25, 2, 8)),
        ),
        "out shape": dict(
            block_tables=tables, seq_lens=lens, out=(torch.empty(24, 2, 8), torch.empty(24, 2, 8))
        ),
    }


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_arguments_raise(case, backend):
    cache = torch.zeros(4, 2, 16, 2, 8)
    with pytest.raises(InvalidArgument):
        kv_gather(cache, backend=backend, **_bad_cases()[case])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("block_size", [1, 16, 128])
@pytest.mark.parametrize("all_layers", [False, True], ids=["layer", "all_layers"])
def test_gpu_triton_matches_reference(dtype, block_size, all_layers):
    gen = torch.Generator().manual_seed(block_size)
    lens = [1, 0, 999, 4096, 37]
    num_blocks = 8 + sum(-(-n // block_size) for n in lens)
    storage = random_bits((num_blocks, 4, 2, block_size, 8, 128), dtype, gen).cuda()
    tables = random_tables(lens, block_size, num_blocks, gen).cuda()
    cache = storage if all_layers else storage[:, 2]
    k_ref, v_ref = refs.kv_gather(cache, tables, lens)
    key, value = kv_gather(cache, tables, lens)
    torch.cuda.synchronize()
    assert bits_equal(key, k_ref) and bits_equal(value, v_ref)
