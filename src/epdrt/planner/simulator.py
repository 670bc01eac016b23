# SPDX-License-Identifier: Apache-2.0
"""Discrete-event simulation of one deployment serving a list of requests.

Model (one GPU runs one batch at a time; stages on one GPU take turns):

- Arrival: the request is routed to the prefill GPU with the fewest outstanding input tokens
  (``aggregated``: the fewest unfinished requests). Its images are cut into up to
  ``image_split`` near-equal chunks on the least-loaded encoders (``pd``/``aggregated``: its
  prefill GPU encodes them all).
- Batch formation is the runtime's own (``epdrt.scheduler``, called here with simulated
  queues): encode batches (``encode_batch``), flat prefill steps with chunking
  (``prefill_chunks``) and the stages' turn order (``ROLE_ORDER``).
- Encode: FIFO over images; a batch takes up to ``encode_batch`` images and ``encode_tokens``
  MM tokens, the first always (a request's images may span batches), and lasts
  ``encode(images, mean tokens per image)``. A finished chunk's MM tokens go to the prefill
  GPU (no transfer when it is the same GPU).
- Prefill: FIFO over requests whose MM tokens have all arrived. A flat step takes the
  running prompts' next chunks, then queued requests while their KV fits the GPU's free KV
  (reserved for the whole prompt as one starts; back-pressure: it waits, nothing is
  dropped), up to ``prefill_tokens`` tokens: a longer prompt is prefilled over several steps.
  A step lasts ``profile.prefill_batch_latency`` of its chunks (the fixed cost of a call once,
  every chunk's own work) and gives the requests it completes their first token.
  ``prefill_padded`` (other systems' right-padded batches): no chunks; a batch takes requests
  while requests x longest prompt fits ``prefill_tokens`` (the first always).
- Hand-off (``epd``/``pd``/``ed``): the decode GPU with the fewest sequences among those with
  KV room for input + output tokens is reserved; a message tells it the KV is ready, and it
  pulls the KV (input tokens) over its link, then the sequence joins its batch at the next
  step boundary. The prefill GPU frees the KV when its batch running at the end of the pull
  ends (the runtime's prefill worker reads the decoder's ``KVPulled`` between batches).
  Without room anywhere the request waits, holding its prefill KV. NOTE: the runtime's
  decode admits by the prompt's KV and preempts the newest sequence when the cache fills
  (recompute, ``runtime/decode_role.py``); reserving the output up front, as here, matches it
  while KV is not the bottleneck and is conservative when it is (no preemption modelled).
  NOTE: this is the runtime's ``kv_handoff="pull"``; its default, ``"layerwise"``, reserves
  the decoder's blocks as prefill admits a request and pushes the KV during the prefill
  (``runtime/prefill_role.py``): a shorter hand-off than modelled here, a round trip before
  each prefill starts, and decode KV held while a request's images encode.
- Decode: continuous batching; at each step boundary waiting sequences join while the batch
  has fewer than ``decode_batch``; a step lasts ``decode(batch, total context tokens)`` and
  gives every sequence one token (``decode_padded``: the total counts every sequence at the
  longest context in the batch).
- Stages that share a GPU take turns at batch boundaries, in the order encode, prefill,
  decode, skipping a stage with no work (the runtime's worker loop): a pending prefill runs
  after at most one more decode step (no chunked prefill), and under overload every stage
  keeps a share of the GPU instead of the first starving the others.
- Transfers: ``latency + bytes / bandwidth``, serialized per sending GPU.
- Memory: per-GPU KV capacity and the encode batch bound come from the memory plan
  (config.memory_plan): colocated weights and activation reserves shrink KV capacity.
  ``aggregated`` reserves input + output KV at prefill admission on its one GPU.
- Runtime costs (profile.overheads, zero unless measured): the router preprocesses requests
  one at a time, then messages the workers; control messages (MM tokens ready, the first and
  last token to the client, the KV hand-off's KVReady and KVPulled); a GPU starting work
  after idling pays a wake-up cost; calibrated per-request latency and per-step work;
  the router's CPU per request beyond preprocessing (``route_s``) and per tokens message of
  a decode step (``token_message_s``, taken in by the router's receiving side).
- Batch latencies are drawn from profile.jitter (seeded) when the profile has one.
- ``host_cores``: GPUs and the router share that many CPU cores (processor sharing), as on a
  CPU-only host; ``host_interference``: each further process running at the same time slows
  every running one by that fraction (they share caches and memory bandwidth).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from epdrt import scheduler
from epdrt.errors import InvalidArgument
from epdrt.planner.config import DeployConfig, check_memory, memory_plan, role_stages
from epdrt.planner.metrics import SLO, quantile, summarize
from epdrt.planner.profile import PiecewiseLinear, StageProfile
from epdrt.planner.workload import Request


class _Req:
    __slots__ = (
        "arrival",
        "bad",
        "dgpu",
        "inp",
        "out",
        "pdone",
        "pending",
        "pgpu",
        "t_finish",
        "t_first",
        "t_join",
        "t_pstart",
        "t_ready",
    )

    def __init__(self, r: Request) -> None:
        self.arrival = r.arrival_s
        self.inp = r.input_tokens
        self.out = r.output_tokens
        self.pdone = 0  # prompt tokens prefilled (a prompt over the budget takes several steps)
        self.pending = 0
        self.pgpu: _Gpu | None = None
        self.dgpu: _Gpu | None = None
        self.bad = False
        nan = float("nan")
        self.t_ready = self.t_pstart = self.t_first = self.t_join = self.t_finish = nan


class _Gpu:
    __slots__ = (
        "busy",
        "busy_s",
        "core",
        "dec_wait",
        "ei",
        "enc_q",
        "fin",
        "gone",
        "idle_since",
        "incoming",
        "index",
        "kv_cap",
        "kv_used",
        "last",
        "link_free",
        "longest",
        "mac_ctx",
        "mac_end",
        "mac_f",
        "mac_id",
        "mac_k",
        "mac_line",
        "mac_t0",
        "name",
        "pi",
        "pre_q",
        "pre_run",
        "pulled",
        "rate",
        "run_ctx",
        "run_n",
        "stages",
        "step",
        "task",
    )

    def __init__(self, index: int, name: str, stages: tuple[str, ...], kv_cap: int) -> None:
        self.index = index
        self.name = name  # pool and index in it: E0, P1, N0 (the router: "router")
        self.stages = stages
        self.busy = False
        self.idle_since = -math.inf  # when the last batch ended (wake-up cost after idling)
        # Shared host cores: work seconds done per second now; the router's core when workers
        # are pinned (a worker's is its index), -1 before it first runs.
        self.rate = 1.0
        self.core = -1
        # Work seconds per stage (the router's under "route").
        self.busy_s = {"encode": 0.0, "prefill": 0.0, "decode": 0.0, "route": 0.0}
        self.enc_q: deque[tuple[list[Any], int]] = deque()  # (chunk, tokens) per image
        self.ei = -1  # index into _Sim.enc_load (encode GPUs)
        self.pre_q: deque[_Req] = deque()
        self.pre_run: list[_Req] = []  # prefilling over several steps (chunks), in start order
        self.pi = -1  # index into _Sim.pre_load (prefill GPUs)
        self.kv_cap = kv_cap
        self.kv_used = 0
        self.last = -1  # index into _Sim.starts of the stage of the last batch started here
        self.run_n = 0  # sequences in the decode batch
        self.run_ctx = 0  # their context tokens, summed
        self.fin: list[tuple[int, int, _Req]] = []  # (finishing step, seq, request)
        # Running sequences by context, longest first: (-(context - step), seq); a sequence's
        # context is that base plus the step count. Finished ones leave lazily (seq in gone).
        self.longest: list[tuple[int, int]] = []
        self.gone: set[int] = set()
        self.step = 0
        self.dec_wait: deque[_Req] = deque()
        self.incoming = 0  # KV transfers under way to this GPU
        # Requests whose KV decode pulled during the current batch: freed when it ends.
        self.pulled: list[_Req] = []
        self.link_free = 0.0
        # A run of mac_k decode steps started at mac_t0 (context mac_ctx); mac_k == 0: none.
        self.mac_k = 0
        self.mac_id = 0
        self.mac_t0 = self.mac_end = 0.0
        self.mac_ctx = 0
        self.mac_line: PiecewiseLinear | None = None
        self.mac_f = 1.0  # the run's jitter factor
        # With shared host cores: [work seconds left, callback, its argument, total work].
        self.task: list[Any] | None = None


@dataclass
class SimResult:
    """What one simulation run gives. Arrays hold one entry per request, in arrival order;
    NaN where a request did not get that far (only when the run stopped early).

    Attributes:
        aborted: the run stopped as soon as the SLO target could no longer be met
            (``stop_below``); then ``slo_attainment`` is an upper bound below the target.
        utilization: busy share of each stage's instances, 0..1.
        work_s: seconds of work (at full speed) each GPU ran, named by pool and index as in
            ``E0``, ``P1``, ``D0``, ``N0``, and the router's (``router``): with shared host
            cores, the CPU seconds the simulation charges to each process.
        phases: mean seconds per request in: encode (arrival to MM tokens at prefill, image
            requests only), prefill_wait (ready to batch start), handoff (first token to decode
            join), decode_per_token (per output token after joining).
    """

    config: DeployConfig
    num_requests: int
    completed: int
    arrival_s: np.ndarray
    ttft_s: np.ndarray
    tpot_s: np.ndarray
    output_tokens: np.ndarray
    duration_s: float
    slo: SLO | None
    slo_attainment: float
    aborted: bool
    utilization: dict[str, float] = field(default_factory=dict)
    work_s: dict[str, float] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def throughput_rps(self) -> float:
        """Completed requests per second from the first arrival to the last finish."""
        return self.completed / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def output_tokens_per_s(self) -> float:
        done = np.isfinite(self.tpot_s)
        total = float(self.output_tokens[done].sum())
        return total / self.duration_s if self.duration_s > 0 else 0.0

    def ttft_quantile(self, q: float) -> float:
        return quantile(self.ttft_s, q)

    def tpot_quantile(self, q: float) -> float:
        return quantile(self.tpot_s, q)

    def summary(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "num_requests": self.num_requests,
            "completed": self.completed,
            "duration_s": self.duration_s,
            "throughput_rps": self.throughput_rps,
            "output_tokens_per_s": self.output_tokens_per_s,
            "ttft_s": summarize(self.ttft_s),
            "tpot_s": summarize(self.tpot_s),
            "slo_attainment": self.slo_attainment,
            "aborted": self.aborted,
            "utilization": self.utilization,
            "work_s": self.work_s,
            "phases": self.phases,
        }


def _chunks(tokens: tuple[int, ...], k: int) -> list[tuple[int, ...]]:
    """``tokens`` cut into k contiguous, near-equal parts (the first ones one longer)."""
    n = len(tokens)
    base, extra = divmod(n, k)
    out, start = [], 0
    for i in range(k):
        size = base + (1 if i < extra else 0)
        out.append(tokens[start : start + size])
        start += size
    return out


class _Sim:
    def __init__(
        self,
        profile: StageProfile,
        config: DeployConfig,
        requests: Sequence[Request],
        slo: SLO | None,
        stop_below: float | None,
        host_cores: int | None = None,
        host_interference: float = 0.0,
        host_pinned: bool = False,
    ) -> None:
        self.p = profile
        self.c = config
        self.reqs = list(requests)
        self.slo = slo
        self.heap: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self.seq = itertools.count()
        self.now = 0.0
        self.agg = config.mode == "aggregated"
        max_img = max((max(r.image_tokens) for r in self.reqs if r.image_tokens), default=1)
        why = check_memory(
            profile,
            config,
            max_img,
            max(r.input_tokens + r.output_tokens for r in self.reqs),
            max(r.input_tokens for r in self.reqs),
        )
        if why:
            raise InvalidArgument(f"{config.label()} does not fit in memory: {why}")
        plan = memory_plan(profile, config, max_img)
        self.gpus: list[_Gpu] = []
        for pool, count in zip(role_stages(config.mode), config.pools):
            gm = plan[pool]
            for k in range(count):
                self.gpus.append(_Gpu(len(self.gpus), f"{pool}{k}", gm.stages, gm.kv_tokens))
        self.enc = [g for g in self.gpus if "encode" in g.stages]
        self.pre = [g for g in self.gpus if "prefill" in g.stages]
        self.dec = [g for g in self.gpus if "decode" in g.stages]
        for i, g in enumerate(self.enc):
            g.ei = i
        for i, g in enumerate(self.pre):
            g.pi = i
        # Routing loads: images queued or in service per encoder; outstanding input tokens per
        # prefill GPU (unfinished requests in aggregated).
        self.enc_load = [0] * len(self.enc)
        self.pre_load = [0] * len(self.pre)
        self.handoff: deque[_Req] = deque()
        self.state = [_Req(r) for r in self.reqs]
        self.violations = 0
        self.max_violations = len(self.reqs) + 1
        if stop_below is not None and slo is not None:
            self.max_violations = int((1.0 - stop_below) * len(self.reqs) + 1e-9)
        self.stop = False
        self.completed = 0
        self.next_arrival = 0
        m = profile.memory
        self.kv_bytes = m.kv_bytes_per_token
        self.mm_bytes = m.mm_bytes_per_token
        self.xfer = profile.transfer.seconds
        o = profile.overheads
        self.msg = o.message_s
        self.overheads = o
        self.wake = o.wake if o.wake_s > 0 else None
        self.step_s = o.step_s  # runtime work per decode step beyond the model's
        # The router: one process that preprocesses requests one at a time (FIFO).
        self.router = _Gpu(-1, "router", (), 0)
        self.router_q: deque[int] = deque()
        # The router's receiving side (its tokens messages): a process of its own on shared
        # cores, with the CPU seconds of messages that arrived while it was busy.
        self.receiver = _Gpu(-2, "router", (), 0)
        self.receive_backlog = 0.0
        # Shared host cores (processor sharing): the GPUs and the router busy now, their speed.
        if host_cores is not None and host_cores < 1:
            raise InvalidArgument("host_cores must be >= 1")
        if not host_interference >= 0:
            raise InvalidArgument(f"host_interference must be >= 0, got {host_interference}")
        self.cores = host_cores
        self.interference = host_interference
        # Each worker on a core of its own (the runtime pins them when there are enough).
        self.pinned = host_pinned and host_cores is not None and len(self.gpus) <= host_cores
        self.active: list[_Gpu] = []
        self.ps_t = 0.0
        self.ps_gen = 0
        # Batch-latency jitter (profile.jitter): a seeded draw per batch, so runs repeat.
        self.jit = profile.jitter
        self.rand = random.Random(0)
        j = self.jit  # the mean of the piecewise-uniform distribution the quantiles describe
        self.jit_mean = (
            sum(a + b for a, b in itertools.pairwise(j)) / (2 * (len(j) - 1)) if j else 1.0
        )
        self.lines: dict[int, PiecewiseLinear] = {}  # decode latency against context, by batch
        # A shared GPU's stages take turns in this order (g.last indexes it).
        by_role = {
            "encode": self._start_encode, "prefill": self._start_prefill,
            "decode": self._start_decode,
        }  # fmt: skip
        self.starts = tuple(by_role[role] for role in scheduler.ROLE_ORDER)

    # -- plumbing --------------------------------------------------------------------------
    def _at(self, t: float, fn: Callable[[Any], None], arg: Any) -> None:
        heapq.heappush(self.heap, (t, next(self.seq), fn, arg))

    def _start(self, g: _Gpu, work: float, fn: Callable[[Any], None], arg: Any) -> None:
        """g runs ``work`` seconds of work (at full speed), then ``fn(arg)``.

        With shared host cores, every busy GPU (and the busy router) is one runnable process:
        n of them on c cores each run at ``min(1, c / n)`` of full speed, divided by
        ``1 + interference * (min(n, c) - 1)`` (the processes running at once slow each other).
        With pinned workers, each worker has its core; the router's sides move to a core
        with nothing else running whenever there is one (the kernel's idle balancing), else
        stay where they ran last, and the tasks of one core share it.
        """
        if self.cores is None:
            self._at(self.now + work, fn, arg)
            return
        self._advance()
        g.task = [work, fn, arg, work]
        self.active.append(g)
        self._retime()

    def _balance(self) -> Counter[int]:
        """Pinned workers: moves each busy side of the router to a core with nothing else
        running, if there is one and its own is not; returns the tasks on each core."""
        assert self.cores is not None
        on_core = Counter(g.index for g in self.active if g.index >= 0)
        for g in self.active:
            if g.index >= 0:
                continue
            if g.core < 0 or on_core[g.core]:
                free = [k for k in range(self.cores) if not on_core[k]]
                if free:
                    g.core = free[0]
                elif g.core < 0:
                    g.core = min(range(self.cores), key=on_core.__getitem__)
            on_core[g.core] += 1
        return on_core

    def _advance(self) -> None:
        """Books the work every active task did since the last change, at the old speed."""
        dt = self.now - self.ps_t
        if dt > 0:
            for g in self.active:
                assert g.task is not None
                g.task[0] -= dt * g.rate
        self.ps_t = self.now

    def _retime(self) -> None:
        """New speed for the active tasks; their completions rescheduled (older ones void)."""
        n, c = len(self.active), self.cores
        assert c is not None
        if self.pinned:
            on_core = self._balance()
            slow = 1.0 + self.interference * (len(+on_core) - 1)
            for g in self.active:
                g.rate = 1.0 / (on_core[g.index if g.index >= 0 else g.core] * slow)
        else:
            speed = min(1.0, c / n) / (1.0 + self.interference * (min(n, c) - 1)) if n else 1.0
            for g in self.active:
                g.rate = speed
        self.ps_gen += 1
        for g in self.active:
            assert g.task is not None
            end = self.now + max(g.task[0], 0.0) / g.rate
            self._at(end, self._task_end, (g, self.ps_gen))

    def _task_end(self, arg: tuple[_Gpu, int]) -> None:
        g, gen = arg
        if gen != self.ps_gen or g.task is None:
            return  # rescheduled since
        self._advance()
        _, fn, farg, _ = g.task
        g.task = None
        self.active.remove(g)
        self._retime()
        fn(farg)

    def _task_work_done(self, g: _Gpu) -> float:
        """Work seconds g's current task has done (shared cores only)."""
        self._advance()
        assert g.task is not None
        return g.task[3] - g.task[0]

    def _send(
        self,
        src: _Gpu,
        num_bytes: float,
        fn: Callable[[Any], None],
        arg: Any,
        messages: int = 1,
    ) -> None:
        """Copies ``num_bytes`` over ``src``'s link (the GPU whose transfer engine runs the
        copy: serialized per GPU), then ``messages`` control messages, one after another,
        before ``fn(arg)`` runs."""
        start = max(self.now, src.link_free)
        src.link_free = start + self.xfer(num_bytes)
        self._at(src.link_free + messages * self.msg, fn, arg)

    def _violate(self, rq: _Req) -> None:
        if not rq.bad:
            rq.bad = True
            self.violations += 1
            if self.violations > self.max_violations:
                self.stop = True

    def run(self) -> None:
        if self.reqs:
            self._at(self.reqs[0].arrival_s, self._arrive, 0)
        heap, pop = self.heap, heapq.heappop
        while heap and not self.stop:
            t, _, fn, arg = pop(heap)
            self.now = t
            fn(arg)
        if not self.stop and self.completed < len(self.reqs):
            raise InvalidArgument(f"{self.c.label()}: requests stuck (can never be admitted)")

    # -- events ----------------------------------------------------------------------------
    def _arrive(self, i: int) -> None:
        if i + 1 < len(self.reqs):
            self._at(self.reqs[i + 1].arrival_s, self._arrive, i + 1)
        o = self.overheads
        if o.router_work(1) > 0 or self.msg > 0 or o.request_s > 0:
            self.router_q.append(i)
            if not self.router.busy:
                self._route_next()
        else:
            self._dispatch(i)

    def _route_next(self) -> None:
        """The router preprocesses the next request, then messages the workers."""
        r = self.router
        i = self.router_q.popleft()
        r.busy = True
        # No wake-up cost: that is the profile's measure of a model batch on the device after
        # idling; the router's own CPU after idling is in its calibrated route_s.
        cost = self.overheads.router_work(self.reqs[i].num_images) * self._factor()
        r.busy_s["route"] += cost
        self._start(r, cost, self._prepared, i)

    def _prepared(self, i: int) -> None:
        o = self.overheads
        extra = o.request_s
        if o.request_spread:
            extra = max(extra + self._draw(o.request_spread), 0.0)
        self._at(self.now + self.msg + extra, self._dispatch, i)
        r = self.router
        r.busy = False
        if self.router_q:
            self._route_next()

    def _receive(self, work: float) -> None:
        """The router takes in tokens messages worth ``work`` CPU seconds, after those queued
        before them. With shared host cores it competes for them; it delays no token."""
        rx = self.receiver
        rx.busy_s["route"] += work
        if self.cores is None or work <= 0:
            return
        if rx.busy:
            self.receive_backlog += work
            return
        rx.busy = True
        self._start(rx, work, self._received, None)

    def _received(self, _: None) -> None:
        rx, work = self.receiver, self.receive_backlog
        if work > 0:
            self.receive_backlog = 0.0
            self._start(rx, work, self._received, None)
        else:
            rx.busy = False

    def _dispatch(self, i: int) -> None:
        r, rq = self.reqs[i], self.state[i]
        loads = self.pre_load
        pi = loads.index(min(loads))
        loads[pi] += 1 if self.agg else rq.inp
        p = self.pre[pi]
        rq.pgpu = p
        if not r.image_tokens:
            rq.pending = 1
            self._mm_arrive(rq)
            return
        if self.c.mode in ("pd", "aggregated"):
            encoders = [p]
        else:
            k = min(self.c.image_split, len(r.image_tokens))
            el = self.enc_load
            if k == 1:
                encoders = [self.enc[el.index(min(el))]]
            else:
                encoders = [self.enc[i] for i in heapq.nsmallest(k, range(len(el)), el.__getitem__)]
        parts = _chunks(r.image_tokens, len(encoders))
        rq.pending = len(encoders)
        for g, part in zip(encoders, parts):
            chunk = [rq, len(part), sum(part)]
            g.enc_q.extend((chunk, t) for t in part)
            self.enc_load[g.ei] += len(part)
            self._kick(g)

    def _mm_arrive(self, rq: _Req) -> None:
        rq.pending -= 1
        if rq.pending == 0:
            rq.t_ready = self.now
            p = rq.pgpu
            assert p is not None
            p.pre_q.append(rq)
            self._kick(p)

    def _enc_done(self, arg: tuple[_Gpu, list[tuple[list[Any], int]]]) -> None:
        g, batch = arg
        for chunk, _ in batch:
            chunk[1] -= 1
            if chunk[1] == 0:
                rq = chunk[0]
                if rq.pgpu is g:
                    # Same GPU: the prefill queue sees it when g is free again (below).
                    rq.pending -= 1
                    if rq.pending == 0:
                        rq.t_ready = self.now
                        g.pre_q.append(rq)
                else:
                    self._send(g, chunk[2] * self.mm_bytes, self._mm_arrive, rq)  # + ready notice
        self.enc_load[g.ei] -= len(batch)
        self._batch_done(g)

    def _pre_done(self, arg: tuple[_Gpu, list[_Req]]) -> None:
        g, batch = arg
        now = self.now
        slo = self.slo
        for rq in batch:
            rq.t_first = now + self.msg  # the first token reaches the client
            if not self.agg:
                self.pre_load[g.pi] -= rq.inp
            if slo is not None and rq.t_first - rq.arrival > slo.ttft_s:
                self._violate(rq)
            if rq.out == 1:
                g.kv_used -= rq.inp + (1 if self.agg else 0)
                if self.agg:
                    self.pre_load[g.pi] -= 1
                self._finish(rq)
            elif self.agg:
                rq.dgpu = g
                g.dec_wait.append(rq)
            else:
                self.handoff.append(rq)
        if self.handoff:
            self._place_handoffs()
        self._batch_done(g)

    def _batch_done(self, g: _Gpu) -> None:
        """g's batch ended: the KV that decode GPUs pulled meanwhile is freed (the worker reads
        its messages between batches), then g starts its next batch."""
        g.busy = False
        g.idle_since = self.now
        for rq in g.pulled:
            g.kv_used -= rq.inp
        g.pulled.clear()
        self._kick(g)

    def _place_handoffs(self) -> None:
        free = [d.kv_cap - d.kv_used for d in self.dec]
        most = max(free)
        waiting: deque[_Req] = deque()
        for rq in self.handoff:
            need = rq.inp + rq.out
            if need > most:
                waiting.append(rq)
                continue
            best, best_i, best_load = None, -1, 0
            for i, d in enumerate(self.dec):
                if free[i] >= need:
                    load = d.run_n + len(d.dec_wait) + d.incoming
                    if best is None or load < best_load:
                        best, best_i, best_load = d, i, load
            assert best is not None
            best.kv_used += need
            best.incoming += 1
            free[best_i] -= need
            most = max(free)
            rq.dgpu = best
            # KVReady reaches the decoder, which pulls the KV over its own link.
            self._at(self.now + self.msg, self._kv_pull, rq)
        self.handoff = waiting

    def _kv_pull(self, rq: _Req) -> None:
        assert rq.dgpu is not None
        self._send(rq.dgpu, rq.inp * self.kv_bytes, self._kv_arrive, rq, messages=0)

    def _kv_arrive(self, rq: _Req) -> None:
        """The pull ended: the sequence joins its decoder; KVPulled frees the prefill GPU's
        copy, at once or when the batch it is running ends."""
        src, d = rq.pgpu, rq.dgpu
        assert src is not None and d is not None
        d.incoming -= 1
        d.dec_wait.append(rq)
        self._kick(d)
        self._at(self.now + self.msg, self._kv_pulled, rq)

    def _kv_pulled(self, rq: _Req) -> None:
        src = rq.pgpu
        assert src is not None
        if src.busy:
            src.pulled.append(rq)
        else:
            src.kv_used -= rq.inp
            self._kick(src)

    def _steps_done(self, arg: tuple[_Gpu, int]) -> None:
        g, mac_id = arg
        if mac_id != g.mac_id:
            return  # superseded by a shorter run (_truncate)
        g.step += g.mac_k
        g.run_ctx += g.run_n * g.mac_k
        self._receive(g.mac_k * self.overheads.token_message_s)  # a message per step
        g.mac_k = 0
        fin, step = g.fin, g.step
        released = False
        while fin and fin[0][0] <= step:
            _, seq, rq = heapq.heappop(fin)
            g.gone.add(seq)
            g.run_n -= 1
            g.run_ctx -= rq.inp + rq.out
            g.kv_used -= rq.inp + rq.out
            if self.agg:
                self.pre_load[g.pi] -= 1
            released = True
            self._finish(rq)
        if released and self.handoff:
            self._place_handoffs()
        self._batch_done(g)

    def _truncate(self, g: _Gpu) -> None:
        """Ends g's run of decode steps at the first step boundary at or after now."""
        line, ctx, b = g.mac_line, g.mac_ctx, g.run_n
        assert line is not None
        shared = self.cores is not None
        done = self._task_work_done(g) if shared else self.now
        elapsed = done - g.mac_t0
        lo, hi = 1, g.mac_k
        while lo < hi:
            mid = (lo + hi) // 2
            if g.mac_f * line.sum_arithmetic(ctx, b, mid) + mid * self.step_s >= elapsed:
                hi = mid
            else:
                lo = mid + 1
        if lo == g.mac_k:
            return
        end = g.mac_t0 + g.mac_f * line.sum_arithmetic(ctx, b, lo) + lo * self.step_s
        g.busy_s["decode"] -= g.mac_end - end
        g.mac_k, g.mac_end = lo, end
        g.mac_id += 1
        if shared:
            assert g.task is not None
            g.task[0] -= g.task[3] - end  # the run now ends after `end` work seconds
            g.task[2], g.task[3] = (g, g.mac_id), end
            self._retime()
        else:
            self._at(end, self._steps_done, (g, g.mac_id))

    def _finish(self, rq: _Req) -> None:
        rq.t_finish = self.now + self.msg  # the last token reaches the client
        self.completed += 1
        slo = self.slo
        if (
            slo is not None
            and rq.out > 1
            and not rq.bad
            and (rq.t_finish - rq.t_first) / (rq.out - 1) > slo.tpot_s
        ):
            self._violate(rq)

    # -- scheduling ------------------------------------------------------------------------
    def _draw(self, quantiles: tuple[float, ...]) -> float:
        """A draw from the distribution with these (equally spaced) quantiles."""
        x = self.rand.random() * (len(quantiles) - 1)
        i = min(int(x), len(quantiles) - 2)
        return quantiles[i] + (x - i) * (quantiles[i + 1] - quantiles[i])

    def _factor(self, steps: int = 1) -> float:
        """A batch's latency over the profile's (median) latency, drawn from profile.jitter;
        for a run of ``steps`` independent steps, their mean (spread shrunk by sqrt(steps))."""
        if not self.jit:
            return 1.0
        f = self._draw(self.jit)
        return self.jit_mean + (f - self.jit_mean) / math.sqrt(steps) if steps > 1 else f

    def _wake_cost(self, g: _Gpu) -> float:
        """Extra seconds of a batch that starts now on g, after g idled (profile overheads)."""
        return 0.0 if self.wake is None else self.wake(self.now - g.idle_since)

    def _kick(self, g: _Gpu) -> None:
        """Starts g's next batch if g is idle: the stages take turns, encode, prefill, decode,
        each skipped when it has no work (the runtime's worker loop)."""
        c = self.c
        if g.busy:
            # New work waits for the current batch; a run of decode steps ends at the next
            # step boundary when the work could start then.
            prefill = g.pre_q or g.pre_run
            if g.mac_k > 1 and (g.enc_q or prefill or (g.dec_wait and g.run_n < c.decode_batch)):
                self._truncate(g)
            return
        for k in range(1, 4):
            i = (g.last + k) % 3
            if self.starts[i](g):
                g.last = i
                return

    def _start_encode(self, g: _Gpu) -> bool:
        q = g.enc_q
        if not q:
            return False
        n = scheduler.encode_batch((t for _, t in q), self.c.encode_batch, self.c.encode_tokens)
        batch = [q.popleft() for _ in range(n)]
        seconds = self.p.encode(n, sum(t for _, t in batch) / n) * self._factor()
        return self._begin(g, "encode", seconds, self._enc_done, (g, batch))

    def _start_prefill(self, g: _Gpu) -> bool:
        if not self.c.prefill_padded:
            return self._start_prefill_flat(g)
        c = self.c
        pbatch: list[_Req] = []
        tokens = kv = longest = 0
        free = g.kv_cap - g.kv_used
        for rq in g.pre_q:
            longest = max(longest, rq.inp)
            size = (len(pbatch) + 1) * longest if c.prefill_padded else tokens + rq.inp
            if pbatch and size > c.prefill_tokens:
                break
            need = rq.inp + (rq.out if self.agg else 0)
            if kv + need > free:
                break  # back-pressure: the batch waits for KV
            pbatch.append(rq)
            tokens += rq.inp
            kv += need
        if not pbatch:
            return False
        for rq in pbatch:
            g.pre_q.popleft()
            rq.t_pstart = self.now
        g.kv_used += kv
        prompts = [rq.inp for rq in pbatch]
        seconds = self.p.prefill_batch_latency(prompts, c.prefill_padded) * self._factor()
        return self._begin(g, "prefill", seconds, self._pre_done, (g, pbatch))

    def _start_prefill_flat(self, g: _Gpu) -> bool:
        """A flat (packed) prefill step, formed as the runtime forms it
        (``scheduler.prefill_chunks``): running prompts' next chunks, then queued requests
        while their KV fits (reserved for the whole prompt as one starts). A chunk costs what
        a prompt of its length does (NOTE: its attention to the earlier chunks is left out)."""
        free = g.kv_cap - g.kv_used
        started: list[_Req] = []

        def start(rq: _Req) -> bool:
            nonlocal free
            need = rq.inp + (rq.out if self.agg else 0)
            if need > free:
                return False  # back-pressure: it waits for KV
            free -= need
            started.append(rq)
            return True

        chunks = scheduler.prefill_chunks(
            ((rq, rq.inp - rq.pdone) for rq in g.pre_run),
            ((rq, rq.inp) for rq in g.pre_q),
            self.c.prefill_tokens,
            start,
        )
        if not chunks:
            return False
        for rq in started:
            g.pre_q.popleft()
            rq.t_pstart = self.now
            g.pre_run.append(rq)
        g.kv_used = g.kv_cap - free
        for rq, take in chunks:
            rq.pdone += take
        seconds = self.p.prefill_batch_latency([t for _, t in chunks], False) * self._factor()
        done = [rq for rq, _ in chunks if rq.pdone == rq.inp]
        g.pre_run = [rq for rq in g.pre_run if rq.pdone < rq.inp]
        return self._begin(g, "prefill", seconds, self._pre_done, (g, done))

    def _begin(
        self, g: _Gpu, stage: str, seconds: float, done: Callable[[Any], None], arg: Any
    ) -> bool:
        """Starts a batch of ``seconds`` on g, after g's wake-up cost; ``done(arg)`` at its end."""
        dur = seconds + self._wake_cost(g)
        g.busy = True
        g.busy_s[stage] += dur
        self._start(g, dur, done, arg)
        return True

    def _step_context(self, g: _Gpu) -> int:
        """The context tokens g's next decode step computes over: the sum of the running
        sequences' contexts, or (``decode_padded``) the batch size times the longest."""
        if not self.c.decode_padded:
            return g.run_ctx
        top = g.longest
        while top[0][1] in g.gone:
            g.gone.discard(heapq.heappop(top)[1])
        return g.run_n * (g.step - top[0][0])

    def _start_decode(self, g: _Gpu) -> bool:
        c = self.c
        wait, fin = g.dec_wait, g.fin
        while wait and g.run_n < c.decode_batch:
            rq = wait.popleft()
            rq.t_join = self.now
            g.run_n += 1
            g.run_ctx += rq.inp + 1
            seq = next(self.seq)
            heapq.heappush(fin, (g.step + rq.out - 1, seq, rq))
            heapq.heappush(g.longest, (g.step - rq.inp - 1, seq))
        if not g.run_n:
            return False
        # Nothing changes the batch before its next finish, so its steps run as one event (cut
        # short by _truncate when other work arrives); one step when other stages wait.
        line = self.lines.get(g.run_n)
        if line is None:
            line = self.lines[g.run_n] = self.p.decode.at_x(g.run_n)
        k = 1 if g.enc_q or g.pre_q or g.pre_run else g.fin[0][0] - g.step
        f = self._factor(k)
        ctx = self._step_context(g)
        dur = f * line.sum_arithmetic(ctx, g.run_n, k) + k * self.step_s
        pen = self._wake_cost(g)  # the steps start once the GPU is awake
        g.busy = True
        g.busy_s["decode"] += pen + dur
        # mac_t0 / mac_end: when the steps start and end; with shared host cores, in work
        # seconds since the run started (its duration depends on the others' load).
        t0 = pen if self.cores is not None else self.now + pen
        g.mac_k, g.mac_t0, g.mac_end, g.mac_ctx, g.mac_line = k, t0, t0 + dur, ctx, line
        g.mac_f = f
        g.mac_id += 1
        self._start(g, pen + dur, self._steps_done, (g, g.mac_id))
        return True

    # -- results ---------------------------------------------------------------------------
    def result(self) -> SimResult:
        st = self.state
        arrival = np.array([s.arrival for s in st])
        first = np.array([s.t_first for s in st])
        finish = np.array([s.t_finish for s in st])
        out = np.array([s.out for s in st], dtype=np.int64)
        ttft = first - arrival
        with np.errstate(invalid="ignore", divide="ignore"):
            tpot = np.where(out > 1, (finish - first) / np.maximum(out - 1, 1), 0.0)
        tpot = np.where(np.isfinite(finish), tpot, np.nan)
        done = np.isfinite(finish)
        end = float(finish[done].max()) if done.any() else self.now
        duration = end - float(arrival.min()) if len(arrival) else 0.0
        if self.slo is None:
            attainment = float("nan")
        elif self.stop:
            attainment = 1.0 - self.violations / len(st)
        else:
            attainment = self.slo.attainment(ttft, tpot)
        util: dict[str, float] = {}
        for stage, gpus in (("encode", self.enc), ("prefill", self.pre), ("decode", self.dec)):
            if gpus and duration > 0:
                util[stage] = sum(g.busy_s[stage] for g in gpus) / (len(gpus) * duration)
        work = {g.name: sum(g.busy_s.values()) for g in self.gpus}
        work["router"] = self.router.busy_s["route"] + self.receiver.busy_s["route"]
        ready = np.array([s.t_ready for s in st])
        pstart = np.array([s.t_pstart for s in st])
        join = np.array([s.t_join for s in st])
        has_img = np.array([r.num_images > 0 for r in self.reqs])
        multi = out > 1

        def mean(x: np.ndarray) -> float:
            x = x[np.isfinite(x)]
            return float(x.mean()) if len(x) else 0.0

        with np.errstate(invalid="ignore", divide="ignore"):
            phases = {
                "encode": mean((ready - arrival)[has_img]),
                "prefill_wait": mean(pstart - ready),
                "prefill": mean(first - pstart),
                "handoff": mean((join - first)[multi]),
                "decode_per_token": mean(((finish - join) / np.maximum(out - 1, 1))[multi]),
            }
        return SimResult(
            config=self.c,
            num_requests=len(st),
            completed=self.completed,
            arrival_s=arrival,
            ttft_s=ttft,
            tpot_s=tpot,
            output_tokens=out,
            duration_s=duration,
            slo=self.slo,
            slo_attainment=attainment,
            aborted=self.stop,
            utilization=util,
            work_s=work,
            phases=phases,
        )


def simulate(
    profile: StageProfile,
    config: DeployConfig,
    requests: Sequence[Request],
    slo: SLO | None = None,
    *,
    stop_below: float | None = None,
    host_cores: int | None = None,
    host_interference: float = 0.0,
    host_pinned: bool = False,
) -> SimResult:
    """Simulates ``config`` serving ``requests`` (sorted by arrival) until all finish.

    Args:
        slo: when given, the result's ``slo_attainment`` is the share meeting both SLOs.
        stop_below: stop as soon as the attainment can no longer reach this share (the search
            uses it to give up on overloaded configs early); needs ``slo``.
        host_cores: the deployment's workers and router share this many CPU cores
            (processor sharing: n busy on c cores each run at ``min(1, c / n)`` speed), as
            on a CPU-only host; None: every worker has its own device.
        host_interference: with ``host_cores``, the fraction by which each further process
            running at the same time slows every running one (shared caches and memory
            bandwidth; ``bench/planner.py`` measures it with two copies of a probe).
        host_pinned: with ``host_cores``, each worker runs on a core of its own (the runtime
            pins CPU workers when there are enough cores); the router runs where a core is
            free, else shares its last one.

    Raises:
        InvalidArgument: the config cannot hold the workload in memory.
    """
    if not requests:
        raise InvalidArgument("simulate needs at least one request")
    if any(b.arrival_s < a.arrival_s for a, b in itertools.pairwise(requests)):
        raise InvalidArgument("requests must be sorted by arrival_s")
    sim = _Sim(
        profile, config, requests, slo, stop_below, host_cores, host_interference, host_pinned
    )
    sim.run()
    return sim.result()


@dataclass(frozen=True)
class Prediction:
    """The simulator's prediction for one config and workload (seconds, requests/s)."""

    ttft_p50_s: float
    ttft_p90_s: float
    tpot_p50_s: float
    tpot_p90_s: float
    throughput_rps: float
    output_tokens_per_s: float
    slo_attainment: float

    @classmethod
    def of(cls, res: SimResult) -> Prediction:
        """The prediction a simulation run gives."""
        return cls(
            ttft_p50_s=res.ttft_quantile(0.5),
            ttft_p90_s=res.ttft_quantile(0.9),
            tpot_p50_s=res.tpot_quantile(0.5),
            tpot_p90_s=res.tpot_quantile(0.9),
            throughput_rps=res.throughput_rps,
            output_tokens_per_s=res.output_tokens_per_s,
            slo_attainment=res.slo_attainment,
        )

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def predict(
    profile: StageProfile,
    config: DeployConfig,
    requests: Sequence[Request],
    slo: SLO | None = None,
    *,
    host_cores: int | None = None,
    host_interference: float = 0.0,
    host_pinned: bool = False,
) -> Prediction:
    """Predicted TTFT/TPOT percentiles and throughput of ``config`` serving ``requests``.

    The entry point for validating the simulator against real ``epdrt run`` measurements:
    replay the measured run's requests (workload.load_trace) and compare (planner.validation).
    """
    res = simulate(
        profile,
        config,
        sorted(requests, key=lambda r: r.arrival_s),
        slo,
        host_cores=host_cores,
        host_interference=host_interference,
        host_pinned=host_pinned,
    )
    return Prediction.of(res)
