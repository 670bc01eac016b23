# SPDX-License-Identifier: Apache-2.0
"""Model directories built locally with random weights: no download, working processor files.

``size="tiny"`` writes a few-hundred-kB model (hidden 64, 2 layers, 32-112 px images) with
``model.safetensors``; weights are drawn with ``initializer_range`` 0.2 so that greedy output
depends strongly on the image and the prompt (good for equivalence tests).

Real sizes (``"7b"`` for LLaVA-1.5-7B; ``"2b"`` / ``"7b"`` for Qwen2-VL-2B / -7B) write the
published shapes and processor settings but *no weights*: an ``epdrt.json`` marker makes
``load_adapter`` draw seeded random weights at load time on the target device (each process
only for its own stages). Use them for memory and speed measurements, never for outputs.
``"small"`` (LLaVA only) is written the same way: a CPU-sized model (hidden 256, 4 layers,
112 px images of 64 tokens) whose batches take milliseconds to tens of milliseconds on one
core, so that compute, not the runtime's millisecond-scale overheads, sets its latencies
(the planner's validation on CPU hosts).

The tokenizer is a ``tokenizers`` WordLevel model (whitespace / punctuation split) wrapped in
``PreTrainedTokenizerFast``, with the model's special tokens at the model's ids and a plain
prompt format (no chat template): e.g. ``"USER: <image> describe it ASSISTANT:"``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from epdrt.models.loading import RANDOM_WEIGHTS_FILE

#: ``--arch`` values and the config ``model_type`` they write.
ARCHS = {"llava": "llava", "qwen2-vl": "qwen2_vl"}
#: sizes per arch ("tiny" has weights; the others are config-only, weights drawn at load).
SIZES = {"llava": ("tiny", "small", "7b"), "qwen2-vl": ("tiny", "2b", "7b")}

_WORDS = [
    "the",
    "a",
    "an",
    "is",
    "are",
    "was",
    "of",
    "to",
    "in",
    "on",
    "at",
    "for",
    "with",
    "and",
    "or",
    "not",
    "this",
    "that",
    "it",
    "what",
    "which",
    "who",
    "how",
    "many",
    "much",
    "where",
    "when",
    "why",
    "image",
    "picture",
    "photo",
    "describe",
    "tell",
    "me",
    "about",
    "show",
    "color",
    "colour",
    "red",
    "green",
    "blue",
    "yellow",
    "black",
    "white",
    "gray",
    "dark",
    "light",
    "big",
    "small",
    "left",
    "right",
    "top",
    "bottom",
    "center",
    "middle",
    "cat",
    "dog",
    "bird",
    "car",
    "tree",
    "house",
    "person",
    "man",
    "woman",
    "child",
    "sky",
    "sea",
    "water",
    "road",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "first",
    "second",
    "third",
    "last",
    "there",
    "here",
    "do",
    "does",
    "see",
    "look",
    "find",
    "count",
    "compare",
    "between",
    "both",
    "each",
    "all",
    "some",
    "any",
    "no",
    "yes",
    "please",
    "answer",
    "question",
    "short",
    "long",
    "word",
    "words",
    "sentence",
    "user",
    "assistant",
    "system",
    "text",
    "number",
    "shape",
    "square",
    "circle",
    "line",
    "dot",
    "pattern",
    "stripe",
    "noise",
    "gradient",
    "you",
    "your",
    "i",
    "my",
    "we",
    "our",
    "they",
    "0",
    "1",
    "2",
    "3",
    "4",
    "5",
    "6",
    "7",
    "8",
    "9",
    ".",
    ",",
    "?",
    "!",
    ":",
    ";",
    "'",
    "-",
    "(",
    ")",
]


def make_tiny_model(
    path: str | Path, arch: str, seed: int = 0, size: str = "tiny"
) -> dict[str, Any]:
    """Writes a random-weight model directory for ``arch`` ("llava" or "qwen2-vl").

    Returns:
        A description: path, arch, size, model_type, seed, weights ("safetensors" or
        "random at load"), image_placeholder, parameter count and the files written.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; known: {sorted(ARCHS)}")
    if size not in SIZES[arch]:
        raise ValueError(f"unknown size {size!r} for {arch}; known: {SIZES[arch]}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    build = _llava if arch == "llava" else _qwen2_vl
    config, tokenizer, image_processor, extra_files, placeholder = build(size)
    model_class = (
        LlavaForConditionalGeneration if arch == "llava" else Qwen2VLForConditionalGeneration
    )
    text = config.get_text_config()
    eos = [text.eos_token_id]
    if arch == "qwen2-vl":  # Qwen2-VL-Instruct stops on <|im_end|> and <|endoftext|>
        eos.append(text.pad_token_id)
    if size == "tiny":
        torch.manual_seed(seed)
        model = model_class(config).eval()
        num_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(out)
        weights = "safetensors"
    else:
        with torch.device("meta"):
            num_params = sum(p.numel() for p in model_class(config).parameters())
        config.save_pretrained(out)
        (out / RANDOM_WEIGHTS_FILE).write_text(json.dumps({"weights": "random", "seed": seed}))
        weights = "random at load"
    GenerationConfig(
        bos_token_id=text.bos_token_id, eos_token_id=eos, pad_token_id=text.pad_token_id
    ).save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    for name, content in extra_files.items():
        (out / name).write_text(json.dumps(content, indent=2) + "\n")
    return {
        "path": str(out),
        "arch": arch,
        "size": size,
        "model_type": config.model_type,
        "seed": seed,
        "weights": weights,
        "image_placeholder": placeholder,
        "num_parameters": num_params,
        "files": sorted(p.name for p in out.iterdir()),
    }


def _tokenizer(
    vocab_size: int,
    specials: dict[str, int],
    *,
    bos: str | None,
    eos: str,
    pad: str,
    unk: str,
) -> PreTrainedTokenizerFast:
    """WordLevel tokenizer of ``vocab_size`` ids with ``specials`` at fixed ids."""
    vocab = dict(specials)
    free = (i for i in range(vocab_size) if i not in set(specials.values()))
    fillers = (f"w{i}" for i in range(vocab_size))
    for word in [*_WORDS, *fillers]:
        if word in vocab:
            continue
        try:
            vocab[word] = next(free)
        except StopIteration:
            break
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    tok.add_special_tokens(list(specials))
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=unk, eos_token=eos, pad_token=pad, bos_token=bos
    )
    wrapped.model_max_length = 1 << 30
    return wrapped


def _llava(size: str):
    if size == "tiny":
        vocab, image_id, image_px, patch = 256, 4, 32, 8
        vision = CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=image_px, patch_size=patch, projection_dim=32, hidden_act="quick_gelu",
            initializer_range=0.2,
        )  # fmt: skip
        text = LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512,
            initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=3,
        )  # fmt: skip
        dtype = "float32"
    elif size == "small":  # CPU-sized: batches take milliseconds to tens of ms on one core
        vocab, image_id, image_px, patch = 1024, 4, 112, 14
        vision = CLIPVisionConfig(
            hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=3,
            image_size=image_px, patch_size=patch, projection_dim=192, hidden_act="quick_gelu",
        )  # fmt: skip
        text = LlamaConfig(
            hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=8192,
            bos_token_id=1, eos_token_id=2, pad_token_id=3,
        )  # fmt: skip
        dtype = "float32"
    else:  # LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf) shapes
        vocab, image_id, image_px, patch = 32064, 32000, 336, 14
        vision = CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
            num_attention_heads=16, image_size=image_px, patch_size=patch, projection_dim=768,
            hidden_act="quick_gelu",
        )  # fmt: skip
        text = LlamaConfig(
            hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=32, vocab_size=vocab,
            max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
            pad_token_id=32001,
        )  # fmt: skip
        dtype = "float16"
    tokens_per_image = (image_px // patch) ** 2
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_id,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", image_seq_length=tokens_per_image,
        tie_word_embeddings=False,
    )  # fmt: skip
    config.dtype = dtype
    specials = {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": image_id, "<pad>": text.pad_token_id}
    tokenizer = _tokenizer(vocab, specials, bos="<s>", eos="</s>", pad="<pad>", unk="<unk>")
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_px}, crop_size={"height": image_px, "width": image_px}
    )
    processor = {
        "processor_class": "LlavaProcessor",
        "image_token": "<image>",
        "patch_size": patch,
        "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1,
    }
    return config, tokenizer, image_processor, {"processor_config.json": processor}, "<image>"


def _qwen2_vl(size: str):
    if size == "tiny":
        vocab = 256
        ids = dict(endoftext=0, im_start=1, im_end=2, vstart=3, vend=4, image=5, video=6)
        vision = dict(
            depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, initializer_range=0.2,
        )  # fmt: skip
        text = dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
            initializer_range=0.2,
            rope_parameters={
                "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]
            },
        )  # fmt: skip
        pixels = {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}
        tie, dtype = False, "float32"
    else:  # Qwen/Qwen2-VL-2B-Instruct and -7B-Instruct shapes
        big = size == "7b"
        vocab = 152064 if big else 151936
        ids = dict(
            endoftext=151643, im_start=151644, im_end=151645, vstart=151652, vend=151653,
            image=151655, video=151656,
        )  # fmt: skip
        hidden = 3584 if big else 1536
        vision = dict(
            depth=32, embed_dim=1280, hidden_size=hidden, num_heads=16, mlp_ratio=4,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu",
        )  # fmt: skip
        text = dict(
            hidden_size=hidden, intermediate_size=18944 if big else 8960, num_hidden_layers=28,
            num_attention_heads=28 if big else 12, num_key_value_heads=4 if big else 2,
            max_position_embeddings=32768, rms_norm_eps=1e-6,
            rope_parameters={
                "rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]
            },
        )  # fmt: skip
        pixels = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
        tie, dtype = not big, "bfloat16"
    text.update(
        vocab_size=vocab, bos_token_id=ids["endoftext"], eos_token_id=ids["im_end"],
        pad_token_id=ids["endoftext"], tie_word_embeddings=tie,
    )  # fmt: skip
    config = Qwen2VLConfig(
        vision_config=vision, text_config=text, image_token_id=ids["image"],
        video_token_id=ids["video"], vision_start_token_id=ids["vstart"],
        vision_end_token_id=ids["vend"], tie_word_embeddings=tie,
    )  # fmt: skip
    config.dtype = dtype
    names = {
        "endoftext": "<|endoftext|>", "im_start": "<|im_start|>", "im_end": "<|im_end|>",
        "vstart": "<|vision_start|>", "vend": "<|vision_end|>", "image": "<|image_pad|>",
        "video": "<|video_pad|>",
    }  # fmt: skip
    specials = {names[k]: v for k, v in ids.items()}
    specials["<unk>"] = next(i for i in range(vocab) if i not in set(ids.values()))
    tokenizer = _tokenizer(
        vocab, specials, bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk="<unk>"
    )
    image_processor = Qwen2VLImageProcessorPil(
        size=pixels, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    return config, tokenizer, image_processor, {}, placeholder
