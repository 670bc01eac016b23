# SPDX-License-Identifier: Apache-2.0
"""Block-pool operations per second against the pure-Python model pool, in the same run.

Three ways in, each against the model (epdrt.testing.model_pool) doing the same operations:
``binding`` (one Python call per operation), ``batched`` (one Python call per 16 blocks:
allocate/free/lookup_many/commit_many) and ``native`` (the C API from a C program,
bench/native/block_pool_bench.c, compiled on the spot; skipped without a C compiler). A
``binding floor`` record times a bare ``dict.get`` per block in the same loop: the interpreter's
own cost per call, which bounds every one-call-per-block path whatever the pool does.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from epdrt import BlockPool
from epdrt.benchmarking import Record
from epdrt.errors import EpdrtError
from epdrt.native import compile_c_program
from epdrt.testing.model_pool import ModelBlockPool

HELP = "ops/s of allocate/free/commit/lookup: C++ pool vs the pure-Python model"

NUM_BLOCKS = 4096
BATCH = 16  # blocks per batched call: a typical request's block count per step
NATIVE_SOURCE = Path(__file__).with_name("native") / "block_pool_bench.c"

Body = Callable[[Any], int]  # runs on a pool, returns the block operations it did


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ops", type=int, default=1_000_000, help="block operations per case")
    parser.add_argument(
        "--repeat", type=int, default=5, help="rounds of every case (each side: best round)"
    )
    parser.add_argument("--seed", type=int, default=0)


def _keys(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(32) for _ in range(n)]


def _alloc_free(ops: int) -> Body:
    def body(pool: Any) -> int:
        allocate, free = pool.allocate, pool.free
        for _ in range(ops // (2 * BATCH)):
            free(allocate(BATCH))
        return ops // (2 * BATCH) * 2 * BATCH

    return body


def _lookup_hit(ops: int, keys: list[bytes]) -> Body:
    def body(pool: Any) -> int:
        lookup, free, n = pool.lookup, pool.free, len(keys)
        for i in range(ops // 2):
            free([lookup(keys[i % n])])
        return ops // 2 * 2

    return body


def _lookup_miss(ops: int, keys: list[bytes]) -> Body:
    def body(pool: Any) -> int:
        lookup, n = pool.lookup, len(keys)
        for i in range(ops):
            lookup(keys[i % n])
        return ops

    return body


def _commit(ops: int, keys: list[bytes]) -> Body:
    def body(pool: Any) -> int:
        allocate, commit, free, n = pool.allocate, pool.commit, pool.free, len(keys)
        iters = ops // (3 * BATCH)
        for i in range(iters):
            ids = allocate(BATCH)
            for j, block in enumerate(ids):
                commit(block, keys[(i * BATCH + j) % n])
            free(ids)
        return iters * 3 * BATCH

    return body


def _lookup_many_hit(ops: int, keys: list[bytes]) -> Body:
    batches = [keys[i : i + BATCH] for i in range(0, len(keys) - BATCH + 1, BATCH)]

    def body(pool: Any) -> int:
        lookup_many, free = pool.lookup_many, pool.free
        iters = ops // (2 * BATCH)
        for i in range(iters):
            free(lookup_many(batches[i % len(batches)]))
        return iters * 2 * BATCH

    return body


def _lookup_many_miss(ops: int, keys: list[bytes]) -> Body:
    batches = [keys[i : i + BATCH] for i in range(0, len(keys) - BATCH + 1, BATCH)]

    def body(pool: Any) -> int:
        lookup_many = pool.lookup_many
        iters = ops // BATCH
        for i in range(iters):
            lookup_many(batches[i % len(batches)])
        return iters * BATCH

    return body


def _commit_many(ops: int, keys: list[bytes]) -> Body:
    batches = [keys[i : i + BATCH] for i in range(0, len(keys) - BATCH + 1, BATCH)]

    def body(pool: Any) -> int:
        allocate, commit_many, free = pool.allocate, pool.commit_many, pool.free
        iters = ops // (3 * BATCH)
        for i in range(iters):
            ids = allocate(BATCH)
            commit_many(ids, batches[i % len(batches)])
            free(ids)
        return iters * 3 * BATCH

    return body


def _mixed(trace: list[tuple[str, Any]]) -> Body:
    """Replays a random allocate/commit/lookup/free trace, as a serving loop issues them."""

    def body(pool: Any) -> int:
        held: list[list[int]] = []
        done = 0
        for op, arg in trace:
            if op == "alloc" and pool.num_free >= len(arg):
                ids = pool.allocate(len(arg))
                pool.commit_many(ids, arg)
                held.append(ids)
                done += 2 * len(arg)
            elif op == "lookup":
                found = [b for b in pool.lookup_many(arg) if b is not None]
                held.append(found)
                done += len(arg)
            elif op == "free" and held:
                ids = held.pop(arg % len(held))
                pool.free(ids)
                done += len(ids)
        for ids in held:
            pool.free(ids)
            done += len(ids)
        return done

    return body


def _make_trace(num_ops: int, keys: list[bytes], seed: int) -> list[tuple[str, Any]]:
    rng = random.Random(seed)
    trace: list[tuple[str, Any]] = []
    count = 0
    while count < num_ops:
        r = rng.random()
        n = rng.randint(1, BATCH)
        picked = [keys[rng.randrange(len(keys))] for _ in range(n)]
        if r < 0.35:
            trace.append(("alloc", list(dict.fromkeys(picked))))
            count += 2 * n
        elif r < 0.6:
            trace.append(("lookup", picked))
            count += n
        else:
            trace.append(("free", rng.randrange(1 << 30)))
            count += BATCH // 2
    return trace


class _CallFloor:
    """A stand-in pool whose ``lookup`` is a bare ``dict.get``: one C call per block that does
    almost nothing, so its rate bounds any API that costs one Python call per block."""

    def __init__(self) -> None:
        self.lookup = {}.get


def _prefilled(cls: Callable[[int], Any], keys: list[bytes]) -> Callable[[], Any]:
    """Makes pools whose blocks are all free, the first len(keys) cached under keys."""

    def make() -> Any:
        pool = cls(NUM_BLOCKS)
        ids = pool.allocate(len(keys))
        pool.commit_many(ids, keys)
        pool.free(ids)
        return pool

    return make


def _time(make_pool: Callable[[], Any], body: Body) -> tuple[float, int]:
    """Seconds of one run of ``body`` on a fresh pool, and the block operations done."""
    pool = make_pool()
    start = time.perf_counter()
    ops = body(pool)
    return time.perf_counter() - start, ops


def _record(
    case: str, ops: int, seconds: list[float], base_ops: int, base_seconds: list[float]
) -> Record:
    """The record of one case from each side's seconds per round (best round counts)."""
    value, baseline = ops / min(seconds), base_ops / min(base_seconds)
    return Record(
        bench="block-pool",
        case=case,
        metric="block ops/s",
        value=value,
        baseline="pure-Python model pool",
        baseline_value=baseline,
        ratio=value / baseline,
        extra={
            "ns_per_block_op": 1e9 / value,
            "baseline_ns_per_block_op": 1e9 / baseline,
            # Slowest over best round, each side: how much the host drifted meanwhile.
            "spread": max(seconds) / min(seconds),
            "baseline_spread": max(base_seconds) / min(base_seconds),
            "rounds": len(seconds),
            "block_ops": ops,
            "num_blocks": NUM_BLOCKS,
        },
    )


def _build_native(tmp: Path) -> Path | None:
    """The C program, or None (with a note) if it cannot be built."""
    try:
        return compile_c_program(NATIVE_SOURCE, tmp / "block_pool_bench")
    except EpdrtError as exc:
        print(f"[block-pool] native cases skipped: {exc}", file=sys.stderr)
        return None


def _run_native(exe: Path, ops: int) -> dict[str, tuple[float, int]]:
    """Seconds (one run) and block ops per case from the C program."""
    out = subprocess.run(
        [str(exe), str(NUM_BLOCKS), str(ops), "1"],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    return {r["case"]: (r["seconds"], r["block_ops"]) for r in rows}


def run(args: argparse.Namespace) -> list[Record]:
    """Every case in ``args.repeat`` rounds, each round running the C++ pool, the model and the
    C program back to back; each side's best round counts. The host's speed drifts over
    seconds (a shared VM): interleaving exposes both sides to the same drift, and the best
    round is the one least slowed by it."""
    cached = _keys(NUM_BLOCKS // 2, seed=1)
    missing = _keys(NUM_BLOCKS // 2, seed=2)
    ops = args.ops
    fresh = {cls: (lambda c=cls: c(NUM_BLOCKS)) for cls in (BlockPool, ModelBlockPool)}
    full = {cls: _prefilled(cls, cached) for cls in (BlockPool, ModelBlockPool)}
    # (way in, case, pools, body); native cases reuse the binding cases' names.
    cases = [
        ("binding", f"allocate+free x{BATCH}", fresh, _alloc_free(ops)),
        ("binding", "lookup hit + free", full, _lookup_hit(ops, cached)),
        ("binding", "lookup miss", full, _lookup_miss(ops, missing)),
        ("binding", f"allocate+commit+free x{BATCH}", fresh, _commit(ops, cached)),
        ("batched", f"lookup_many hit + free x{BATCH}", full, _lookup_many_hit(ops, cached)),
        ("batched", f"lookup_many miss x{BATCH}", full, _lookup_many_miss(ops, missing)),
        ("batched", f"allocate+commit_many+free x{BATCH}", fresh, _commit_many(ops, cached)),
        ("batched", "mixed serving trace", fresh, _mixed(_make_trace(ops, cached, args.seed))),
    ]
    floor_name = "binding floor: dict.get per block"
    seconds: dict[tuple[str, str], list[float]] = defaultdict(list)  # (side, case) -> rounds
    work: dict[tuple[str, str], int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        exe = _build_native(Path(tmp))
        for r in range(args.repeat):
            print(f"[block-pool] round {r + 1}/{args.repeat} ...", file=sys.stderr, flush=True)
            for way, case, pools, body in cases:
                for side, cls in (("epdrt", BlockPool), ("model", ModelBlockPool)):
                    t, n = _time(pools[cls], body)
                    seconds[side, f"{way}: {case}"].append(t)
                    work[side, f"{way}: {case}"] = n
                if work["epdrt", f"{way}: {case}"] != work["model", f"{way}: {case}"]:
                    raise RuntimeError(f"{case}: the pools did different work")
            t, work["epdrt", floor_name] = _time(_CallFloor, _lookup_miss(ops, missing))
            seconds["epdrt", floor_name].append(t)
            for case, (t, n) in (_run_native(exe, ops) if exe else {}).items():
                seconds["epdrt", f"native: {case}"].append(t)
                work["epdrt", f"native: {case}"] = n
    model_name = {case: f"{way}: {case}" for way, case, _, _ in cases}
    records = []
    for side, name in list(seconds):
        if side != "epdrt":
            continue
        # Native cases and the floor compare with the model's run of the same case.
        case = "lookup miss" if name == floor_name else name.split(": ", 1)[1]
        peer = model_name[case]
        rec = _record(
            name, work[side, name], seconds[side, name], work["model", peer], seconds["model", peer]
        )
        if name == floor_name:
            rec.extra["note"] = "upper bound of any one-call-per-block binding (interpreter cost)"
        records.append(rec)
    return records
