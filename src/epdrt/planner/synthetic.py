# SPDX-License-Identifier: Apache-2.0
"""Synthetic profiles with linear latency models: exact known answers for tests and examples."""

from __future__ import annotations

from epdrt.planner.profile import (
    Bilinear,
    MemoryProfile,
    PiecewiseLinear,
    StageProfile,
    TransferProfile,
)

GB = 1e9


def linear_profile(
    *,
    encode_fixed_s: float = 0.0,
    encode_per_image_s: float = 0.0,
    encode_per_token_s: float = 0.0,
    prefill_fixed_s: float = 0.0,
    prefill_per_token_s: float = 0.0,
    decode_fixed_s: float = 0.0,
    decode_per_seq_s: float = 0.0,
    decode_per_context_token_s: float = 0.0,
    transfer_latency_s: float = 0.0,
    transfer_bytes_per_s: float = 1e30,
    device_bytes: float = 80 * GB,
    encode_weight_bytes: float = 1 * GB,
    lm_weight_bytes: float = 14 * GB,
    kv_bytes_per_token: float = 128 * 1024,
    mm_bytes_per_token: float = 8 * 1024,
    encode_activation_bytes_per_token: float = 0.0,
    prefill_activation_bytes_per_token: float = 0.0,
    usable_fraction: float = 1.0,
    name: str = "synthetic-linear",
) -> StageProfile:
    """A profile whose latencies are exactly linear (seconds):

    - encode batch: ``encode_fixed_s + images * (encode_per_image_s + tokens_per_image *
      encode_per_token_s)``
    - prefill batch: ``prefill_fixed_s + tokens * prefill_per_token_s``
    - decode step: ``decode_fixed_s + batch * decode_per_seq_s + context_tokens *
      decode_per_context_token_s``
    """

    def enc(n: float, t: float) -> float:
        return encode_fixed_s + n * (encode_per_image_s + t * encode_per_token_s)

    def dec(b: float, ctx: float) -> float:
        return decode_fixed_s + b * decode_per_seq_s + ctx * decode_per_context_token_s

    return StageProfile(
        name=name,
        source="synthetic",
        device="none (synthetic)",
        notes="linear latency models for tests and examples; not a measurement",
        encode=Bilinear.from_function((0, 1), (0, 1), enc),
        prefill=PiecewiseLinear(
            (0.0, 1.0), (prefill_fixed_s, prefill_fixed_s + prefill_per_token_s)
        ),
        decode=Bilinear.from_function((0, 1), (0, 1), dec),
        memory=MemoryProfile(
            device_bytes=int(device_bytes),
            usable_fraction=usable_fraction,
            encode_weight_bytes=int(encode_weight_bytes),
            lm_weight_bytes=int(lm_weight_bytes),
            kv_bytes_per_token=kv_bytes_per_token,
            mm_bytes_per_token=mm_bytes_per_token,
            encode_activation_bytes_per_token=encode_activation_bytes_per_token,
            prefill_activation_bytes_per_token=prefill_activation_bytes_per_token,
        ),
        transfer=TransferProfile(transfer_latency_s, transfer_bytes_per_s),
    )
