# SPDX-License-Identifier: Apache-2.0
"""Incremental detokenization for streamed answers.

Each new token yields the text it adds, never half of a multi-byte character: the tokens since
the last complete text are decoded together, and a decoding that ends in U+FFFD (an incomplete
UTF-8 sequence) waits for the next token. With stop strings, the last ``longest stop - 1``
characters are held back until the answer ends, and nothing from a stop string on is given
out, so no streamed text ever runs past where a stop string cuts it. The final piece comes
from the full answer the cluster returns, so the pieces always add up to it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

#: How many tokens before the unread ones are decoded with them (a tokenizer may render a
#: token differently at the start of a text, e.g. without its leading space).
CONTEXT_TOKENS = 5


class IncrementalText:
    """The text of a growing token sequence, one piece per token.

    ``decode`` turns token ids into text (the same call the cluster makes for the final
    answer, special tokens skipped).
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._tokens: list[int] = []
        self._prefix = 0  # first token of the decoding window
        self._read = 0  # tokens whose text has been produced
        self._text = ""  # text produced so far (held back or not)
        self._sent = 0  # characters of it handed out
        self._stop = list(stop)
        self._hold = max((len(s) for s in stop), default=1) - 1

    def add(self, token: int) -> str:
        """Appends ``token``; returns the text that may be sent now (maybe empty)."""
        self._tokens.append(token)
        window = self._tokens[self._prefix :]
        new = self._decode(window)
        if new.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next token
        known = self._decode(self._tokens[self._prefix : self._read])
        self._text += new[len(known) :]
        self._read = len(self._tokens)
        self._prefix = max(0, self._read - CONTEXT_TOKENS)
        ready = max(self._sent, len(self._text) - self._hold)
        for stop in self._stop:  # the token that completes a stop string is streamed too
            at = self._text.find(stop)
            if at >= 0:
                ready = min(ready, at)
        piece = self._text[self._sent : ready]
        self._sent = ready
        return piece

    def finish(self, final_text: str) -> str:
        """The rest of the answer, given its full text (cut at a stop string, if any)."""
        piece = final_text[self._sent :]
        self._sent = len(final_text)
        return piece

    @property
    def sent(self) -> int:
        """Characters handed out so far."""
        return self._sent
