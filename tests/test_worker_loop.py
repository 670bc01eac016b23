# SPDX-License-Identifier: Apache-2.0
"""The worker loop's message intake: what arrives while one role steps reaches the next role
before its step (a pd worker prefills a request right after encoding its images, even when
the prefill half of the request arrived during the encode)."""

import os
from collections import deque
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from epdrt.runtime import messages as m
from epdrt.runtime.mm_claims import IllegalTransition
from epdrt.runtime.wire import TensorMeta, WireError
from epdrt.runtime.worker import (
    COPY_WAIT_S,
    IDLE_POLL_S,
    MAX_MESSAGES_PER_STEP,
    PendingCopy,
    Worker,
)


@dataclass
class Note:
    """A message for one role."""

    role: str
    tag: str


class ScriptedChannel:
    """recv() hands out what has been queued, never blocking; logs each timeout it is given
    and runs ``on_recv`` (what happens while the worker polls) before answering."""

    def __init__(self, *msgs: object) -> None:
        self.queue = deque((msg, []) for msg in msgs)
        self.timeouts: list[float] = []
        self.on_recv = None

    def recv(self, timeout_s: float):
        self.timeouts.append(timeout_s)
        if self.on_recv is not None:
            self.on_recv()
        return self.queue.popleft() if self.queue else None

    def push(self, msg: object) -> None:
        self.queue.append((msg, []))


class RecordingRole:
    """Logs what it handles and each step; ``during_step`` runs inside the step (arrivals)."""

    def __init__(self, name: str, log: list, during_step=None) -> None:
        self.name, self.log, self.during_step = name, log, during_step

    def handle(self, msg: object, frames: list) -> bool:
        if isinstance(msg, Note) and msg.role == self.name:
            self.log.append((self.name, "got", msg.tag))
            return True
        return False

    def step(self) -> bool:
        self.log.append((self.name, "step"))
        if self.during_step is not None:
            action, self.during_step = self.during_step, None
            action()
        return False

    def abort(self, req_id: str) -> None:
        pass


def make_worker(channel: ScriptedChannel, roles: list) -> tuple[Worker, list]:
    """A Worker with only what its loop touches: channel, roles, outbox, sends recorded."""
    w = Worker.__new__(Worker)
    sent: list = []
    w.name = "ep0"
    w.channel = channel
    w.roles = roles
    w.outbox = []
    w.counters = {}
    w.mm = w.kv = None
    w.device = "cpu"
    w.spec = SimpleNamespace(parent_pid=os.getppid())
    w.config = SimpleNamespace(stats_interval_s=0)  # no live reports: sends are counted
    w.send = lambda peer, msg, tensors=None: sent.append((peer, msg))
    w._await_peers = lambda: []
    w.stats = lambda: {}
    return w, sent


def test_a_message_that_arrives_during_one_roles_step_reaches_the_next_role_first():
    log: list = []
    channel = ScriptedChannel(Note("encode", "r1"))
    # The request's prefill half lands while its images encode; shut down after prefill.
    encode = RecordingRole("encode", log, lambda: channel.push(Note("prefill", "r1")))
    prefill = RecordingRole("prefill", log, lambda: channel.push(m.Shutdown()))
    worker, sent = make_worker(channel, [encode, prefill])
    worker.run()
    assert log == [
        ("encode", "got", "r1"),
        ("encode", "step"),
        ("prefill", "got", "r1"),  # before its step: prefilled in the same round
        ("prefill", "step"),
    ]
    assert [type(msg) for _, msg in sent] == [m.Hello, m.Stats]


@pytest.mark.parametrize("waiting", [1, MAX_MESSAGES_PER_STEP, MAX_MESSAGES_PER_STEP + 5])
def test_intake_is_bounded_per_step_and_keeps_order(waiting):
    log: list = []
    channel = ScriptedChannel(*(Note("encode", str(i)) for i in range(waiting)), m.Shutdown())
    worker, _ = make_worker(channel, [RecordingRole("encode", log)])
    worker.run()
    got = [entry[2] for entry in log if entry[1] == "got"]
    assert got == [str(i) for i in range(waiting)]
    # At most MAX_MESSAGES_PER_STEP messages go in before each step.
    steps_before = [sum(1 for e in log[:i] if e[1] == "step") for i, e in enumerate(log)]
    per_step = [steps_before[i] for i, e in enumerate(log) if e[1] == "got"]
    assert max(per_step.count(k) for k in set(per_step)) <= MAX_MESSAGES_PER_STEP


class FakeCopy:
    """A copy in flight: done once waited on (``finishes``), else never; waits are logged."""

    def __init__(self, finishes: bool) -> None:
        self.finishes, self.finished, self.waits = finishes, False, []

    def done(self) -> bool:
        return self.finished

    def wait(self, timeout: float) -> None:
        self.waits.append(timeout)
        if not self.finishes:
            raise TimeoutError("still copying")
        self.finished = True

    @property
    def state(self) -> str:
        return "done" if self.finished else "pending"

    error = ""

    def release(self) -> None:
        pass


@pytest.mark.parametrize("finishes", [True, False])
def test_a_copy_about_to_finish_is_waited_for_before_the_next_step(finishes):
    log: list = []
    channel = ScriptedChannel()
    copy = FakeCopy(finishes)

    def hand_off() -> None:  # a step ends by starting a copy (a request's KV to decode)
        worker.outbox.append(PendingCopy(copy, lambda error: log.append(("copy done", error))))
        role.during_step = lambda: channel.push(m.Shutdown())  # after the next step

    role = RecordingRole("prefill", log, hand_off)
    worker, _ = make_worker(channel, [role])
    worker.run()
    assert copy.waits and max(copy.waits) <= COPY_WAIT_S  # bounded: never a step's length
    if finishes:  # its callback ran before the next step (the StartDecode goes out first)
        assert log == [("prefill", "step"), ("copy done", None), ("prefill", "step")]
    else:  # the next step went ahead; the callback waits for the copy
        assert log == [("prefill", "step"), ("prefill", "step")]


class BusyRole(RecordingRole):
    """A role with work left for ``steps`` steps; ``during_step`` runs in its first."""

    def __init__(self, log: list, steps: int, during_step=None) -> None:
        super().__init__("prefill", log, during_step)
        self.left = steps

    def step(self) -> bool:
        super().step()
        self.left -= 1
        return self.left > 0


def test_a_slow_copy_is_waited_for_once_not_before_every_step():
    log: list = []
    channel = ScriptedChannel()
    copy = FakeCopy(finishes=False)
    role = BusyRole(log, steps=5)
    role.during_step = lambda: worker.outbox.append(PendingCopy(copy, lambda error: None))
    worker, _ = make_worker(channel, [role])
    channel.on_recv = lambda: role.left == 0 and channel.push(m.Shutdown())
    worker.run()
    assert [e for e in log if e[1] == "step"] == [("prefill", "step")] * 5
    assert copy.waits == [pytest.approx(COPY_WAIT_S, abs=COPY_WAIT_S)]  # one wait, not four


def test_an_idle_worker_sleeps_in_its_poll_while_a_copy_is_in_flight():
    """No busy loop while a copy runs: the worker blocks in its poll (the engine's completion
    fd wakes it, here the scripted channel) and runs the copy's callback right after."""
    log: list = []
    channel = ScriptedChannel()
    copy = FakeCopy(finishes=False)
    role = BusyRole(log, steps=1)
    role.during_step = lambda: worker.outbox.append(
        PendingCopy(copy, lambda error: log.append(("copy done", error)))
    )
    worker, _ = make_worker(channel, [role])
    polls_in_flight: list[float] = []

    def poll() -> None:
        if log and not copy.finished:  # the copy is in flight: this poll ends when it does
            polls_in_flight.append(channel.timeouts[-1])
            copy.finished = True
        elif ("copy done", None) in log:
            channel.push(m.Shutdown())

    channel.on_recv = poll
    worker.run()
    assert polls_in_flight == [IDLE_POLL_S]  # blocked, once, not a 0 s spin
    assert log[:2] == [("prefill", "step"), ("copy done", None)]


def test_a_copy_ending_wakes_the_channels_poll():
    """The worker's real wiring: the engine's completion fd on the channel's poll."""
    import tempfile
    import time

    from epdrt.region import Region
    from epdrt.runtime.channel import Channel
    from epdrt.transfer.engine import TransferEngine

    engine = TransferEngine(num_threads=1)
    with tempfile.TemporaryDirectory(dir="/tmp") as run_dir:
        channel = Channel(f"ipc://{run_dir}/w")
        try:
            channel.watch(engine.completion_fd)
            nbytes = 64 << 20
            src, dst = Region.create(nbytes), Region.create(nbytes)
            t0 = time.monotonic()
            transfer = engine.submit([(src, 0, dst, 0, nbytes)])
            assert channel.recv(30.0) is None  # woken by the copy, no message
            assert time.monotonic() - t0 < 20.0
            transfer.wait(30.0)
            assert transfer.state == "done"
            assert channel.recv(0.0) is None  # the fd was reset: nothing pending
        finally:
            channel.close()


class GarbledChannel(ScriptedChannel):
    """Its first recv() meets a frame set that does not decode (Channel.recv raises)."""

    def recv(self, timeout_s: float):
        if not self.timeouts:
            self.timeouts.append(timeout_s)
            raise WireError("malformed control message: truncated")
        return super().recv(timeout_s)


class MalformedRole(RecordingRole):
    """Takes Notes tagged "bad" but finds their tensor frames malformed."""

    def handle(self, msg: object, frames: list) -> bool:
        if isinstance(msg, Note) and msg.tag == "bad":
            raise WireError("tensor frame has 3 bytes, needs 16")
        if isinstance(msg, Note) and msg.tag == "again":
            raise IllegalTransition("fetch in state sending")
        return super().handle(msg, frames)


def test_malformed_and_unknown_messages_are_counted_and_dropped():
    log: list = []
    channel = GarbledChannel(
        m.KVPulled("r0"),  # no role here takes it
        Note("encode", "bad"),
        Note("encode", "again"),  # a message the protocol does not allow now
        Note("encode", "good"),
        m.Shutdown(),
    )
    worker, sent = make_worker(channel, [MalformedRole("encode", log)])
    worker.run()
    assert ("encode", "got", "good") in log
    assert worker.counters["messages_dropped"] == 4
    assert [type(msg) for _, msg in sent] == [m.Hello, m.Stats]


def test_a_missing_tensor_frame_is_a_wire_error():
    entry = m.NamedTensor("pixel_values", TensorMeta("float32", (2, 3)))
    with pytest.raises(WireError, match="no tensor frame for 'pixel_values'"):
        m.named_tensors([entry], [])
    with pytest.raises(WireError, match="24"):
        m.named_tensors([entry], [b"short"])
