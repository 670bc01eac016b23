# SPDX-License-Identifier: Apache-2.0
"""Content digests that check a hand-off end to end (``EPDConfig.verify_transfers``).

The sender digests the tensor it hands over (an image's MM tokens, a sequence's KV), the
receiver digests what landed in its own cache, and a mismatch fails the request with a clear
error instead of decoding from the wrong bytes. It is a debugging aid: each digest reads the
tensor once more and costs a temporary of eight bytes per 16-bit word of it.
"""

from __future__ import annotations

import torch

# Weights cycle through 1..PERIOD so a digest also changes when words swap places.
_PERIOD = 65521


def content_digest(tensor: torch.Tensor) -> torch.Tensor:
    """A 0-dim int64 tensor on ``tensor``'s device: a position-weighted sum of its bytes read
    as 16-bit words (exact, so equal bytes give equal digests on every device; wraps on
    overflow the same way everywhere). Asynchronous on CUDA: ``int()`` of it waits."""
    words = tensor.detach().contiguous().view(-1).view(torch.int16).to(torch.int64)
    weights = torch.arange(words.numel(), device=words.device, dtype=torch.int64) % _PERIOD + 1
    return (words * weights).sum()
