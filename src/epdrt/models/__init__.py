# SPDX-License-Identifier: Apache-2.0
"""Model adapters: a ``transformers`` LMM split into encode / prefill / decode stages.

Typical use::

    adapter = load_adapter(model_dir, stages={"encode", "prefill", "decode"})
    req = adapter.prepare("USER: <image> What is this? ASSISTANT:", ["cat.png"])
    feats = adapter.encode(req.images)                        # [n_i, hidden] per image
    embeds = insert_image_tokens(adapter.embed(req.input_ids), req.image_starts, feats)
    kv = PagedKVCache(...)                                    # see epdrt.cache.sizing.kv_cache
    kv.extend("r1", req.num_tokens)
    logits = adapter.forward(embeds, FlatBatch.build(kv, [("r1", req.num_tokens)]), [req.extras])
    kv.extend("r1", 1)                                        # then one token per step
    token = adapter.embed([int(logits[0].argmax())])
    logits = adapter.forward(token, FlatBatch.build(kv, [("r1", 1)]),
                             [adapter.decode_extras(req.extras)])

``make_tiny_model`` writes small random-weight model directories for tests and demos.
"""

from epdrt.models.base import ModelAdapter, insert_image_tokens
from epdrt.models.errors import ModelLoadError, RequestError
from epdrt.models.images import ImageSource, load_image
from epdrt.models.paged import FlatBatch
from epdrt.models.registry import (
    adapter_class,
    load_adapter,
    register_adapter,
    registered_model_types,
)
from epdrt.models.tiny import ARCHS, SIZES, make_tiny_model
from epdrt.models.types import (
    STAGES,
    ImageInput,
    ImageLimits,
    ModelSpec,
    PreparedRequest,
)

__all__ = [
    "ARCHS",
    "SIZES",
    "STAGES",
    "FlatBatch",
    "ImageInput",
    "ImageLimits",
    "ImageSource",
    "ModelAdapter",
    "ModelLoadError",
    "ModelSpec",
    "PreparedRequest",
    "RequestError",
    "adapter_class",
    "insert_image_tokens",
    "load_adapter",
    "load_image",
    "make_tiny_model",
    "register_adapter",
    "registered_model_types",
]
