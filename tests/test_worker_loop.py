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
from epdrt.runtime.worker import MAX_MESSAGES_PER_STEP, Worker


@dataclass
class Note:
    """A message for one role."""

    role: str
    tag: str


class ScriptedChannel:
    """recv() hands out what has been queued, never blocking."""

    def __init__(self, *msgs: object) -> None:
        self.queue = deque((msg, []) for msg in msgs)

    def recv(self, timeout_s: float):
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
    from epdrt.runtime.worker import COPY_WAIT_S

    log: list = []
    channel = ScriptedChannel()
    copy = FakeCopy(finishes)

    def hand_off() -> None:  # a step ends by starting a copy (a request's KV to decode)
        worker.outbox.append((copy, lambda error: log.append(("copy done", error))))
        role.during_step = lambda: channel.push(m.Shutdown())  # after the next step

    role = RecordingRole("prefill", log, hand_off)
    worker, _ = make_worker(channel, [role])
    worker.run()
    assert copy.waits and max(copy.waits) <= COPY_WAIT_S  # bounded: never a step's length
    if finishes:  # its callback ran before the next step (the StartDecode goes out first)
        assert log == [("prefill", "step"), ("copy done", None), ("prefill", "step")]
    else:  # the next step went ahead; the callback waits for the copy
        assert log == [("prefill", "step"), ("prefill", "step")]
