# SPDX-License-Identifier: Apache-2.0
"""Incremental detokenization: pieces never split a multi-byte character, never run past a
stop string, and always add up to the full text."""

import pytest

from epdrt.serve.detok import IncrementalText

# Byte-level "tokens": each is a few UTF-8 bytes, so characters straddle tokens.
TEXT = "héllo wörld — 猫が好き 🐈 end"
RAW = TEXT.encode()


def byte_tokens(size: int) -> list[bytes]:
    return [RAW[i : i + size] for i in range(0, len(RAW), size)]


@pytest.mark.parametrize("size", [1, 2, 3, 5])
@pytest.mark.parametrize("stop", [[], ["wör"], ["好き 🐈", "zz"], ["not there"]])
def test_pieces_add_up_and_never_split_a_character(size, stop):
    vocab = byte_tokens(size)

    def decode(ids):
        return b"".join(vocab[i] for i in ids).decode(errors="replace")

    text = IncrementalText(decode, stop)
    pieces = [text.add(i) for i in range(len(vocab))]
    cuts = [TEXT.find(s) for s in stop if s in TEXT]
    final = TEXT[: min(cuts)] if cuts else TEXT
    streamed = "".join(pieces)
    assert "\ufffd" not in streamed
    assert final.startswith(streamed)  # nothing past the cut was given out
    assert streamed + text.finish(final) == final
    assert text.sent == len(final)
