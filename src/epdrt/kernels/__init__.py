# SPDX-License-Identifier: Apache-2.0
"""Device kernels: paged attention, paged KV gather/scatter, multimodal embedding assembly,
many-block copy.

Each operation has a dispatcher here that checks its arguments (``InvalidArgument`` before any
launch) and picks an implementation: Triton on CUDA tensors (the CUDA kernel of the C++ core
for ``block_copy``), the pure-torch reference (``epdrt.kernels.reference``) or host memcpy on CPU.
``backend="triton"`` forces the Triton code, which runs on CPU tensors under
``TRITON_INTERPRET=1``. Triton is imported on first use.
"""

from .block_copy import BlockCopy, block_copy
from .kv_gather import kv_gather
from .kv_scatter import kv_scatter
from .mm_embed import assemble_inputs_embeds, cached_source_rows, mm_embed, mm_source_rows
from .paged_attention import paged_attention_decode, paged_attention_prefill

__all__ = [
    "BlockCopy",
    "assemble_inputs_embeds",
    "block_copy",
    "cached_source_rows",
    "kv_gather",
    "kv_scatter",
    "mm_embed",
    "mm_source_rows",
    "paged_attention_decode",
    "paged_attention_prefill",
]
