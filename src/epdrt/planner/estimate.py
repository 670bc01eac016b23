# SPDX-License-Identifier: Apache-2.0
"""Estimated (not measured) profiles from model shapes and GPU datasheet numbers.

A roofline estimate: each batch takes ``max(FLOPs / (peak * MFU), bytes / bandwidth)`` plus a
fixed overhead per batch. Use it to plan before a GPU is at hand; replace it with a measured
profile (planner.profiler) as soon as one is. The shipped
``profiles/qwen2-vl-7b-h100-estimated.json`` is ``estimate_profile(QWEN2_VL_7B, H100_SXM)``;
regenerate it with ``python -m epdrt.planner.estimate OUT.json``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from epdrt.planner.profile import (
    Bilinear,
    MemoryProfile,
    PiecewiseLinear,
    StageProfile,
    TransferProfile,
)

GiB = 1 << 30


@dataclass(frozen=True)
class GpuSpec:
    """What the estimate assumes of the GPU (bytes, FLOP/s, seconds)."""

    name: str
    memory_bytes: int
    peak_flops: float  # dense bf16 FLOP/s assumed attainable as "peak"
    mfu: float  # share of peak_flops reached by large matmul-bound batches
    hbm_bytes_per_s: float  # achieved HBM bandwidth for weight and KV reads
    link_bytes_per_s: float  # GPU-to-GPU bandwidth for MM-token and KV transfers
    link_latency_s: float
    encode_overhead_s: float  # fixed cost per encode batch (launches, preprocessing)
    prefill_overhead_s: float  # fixed cost per prefill batch
    decode_overhead_s: float  # fixed cost per decode step (launches, sampling)
    runtime_overhead_bytes: int  # CUDA context, allocator slack, graphs
    usable_fraction: float = 0.9


@dataclass(frozen=True)
class LmmSpec:
    """Shapes of a LLaVA/Qwen2-VL style LMM: a ViT with a token merger, then a decoder LM."""

    name: str
    lm_layers: int
    lm_hidden: int
    lm_intermediate: int
    lm_heads: int
    lm_kv_heads: int
    lm_head_dim: int
    vocab: int
    tied_embeddings: bool
    vit_layers: int
    vit_hidden: int
    vit_intermediate: int
    vit_patches_per_token: int  # ViT patches merged into one MM token
    merger_params: int
    dtype_bytes: int = 2
    typical_sequence: int = 2048  # sequence length assumed for prefill attention FLOPs

    @property
    def lm_layer_params(self) -> int:
        h, kv = self.lm_hidden, self.lm_kv_heads * self.lm_head_dim
        attn = 2 * h * h + 2 * h * kv
        mlp = 3 * h * self.lm_intermediate
        return attn + mlp

    @property
    def lm_params(self) -> int:
        emb = self.vocab * self.lm_hidden
        return self.lm_layers * self.lm_layer_params + emb * (1 if self.tied_embeddings else 2)

    @property
    def vit_params(self) -> int:
        d = self.vit_hidden
        return self.vit_layers * (4 * d * d + 2 * d * self.vit_intermediate) + self.merger_params

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.lm_layers * self.lm_kv_heads * self.lm_head_dim * self.dtype_bytes

    def prefill_flops_per_token(self) -> float:
        """Matmuls (2 FLOP per weight) plus causal attention at ``typical_sequence``."""
        attn = 2 * self.typical_sequence * self.lm_heads * self.lm_head_dim * self.lm_layers
        return 2.0 * self.lm_layers * self.lm_layer_params + attn

    def decode_flops(self, batch: float, context_tokens: float) -> float:
        """One decode step: matmuls and LM head per sequence, attention over the context."""
        per_seq = 2.0 * (self.lm_layers * self.lm_layer_params + self.vocab * self.lm_hidden)
        attn = 4.0 * context_tokens * self.lm_heads * self.lm_head_dim * self.lm_layers
        return batch * per_seq + attn

    def encode_flops(self, tokens_per_image: float) -> float:
        """One image of ``tokens_per_image`` MM tokens: ViT matmuls, full attention over the
        image's patches, and the merger."""
        p = tokens_per_image * self.vit_patches_per_token
        d = self.vit_hidden
        mm = 2.0 * self.vit_layers * (4 * d * d + 2 * d * self.vit_intermediate) * p
        attn = 4.0 * p * p * d * self.vit_layers
        return mm + attn + 2.0 * self.merger_params * tokens_per_image


# Qwen2-VL-7B-Instruct's published config: Qwen2-7B LM (28 layers, hidden 3584, MLP 18944,
# 28 query / 4 KV heads of 128, vocab 152064, untied head) and a 32-layer ViT (hidden 1280,
# MLP 5120, patch 14) whose 2x2 merger turns 4 patches into one MM token.
QWEN2_VL_7B = LmmSpec(
    name="Qwen2-VL-7B-class",
    lm_layers=28,
    lm_hidden=3584,
    lm_intermediate=18944,
    lm_heads=28,
    lm_kv_heads=4,
    lm_head_dim=128,
    vocab=152064,
    tied_embeddings=False,
    vit_layers=32,
    vit_hidden=1280,
    vit_intermediate=5120,
    vit_patches_per_token=4,
    merger_params=5120 * 5120 + 5120 * 3584,
)

# H100 SXM5 80GB. Datasheet: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3, NVLink 4 at 450 GB/s per
# direction. Assumed here: 700 TFLOP/s usable peak at 50% MFU (350 TFLOP/s effective),
# 3.0 TB/s HBM achieved, 150 GB/s and 50 us per paged GPU-to-GPU copy.
H100_SXM = GpuSpec(
    name="H100-SXM5-80GB (estimated)",
    memory_bytes=80 * GiB,
    peak_flops=700e12,
    mfu=0.5,
    hbm_bytes_per_s=3.0e12,
    link_bytes_per_s=150e9,
    link_latency_s=50e-6,
    encode_overhead_s=3e-3,
    prefill_overhead_s=2e-3,
    decode_overhead_s=1.5e-3,
    runtime_overhead_bytes=2 * GiB,
)

ENCODE_IMAGES = (1, 2, 4, 8, 16, 32, 64)
ENCODE_TOKENS = (64, 256, 576, 1024, 2048, 4096)
PREFILL_TOKENS = (1, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
DECODE_BATCH = (1, 8, 16, 32, 64, 128, 256, 512)
DECODE_CONTEXT = (0, 65536, 262144, 1048576, 4194304)


def estimate_profile(model: LmmSpec, gpu: GpuSpec) -> StageProfile:
    """A roofline profile of ``model`` on ``gpu``, with the arithmetic in its notes."""
    flops = gpu.peak_flops * gpu.mfu
    bw = gpu.hbm_bytes_per_s
    db = model.dtype_bytes
    lm_bytes = model.lm_params * db
    vit_bytes = model.vit_params * db
    emb_bytes = model.vocab * model.lm_hidden * db  # looked up, not read whole, per step
    lm_read = lm_bytes - emb_bytes

    def enc(n: float, t: float) -> float:
        return max(n * model.encode_flops(t) / flops, vit_bytes / bw) + gpu.encode_overhead_s

    def pre(n: float) -> float:
        return max(n * model.prefill_flops_per_token() / flops, lm_read / bw) + (
            gpu.prefill_overhead_s
        )

    def dec(b: float, ctx: float) -> float:
        mem = (lm_read + ctx * model.kv_bytes_per_token) / bw
        return max(model.decode_flops(b, ctx) / flops, mem) + gpu.decode_overhead_s

    # Peak activations: ViT per patch ~ (qkv 3d + MLP 4d + residual 2d) x dtype, flash
    # attention (no patch x patch buffer); LM prefill per token ~ (gate+up 2I + 4h) x dtype.
    vit_act = (9 * model.vit_hidden) * db * model.vit_patches_per_token
    lm_act = (2 * model.lm_intermediate + 4 * model.lm_hidden) * db
    notes = (
        f"ESTIMATE, NOT A MEASUREMENT. Roofline arithmetic for {model.name} on {gpu.name}: "
        f"each batch takes max(FLOPs / {flops / 1e12:.0f} TFLOP/s "
        f"[{gpu.peak_flops / 1e12:.0f} TFLOP/s assumed peak x {gpu.mfu:.0%} MFU], "
        f"bytes read / {bw / 1e12:.1f} TB/s HBM) + a fixed overhead "
        f"(encode {gpu.encode_overhead_s * 1e3:.1f} ms, prefill "
        f"{gpu.prefill_overhead_s * 1e3:.1f} ms, "
        f"decode step {gpu.decode_overhead_s * 1e3:.1f} ms). "
        f"LM {model.lm_params / 1e9:.2f}B params = {lm_bytes / 1e9:.1f} GB bf16; "
        f"prefill {model.prefill_flops_per_token() / 1e9:.2f} GFLOP/token (matmuls + causal "
        f"attention at {model.typical_sequence} tokens); decode reads "
        f"{lm_read / 1e9:.1f} GB of weights plus {model.kv_bytes_per_token} B of KV per context "
        f"token per step. ViT {model.vit_params / 1e6:.0f}M params = {vit_bytes / 1e9:.2f} GB; "
        f"{model.vit_patches_per_token} patches per MM token; one image of 1024 MM tokens = "
        f"{model.encode_flops(1024) / 1e12:.1f} TFLOP (full attention over its patches). "
        f"Transfers {gpu.link_bytes_per_s / 1e9:.0f} GB/s + {gpu.link_latency_s * 1e6:.0f} us. "
        "Not modelled: prefill attention growing with each sequence's own length, "
        "kernel-efficiency cliffs at small batches, CPU-side image preprocessing."
    )
    return StageProfile(
        name=f"{model.name} on {gpu.name}",
        source="estimated",
        device=gpu.name,
        notes=notes,
        encode=Bilinear.from_function(ENCODE_IMAGES, ENCODE_TOKENS, enc),
        prefill=PiecewiseLinear(
            tuple(float(n) for n in PREFILL_TOKENS), tuple(pre(n) for n in PREFILL_TOKENS)
        ),
        decode=Bilinear.from_function(DECODE_BATCH, DECODE_CONTEXT, dec),
        memory=MemoryProfile(
            device_bytes=gpu.memory_bytes,
            usable_fraction=gpu.usable_fraction,
            overhead_bytes=gpu.runtime_overhead_bytes,
            encode_weight_bytes=vit_bytes,
            lm_weight_bytes=lm_bytes,
            encode_activation_bytes_per_token=float(vit_act),
            prefill_activation_bytes_per_token=float(lm_act),
            kv_bytes_per_token=float(model.kv_bytes_per_token),
            mm_bytes_per_token=float(model.lm_hidden * db),
        ),
        transfer=TransferProfile(gpu.link_latency_s, gpu.link_bytes_per_s),
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m epdrt.planner.estimate OUT.json", file=sys.stderr)
        return 2
    estimate_profile(QWEN2_VL_7B, H100_SXM).save(args[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
