# SPDX-License-Identifier: Apache-2.0
"""paged_attention_decode / paged_attention_prefill: the Triton kernels (interpreted on CPU)
and the torch references against dense fp64 attention of the same tokens, the custom ops under
opcheck and torch.compile, and argument errors raised before any launch.

Accuracy rule: error against fp64 within ``K_PLAIN`` times that of plain torch attention done
in the input dtype (plus a floor of a few fp32 ulps for fp32 inputs).
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_utils import CPU_TRITON, DEVICES

import epdrt
from epdrt import InvalidArgument
from epdrt.kernels import paged_attention as pa
from epdrt.kernels import paged_attention_decode, paged_attention_prefill
from epdrt.kernels import reference as refs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
HEAD_DIMS = [64, 80, 128]
BLOCK_SIZES = [16, 32, 64]
#: (query heads, KV heads): multi-head, GQA with a power-of-two and an odd group
HEADS = [(2, 2), (4, 2), (6, 2)]
K_PLAIN = 4.0
#: Interpreted Triton is slow: one case per head dim, block size, dtype and head layout.
TRITON_CASES = [
    pytest.param(d, bs, dt, h, id=f"D{d}-bs{bs}-{i}-Hq{h[0]}Hkv{h[1]}")
    for d, bs, dt, i, h in zip(HEAD_DIMS, BLOCK_SIZES, DTYPES, DTYPE_IDS, HEADS, strict=True)
]
#: Context lengths of one decode batch: one token, a block boundary crossed, an exact multiple
#: of every block size, and a long one. With ``bs`` in BLOCK_SIZES.
DECODE_LENS = [1, 17, 64, 150]
#: (context length, new queries) of one prefill batch: a whole prompt, a later chunk, a single
#: token, a sequence without new tokens, a chunk crossing blocks.
PREFILL_LENS = [(40, 40), (100, 37), (1, 1), (9, 0), (70, 5)]


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


class Case:
    """A batch of sequences in a poisoned paged cache (two layers, attention reads layer 1).

    Every cache element that attention must not read is NaN: the other layer, free blocks, the
    slots past each sequence's end; table padding is -1.
    """

    def __init__(self, lens, q_lens, block_size, heads, head_dim, dtype, seed, device="cpu"):
        gen = torch.Generator().manual_seed(seed)
        num_heads, num_kv_heads = heads
        need = [-(-n // block_size) for n in lens]
        num_blocks = sum(need) + 3
        storage = torch.full(
            (num_blocks, 2, 2, block_size, num_kv_heads, head_dim), math.nan, dtype=dtype
        )
        perm = torch.randperm(num_blocks, generator=gen)
        tables = torch.full((len(lens), max(need, default=0) + 2), -1, dtype=torch.int32)
        self.keys, self.values, used = [], [], 0
        for s, n in enumerate(lens):
            tables[s, : need[s]] = perm[used : used + need[s]].int()
            used += need[s]
            key = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
            value = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
            pos = torch.arange(n)
            slots = tables[s, pos // block_size].long() * block_size + pos % block_size
            refs.kv_scatter(key, value, storage[:, 1], slots)
            self.keys.append(key)
            self.values.append(value)
        self.lens, self.q_lens = list(lens), list(q_lens)
        total_q = sum(q_lens)
        # The query is a strided view, as a slice of a fused QKV projection would be.
        qkv = torch.randn(total_q, num_heads + 2 * num_kv_heads, head_dim, generator=gen)
        self.query = qkv.to(dtype)[:, :num_heads].to(device)
        self.storage = storage.to(device)
        self.kv_layer = self.storage[:, 1]
        self.tables = tables.to(device)
        self.context_lens = torch.tensor(lens, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0).int()
        self.cu_seqlens_q = self.cu_seqlens_q.to(device)
        self.scale = head_dim**-0.5

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """Plain attention over the original (unpaged) K/V, computed in ``dtype``."""
        outs, start = [], 0
        for key, value, m in zip(self.keys, self.values, self.q_lens, strict=True):
            q = self.query[start : start + m].to(dtype)
            start += m
            group = q.shape[1] // key.shape[1]
            k = key.to(q.device, dtype).repeat_interleave(group, dim=1)
            v = value.to(q.device, dtype).repeat_interleave(group, dim=1)
            n = k.shape[0]
            scores = torch.einsum("mhd,nhd->hmn", q, k) * self.scale
            pos = torch.arange(n, device=q.device)
            visible = pos[None, :] <= pos[:m, None] + (n - m)
            probs = torch.softmax(scores.masked_fill(~visible, -math.inf), dim=-1)
            outs.append(torch.einsum("hmn,nhd->mhd", probs, v))
        return torch.cat(outs).cpu()

    def check(self, out: torch.Tensor) -> None:
        """``out`` is as close to fp64 attention as ``K_PLAIN`` times plain torch."""
        dtype = self.query.dtype
        assert out.shape == self.query.shape and out.dtype == dtype and out.is_contiguous()
        truth = self.dense(torch.float64)
        err = (out.cpu().double() - truth).abs().max().item()
        plain = (self.dense(dtype).double() - truth).abs().max().item()
        floor = 16 * torch.finfo(dtype).eps if dtype == torch.float32 else 0.0
        assert err <= K_PLAIN * plain + floor, (err, plain)


def decode_case(block_size, heads, head_dim, dtype, seed=0, lens=DECODE_LENS, device="cpu"):
    return Case(lens, [1] * len(lens), block_size, heads, head_dim, dtype, seed, device)


def prefill_case(block_size, heads, head_dim, dtype, seed=0, lens=PREFILL_LENS, device="cpu"):
    ctx, q_lens = zip(*lens, strict=True)
    return Case(ctx, q_lens, block_size, heads, head_dim, dtype, seed, device)


def decode(case: Case, **kwargs) -> torch.Tensor:
    return paged_attention_decode(
        case.query, case.kv_layer, case.tables, case.context_lens, case.scale, **kwargs
    )


def prefill(case: Case, **kwargs) -> torch.Tensor:
    return paged_attention_prefill(
        case.query,
        case.kv_layer,
        case.tables,
        case.cu_seqlens_q,
        case.context_lens,
        case.scale,
        **kwargs,
    )


@pytest.fixture
def poisoned_output(monkeypatch):
    """Kernel outputs start as NaN: an element the kernel does not write fails the check."""
    monkeypatch.setattr(pa, "_new_output", lambda q: torch.full_like(q, math.nan))


# Triton (interpreted on CPU): few cases, each a whole ragged batch.


@pytest.mark.parametrize(("head_dim", "block_size", "dtype", "heads"), TRITON_CASES)
@CPU_TRITON
def test_triton_decode(head_dim, block_size, dtype, heads, poisoned_output):
    case = decode_case(block_size, heads, head_dim, dtype)
    case.check(decode(case, backend="triton"))


@pytest.mark.parametrize(("head_dim", "block_size", "dtype", "heads"), TRITON_CASES)
@CPU_TRITON
def test_triton_prefill(head_dim, block_size, dtype, heads, poisoned_output):
    case = prefill_case(block_size, heads, head_dim, dtype)
    case.check(prefill(case, backend="triton"))


@pytest.mark.parametrize("block_size", [1, 24])
@CPU_TRITON
def test_triton_any_block_size(block_size):
    """Pages are looked up per position: one-token blocks and a non-power-of-two size work."""
    case = decode_case(block_size, (4, 2), 64, torch.float16, lens=[1, 30, 49])
    case.check(decode(case, backend="triton"))
    case = prefill_case(block_size, (4, 2), 64, torch.float16, lens=[(30, 30), (49, 20)])
    case.check(prefill(case, backend="triton"))


@pytest.mark.parametrize("parts", [3, 64])
@pytest.mark.parametrize(("head_dim", "block_size", "dtype", "heads"), TRITON_CASES[::2])
@CPU_TRITON
def test_triton_split_decode(
    head_dim, block_size, dtype, heads, parts, poisoned_output, monkeypatch
):
    """Positions split into parts and combined (as on a GPU with few sequences); some parts of
    the short sequences are empty, and 64 parts are more than 150 positions fill."""
    from epdrt.kernels._triton import paged_attention as kernel

    monkeypatch.setattr(kernel, "num_splits", lambda *args: parts)
    case = decode_case(block_size, heads, head_dim, dtype)
    out = decode(case, backend="triton")
    case.check(out)
    monkeypatch.setattr(kernel, "num_splits", lambda *args: 1)
    eps = torch.finfo(dtype).eps  # parts round probabilities against their own maximum
    torch.testing.assert_close(out, decode(case, backend="triton"), rtol=0, atol=4 * eps)


@CPU_TRITON
def test_triton_chunked_prefill_then_decode_agree_with_one_prefill():
    """A prompt prefilled in two chunks and one decode step: the rows of one whole prefill."""
    case = prefill_case(16, (4, 2), 64, torch.float32, lens=[(45, 45)])
    whole = prefill(case, backend="triton")
    lens = torch.tensor([30], dtype=torch.int32)
    first = paged_attention_prefill(
        case.query[:30],
        case.kv_layer,
        case.tables,
        torch.tensor([0, 30], dtype=torch.int32),
        lens,
        case.scale,
        backend="triton",
    )
    second = paged_attention_prefill(
        case.query[30:],
        case.kv_layer,
        case.tables,
        torch.tensor([0, 15], dtype=torch.int32),
        case.context_lens,
        case.scale,
        backend="triton",
    )
    last = paged_attention_decode(
        case.query[44:],
        case.kv_layer,
        case.tables,
        case.context_lens,
        case.scale,
        backend="triton",
    )
    torch.testing.assert_close(torch.cat([first, second]), whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(last, whole[44:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=CPU_TRITON)])
def test_serving_steps_on_a_paged_kv_cache(backend):
    """Chunked prefill then decode on PagedKVCache's layer views and block tables, as the
    runtime drives them: each step appends K/V, then attends; dense attention of the same
    tokens agrees at every step and layer."""
    gen = torch.Generator().manual_seed(3)
    layers, kv_heads, heads, dim, bs = 2, 2, 4, 64, 16
    cache = epdrt.PagedKVCache(layers, kv_heads, dim, bs, 16, torch.float32)
    cache.storage.fill_(math.nan)
    seqs = {"a": [21, 1, 1], "b": [3, 30, 1]}  # tokens appended per step (decode when 1)
    keys = {s: torch.empty(layers, 0, kv_heads, dim) for s in seqs}
    values = {s: torch.empty(layers, 0, kv_heads, dim) for s in seqs}
    for step in range(3):
        new = {s: sizes[step] for s, sizes in seqs.items()}
        for s, n in new.items():
            k = torch.randn(layers, n, kv_heads, dim, generator=gen)
            v = torch.randn(layers, n, kv_heads, dim, generator=gen)
            cache.append(s, k, v)
            keys[s], values[s] = torch.cat([keys[s], k], 1), torch.cat([values[s], v], 1)
        width = max(len(cache.block_table(s)) for s in seqs)
        tables = torch.tensor(
            [cache.block_table(s) + [-1] * (width - len(cache.block_table(s))) for s in seqs],
            dtype=torch.int32,
        )
        lens = torch.tensor([cache.seq_len(s) for s in seqs], dtype=torch.int32)
        cu = torch.tensor([0, *new.values()], dtype=torch.int32).cumsum(0).int()
        query = torch.randn(int(cu[-1]), heads, dim, generator=gen)
        for layer in range(layers):
            kv = cache.layer(layer)
            if all(n == 1 for n in new.values()):
                out = paged_attention_decode(query, kv, tables, lens, 0.2, backend=backend)
            else:
                out = paged_attention_prefill(query, kv, tables, cu, lens, 0.2, backend=backend)
            for i, s in enumerate(seqs):
                q = query[cu[i] : cu[i + 1]].transpose(0, 1)
                k, v = keys[s][layer].transpose(0, 1), values[s][layer].transpose(0, 1)
                mask = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).tril(
                    k.shape[1] - q.shape[1]
                )
                dense = torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, scale=0.2, enable_gqa=True
                )
                got = out[cu[i] : cu[i + 1]]
                torch.testing.assert_close(got, dense.transpose(0, 1), rtol=1e-4, atol=1e-5)


# The torch path (references): every dtype, head dim and block size.


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_torch_path(dtype, head_dim, block_size):
    for heads in HEADS:
        seed = head_dim + block_size
        case = decode_case(block_size, heads, head_dim, dtype, seed)
        case.check(decode(case, backend="torch"))
        case = prefill_case(block_size, heads, head_dim, dtype, seed)
        case.check(prefill(case, backend="torch"))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_native_decode(dtype, head_dim, block_size, poisoned_output):
    """The C++ host kernel reads K/V in place; slots past each context hold NaN."""
    for heads in [*HEADS, (8, 1)]:
        case = decode_case(block_size, heads, head_dim, dtype, head_dim + block_size)
        case.check(decode(case, backend="native"))


@pytest.mark.parametrize("threads", [1, 3])
def test_native_decode_threads_agree(threads, monkeypatch):
    case = decode_case(16, (4, 2), 64, torch.float32, lens=[1, 17, 64, 150, 3000, 900])
    one = decode(case, backend="native")
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert torch.equal(decode(case, backend="native"), one)


def test_auto_on_cpu_is_native_decode_and_torch_prefill():
    case = decode_case(16, (4, 2), 64, torch.float32)
    assert torch.equal(decode(case), decode(case, backend="native"))
    case = prefill_case(16, (4, 2), 64, torch.float32)
    assert torch.equal(prefill(case), prefill(case, backend="torch"))
    assert torch.equal(prefill(case, backend="native"), prefill(case, backend="torch"))


@pytest.mark.parametrize("backend", ["torch", "native", pytest.param("triton", marks=CPU_TRITON)])
def test_length_hints_give_the_same_result(backend):
    """Told the longest context / query run (what a runtime passes), a call gives the same."""
    case = decode_case(16, (4, 2), 64, torch.float32)
    hinted = decode(case, backend=backend, check_indices=False, max_context_len=max(case.lens))
    assert torch.equal(hinted, decode(case, backend=backend))
    case = prefill_case(16, (4, 2), 64, torch.float32)
    hinted = prefill(case, backend=backend, check_indices=False, max_query_len=max(case.q_lens))
    assert torch.equal(hinted, prefill(case, backend=backend))


def test_default_scale_is_inverse_sqrt_head_dim():
    case = prefill_case(16, (2, 2), 80, torch.float32, lens=[(20, 3)])
    default = paged_attention_prefill(
        case.query, case.kv_layer, case.tables, case.cu_seqlens_q, case.context_lens
    )
    assert torch.equal(default, prefill(case))


# Custom ops: fake implementations, opcheck, torch.compile.


@pytest.mark.parametrize("backend", ["torch", "native", pytest.param("triton", marks=CPU_TRITON)])
def test_opcheck(backend):
    case = prefill_case(16, (4, 2), 64, torch.float32, lens=[(20, 20), (9, 2)])
    torch.library.opcheck(
        torch.ops.epdrt.paged_attention_prefill,
        (
            case.query,
            case.kv_layer,
            case.tables,
            case.cu_seqlens_q,
            case.context_lens,
            case.scale,
            backend,
            True,
        ),
    )
    case = decode_case(16, (4, 2), 64, torch.float32, lens=[20, 3])
    torch.library.opcheck(
        torch.ops.epdrt.paged_attention_decode,
        (case.query, case.kv_layer, case.tables, case.context_lens, case.scale, backend, True),
    )


def test_compiles_without_graph_breaks():
    case = prefill_case(16, (4, 2), 64, torch.float32, lens=[(20, 20), (9, 2)])

    def step(q, kv, tables, cu, lens):
        return paged_attention_prefill(q, kv, tables, cu, lens, 0.125).sum(-1) * 2

    args = (case.query, case.kv_layer, case.tables, case.cu_seqlens_q, case.context_lens)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), step(*args), rtol=0, atol=0)


def test_fake_tensors_give_the_output_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    case = prefill_case(16, (6, 2), 80, torch.bfloat16, lens=[(20, 20), (9, 2)])
    with FakeTensorMode() as mode:
        args = [mode.from_tensor(t) for t in (case.query, case.kv_layer, case.tables)]
        cu, lens = mode.from_tensor(case.cu_seqlens_q), mode.from_tensor(case.context_lens)
        out = paged_attention_prefill(*args, cu, lens)
        assert out.shape == case.query.shape and out.dtype == torch.bfloat16
        with pytest.raises(InvalidArgument, match="multiple"):
            paged_attention_prefill(args[0][:, :5], args[1], args[2], cu, lens)


# Argument errors, raised before any launch.


def _base():
    return decode_case(16, (4, 2), 64, torch.float16, lens=[1, 20])


def _bad_decode(**changes):
    case = _base()
    args = {
        "query": case.query,
        "kv_layer": case.kv_layer,
        "block_tables": case.tables,
        "context_lens": case.context_lens,
        "scale": case.scale,
    }
    args.update(changes)
    return args


def _tables(**where):
    tables = _base().tables.clone()
    for key, value in where.items():
        s, j = (int(x) for x in key[1:].split("_"))
        tables[s, j] = value
    return tables


BAD_DECODE = {
    "block out of range": (dict(block_tables=_tables(t1_1=10_000)), r"block_tables\[1, 1\]"),
    "negative block": (dict(block_tables=_tables(t0_0=-1)), r"block_tables\[0, 0\] = -1"),
    "context past table": (
        dict(context_lens=torch.tensor([1, 16 * 4 + 1], dtype=torch.int32)),
        "columns",
    ),
    "empty context": (dict(context_lens=torch.tensor([0, 20], dtype=torch.int32)), ">= 1"),
    "negative context": (dict(context_lens=torch.tensor([-3, 20], dtype=torch.int32)), ">= 0"),
    "int64 tables": (dict(block_tables=_base().tables.long()), "int32"),
    "int64 lens": (dict(context_lens=_base().context_lens.long()), "int32"),
    "lens length": (dict(context_lens=torch.tensor([1], dtype=torch.int32)), r"shape \[2\]"),
    "query dtype": (dict(query=_base().query.float()), "dtype"),
    "integer query": (dict(query=_base().query.to(torch.int16)), "dtype"),
    "query rows": (dict(query=_base().query[:1]), "one per sequence"),
    "head dim": (dict(query=_base().query[..., :32]), "head dim"),
    "group": (dict(query=_base().query[:, :3]), "multiple"),
    "query strides": (
        dict(query=_base().query.transpose(0, 2).contiguous().transpose(0, 2)),
        "stride 1",
    ),
    "kv rank": (dict(kv_layer=_base().storage), "5-D"),
    "kv pair dim": (dict(kv_layer=_base().storage[:, 1, :1]), "num_blocks, 2"),
    "kv device": (dict(kv_layer=_base().kv_layer.to("meta")), "is on meta"),
    "tables device": (dict(block_tables=_base().tables.to("meta")), "is on meta"),
    "tables not a tensor": (dict(block_tables=[[0, 1]]), "torch.Tensor"),
    "scale": (dict(scale=torch.tensor(0.5)), "scale must be a float"),
}


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=CPU_TRITON)])
@pytest.mark.parametrize("name", list(BAD_DECODE))
def test_bad_decode_arguments(name, backend):
    changes, message = BAD_DECODE[name]
    args = _bad_decode(**changes)
    with pytest.raises(InvalidArgument, match=message):
        paged_attention_decode(**args, backend=backend)


def test_bad_prefill_arguments():
    case = prefill_case(16, (4, 2), 64, torch.float32, lens=[(20, 20), (9, 2)])

    def call(cu=case.cu_seqlens_q, lens=case.context_lens, query=case.query):
        return paged_attention_prefill(query, case.kv_layer, case.tables, cu, lens)

    def i32(*xs):
        return torch.tensor(xs, dtype=torch.int32)

    for cu, message in [
        (i32(0, 20), r"shape \[3\]"),
        (i32(0, 20, 21), "rise from 0 to total_q = 22"),
        (i32(1, 20, 22), "rise from 0"),
        (i32(0, 23, 22), "rise from 0"),
        (i32(0, 12, 22), "sequence 1 has 10 queries but context_lens"),
        (case.cu_seqlens_q.long(), "int32"),
    ]:
        with pytest.raises(InvalidArgument, match=message):
            call(cu=cu)
    with pytest.raises(InvalidArgument, match="sequence 0 has 20 queries"):
        call(lens=i32(19, 9))


def test_unused_table_entries_are_not_checked():
    """Entries past a sequence's blocks are padding, whatever they hold."""
    case = _base()
    case.tables[0, 1:] = 10_000
    decode(case)


def test_check_indices_off_skips_the_block_check():
    case = _base()
    case.tables[1, 1] = 10_000
    with pytest.raises(InvalidArgument):
        decode(case)
    case.tables[1, 1] = case.tables[1, 0]  # in range but wrong: only the range is checked
    decode(case, check_indices=False)


# Larger sweeps on a GPU.


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("heads", [(8, 8), (32, 8), (12, 4), (16, 1)], ids=str)
def test_gpu_sweep(dtype, head_dim, block_size, heads):
    lens = [1, 15, 16, 17, 255, 1000, 2049]
    case = decode_case(block_size, heads, head_dim, dtype, lens=lens, device="cuda")
    case.check(decode(case))
    chunks = [(1, 1), (300, 300), (1000, 129), (2049, 1), (64, 0), (700, 700)]
    case = prefill_case(block_size, heads, head_dim, dtype, lens=chunks, device="cuda")
    case.check(prefill(case))


@pytest.mark.gpu
def test_gpu_no_host_sync_with_length_hints():
    case = prefill_case(16, (8, 2), 128, torch.float16, lens=[(500, 100), (20, 20)], device="cuda")
    prefill(case, check_indices=False, max_query_len=100)  # compile first
    case = decode_case(16, (8, 2), 128, torch.float16, device="cuda")
    decode(case, check_indices=False, max_context_len=max(case.lens))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        decode(case, check_indices=False, max_context_len=max(case.lens))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_gpu_one_host_sync_per_call():
    case = prefill_case(16, (8, 2), 128, torch.float16, lens=[(500, 100), (20, 20)], device="cuda")
    prefill(case)  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning) as record:
            prefill(case)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in record if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


@pytest.mark.parametrize("device", DEVICES)
def test_context_length_one(device):
    """A one-token context: the output is that token's value, for every query head."""
    case = decode_case(32, (6, 2), 80, torch.float32, lens=[1], device=device)
    out = decode(case, backend="triton")
    expected = case.values[0][0].repeat_interleave(3, dim=0)
    torch.testing.assert_close(out[0].cpu(), expected, rtol=0, atol=1e-6)
