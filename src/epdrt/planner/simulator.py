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
  dropped), up to ``prefill_tokens`` tokens; with the layer-wise hand-off, only those whose
  decoder's blocks are known (the runtime's ``_has_dest``). A longer prompt is prefilled
  over several steps. A step lasts ``profile.prefill_batch_latency`` of its chunks (the
  fixed cost of a call once, every chunk's own work) and gives the requests it completes
  their first token.
  ``prefill_padded`` (other systems' right-padded batches): no chunks; a batch takes requests
  while requests x longest prompt fits ``prefill_tokens`` (the first always).
- Decoder choice: the router picks a request's decode GPU as it arrives (the fewest
  unfinished requests; ``aggregated``: its prefill GPU).
- Hand-off (``epd``/``pd``/``ed``, ``kv_handoff``): ``layerwise``, the prefill GPU asks the
  decoder for blocks as the request reaches it (a message); the decoder admits it (below)
  and answers (a message), and the prefill may start only then. Each step's chunks are pushed
  over the prefill GPU's link as their layers are written (overlapping the step; the step
  ends once the last byte has landed), the prefill KV is freed at the step's end, and a
  message later the sequence joins its decoder. ``pull``, the finished prefill messages the
  decoder, which admits it, copies the prompt's KV over its own link, and lets the prefill
  GPU free its KV (a message; when the batch it is running ends).
- Decode admission and growth are the runtime's (``scheduler.decode_admit``,
  ``growth_preemptions``), in tokens: FIFO, a sequence is admitted when its prompt's KV fits
  beside ``kv_block`` tokens kept free per sequence the decoder holds (running, receiving
  or pulling) and fewer than ``max_num_seqs`` are held; a step's sequences take one token of
  KV each, and when they do not fit the newest running sequence is preempted: its KV is
  freed and it is prefilled again, prompt plus the tokens it generated (two messages later,
  on the same GPUs, its images cached), as the runtime recomputes it. NOTE: the runtime
  counts blocks, which a sequence takes every ``kv_block`` tokens; tokens here.
- Decode: continuous batching; at each step boundary admitted sequences whose KV is in join
  the running set; a step takes ``min(running, decode_batch)`` of them (in turn when more
  run) and lasts ``decode(batch, total context tokens)``, giving each one token
  (``decode_padded``: the total counts every sequence at the longest context in the batch).
- Stages that share a GPU take turns at batch boundaries, in the order encode, prefill,
  decode, skipping a stage with no work (the runtime's worker loop): a pending prefill runs
  after at most one more decode step, and under overload every stage keeps a share of the
  GPU instead of the first starving the others.
- Transfers: ``latency + bytes / bandwidth``, serialized per sending GPU.
- Memory: per-GPU KV capacity and the encode batch bound come from the memory plan
  (config.memory_plan): colocated weights and activation reserves shrink KV capacity.
  ``aggregated``: prefill and decode share one cache; a prefill keeps the decoder's
  headroom free.
- Runtime costs (profile.overheads, zero unless measured): the router preprocesses requests
  one at a time, then messages the workers; control messages (MM tokens ready, the first and
  last token to the client, the hand-off's KVReserve, KVDest, KVReady and KVPulled, a
  preemption's Preempted and the request dispatched again); a GPU starting work
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
from collections.abc import Callable, Iterable, Sequence
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
        "dest",
        "dgpu",
        "done",
        "inp",
        "join_p",
        "out",
        "pdone",
        "pending",
        "pgpu",
        "prompt",
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
        self.done = 0  # tokens generated before a preemption (recomputed with the prompt)
        self.prompt = self.inp  # tokens the current prefill computes: inp + done
        self.pdone = 0  # prompt tokens prefilled (a prompt over the budget takes several steps)
        self.dest = False  # layer-wise hand-off: the decoder's blocks are known (KVDest)
        self.join_p = 0.0  # its decode GPU's progress (``_Gpu.prog``) when it joined
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
        "di",
        "ei",
        "enc_q",
        "fin",
        "holding",
        "idle_since",
        "index",
        "kv_cap",
        "kv_used",
        "last",
        "link_free",
        "longest",
        "mac_ctx",
        "mac_dx",
        "mac_end",
        "mac_f",
        "mac_id",
        "mac_k",
        "mac_line",
        "mac_share",
        "mac_t0",
        "name",
        "pi",
        "pre_q",
        "pre_run",
        "prog",
        "pulled",
        "rate",
        "ready_q",
        "run_ctx",
        "running",
        "stages",
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
        # Decode. Waiting for admission, in arrival order: ("reserve" | "ready" | "local", req).
        self.ready_q: deque[tuple[str, _Req]] = deque()
        self.dec_wait: deque[_Req] = deque()  # admitted, KV in: they join at the next step
        self.holding = 0  # sequences admitted here and not finished (the admission headroom)
        self.running: dict[int, _Req] = {}  # by seq, in admission order
        self.run_ctx = 0.0  # their context tokens, summed
        # Progress: decode tokens each running sequence has had since the GPU started (steps
        # times the share of the running set a step takes); a sequence's context is its prompt
        # + 1 + prog - join_p.
        self.prog = 0.0
        self.fin: list[tuple[float, int, _Req]] = []  # (progress it finishes at, seq, request)
        # Running sequences by context, longest first: (-(context - prog), seq). Finished or
        # preempted ones leave both heaps lazily (their seq no longer in running).
        self.longest: list[tuple[float, int]] = []
        self.di = -1  # index into _Sim.dec_load (decode GPUs)
        # Requests whose KV decode pulled during the current batch: freed when it ends.
        self.pulled: list[_Req] = []
        self.link_free = 0.0
        # A run of mac_k decode steps started at mac_t0 (context mac_ctx, growing by mac_dx a
        # step; each step takes mac_share of the running set); mac_k == 0: none.
        self.mac_k = 0
        self.mac_id = 0
        self.mac_t0 = self.mac_end = 0.0
        self.mac_ctx = self.mac_dx = 0.0
        self.mac_share = 1.0
        self.mac_line: PiecewiseLinear | None = None
        self.mac_f = 1.0  # the run's jitter factor
        # With shared host cores: [work seconds left, callback, its argument, total work].
        self.task: list[Any] | None = None

    @property
    def run_n(self) -> int:
        """Sequences in the decode running set."""
        return len(self.running)


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
        preemptions: running sequences evicted from a full decode cache (each recomputed).
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
    preemptions: int = 0

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
            "preemptions": self.preemptions,
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
        for i, g in enumerate(self.dec):
            g.di = i
        # Routing loads: images queued or in service per encoder; outstanding input tokens per
        # prefill GPU (unfinished requests in aggregated); unfinished requests per decoder.
        self.enc_load = [0] * len(self.enc)
        self.pre_load = [0] * len(self.pre)
        self.dec_load = [0] * len(self.dec)
        self.layerwise = not self.agg and config.kv_handoff == "layerwise"
        self.max_seqs = config.running_limit
        self.preemptions = 0
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
        if self.agg:
            rq.dgpu = p
        else:
            dl = self.dec_load
            di = dl.index(min(dl))
            dl[di] += 1
            rq.dgpu = self.dec[di]
        self._reserve(rq)
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
        now, msg = self.now, self.msg
        slo = self.slo
        for rq in batch:
            if math.isnan(rq.t_first):  # not a preempted request's recompute
                rq.t_first = now + msg  # the first token reaches the client
                if slo is not None and rq.t_first - rq.arrival > slo.ttft_s:
                    self._violate(rq)
            if not self.agg:
                self.pre_load[g.pi] -= rq.prompt
            if rq.done + 1 == rq.out:  # finished at its first token
                g.kv_used -= rq.prompt
                if self.layerwise:  # KVPushEnded: the decoder frees the blocks it gave
                    self._at(now + msg, self._release, rq)
                self._done(rq)
            elif self.agg:
                g.ready_q.append(("local", rq))
            elif self.layerwise:  # the last layer has landed (the step waited for it)
                g.kv_used -= rq.prompt
                self._at(now + msg, self._landed, rq)
            else:
                self._at(now + msg, self._kv_ready, rq)
        self._batch_done(g)

    def _batch_done(self, g: _Gpu) -> None:
        """g's batch ended: the KV that decode GPUs pulled meanwhile is freed (the worker reads
        its messages between batches), then g starts its next batch."""
        g.busy = False
        g.idle_since = self.now
        for rq in g.pulled:
            g.kv_used -= rq.prompt
        g.pulled.clear()
        self._kick(g)

    # -- hand-off --------------------------------------------------------------------------
    def _reserve(self, rq: _Req) -> None:
        """The request reached its prefill GPU: with the layer-wise hand-off, KVReserve goes
        to its decoder."""
        if self.layerwise:
            rq.dest = False
            self._at(self.now + self.msg, self._to_decoder, ("reserve", rq))

    def _to_decoder(self, item: tuple[str, _Req]) -> None:
        d = item[1].dgpu
        assert d is not None
        d.ready_q.append(item)
        self._kick(d)

    def _kv_ready(self, rq: _Req) -> None:
        self._to_decoder(("ready", rq))

    def _kv_dest(self, rq: _Req) -> None:
        """KVDest: the prefill may start."""
        rq.dest = True
        assert rq.pgpu is not None
        self._kick(rq.pgpu)

    def _landed(self, rq: _Req) -> None:
        """KVReady after a push: the sequence joins its decoder at the next step."""
        d = rq.dgpu
        assert d is not None
        d.dec_wait.append(rq)
        self._kick(d)

    def _release(self, rq: _Req) -> None:
        """KVPushEnded: the decoder frees the blocks it reserved for a push that ended."""
        d = rq.dgpu
        assert d is not None
        d.kv_used -= rq.prompt
        d.holding -= 1
        self._kick(d)

    def _kv_arrive(self, rq: _Req) -> None:
        """The pull ended: the sequence joins its decoder; KVPulled frees the prefill GPU's
        copy, at once or when the batch it is running ends."""
        self._landed(rq)
        self._at(self.now + self.msg, self._kv_pulled, rq)

    def _kv_pulled(self, rq: _Req) -> None:
        src = rq.pgpu
        assert src is not None
        if src.busy:
            src.pulled.append(rq)
        else:
            src.kv_used -= rq.prompt
            self._kick(src)

    def _decode_room(self, g: _Gpu, item: tuple[str, _Req]) -> int | None:
        """The KV tokens a sequence waiting on decoder g takes if admitted now
        (``scheduler.decode_admit``); None when it must wait."""
        kind, rq = item
        need = 0 if kind == "local" else rq.prompt
        free = g.kv_cap - g.kv_used
        why = scheduler.decode_admit(need, free, g.holding, self.max_seqs, self.c.kv_block)
        return need if why is None else None

    def _admittable(self, g: _Gpu) -> bool:
        """Whether decoder g would admit its next waiting sequence now."""
        return bool(g.ready_q) and self._decode_room(g, g.ready_q[0]) is not None

    def _admit(self, g: _Gpu) -> None:
        """Decode admission, FIFO (``scheduler.decode_admissions``)."""

        def admit(item: tuple[str, _Req]) -> bool:
            need = self._decode_room(g, item)
            if need is None:
                return False
            g.kv_used += need
            g.holding += 1
            return True

        for kind, rq in scheduler.decode_admissions(g.ready_q, admit):
            g.ready_q.popleft()
            if kind == "reserve":  # KVDest to the prefill GPU
                self._at(self.now + self.msg, self._kv_dest, rq)
            elif kind == "ready":  # the decoder pulls the KV over its own link
                self._send(g, rq.prompt * self.kv_bytes, self._kv_arrive, rq, messages=0)
            else:
                g.dec_wait.append(rq)

    def _preempt(self, g: _Gpu, seq: int) -> None:
        """Evicts a running sequence (its KV freed); the cluster prefills it again, prompt
        plus the tokens it generated, once the Preempted message is in (a message to the
        cluster, one to its prefill GPU)."""
        rq = g.running.pop(seq)
        grown = self._leave(g, rq)
        rq.done += 1 + math.floor(grown + 1e-9)  # its prefill's token and the decoded ones
        rq.prompt = rq.inp + rq.done
        rq.pdone = 0
        self.preemptions += 1
        self._at(self.now + 2 * self.msg, self._resume, rq)

    def _leave(self, g: _Gpu, rq: _Req) -> float:
        """A sequence leaves g's running set (finished or preempted): its KV and context
        leave the totals. Returns the decode tokens it had (progress units)."""
        grown = g.prog - rq.join_p
        g.kv_used -= rq.prompt + grown
        g.run_ctx -= rq.prompt + 1 + grown
        g.holding -= 1
        return grown

    def _resume(self, rq: _Req) -> None:
        p = rq.pgpu
        assert p is not None
        if not self.agg:
            self.pre_load[p.pi] += rq.prompt
        self._reserve(rq)
        p.pre_q.append(rq)  # its images are in the caches: nothing to encode
        self._kick(p)

    def _done(self, rq: _Req) -> None:
        """The request's last token: it leaves its decoder's routing load and finishes."""
        p, d = rq.pgpu, rq.dgpu
        assert p is not None and d is not None
        if self.agg:
            self.pre_load[p.pi] -= 1
        else:
            self.dec_load[d.di] -= 1
        self._finish(rq)

    def _steps_done(self, arg: tuple[_Gpu, int]) -> None:
        g, mac_id = arg
        if mac_id != g.mac_id:
            return  # superseded by a shorter run (_truncate)
        k = g.mac_k
        grown = k * g.mac_share  # decode tokens each running sequence had, on average
        g.prog += grown
        g.run_ctx += grown * g.run_n
        g.kv_used += grown * g.run_n  # the stepped sequences' new tokens
        self._receive(k * self.overheads.token_message_s)  # a message per step
        g.mac_k = 0
        fin, prog = g.fin, g.prog + 1e-9
        while fin and fin[0][0] <= prog:
            _, seq, rq = heapq.heappop(fin)
            if g.running.pop(seq, None) is None:
                continue  # preempted
            self._leave(g, rq)
            self._done(rq)
        self._batch_done(g)

    def _truncate(self, g: _Gpu) -> None:
        """Ends g's run of decode steps at the first step boundary at or after now."""
        line, ctx, dx = g.mac_line, g.mac_ctx, g.mac_dx
        assert line is not None
        shared = self.cores is not None
        done = self._task_work_done(g) if shared else self.now
        elapsed = done - g.mac_t0
        lo, hi = 1, g.mac_k
        while lo < hi:
            mid = (lo + hi) // 2
            if g.mac_f * line.sum_arithmetic(ctx, dx, mid) + mid * self.step_s >= elapsed:
                hi = mid
            else:
                lo = mid + 1
        if lo == g.mac_k:
            return
        end = g.mac_t0 + g.mac_f * line.sum_arithmetic(ctx, dx, lo) + lo * self.step_s
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
        if g.busy:
            # New work waits for the current batch; a run of decode steps ends at the next
            # step boundary when the work could start then.
            waits = g.enc_q or g.pre_q or g.pre_run or g.dec_wait or self._admittable(g)
            if g.mac_k > 1 and waits:
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
        longest = 0
        free = self._prefill_room(g)
        for rq in self._startable(g):
            longest = max(longest, rq.prompt)
            if pbatch and (len(pbatch) + 1) * longest > c.prefill_tokens:
                break
            if rq.prompt > free:
                break  # back-pressure: the batch waits for KV
            pbatch.append(rq)
            free -= rq.prompt
        if not pbatch:
            return False
        self._started(g, pbatch)
        prompts = [rq.prompt for rq in pbatch]
        seconds = self.p.prefill_batch_latency(prompts, c.prefill_padded) * self._factor()
        seconds = self._push(g, [(rq, rq.prompt) for rq in pbatch], seconds)
        return self._begin(g, "prefill", seconds, self._pre_done, (g, pbatch))

    def _prefill_room(self, g: _Gpu) -> float:
        """KV tokens a prefill on g may take: its free KV less, with decode on the same cache
        (``aggregated``), the decoder's headroom."""
        free = g.kv_cap - g.kv_used
        return free - g.holding * self.c.kv_block if self.agg else free

    def _startable(self, g: _Gpu) -> Iterable[_Req]:
        """g's queued requests that may start, in order: with the layer-wise hand-off, those
        whose decoder's blocks are known (the others wait without holding anyone up)."""
        return (rq for rq in g.pre_q if rq.dest) if self.layerwise else g.pre_q

    def _started(self, g: _Gpu, started: list[_Req]) -> None:
        """The requests' prefills start: out of g's queue, their prompts' KV taken."""
        if all(a is b for a, b in zip(started, g.pre_q)):
            for _ in started:
                g.pre_q.popleft()
        else:
            ids = {id(rq) for rq in started}
            g.pre_q = deque(rq for rq in g.pre_q if id(rq) not in ids)
        for rq in started:
            g.kv_used += rq.prompt
            if math.isnan(rq.t_pstart):  # not a preempted request's recompute
                rq.t_pstart = self.now

    def _push(self, g: _Gpu, chunks: list[tuple[_Req, int]], seconds: float) -> float:
        """With the layer-wise hand-off, the chunks' KV goes over g's link as the step writes
        it (from its start, overlapping it); returns the step's length, which ends once the
        last byte has landed."""
        if not self.layerwise:
            return seconds
        t = max(self.now, g.link_free)
        for _, take in chunks:
            t += self.xfer(take * self.kv_bytes)
        g.link_free = max(t, self.now + seconds)
        return g.link_free - self.now

    def _start_prefill_flat(self, g: _Gpu) -> bool:
        """A flat (packed) prefill step, formed as the runtime forms it
        (``scheduler.prefill_chunks``): running prompts' next chunks, then queued requests
        while their KV fits (reserved for the whole prompt as one starts). A chunk costs what
        a prompt of its length does (NOTE: its attention to the earlier chunks is left out)."""
        free = self._prefill_room(g)
        started: list[_Req] = []

        def start(rq: _Req) -> bool:
            nonlocal free
            if rq.prompt > free:
                return False  # back-pressure: it waits for KV
            free -= rq.prompt
            started.append(rq)
            return True

        chunks = scheduler.prefill_chunks(
            ((rq, rq.prompt - rq.pdone) for rq in g.pre_run),
            ((rq, rq.prompt) for rq in self._startable(g)),
            self.c.prefill_tokens,
            start,
        )
        if not chunks:
            return False
        self._started(g, started)
        g.pre_run += started
        for rq, take in chunks:
            rq.pdone += take
        seconds = self.p.prefill_batch_latency([t for _, t in chunks], False) * self._factor()
        seconds = self._push(g, chunks, seconds)
        done = [rq for rq, _ in chunks if rq.pdone == rq.prompt]
        g.pre_run = [rq for rq in g.pre_run if rq.pdone < rq.prompt]
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

    def _step_context(self, g: _Gpu) -> float:
        """The context tokens of g's running sequences: the sum of their contexts, or
        (``decode_padded``) their number times the longest."""
        if not self.c.decode_padded:
            return g.run_ctx
        top = g.longest
        while top[0][1] not in g.running:
            heapq.heappop(top)
        return g.run_n * (g.prog - top[0][0])

    def _join(self, g: _Gpu) -> None:
        """Admitted sequences whose KV is in join g's running set."""
        while g.dec_wait:
            rq = g.dec_wait.popleft()
            if math.isnan(rq.t_join):
                rq.t_join = self.now
            seq = next(self.seq)
            rq.join_p = g.prog
            g.running[seq] = rq
            g.run_ctx += rq.prompt + 1
            heapq.heappush(g.fin, (g.prog + rq.out - rq.done - 1, seq, rq))
            heapq.heappush(g.longest, (g.prog - rq.prompt - 1, seq))

    def _make_room(self, g: _Gpu) -> None:
        """Preempts running sequences while the next step's new tokens do not fit in g's KV
        (``scheduler.growth_preemptions``; the step takes the oldest ``decode_batch``)."""
        b = min(g.run_n, self.c.decode_batch)
        free = g.kv_cap - g.kv_used
        if free >= b:
            return
        running = g.running
        stepped = itertools.islice(running, b)
        held = {seq: rq.prompt + g.prog - rq.join_p for seq, rq in running.items()}
        for seq in scheduler.growth_preemptions(
            ((seq, 1) for seq in stepped), held, {seq: seq for seq in running}, free
        ):
            self._preempt(g, seq)

    def _start_decode(self, g: _Gpu) -> bool:
        self._admit(g)
        self._join(g)
        self._make_room(g)
        if not g.run_n:
            return False
        fin = g.fin
        while fin[0][1] not in g.running:
            heapq.heappop(fin)  # preempted
        b = min(g.run_n, self.c.decode_batch)
        share = b / g.run_n
        # Nothing changes the running set before its next finish or a full cache, so its steps
        # run as one event (cut short by _truncate when other work arrives); one step when
        # other stages wait.
        line = self.lines.get(b)
        if line is None:
            line = self.lines[b] = self.p.decode.at_x(b)
        if g.enc_q or g.pre_q or g.pre_run:
            k = 1
        else:
            room = int((g.kv_cap - g.kv_used) // b)
            k = min(math.ceil((fin[0][0] - g.prog) / share - 1e-9), room)
        f = self._factor(k)
        ctx, dx = self._step_context(g) * share, b * share  # the stepped sequences'
        dur = f * line.sum_arithmetic(ctx, dx, k) + k * self.step_s
        pen = self._wake_cost(g)  # the steps start once the GPU is awake
        g.busy = True
        g.busy_s["decode"] += pen + dur
        # mac_t0 / mac_end: when the steps start and end; with shared host cores, in work
        # seconds since the run started (its duration depends on the others' load).
        t0 = pen if self.cores is not None else self.now + pen
        g.mac_k, g.mac_t0, g.mac_end, g.mac_ctx, g.mac_line = k, t0, t0 + dur, ctx, line
        g.mac_dx, g.mac_share, g.mac_f = dx, share, f
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
            preemptions=self.preemptions,
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
