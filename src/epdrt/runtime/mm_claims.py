# SPDX-License-Identifier: Apache-2.0
"""The MM hand-off between an encoder and a prefill worker, as two state machines per
(request, image): the encoder's ``Claim`` and the prefill's ``Want``.

Each side keeps one state per (request, image) and changes it only through ``advance``, which
raises ``IllegalTransition`` for a pair the protocol does not have. docs/architecture.md
(Stage runtime, Encode and Prefill) draws both tables and says who frees what.

Every ``FetchMM`` a prefill sends is answered by exactly one ``MMReady`` (success or error),
and a prefill frees blocks it asked an encoder to fill only after that answer: a late copy can
never land in blocks given to another image.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TypeVar


class IllegalTransition(RuntimeError):
    """A (state, event) pair the protocol does not allow: a bug, not a runtime condition."""


class Claim(enum.Enum):
    """Encoder side: one request's claim on one image."""

    NEW = "new"
    EARLY = "early"  #: its fetch came before the claim (another socket); no hold
    QUEUED = "queued"  #: to be encoded, no fetch yet; no hold
    READY = "ready"  #: cached and held for this claim, no fetch yet (the hold is preemptible)
    UNHELD = "unheld"  #: was ready; its hold was given up for a wanted image (look up again)
    WANTED = "wanted"  #: fetched, not cached: encoded before any image no one fetched yet
    SENDING = "sending"  #: copy into the prefill's blocks in flight; held until it ends
    DONE = "done"  #: answered (MMReady sent) or aborted; holds nothing


class ClaimEvent(enum.Enum):
    CLAIM = "claim"  #: EncodeImages named the image; it is not cached
    CLAIM_CACHED = "claim_cached"  #: EncodeImages named the image; it is cached (held now)
    FETCH = "fetch"  #: FetchMM with blocks; the image is not cached (or not held)
    FETCH_CACHED = "fetch_cached"  #: FetchMM with blocks; the image is cached and held
    RELEASE = "release"  #: FetchMM without blocks: the prefill has the image already
    ENCODED = "encoded"  #: the image was encoded and cached (held now)
    PREEMPT = "preempt"  #: its hold is given up to make room for a wanted image
    EVICTED = "evicted"  #: a local prefill asked for it and it was evicted meanwhile
    HAND_OVER = "hand_over"  #: a prefill role in the same worker takes over the hold
    COPIED = "copied"  #: the copy into the prefill's blocks ended (or failed)
    ABORT = "abort"  #: the request failed or was aborted


_C, _CE = Claim, ClaimEvent
CLAIM_TRANSITIONS: dict[tuple[Claim, ClaimEvent], Claim] = {
    (_C.NEW, _CE.CLAIM): _C.QUEUED,
    (_C.NEW, _CE.CLAIM_CACHED): _C.READY,
    (_C.NEW, _CE.FETCH): _C.EARLY,
    (_C.EARLY, _CE.CLAIM): _C.WANTED,
    (_C.EARLY, _CE.CLAIM_CACHED): _C.SENDING,
    (_C.EARLY, _CE.RELEASE): _C.DONE,
    (_C.EARLY, _CE.ABORT): _C.DONE,
    (_C.QUEUED, _CE.ENCODED): _C.READY,
    (_C.QUEUED, _CE.FETCH): _C.WANTED,
    (_C.QUEUED, _CE.RELEASE): _C.DONE,
    (_C.QUEUED, _CE.ABORT): _C.DONE,
    (_C.READY, _CE.FETCH_CACHED): _C.SENDING,
    (_C.READY, _CE.RELEASE): _C.DONE,
    (_C.READY, _CE.PREEMPT): _C.UNHELD,
    (_C.READY, _CE.HAND_OVER): _C.DONE,
    (_C.READY, _CE.ABORT): _C.DONE,
    (_C.UNHELD, _CE.FETCH_CACHED): _C.SENDING,
    (_C.UNHELD, _CE.FETCH): _C.WANTED,
    (_C.UNHELD, _CE.RELEASE): _C.DONE,
    (_C.UNHELD, _CE.HAND_OVER): _C.DONE,
    (_C.UNHELD, _CE.EVICTED): _C.QUEUED,
    (_C.UNHELD, _CE.ABORT): _C.DONE,
    (_C.WANTED, _CE.ENCODED): _C.SENDING,
    (_C.WANTED, _CE.ABORT): _C.DONE,
    (_C.SENDING, _CE.COPIED): _C.DONE,
    # The copy writes on into the prefill's blocks: the claim (and its hold) stays until it
    # ends, and the prefill learns the end from the MMReady sent then.
    (_C.SENDING, _CE.ABORT): _C.SENDING,
}


class Want(enum.Enum):
    """Prefill side: one request's need for one image."""

    NEW = "new"
    LOCAL = "local"  #: the encode role of this worker makes it (handed over in-process)
    RESERVED = "reserved"  #: blocks reserved here, the fetch not sent yet (admission)
    RECEIVING = "receiving"  #: blocks reserved, fetch sent: the encoder's copy may be writing
    AWAITING = "awaiting"  #: another want (maybe an orphan) of this worker receives the image
    ORPHAN = "orphan"  #: was receiving when the request went: blocks kept until the MMReady
    HELD = "held"  #: the image is committed here and this request holds it
    DONE = "done"  #: released, freed or handed on; holds nothing


class WantEvent(enum.Enum):
    LOCAL = "local"  #: admitted; the image comes from this worker's encode role
    HIT = "hit"  #: admitted; the image is cached here (held now)
    RESERVE = "reserve"  #: admitted; blocks reserved for it
    AWAIT = "await"  #: admitted; another want of this worker receives it
    FETCH_SENT = "fetch_sent"  #: the FetchMM for the reserved blocks went out
    READY = "ready"  #: MMReady without error (the blocks are committed)
    READY_ERROR = "ready_error"  #: MMReady with an error (or a digest mismatch)
    EXPIRED = "expired"  #: an orphan's MMReady did not come in time: its encoder is gone
    COMMITTED = "committed"  #: the want it awaited committed the image (held now)
    INHERIT = "inherit"  #: the want it awaited passed its reservation on (fetch sent)
    HANDED_OVER = "handed_over"  #: the local encode role handed its hold over
    PREFILLED = "prefilled"  #: the request was prefilled; its holds are released
    ABORT = "abort"  #: the request failed, was aborted, or did not fit (admission rollback)


_W, _WE = Want, WantEvent
WANT_TRANSITIONS: dict[tuple[Want, WantEvent], Want] = {
    (_W.NEW, _WE.LOCAL): _W.LOCAL,
    (_W.NEW, _WE.HIT): _W.HELD,
    (_W.NEW, _WE.RESERVE): _W.RESERVED,
    (_W.NEW, _WE.AWAIT): _W.AWAITING,
    (_W.NEW, _WE.ABORT): _W.DONE,
    (_W.LOCAL, _WE.HANDED_OVER): _W.HELD,
    (_W.LOCAL, _WE.ABORT): _W.DONE,
    (_W.RESERVED, _WE.FETCH_SENT): _W.RECEIVING,
    (_W.RESERVED, _WE.ABORT): _W.DONE,  # no fetch went out: nothing writes into the blocks
    (_W.RECEIVING, _WE.READY): _W.HELD,
    (_W.RECEIVING, _WE.READY_ERROR): _W.DONE,
    (_W.RECEIVING, _WE.ABORT): _W.ORPHAN,
    (_W.ORPHAN, _WE.READY): _W.DONE,
    (_W.ORPHAN, _WE.READY_ERROR): _W.DONE,
    (_W.ORPHAN, _WE.EXPIRED): _W.DONE,
    (_W.AWAITING, _WE.COMMITTED): _W.HELD,
    (_W.AWAITING, _WE.INHERIT): _W.RECEIVING,
    (_W.AWAITING, _WE.ABORT): _W.DONE,
    (_W.HELD, _WE.PREFILLED): _W.DONE,
    (_W.HELD, _WE.ABORT): _W.DONE,
}


S = TypeVar("S", Claim, Want)
E = TypeVar("E", ClaimEvent, WantEvent)


def advance(table: Mapping[tuple[S, E], S], state: S, event: E) -> S:
    """The state after ``event`` in ``state`` (``CLAIM_TRANSITIONS`` or ``WANT_TRANSITIONS``).

    Raises:
        IllegalTransition: the protocol has no such transition.
    """
    try:
        return table[(state, event)]
    except KeyError:
        raise IllegalTransition(f"{event.value} in state {state.value}") from None
