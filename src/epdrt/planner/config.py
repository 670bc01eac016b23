# SPDX-License-Identifier: Apache-2.0
"""Deployment configurations (mode, E/P/D counts, batch limits, image split) and the per-GPU
memory plan that decides KV capacity and the largest encode batch.

Modes, by which stages share a GPU:

==============  =========================================  ======================
mode            GPUs                                       colocated on one GPU
==============  =========================================  ======================
``epd``         E encode + P prefill + D decode            nothing
``pd``          P encode+prefill + D decode                encode with prefill
``ed``          P prefill + D encode+decode                encode with decode
``aggregated``  N GPUs, each runs all three                encode, prefill, decode
==============  =========================================  ======================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from epdrt import scheduler
from epdrt.errors import InvalidArgument
from epdrt.planner.profile import StageProfile

MODES = ("epd", "pd", "ed", "aggregated")
KV_HANDOFFS = scheduler.KV_HANDOFFS
# The independent GPU pools of each mode, in the order they appear in a config's counts.
POOLS = {"epd": ("E", "P", "D"), "pd": ("P", "D"), "ed": ("P", "D"), "aggregated": ("N",)}


@dataclass(frozen=True)
class DeployConfig:
    """One deployment.

    Args:
        mode: one of MODES.
        num_encode, num_prefill, num_decode: stage instances. A colocated stage has one
            instance per host GPU: ``pd`` needs num_encode == num_prefill, ``ed`` needs
            num_encode == num_decode, ``aggregated`` needs all three equal.
        encode_batch: most images in one encode batch.
        prefill_tokens: most tokens in one prefill batch (a longer request still runs alone).
        decode_batch: most sequences in one decode step.
        image_split: a request's images are spread over up to this many encoders (``epd`` and
            ``ed``); 1 in ``pd`` and ``aggregated``, where a request is encoded on its own
            prefill GPU.
        prefill_padded: a prefill batch is right-padded to its longest prompt, so it computes
            requests x longest tokens, and ``prefill_tokens`` bounds that product (epdrt's
            Hugging Face adapters); False: packed (variable-length) batches compute, and the
            budget bounds, the sum of the prompts.
        decode_padded: a decode step left-pads every sequence's past to the longest one, so
            it attends over sequences x longest context tokens (epdrt's Hugging Face
            adapters); False: paged attention over the sum of the contexts.
        encode_tokens: most MM tokens in one encode batch (a larger image runs alone;
            ``EPDConfig.encode_max_batch_tokens``).
        max_num_seqs: most sequences running on one decode GPU (``EPDConfig.max_num_seqs``);
            when more run than ``decode_batch``, each step takes ``decode_batch`` of them in
            turn. None: ``decode_batch`` (every running sequence steps every step).
        kv_handoff: how KV reaches a decode GPU in ``epd``/``pd``/``ed``
            (``EPDConfig.kv_handoff``): ``layerwise``, the decoder's blocks are reserved as
            the prefill GPU takes the request in, and each layer is pushed as it is written;
            ``pull``, the decoder copies the whole KV in after the prefill.
        kv_block: tokens per KV block (``EPDConfig.kv_block_size``): decode admission keeps a
            block's room free per running sequence.
    """

    mode: str
    num_encode: int
    num_prefill: int
    num_decode: int
    encode_batch: int = 16
    prefill_tokens: int = 8192
    decode_batch: int = 128
    image_split: int = 1
    prefill_padded: bool = False
    decode_padded: bool = False
    encode_tokens: int = 8192
    max_num_seqs: int | None = None
    kv_handoff: str = "layerwise"
    kv_block: int = 16

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidArgument(f"mode must be one of {MODES}, got {self.mode!r}")
        counts = (self.num_encode, self.num_prefill, self.num_decode)
        if min(counts) < 1:
            raise InvalidArgument(f"every stage needs at least one instance, got {counts}")
        if min(self.encode_batch, self.prefill_tokens, self.decode_batch, self.image_split) < 1:
            raise InvalidArgument("batch limits and image_split must be >= 1")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise InvalidArgument(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.kv_handoff not in KV_HANDOFFS:
            raise InvalidArgument(
                f"kv_handoff must be one of {KV_HANDOFFS}, got {self.kv_handoff!r}"
            )
        if self.kv_block < 1:
            raise InvalidArgument(f"kv_block must be >= 1, got {self.kv_block}")
        rule = {
            "epd": True,
            "pd": self.num_encode == self.num_prefill,
            "ed": self.num_encode == self.num_decode,
            "aggregated": self.num_encode == self.num_prefill == self.num_decode,
        }[self.mode]
        if not rule:
            raise InvalidArgument(f"{self.mode}: stage counts {counts} do not fit the mode")
        if self.mode in ("pd", "aggregated") and self.image_split != 1:
            raise InvalidArgument(f"{self.mode}: image_split must be 1")
        if self.image_split > self.num_encode:
            raise InvalidArgument("image_split cannot exceed num_encode")

    @classmethod
    def from_pools(
        cls,
        mode: str,
        pools: tuple[int, ...],
        *,
        encode_batch: int = 16,
        prefill_tokens: int = 8192,
        decode_batch: int = 128,
        image_split: int = 1,
    ) -> DeployConfig:
        """A config from the GPU count of each of the mode's pools (see POOLS)."""
        if len(pools) != len(POOLS.get(mode, ())):
            raise InvalidArgument(f"{mode} has pools {POOLS.get(mode)}, got {pools}")
        e, p, d = {
            "epd": lambda: pools,
            "pd": lambda: (pools[0], pools[0], pools[1]),
            "ed": lambda: (pools[1], pools[0], pools[1]),
            "aggregated": lambda: (pools[0],) * 3,
        }[mode]()
        return cls(mode, e, p, d, encode_batch, prefill_tokens, decode_batch, image_split)

    @property
    def pools(self) -> tuple[int, ...]:
        """GPUs in each of the mode's pools (see POOLS)."""
        return {
            "epd": (self.num_encode, self.num_prefill, self.num_decode),
            "pd": (self.num_prefill, self.num_decode),
            "ed": (self.num_prefill, self.num_decode),
            "aggregated": (self.num_prefill,),
        }[self.mode]

    @property
    def num_gpus(self) -> int:
        return sum(self.pools)

    def counts_label(self) -> str:
        return " ".join(f"{k}{v}" for k, v in zip(POOLS[self.mode], self.pools))

    def label(self) -> str:
        split = f" split{self.image_split}" if self.mode in ("epd", "ed") else ""
        return (
            f"{self.mode} {self.counts_label()} eb{self.encode_batch} "
            f"pt{self.prefill_tokens} db{self.decode_batch}{split}"
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "num_encode": self.num_encode,
            "num_prefill": self.num_prefill,
            "num_decode": self.num_decode,
            "num_gpus": self.num_gpus,
            "encode_batch": self.encode_batch,
            "prefill_tokens": self.prefill_tokens,
            "decode_batch": self.decode_batch,
            "image_split": self.image_split,
            "prefill_padded": self.prefill_padded,
            "decode_padded": self.decode_padded,
            "encode_tokens": self.encode_tokens,
            "max_num_seqs": self.running_limit,
            "kv_handoff": self.kv_handoff,
            "kv_block": self.kv_block,
        }

    @property
    def running_limit(self) -> int:
        """Most sequences running on one decode GPU (``max_num_seqs``, else ``decode_batch``)."""
        return self.decode_batch if self.max_num_seqs is None else self.max_num_seqs


@dataclass(frozen=True)
class GpuMemory:
    """What one GPU of a role can hold, from the memory plan.

    Attributes:
        stages: the stages on this GPU, e.g. ("encode", "prefill").
        weight_bytes: weights of those stages (LM weights counted once).
        activation_bytes: reserve for the largest batch of any of its stages (they take turns,
            so the reserve is a max, not a sum).
        kv_tokens: KV cache capacity in tokens (0 on an encode-only GPU).
        max_encode_batch: most images of ``max_image_tokens`` tokens one encode batch may hold.
        free_bytes: what is left after weights and activations (negative: does not fit).
    """

    stages: tuple[str, ...]
    weight_bytes: float
    activation_bytes: float
    kv_tokens: int
    max_encode_batch: int
    free_bytes: float


def role_stages(mode: str) -> dict[str, tuple[str, ...]]:
    """Which stages each pool's GPUs run, by pool name (see POOLS)."""
    return {
        "epd": {"E": ("encode",), "P": ("prefill",), "D": ("decode",)},
        "pd": {"P": ("encode", "prefill"), "D": ("decode",)},
        "ed": {"P": ("prefill",), "D": ("encode", "decode")},
        "aggregated": {"N": ("encode", "prefill", "decode")},
    }[mode]


def gpu_memory(
    profile: StageProfile, stages: tuple[str, ...], config: DeployConfig, max_image_tokens: int
) -> GpuMemory:
    """The memory plan of one GPU running ``stages`` under ``config``.

    Args:
        max_image_tokens: MM tokens of the largest image in the workload (sizes the encode
            batch's activation reserve).
    """
    m = profile.memory
    weights = 0.0
    if "encode" in stages:
        weights += m.encode_weight_bytes
    if "prefill" in stages or "decode" in stages:
        weights += m.lm_weight_bytes
    per_image = m.encode_activation_bytes_per_token * max(max_image_tokens, 1)
    acts = [0.0]
    if "encode" in stages:
        acts.append(config.encode_batch * per_image)
    if "prefill" in stages:
        acts.append(config.prefill_tokens * m.prefill_activation_bytes_per_token)
    activation = max(acts)
    free = m.usable_bytes - weights - activation
    kv_tokens = 0
    if "prefill" in stages or "decode" in stages:
        kv_tokens = max(int(free // m.kv_bytes_per_token), 0)
    max_encode_batch = 0
    if "encode" in stages:
        room = m.usable_bytes - weights
        # On a shared GPU the KV cache is sized after the activation reserve, so the encode
        # batch only has to fit beside the weights; the KV room it costs shows in kv_tokens.
        max_encode_batch = int(room // per_image) if per_image > 0 else 1 << 30
    return GpuMemory(stages, weights, activation, kv_tokens, max_encode_batch, free)


def memory_plan(
    profile: StageProfile, config: DeployConfig, max_image_tokens: int
) -> dict[str, GpuMemory]:
    """The memory plan of every pool of ``config``, by pool name."""
    return {
        pool: gpu_memory(profile, stages, config, max_image_tokens)
        for pool, stages in role_stages(config.mode).items()
    }


def check_memory(
    profile: StageProfile,
    config: DeployConfig,
    max_image_tokens: int,
    max_request_tokens: int,
    max_input_tokens: int,
) -> str | None:
    """Why ``config`` cannot hold the workload in memory, or None when it can.

    Args:
        max_request_tokens: largest input + output tokens of one request (decode KV).
        max_input_tokens: largest input tokens of one request (prefill KV).
    """
    for pool, gm in memory_plan(profile, config, max_image_tokens).items():
        if gm.free_bytes < 0:
            return f"{pool}: weights and activations exceed usable memory"
        if "encode" in gm.stages and config.encode_batch > gm.max_encode_batch:
            return f"{pool}: encode batch {config.encode_batch} > {gm.max_encode_batch} fits"
        need = 0
        if "prefill" in gm.stages:
            need = max_input_tokens
        if "decode" in gm.stages or config.mode == "aggregated":
            need = max_request_tokens
        if need > gm.kv_tokens:
            return f"{pool}: KV capacity {gm.kv_tokens} tokens < one request's {need}"
    return None


def ceil_div(a: float, b: float) -> int:
    return max(math.ceil(a / b - 1e-9), 0)
