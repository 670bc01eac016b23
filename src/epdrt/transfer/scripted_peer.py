# SPDX-License-Identifier: Apache-2.0
"""A peer process driven by commands, for tests and the transfer benchmark.

Run ``python -m epdrt.transfer.scripted_peer --connect ADDRESS ...``: it registers one region
(``--name``, default "buf"; zero-filled), connects to the agent at ADDRESS and answers notices
from it:

- key ``cmd``: a msgspec-encoded :class:`Command` in ``data``;
- key ``ping``: writes the echo plan back (key ``pong``) - the benchmark's round trip;
- key ``bw``: counts; after ``Command.count`` of them notifies ``bw-done``, whose ``data`` is
  the ``time.monotonic_ns()`` (8 bytes, little-endian) at which the last one was received.

It exits when told to, or (status 3) as soon as the driver goes away.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import subprocess
import sys
import time

import msgspec
import numpy as np
import torch

from epdrt.errors import TransferError
from epdrt.region import Region
from epdrt.transfer.agent import Peer, TransferAgent
from epdrt.transfer.engine import TransferEngine


class Command(msgspec.Struct, frozen=True):
    """``op``: plan (set the echo plan and bw count), digest (blake2b of byte ranges of "buf",
    answered with key ``digest``), stream (write ``count`` transfers of the plan with keys
    ``s0``, ``s1``, ..., forever when ``count`` is 0), fill (set ranges to ``value``), exit."""

    op: str
    src_offsets: list[int] = []
    dst_offsets: list[int] = []
    sizes: list[int] = []
    count: int = 0
    value: int = 0


def encode(cmd: Command) -> bytes:
    return msgspec.msgpack.encode(cmd)


def digest(region: Region, offsets: list[int], sizes: list[int]) -> bytes:
    """blake2b of the bytes at ``offsets``/``sizes`` of a region, in that order."""
    h = hashlib.blake2b(digest_size=16)
    if region.device.is_cuda:
        flat = region.tensor(torch.uint8, (region.nbytes,))
        for off, n in zip(offsets, sizes):
            h.update(flat[off : off + n].cpu().numpy().tobytes())
        return h.digest()
    view = memoryview(region._handle)
    for off, n in zip(offsets, sizes):
        h.update(view[off : off + n])
    return h.digest()


def spawn(
    agent: TransferAgent,
    *,
    region_bytes: int,
    block_bytes: int = 0,
    transport: str = "auto",
    name: str = "buf",
    device: str = "cpu",
    threads: int = 0,
    listen: str | None = None,
    timeout: float = 60.0,
) -> tuple[subprocess.Popen, Peer]:
    """Starts a scripted peer that connects to ``agent``; returns the process and its Peer.

    Raises TimeoutError (after killing the child) when no handshake completes in ``timeout``
    seconds, TransferError when the child exits first.
    """
    cmd = [
        sys.executable, "-m", "epdrt.transfer.scripted_peer", "--connect", agent.address,
        "--transport", transport, "--name", name, "--region-bytes", str(region_bytes),
        "--block-bytes", str(block_bytes), "--device", device, "--threads", str(threads),
        "--timeout", str(timeout),
    ]  # fmt: skip
    if listen:
        cmd += ["--listen", listen]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=dict(os.environ))
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise TransferError(f"the scripted peer exited with status {proc.returncode}")
            try:
                return proc, agent.accept(min(0.5, max(0.0, deadline - time.monotonic())))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise
    except BaseException:
        proc.kill()
        proc.wait(timeout)
        raise


def stop(proc: subprocess.Popen, peer: Peer, timeout: float = 10.0) -> int:
    """Tells the peer to exit and reaps it (killing it after ``timeout``); its exit status."""
    if peer.alive:
        with contextlib.suppress(TransferError):
            peer.notify("cmd", data=encode(Command(op="exit")))
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connect", required=True, help="address of the driving agent")
    parser.add_argument("--transport", default="auto")
    parser.add_argument("--listen", default=None, help="own address (default: ipc abstract)")
    parser.add_argument("--name", default="buf", help="name of the region")
    parser.add_argument("--region-bytes", type=int, required=True)
    parser.add_argument("--block-bytes", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)

    region = Region.create(args.region_bytes, args.device)
    with TransferAgent(
        address=args.listen, engine=TransferEngine(args.threads), timeout=args.timeout
    ) as agent:
        agent.register(args.name, region, block_nbytes=args.block_bytes)
        buf = args.name
        peer = agent.connect(args.connect, transport=args.transport)
        plan = Command(op="plan")
        seen = 0
        try:
            while True:
                notice = peer.recv(None, timeout=args.timeout)
                received_ns = time.monotonic_ns()  # CLOCK_MONOTONIC: shared by the host
                if notice.key == "ping":
                    peer.write("pong", buf, buf, plan.src_offsets, plan.dst_offsets,
                               plan.sizes).wait()  # fmt: skip
                elif notice.key == "bw":
                    seen += 1
                    if seen == plan.count:
                        seen = 0
                        peer.notify("bw-done", data=received_ns.to_bytes(8, "little"))
                elif notice.key == "cmd":
                    cmd = msgspec.msgpack.decode(notice.data, type=Command)
                    if cmd.op == "exit":
                        return 0
                    if cmd.op == "plan":
                        plan, seen = cmd, 0
                    elif cmd.op == "digest":
                        peer.notify("digest", data=digest(region, cmd.dst_offsets, cmd.sizes))
                    elif cmd.op == "fill":
                        flat = region.tensor(torch.uint8, (region.nbytes,))
                        for off, n in zip(cmd.dst_offsets, cmd.sizes):
                            flat[off : off + n] = cmd.value
                        peer.notify("filled")
                    elif cmd.op == "stream":
                        i = 0
                        while cmd.count == 0 or i < cmd.count:
                            so = np.asarray(cmd.src_offsets)
                            peer.write(f"s{i}", buf, buf, so, cmd.dst_offsets,
                                       cmd.sizes).wait()  # fmt: skip
                            i += 1
        except (TransferError, TimeoutError) as exc:
            print(f"scripted peer: {exc}", file=sys.stderr)
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
