# SPDX-License-Identifier: Apache-2.0
"""EPDCluster: launches the stage workers, routes requests, collects tokens, supervises.

The cluster process is the router: it preprocesses requests (image decoding, content keys,
tokenization), picks an encoder per image (the one that last encoded that content, else the
least loaded), the least-loaded prefill and decode workers, and records per-request timings.
A receiver thread turns worker messages into results and watches the workers: when one dies,
every request that depends on it fails with the reason and the survivors free what those
requests held.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import torch

from epdrt.errors import EpdrtError
from epdrt.runtime import messages as m
from epdrt.runtime.channel import SECRET_ENV, Channel, ChannelError
from epdrt.runtime.config import EPDConfig, WorkerSpec
from epdrt.runtime.outbox import Outbox
from epdrt.runtime.request import Request, RequestError, RequestResult
from epdrt.runtime.stage_model import Prepared, Preprocessor

POLL_S = 0.02
KEY_HOMES = 65536  # how many image keys the router remembers the encoder of


@dataclass
class _Worker:
    name: str
    roles: frozenset[str]
    device: str
    proc: subprocess.Popen
    log_path: Path
    argv: list[str]  # how it was started (a restart runs the same)
    load: int = 0  # requests (prefill/decode) or images (encode) in flight
    alive: bool = True
    restarts: int = 0
    #: dead: when it is started again (None: not to be); starting: a new process that has not
    #: said Hello yet
    restart_at: float | None = None
    starting: bool = False
    stats: dict[str, float] = field(default_factory=dict)  # its final report (shutdown)
    live: dict[str, float] = field(default_factory=dict)  # its latest report while running

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class _Inflight:
    """A request the router holds: queued (``loads`` empty) or in the workers."""

    request: Request
    prepared: Prepared
    future: Future
    submitted: float
    deadline: float
    on_token: Callable[[str, int], None] | None = None
    #: worker -> load this request added (undone when it resolves); empty while queued
    loads: dict[str, int] = field(default_factory=dict)
    tokens: list[int] = field(default_factory=list)
    #: tokens that arrived before an earlier one (index -> (token, finished)): the prefill's
    #: first token and decode's next travel on different sockets
    early: dict[int, tuple[int, bool]] = field(default_factory=dict)
    first_token_at: float | None = None
    #: the text returned, when a stop string cut it (else the tokens' text)
    text: str | None = None
    last_token_at: float | None = None
    encode_s: float = 0.0
    #: (prefill, decode, encoder per image key): the workers it was routed to
    route: tuple[str, str, dict[bytes, str]] | None = None
    #: preempted by its decoder after this many tokens: prefilled again once they are here
    resume_at: int | None = None


def cpu_workers_pinned(num_cpu_workers: int, threads_each: int, cores: int) -> bool:
    """Whether CPU workers get cores of their own (``threads_each`` each): only when there are
    enough; with fewer, none is pinned and the kernel shares all cores among them
    (round-robin pinning would put two busy workers on one core while another has one)."""
    return num_cpu_workers * threads_each <= cores


class EPDCluster:
    """A running deployment. Use ``with EPDCluster.launch(model_dir, config) as cluster``."""

    def __init__(self, model_dir: str | os.PathLike[str], config: EPDConfig) -> None:
        self.model_dir = str(Path(model_dir).resolve())
        self.config = config
        self.pre = Preprocessor.load(self.model_dir, config)
        self._run_dir = Path(tempfile.mkdtemp(prefix="epdrt-run-"))
        # Worker logs: kept where the config says, else removed with the run directory.
        log_dir = config.log_dir or os.environ.get("EPDRT_WORKER_LOG_DIR")
        self._log_dir = Path(log_dir) if log_dir else self._run_dir
        self._log_dir.mkdir(parents=True, exist_ok=True)
        # tcp: a secret of this cluster's signs every control message (handed to the workers
        # in their environment, not on their command lines).
        self._secret = secrets.token_bytes(32) if config.control == "tcp" else None
        self._endpoints: dict[str, str] = {}  # where each worker receives, fixed at its start
        self._channel = Channel(self._new_endpoint("cluster"), secret=self._secret)
        self._workers: dict[str, _Worker] = {}
        self._inflight: dict[str, _Inflight] = {}
        self._queue: OrderedDict[str, _Inflight] = OrderedDict()  # admitted in this order
        self._inflight_tokens = 0  # tokens_of() of the requests in _inflight
        self._received: Counter[str] = Counter()  # messages taken in, by type
        self._key_home: OrderedDict[bytes, str] = OrderedDict()
        # Every worker's region descriptors (from its latest Hello), for Peers messages.
        self._mm_regions: dict[str, bytes] = {}
        self._kv_regions: dict[str, bytes] = {}
        self._lock = threading.Lock()
        # What must not run under the lock (future results, token callbacks), queued under it
        # by the thread that holds it and run by that thread once it lets go (see _locked).
        self._after: list[Callable[[], None]] = []
        self._outbox = Outbox(self._channel)
        self._closing = False
        self._receiver: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    @classmethod
    def launch(
        cls, model_dir: str | os.PathLike[str], config: EPDConfig | None = None
    ) -> EPDCluster:
        """Starts every worker and completes the handshake; raises EpdrtError if one fails."""
        cluster = cls(model_dir, config or EPDConfig())
        try:
            cluster._start()
        except BaseException:
            cluster.shutdown()
            raise
        return cluster

    def __enter__(self) -> EPDCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _devices(self) -> list[str]:
        roles = self.config.worker_roles()
        if self.config.devices != "auto":
            return list(self.config.devices)
        n_gpu = torch.cuda.device_count()
        if n_gpu >= len(roles):
            return [f"cuda:{i}" for i in range(len(roles))]
        if n_gpu > 0:
            return [f"cuda:{i % n_gpu}" for i in range(len(roles))]
        return ["cpu"] * len(roles)

    def _start(self) -> None:
        cluster_endpoint = self._channel.endpoint
        devices = self._devices()
        cores = sorted(os.sched_getaffinity(0))
        threads = self.config.cpu_threads
        pin = cpu_workers_pinned(devices.count("cpu"), threads, len(cores))
        free = iter(cores)
        for (name, roles), device in zip(self.config.worker_roles(), devices):
            cpus = [next(free) for _ in range(threads)] if device == "cpu" and pin else []
            spec = WorkerSpec(
                name=name, roles=sorted(roles), device=device, model_dir=self.model_dir,
                config=self.config, endpoint=self._endpoints.setdefault(
                    name, self._new_endpoint(name)
                ),
                cluster_endpoint=cluster_endpoint, parent_pid=os.getpid(), cpus=cpus,
            )  # fmt: skip
            log_path = self._log_dir / f"{self._run_dir.name}-{name}.log"
            argv = [
                sys.executable,
                "-m",
                "epdrt.runtime.worker",
                msgspec.json.encode(spec).decode(),
            ]
            proc = _spawn(argv, log_path, self._worker_env())
            self._workers[name] = _Worker(name, roles, device, proc, log_path, argv)
            self._channel.connect(name, spec.endpoint)
        for hello in self._await_hellos():
            self._note_regions(hello)
        for name in self._workers:
            self._channel.send(name, self._peers())
        self._receiver = threading.Thread(
            target=self._receive_loop, name="epdrt-receiver", daemon=True
        )
        self._receiver.start()

    def _new_endpoint(self, name: str) -> str:
        """Where ``name`` will receive: a socket in the run directory, or a free TCP port."""
        if self.config.control == "ipc":
            return f"ipc://{self._run_dir}/{name}.sock"
        host = self.config.control_host
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
        return f"tcp://{'[' + host + ']' if ':' in host else host}:{port}"

    def _endpoint(self, name: str) -> str:
        return self._endpoints[name]

    def _worker_env(self) -> dict[str, str] | None:
        """The workers' environment: this process's, plus the control secret with tcp."""
        if self._secret is None:
            return None
        return {**os.environ, SECRET_ENV: self._secret.hex()}

    def _note_regions(self, hello: m.Hello) -> None:
        for regions, desc in ((self._mm_regions, hello.mm_region),
                              (self._kv_regions, hello.kv_region)):  # fmt: skip
            if desc is not None:
                regions[hello.worker] = desc

    def _peers(self, restarted: list[str] | None = None) -> m.Peers:
        endpoints = {n: self._endpoint(n) for n in self._workers}
        return m.Peers(endpoints, dict(self._mm_regions), dict(self._kv_regions), restarted or [])

    def _await_hellos(self) -> list[m.Hello]:
        deadline = time.monotonic() + self.config.worker_start_timeout_s
        hellos: dict[str, m.Hello] = {}
        while len(hellos) < len(self._workers):
            for w in self._workers.values():
                if w.proc.poll() is not None:
                    raise EpdrtError(
                        f"worker {w.name} exited with code {w.proc.returncode} while starting:\n"
                        f"{w.log_tail()}"
                    )
            if time.monotonic() > deadline:
                missing = sorted(set(self._workers) - set(hellos))
                raise EpdrtError(
                    f"workers {missing} did not start within {self.config.worker_start_timeout_s} s"
                )
            got = self._channel.recv(0.1)
            if got is not None and isinstance(got[0], m.Hello):
                hellos[got[0].worker] = got[0]
        return list(hellos.values())

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stops every worker (asking first, killing after ``timeout_s``) and cleans up."""
        if self._closing:
            return
        with self._locked():
            self._closing = True
            for w in self._workers.values():
                if w.starting:  # a restart under way holds nothing yet
                    w.proc.kill()
                elif w.alive and w.proc.poll() is None:
                    self._outbox.post(w.name, m.Shutdown())
        if self._receiver is not None:
            self._receiver.join(timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        for w in self._workers.values():
            try:
                w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait(timeout=timeout_s)
        with self._locked():
            for req_id in [*self._inflight, *self._queue]:
                self._resolve(req_id, "the cluster shut down", "unavailable")
        self._outbox.close(timeout_s)
        self._channel.close()
        shutil.rmtree(self._run_dir, ignore_errors=True)

    # ---- requests --------------------------------------------------------------------------
    def generate(self, requests: Iterable[Request]) -> list[RequestResult]:
        """Submits every request and waits for all of them (results in request order)."""
        futures = [self.submit(r) for r in requests]
        return [f.result() for f in futures]

    def submit(
        self, request: Request, on_token: Callable[[str, int], None] | None = None
    ) -> Future:
        """Queues one request; the future resolves to a RequestResult (never raises).

        Requests enter the workers within the admission budget (``max_inflight_requests``,
        ``max_inflight_tokens``), in submission order; beyond it they wait in the router's
        queue, and beyond ``max_queued_requests`` waiting they are rejected at once.
        ``future.cancel()`` (or ``abort``) frees what the request holds in every worker.

        ``on_token(request_id, token_id)`` streams each generated token as it arrives (called
        on the cluster's receiver thread, not under its lock: keep it short).
        """
        future: Future = Future()
        submitted = time.monotonic()
        try:
            prepared = self.pre.prepare(request)
        except RequestError as exc:
            future.set_result(_failed(request.id, str(exc), "invalid"))
            return future
        deadline = submitted + self.config.request_timeout_s
        if not request.sampling.greedy and request.sampling.seed is None:
            # Every draw is seeded by (seed, token index): the same in every mode and batch.
            request.sampling = msgspec.structs.replace(request.sampling, seed=secrets.randbits(63))
        state = _Inflight(request, prepared, future, submitted, deadline, on_token)
        with self._locked():
            error, kind = None, "invalid"
            if self._closing:
                error, kind = "the cluster is shut down", "unavailable"
            elif request.id in self._inflight or request.id in self._queue:
                error = "a request with this id is in flight"
            elif not self._queue and self._has_room(state) and self._admit(state):
                pass
            elif len(self._queue) >= self.config.max_queued_requests:
                error = (
                    f"the router's queue is full ({len(self._queue)} requests wait for"
                    f" {len(self._inflight)} in flight): retry later"
                )
                kind = "overloaded"
            else:
                self._queue[request.id] = state
            if error is not None:
                self._settle(state, _failed(request.id, error, kind))
                return future
        future.add_done_callback(lambda f: f.cancelled() and self.abort(request.id))
        return future

    def abort(self, request_id: str) -> bool:
        """Fails a queued or running request ("aborted") and frees what it holds in every
        worker; False when no such request is held."""
        with self._locked():
            if request_id not in self._inflight and request_id not in self._queue:
                return False
            self._fail(request_id, "aborted", "aborted")
            return True

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Holds the router's lock; then, let go, runs what was queued in ``_after``."""
        with self._lock:
            try:
                yield
            finally:
                after, self._after = self._after, []
        for action in after:
            action()

    @staticmethod
    def tokens_of(state: _Inflight) -> int:
        """What a request counts against ``max_inflight_tokens``: prompt + output tokens."""
        return len(state.prepared.input_ids) + state.request.max_new_tokens

    def _has_room(self, state: _Inflight) -> bool:
        cfg = self.config
        if len(self._inflight) >= cfg.max_inflight_requests:
            return False
        return not self._inflight or (
            self._inflight_tokens + self.tokens_of(state) <= cfg.max_inflight_tokens
        )

    def _admit(self, state: _Inflight) -> bool:
        """Routes an admitted request and queues its messages (under the lock); False when it
        must wait (a role it needs has no live worker, but one is being restarted)."""
        req_id = state.request.id
        try:
            prefill, decode, encoders, state.loads = self._route(state.prepared)
        except _Restarting:
            return False
        except EpdrtError as exc:
            self._settle(state, _failed(req_id, str(exc), "unavailable"))
            return True
        self._inflight[req_id] = state
        self._inflight_tokens += self.tokens_of(state)
        state.route = (prefill, decode, encoders)
        self._dispatch(state.request, state.prepared, prefill, decode, encoders)
        return True

    def _admit_queued(self) -> None:
        while self._queue and not self._closing:
            state = next(iter(self._queue.values()))
            if not self._has_room(state):
                return
            del self._queue[state.request.id]
            if not self._admit(state):  # back at the head: it waits for a restart
                self._queue[state.request.id] = state
                self._queue.move_to_end(state.request.id, last=False)
                return

    def _unreachable(self, req_id: str) -> Callable[[ChannelError], None]:
        """A send failure handler: fails ``req_id`` (called on a sender thread)."""

        def fail(exc: ChannelError) -> None:
            with self._locked():
                self._fail(req_id, f"could not reach a worker: {exc}")

        return fail

    def _live(self, role: str) -> list[_Worker]:
        return [w for w in self._workers.values() if w.alive and role in w.roles]

    def _wait_for_restart(self, role: str) -> None:
        """Raises _Restarting when a worker of ``role`` is dead but coming back."""
        for w in self._workers.values():
            if role in w.roles and (w.starting or w.restart_at is not None):
                raise _Restarting(role)

    def _route(self, prepared) -> tuple[str, str, dict[bytes, str], dict[str, int]]:
        """Picks the workers of a request and adds its load to them."""
        prefills, decodes = self._live("prefill"), self._live("decode")
        if not prefills or not decodes:
            self._wait_for_restart("prefill" if not prefills else "decode")
            raise EpdrtError("no live prefill or decode worker")
        prefill = min(prefills, key=lambda w: w.load)
        decode = prefill if self.config.mode == "aggregated" else min(decodes, key=lambda w: w.load)
        encoders: dict[bytes, str] = {}
        for image in prepared.images:
            if self.config.mode != "epd":
                encoders[image.key] = prefill.name  # encode runs with prefill
                continue
            home = self._key_home.get(image.key)
            if home is None or not self._workers[home].alive:
                live = self._live("encode")
                if not live:
                    self._wait_for_restart("encode")
                    raise EpdrtError("no live encode worker")
                # Least loaded, counting this request's images already placed: a request's
                # images spread across encoders.
                placed = list(encoders.values())
                home = min(live, key=lambda w: w.load + placed.count(w.name)).name
            encoders[image.key] = home
            self._key_home[image.key] = home
            self._key_home.move_to_end(image.key)
            if len(self._key_home) > KEY_HOMES:
                self._key_home.popitem(last=False)
        loads = {prefill.name: 1, decode.name: 1}
        for name in encoders.values():
            loads[name] = loads.get(name, 0) + 1
        for name, amount in loads.items():
            self._workers[name].load += amount
        return prefill.name, decode.name, encoders, loads

    def _dispatch(self, request, prepared, prefill, decode, encoders, first_index=0) -> None:
        """Queues the images for their encoders first (encoding starts at once), then the
        request for its prefill worker (``first_index``: tokens it already generated, at the
        end of ``prepared.input_ids``)."""
        per_encoder: dict[str, list] = {}
        for image in prepared.images:
            if image.key in {i.key for i in per_encoder.get(encoders[image.key], [])}:
                continue  # the same image twice in one request is encoded once
            per_encoder.setdefault(encoders[image.key], []).append(image)
        for name, images in per_encoder.items():
            items, tensors = [], []
            for image in images:
                entries, frames = m.named_entries(image.tensors)
                items.append(m.EncodeItem(image.key, image.num_tokens, entries))
                tensors += frames
            msg = m.EncodeImages(request.id, items)
            self._outbox.post(name, msg, tensors, self._unreachable(request.id))
        slots = [
            m.ImageSlot(i.key, i.num_tokens, i.start, encoders[i.key]) for i in prepared.images
        ]
        entries, frames = m.named_entries(prepared.extras)
        msg = m.PrefillRequest(
            request.id,
            prepared.input_ids,
            slots,
            request.max_new_tokens,
            decode,
            entries,
            request.sampling,
            first_index,
        )
        self._outbox.post(prefill, msg, frames, self._unreachable(request.id))

    # ---- receiving -------------------------------------------------------------------------
    def _receive_loop(self) -> None:
        stats_expected = None
        while True:
            try:
                got = self._channel.recv(POLL_S)
            except EpdrtError as exc:  # a malformed message: drop it, keep serving
                print(f"epdrt cluster: dropped a message: {exc}", file=sys.stderr)
                got = None
            with self._locked():
                if got is not None:
                    self._on_message(got[0])
                self._check_workers()
                self._check_restarts()
                self._check_deadlines()
                if self._closing:
                    live = [w for w in self._workers.values() if w.alive and w.proc.poll() is None]
                    if stats_expected is None:
                        stats_expected = time.monotonic() + 10.0
                    if not any(not w.stats for w in live) or time.monotonic() > stats_expected:
                        return

    def _on_message(self, msg: object) -> None:
        self._received[type(msg).__name__] += 1
        if isinstance(msg, m.Tokens):
            now = time.monotonic()
            for req_id, seconds in msg.encode_s.items():
                if req_id in self._inflight:
                    self._inflight[req_id].encode_s += seconds
            for ev in msg.events:
                state = self._inflight.get(ev.req_id)
                if state is not None:
                    state.early[ev.index] = (ev.token, ev.finished)
                    self._deliver(ev.req_id, state, now)
        elif isinstance(msg, m.Failed):
            self._fail(msg.req_id, msg.error)
        elif isinstance(msg, m.Preempted):
            state = self._inflight.get(msg.req_id)
            if state is not None:
                state.resume_at = msg.generated
                self._resume_if_ready(msg.req_id, state)
        elif isinstance(msg, m.Hello):
            self._restarted(msg)
        elif isinstance(msg, m.Stats):
            worker = self._workers[msg.worker]
            worker.live = dict(msg.counters)
            if msg.final:
                worker.stats = worker.live

    def _deliver(self, req_id: str, state: _Inflight, now: float) -> None:
        """Appends (and streams) the request's tokens that are next in order; resolves the
        request after its last."""
        while len(state.tokens) in state.early:
            token, finished = state.early.pop(len(state.tokens))
            state.tokens.append(token)
            state.first_token_at = state.first_token_at or now
            state.last_token_at = now
            if state.on_token is not None:
                self._after.append(lambda s=state, t=token: self._stream(req_id, s, t))
            if state.request.stop and self._stop_string_seen(state):
                self._fail_or_stop(req_id, state, None)
                return
            if finished:
                self._resolve(req_id, None)
                return
        self._resume_if_ready(req_id, state)

    def _resume_if_ready(self, req_id: str, state: _Inflight) -> None:
        """Prefills a preempted request again, prompt plus the tokens it generated, once all
        of them are here (its first came from the prefill worker, on another socket), on the
        workers it was routed to (its images are in their caches, most likely)."""
        if state.resume_at is None or len(state.tokens) < state.resume_at:
            return
        state.resume_at = None
        prompt = state.prepared
        resumed = dataclasses.replace(prompt, input_ids=prompt.input_ids + state.tokens)
        prefill, decode, encoders = state.route
        self._dispatch(state.request, resumed, prefill, decode, encoders, len(state.tokens))

    def _stop_string_seen(self, state: _Inflight) -> bool:
        """Whether the text so far holds one of the request's stop strings; if so, the text
        is cut before the first (``state.text``). NOTE: decodes the whole text at each token
        (quadratic in the output; incremental detokenization comes with the HTTP server)."""
        text = self.pre.decode(state.tokens)
        cuts = [i for i in (text.find(s) for s in state.request.stop) if i >= 0]
        if not cuts:
            return False
        state.text = text[: min(cuts)]
        return True

    @staticmethod
    def _stream(req_id: str, state: _Inflight, token: int) -> None:
        """Calls the request's ``on_token`` (off the lock); one that raises is dropped."""
        if state.on_token is None:
            return
        try:
            state.on_token(req_id, token)
        except Exception as exc:  # a faulty callback must not stop the receiver
            print(f"epdrt cluster: on_token raised {exc!r}", file=sys.stderr)
            state.on_token = None

    def _check_workers(self) -> None:
        for w in self._workers.values():
            if not (w.alive or w.starting) or w.proc.poll() is None:
                continue
            was_alive, w.alive, w.starting = w.alive, False, False
            if self._closing and w.proc.returncode == 0:
                continue
            roles = "+".join(sorted(w.roles))
            reason = f"worker {w.name} ({roles}) died with exit code {w.proc.returncode}"
            print(f"epdrt cluster: {reason}", file=sys.stderr)
            if was_alive:
                for req_id in [r for r, s in self._inflight.items() if w.name in s.loads]:
                    self._fail(req_id, reason)
            if not self._closing and w.restarts < self.config.max_worker_restarts:
                delay = self.config.restart_backoff_s * 2**w.restarts
                w.restart_at = time.monotonic() + delay

    def _check_restarts(self) -> None:
        """Starts again the dead workers whose back-off has passed; each comes back once its
        Hello is here (``_restarted``)."""
        now = time.monotonic()
        for w in self._workers.values():
            if w.restart_at is None or now < w.restart_at or self._closing:
                continue
            w.restart_at = None
            w.restarts += 1
            self._channel.reconnect(w.name, self._endpoint(w.name))  # drop what was queued
            w.proc = _spawn(w.argv, w.log_path, self._worker_env(), append=True)
            w.starting = True
            print(f"epdrt cluster: restarting worker {w.name} ({w.restarts} of"
                  f" {self.config.max_worker_restarts})", file=sys.stderr)  # fmt: skip

    def _restarted(self, hello: m.Hello) -> None:
        """A restarted worker is ready: it gets every peer, every other worker its new
        regions, and it takes requests again."""
        w = self._workers.get(hello.worker)
        if w is None or not w.starting or hello.pid != w.proc.pid:
            return
        self._note_regions(hello)
        w.starting, w.alive, w.stats, w.live = False, True, {}, {}
        for name, other in self._workers.items():
            if other.alive:
                restarted = [] if name == w.name else [w.name]
                self._outbox.post(name, self._peers(restarted))
        self._admit_queued()

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        limit = self.config.request_timeout_s
        for req_id in [r for r, s in self._queue.items() if now > s.deadline]:
            self._fail(
                req_id, f"timed out after {limit} s waiting in the router's queue", "timeout"
            )
        for req_id in [r for r, s in self._inflight.items() if now > s.deadline]:
            tokens = len(self._inflight[req_id].tokens)
            where = f"after {tokens} tokens" if tokens else "before its first token"
            self._fail(req_id, f"timed out after {limit} s, {where}", "timeout")

    def _fail(self, req_id: str, error: str, kind: str = "failed") -> None:
        """Fails a request and tells the live workers it touched to free what it holds."""
        state = self._inflight.get(req_id) or self._queue.get(req_id)
        if state is not None:
            self._fail_or_stop(req_id, state, error, kind)

    def _fail_or_stop(
        self, req_id: str, state: _Inflight, error: str | None, kind: str = "failed"
    ) -> None:
        """Ends a request before its workers do (failed, or a stop string seen): they are told
        to free what it holds."""
        for name in state.loads:
            if self._workers[name].alive:
                self._outbox.post(name, m.Abort(req_id))
        self._resolve(req_id, error, kind)

    def _resolve(self, req_id: str, error: str | None, kind: str = "failed") -> None:
        """Ends a request held here (queued or in flight) with its result; admits what the
        budget now has room for."""
        state = self._queue.pop(req_id, None)
        if state is None:
            state = self._inflight.pop(req_id)
            self._inflight_tokens -= self.tokens_of(state)
            for name, amount in state.loads.items():
                self._workers[name].load -= amount
            self._admit_queued()  # routed by the loads without this request's
        ttft = None if state.first_token_at is None else state.first_token_at - state.submitted
        tpot = None
        if state.last_token_at is not None and len(state.tokens) > 1:
            tpot = (state.last_token_at - state.first_token_at) / (len(state.tokens) - 1)
        e2e = None if state.last_token_at is None else state.last_token_at - state.submitted
        if error is not None:
            text = ""
        elif state.text is not None:  # cut at a stop string
            text = state.text
        else:
            text = self.pre.decode(state.tokens)
        self._settle(
            state,
            RequestResult(state.request.id, state.tokens if error is None else [], text, ttft,
                          tpot, state.encode_s, e2e, error, None if error is None else kind,
                          len(state.prepared.input_ids)),
        )  # fmt: skip

    def _settle(self, state: _Inflight, result: RequestResult) -> None:
        """Resolves the request's future once the lock is let go (unless it was cancelled)."""

        def settle() -> None:
            if not state.future.cancelled():
                state.future.set_result(result)

        self._after.append(settle)

    # ---- introspection ---------------------------------------------------------------------
    def worker_stats(self) -> dict[str, dict[str, float]]:
        """Counters each worker reported at shutdown (empty while running)."""
        return {name: dict(w.stats) for name, w in self._workers.items()}

    def live_stats(self) -> dict[str, dict[str, float]]:
        """Each worker's latest report while running (``EPDConfig.stats_interval_s``): its
        counters, blocks in use and peak memory."""
        with self._locked():
            return {name: dict(w.live) for name, w in self._workers.items()}

    def load(self) -> dict[str, object]:
        """Requests waiting in the router's queue and in flight, each worker's load (requests,
        or images for an encoder), whether it is alive and how often it was restarted."""
        with self._locked():
            return {
                "queued": len(self._queue),
                "inflight": len(self._inflight),
                "workers": {
                    n: {
                        "roles": sorted(w.roles),
                        "load": w.load,
                        "alive": w.alive,
                        "restarts": w.restarts,
                    }
                    for n, w in self._workers.items()
                },
            }

    def messages_received(self) -> dict[str, int]:
        """Messages the router has taken in from the workers so far, by type (``Tokens``:
        one per request's first token, one per decode step of each decode worker)."""
        with self._locked():
            return dict(self._received)

    def worker_pids(self) -> dict[str, int]:
        return {name: w.proc.pid for name, w in self._workers.items()}

    def worker_devices(self) -> dict[str, str]:
        """The device each worker runs on ("cpu", "cuda:0", ...)."""
        return {name: w.device for name, w in self._workers.items()}


class _Restarting(EpdrtError):
    """Every worker of a role a request needs is dead, and one is being restarted."""


def _spawn(
    argv: list[str], log_path: Path, env: dict[str, str] | None, *, append: bool = False
) -> subprocess.Popen:
    """Starts a worker process, its output into ``log_path`` (``env``: None, this one's)."""
    with open(log_path, "ab" if append else "wb") as log:
        return subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )


def _failed(req_id: str, error: str, kind: str) -> RequestResult:
    return RequestResult(req_id, [], "", None, None, 0.0, None, error, kind)
