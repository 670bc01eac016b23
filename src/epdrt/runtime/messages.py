# SPDX-License-Identifier: Apache-2.0
"""Control messages between the cluster (router) and the stage workers.

Every message is a tagged ``msgspec`` struct; tensors ride as raw frames after it, named by
``NamedTensor`` entries in the struct (see wire.py). Request ids are cluster-unique strings.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
import torch

from epdrt.runtime.sampling import GREEDY, SamplingParams
from epdrt.runtime.wire import Codec, TensorMeta, WireError, tensor_from_frame, tensor_meta


class NamedTensor(msgspec.Struct, frozen=True):
    """A model-specific tensor (e.g. ``pixel_values``) sent as the next raw frame."""

    name: str
    meta: TensorMeta


def named_entries(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[list[NamedTensor], list[torch.Tensor]]:
    """``tensors`` as a message's entries and the tensors to send after it, in one order
    (``named_tensors`` reads them back)."""
    names = list(tensors)
    return [NamedTensor(n, tensor_meta(tensors[n])) for n in names], [tensors[n] for n in names]


def named_tensors(entries: list[NamedTensor], frames: list[bytes]) -> dict[str, torch.Tensor]:
    """Decodes ``entries`` from the next ``len(entries)`` frames (consumed from the front).

    Raises:
        WireError: a frame is missing or does not match its entry.
    """
    out = {}
    for entry in entries:
        if not frames:
            raise WireError(f"no tensor frame for {entry.name!r}")
        out[entry.name] = tensor_from_frame(entry.meta, frames.pop(0))
    return out


class Msg(msgspec.Struct, tag=True, frozen=True):
    """Base of every control message."""


# ---- start-up --------------------------------------------------------------------------------
class Hello(Msg):
    """Worker -> cluster once its model and caches are ready: region descriptors to share."""

    worker: str
    pid: int
    mm_region: bytes | None
    kv_region: bytes | None
    device: str


class Peers(Msg):
    """Cluster -> worker: every worker's endpoint and regions. First the handshake; later an
    update after ``restarted`` workers came back (new processes, new regions): a worker drops
    what it sent them before (their connections are made anew) and opens their new regions."""

    endpoints: dict[str, str]
    mm_regions: dict[str, bytes]
    kv_regions: dict[str, bytes]
    restarted: list[str] = []


class Shutdown(Msg):
    """Cluster -> worker: finish nothing more, report stats, exit."""


# ---- encode ----------------------------------------------------------------------------------
class EncodeItem(msgspec.Struct, frozen=True):
    """One image to encode: its content key, expected token count and input tensors."""

    key: bytes
    num_tokens: int
    tensors: list[NamedTensor]


class EncodeImages(Msg):
    """Cluster -> encoder: images of one request (tensor frames follow, in item order)."""

    req_id: str
    items: list[EncodeItem]


class FetchMM(Msg):
    """Prefill -> encoder: copy ``key``'s tokens into ``blocks`` of my MM cache, then tell me."""

    req_id: str
    key: bytes
    dst: str
    blocks: list[int]


class MMReady(Msg):
    """Encoder -> prefill: ``key``'s tokens are in the blocks you asked for (or an error)."""

    req_id: str
    key: bytes
    encode_s: float
    error: str | None = None
    #: ``integrity.content_digest`` of the tokens sent (``EPDConfig.verify_transfers``)
    digest: int | None = None


# ---- prefill ---------------------------------------------------------------------------------
class ImageSlot(msgspec.Struct, frozen=True):
    """Where one image's tokens go in the prompt, and which encoder makes them."""

    key: bytes
    num_tokens: int
    start: int
    encoder: str


class PrefillRequest(Msg):
    """Cluster -> prefill worker: a tokenized request (model extras as tensor frames)."""

    req_id: str
    input_ids: list[int]
    images: list[ImageSlot]
    max_new_tokens: int
    decoder: str
    extras: list[NamedTensor]
    sampling: SamplingParams = GREEDY
    #: Tokens the request had already generated: ``input_ids`` ends with them (it is resumed
    #: after a preemption) and the token this prefill produces has this index.
    first_index: int = 0


class KVReserve(Msg):
    """Prefill -> decode (``kv_handoff="layerwise"``): a sequence of ``num_tokens`` prompt
    tokens starts prefilling at ``src``. The decoder admits it as it would a ``KVReady``
    (room, a running slot) and answers with the blocks reserved for it (``KVDest``)."""

    req_id: str
    src: str
    num_tokens: int


class KVDest(Msg):
    """Decode -> prefill: push the sequence's KV into these blocks of my cache (in order).
    The prefill worker answers every ``KVDest`` with ``KVReady(pushed=True)`` once the last
    byte has landed, or with ``KVPushEnded`` (aborted, failed): after either, nothing more
    is written into the blocks."""

    req_id: str
    src: str
    blocks: list[int]


class KVPushEnded(Msg):
    """Prefill -> decode: no more bytes will be written into the blocks of a ``KVDest``, and
    the sequence will not come: it failed (``error``: aborted, a failed copy) or finished at
    its first token (None). The decoder frees the blocks; the cluster learns the outcome from
    the prefill worker or its own abort, never from the decoder."""

    req_id: str
    error: str | None


class KVReady(Msg):
    """Prefill -> decode: a prefilled sequence's KV waits in ``blocks`` of the sender's KV
    cache. The decoder admits it when it has room for ``num_tokens`` and a running slot
    (back-pressure), copies the blocks into its own cache itself, and continues from
    ``first_token`` (model extras as tensor frames): the sender's loop takes no part, so a
    hand-off never waits for the sender's next batch. With ``pushed`` the KV is already in
    the blocks the decoder gave (``KVDest``) and nothing is copied."""

    req_id: str
    src: str
    blocks: list[int]
    num_tokens: int
    first_token: int
    max_new_tokens: int
    extras: list[NamedTensor]
    #: ``integrity.content_digest`` of the KV ``[L, 2, num_tokens, H, D]`` staged
    #: (``EPDConfig.verify_transfers``)
    digest: int | None = None
    sampling: SamplingParams = GREEDY
    #: the index of ``first_token`` (``PrefillRequest.first_index``)
    first_index: int = 0
    pushed: bool = False
    #: ``time.monotonic()`` on the sender when the prefill's forward ended (one host's
    #: clock: the decoder counts the hand-off's seconds from it, ``kv_handoff_seconds``).
    prefilled_at: float = 0.0


class KVPulled(Msg):
    """Decode -> prefill: the sequence's KV has been copied out; its blocks can go."""

    req_id: str


# ---- results and faults ----------------------------------------------------------------------
class TokenEvent(msgspec.Struct, frozen=True):
    """One generated token of a request: the ``index``-th (0: prefill's), ``finished`` on its
    last. Prefill and decode send on different sockets, so the cluster orders by index."""

    req_id: str
    index: int
    token: int
    finished: bool


class Tokens(Msg):
    """Worker -> cluster: tokens produced in one step (the first token comes from prefill)."""

    events: list[TokenEvent]
    encode_s: dict[str, float] = {}


class Failed(Msg):
    """Worker -> cluster: a request failed here; its resources on this worker are freed."""

    req_id: str
    error: str


class Preempted(Msg):
    """Decode worker -> cluster: a running sequence was evicted to make room in the KV cache
    (its blocks are freed here) after its first ``generated`` tokens, all of them sent. The
    cluster prefills it again, prompt plus those tokens, and it goes on (recompute)."""

    req_id: str
    generated: int


class Abort(Msg):
    """Cluster -> workers: forget a request (it failed elsewhere); free what it holds."""

    req_id: str


#: Prefix of the ``Stats`` counters of bytes copied per link, counted by the worker that
#: copies: ``link_bytes/<kv|mm>/<source worker>/<destination worker>``.
LINK_BYTES = "link_bytes/"
#: ... and of the copies per link and path (``Transfer.path``: how the bytes moved):
#: ``link_copies/<kv|mm>/<source worker>/<destination worker>/<path>``.
LINK_COPIES = "link_copies/"


class Stats(Msg):
    """Worker -> cluster: counters, cache use, queue depths and peak memory, every
    ``EPDConfig.stats_interval_s`` while running and once more (``final``) on shutdown."""

    worker: str
    counters: dict[str, float]
    final: bool = True


Message = (
    Hello | Peers | Shutdown | EncodeImages | FetchMM | MMReady | PrefillRequest | KVReserve
    | KVDest | KVPushEnded | KVReady | KVPulled | Tokens | Failed | Preempted | Abort | Stats
)  # fmt: skip

CODEC = Codec(Message)
