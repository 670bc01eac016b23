# SPDX-License-Identifier: Apache-2.0
"""``ModelAdapter``: one ``transformers`` LMM split into preprocessing and three stage functions.

Preprocessing (router, CPU, no weights needed): ``load_image`` -> ``preprocess_image`` ->
``tokenize`` (or ``prepare`` for all three). Stages (math on tensors, no processes):
``encode`` (vision tower + projector), ``embed`` / ``forward`` (language model).
Each stage calls the model's own modules; only the KV plumbing is the adapter's.

The language model runs over a paged KV cache (``forward`` with a ``FlatBatch``, see
``epdrt.models.paged``): prompts, prompt chunks and decode tokens of many requests in one
unpadded forward, K/V written into and read from the pages.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import (
    AutoConfig,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
)

from epdrt.models import _compat
from epdrt.models.errors import ModelLoadError, RequestError
from epdrt.models.images import ImageSource, digest, load_image, pixel_digest
from epdrt.models.loading import (
    WeightIndex,
    build_skeleton,
    materialize,
    model_identity,
    random_weights_seed,
    tie_lm_head,
    weight_files,
)
from epdrt.models.paged import BATCH_KWARG, FlatBatch, paged_attention_of
from epdrt.models.types import (
    STAGES,
    ImageInput,
    ImageLimits,
    ModelSpec,
    PreparedRequest,
)

Extras = Mapping[str, torch.Tensor]


class ModelAdapter(abc.ABC):
    """Base class of the per-architecture adapters (see ``epdrt.models.llava``, ``qwen2_vl``).

    Args:
        model_dir: a local directory with ``config.json``, safetensors weights (or an
            ``epdrt.json`` random-weights marker), ``tokenizer.json`` / ``tokenizer_config.json``
            and ``preprocessor_config.json``; ``processor_config.json`` is optional.
        device: where the loaded stages run.
        dtype: weight / KV / image-token dtype; default: the config's ``dtype``, else float32.
        stages: the stages this process runs, a subset of {"encode", "prefill", "decode"}.
            "encode" loads only the vision tower and projector; "prefill" / "decode" load only
            the language model (with its embeddings) and ``lm_head``. An empty set loads no
            weights (a router: preprocessing only).
        limits: image admission limits.
        max_context: cap on prompt + generated tokens (default and upper bound: the model's
            ``max_position_embeddings``).
    """

    #: config ``model_type`` this adapter serves.
    model_type: ClassVar[str]
    #: dotted submodule paths that ``encode`` needs.
    encoder_parts: ClassVar[tuple[str, ...]]
    #: dotted submodule paths that ``embed`` / ``prefill`` / ``decode`` need.
    lm_parts: ClassVar[tuple[str, ...]] = ("model.language_model", "lm_head")
    #: (old prefix, new prefix) for checkpoints saved with pre-5.x key names.
    legacy_prefixes: ClassVar[tuple[tuple[str, str], ...]] = ()

    #: placeholder a prompt carries once per image.
    image_placeholder: str
    #: the token (string) repeated ``num_tokens`` times per image; ``image_token_id`` its id.
    image_token: str
    image_token_id: int

    @classmethod
    @abc.abstractmethod
    def model_class(cls) -> type[PreTrainedModel]:
        """The ``transformers`` class of the whole model, e.g. ``LlavaForConditionalGeneration``."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        stages: Sequence[str] | frozenset[str] = STAGES,
        limits: ImageLimits | None = None,
        max_context: int | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.device = torch.device(device)
        self.stages = frozenset(stages)
        if not self.stages <= STAGES:
            raise ValueError(
                f"unknown stages {sorted(self.stages - STAGES)}; known: {sorted(STAGES)}"
            )
        self.limits = limits or ImageLimits()
        if not (self.model_dir / "config.json").is_file():
            raise ModelLoadError(f"{self.model_dir} has no config.json")
        try:
            self.config = AutoConfig.from_pretrained(self.model_dir, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
            self.image_processor = _compat.pil_image_processor(self.model_dir)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot load {self.model_dir}: {exc}") from exc
        if self.config.model_type != self.model_type:
            raise ModelLoadError(
                f"{self.model_dir} holds a {self.config.model_type!r} model,"
                f" not {self.model_type!r}"
            )
        self.dtype = _resolve_dtype(dtype, self.config)
        self.text_config = self.config.get_text_config()
        self.model = build_skeleton(self.model_class(), self.config, self.dtype)
        self._load_weights()
        self._lm = self.model.model.language_model
        self._setup_tokens()
        self._check_processor()
        self.spec = self._make_spec(max_context)
        self.processor_digest = digest(
            b"epdrt-processor-v1",
            type(self.image_processor).__name__.encode(),
            transformers.__version__.encode(),
            json.dumps(self.image_processor.to_dict(), sort_keys=True, default=str).encode(),
        )
        self._identity: bytes | None = None

    # ---- subclass hooks ----------------------------------------------------------------------
    @abc.abstractmethod
    def _setup_tokens(self) -> None:
        """Sets ``image_placeholder``, ``image_token`` and ``image_token_id``."""

    def _check_processor(self) -> None:  # noqa: B027 (optional hook)
        """Raises ModelLoadError when the image processor disagrees with the model."""

    def _check_prompt(self, prompt: str) -> None:  # noqa: B027 (optional hook)
        """Raises RequestError for prompt content the adapter does not support."""

    @abc.abstractmethod
    def _preprocess(self, img: Image.Image) -> tuple[dict[str, torch.Tensor], int]:
        """Encoder input tensors (CPU) of an RGB image and the number of tokens it yields."""

    @abc.abstractmethod
    def _encode_batch(self, items: list[Extras]) -> list[torch.Tensor]:
        """Encoder outputs ``[num_tokens_i, hidden]`` for a batch of ``ImageInput.tensors``."""

    def _request_extras(
        self, input_ids: list[int], images: Sequence[ImageInput]
    ) -> dict[str, torch.Tensor]:
        """Model-specific tensors ``prefill`` needs (CPU)."""
        return {}

    # ---- description -------------------------------------------------------------------------
    @property
    def identity(self) -> bytes:
        """32-byte digest of the model (config + weights fingerprint), computed once."""
        if self._identity is None:
            self._identity = model_identity(self.model_dir, self.model_type)
        return self._identity

    def _make_spec(self, max_context: int | None) -> ModelSpec:
        t = self.text_config
        limit = int(t.max_position_embeddings)
        if max_context is not None:
            if not 0 < max_context <= limit:
                raise ValueError(f"max_context must be in 1..{limit}, got {max_context}")
            limit = max_context
        head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
        return ModelSpec(
            model_type=self.model_type,
            num_layers=int(t.num_hidden_layers),
            num_heads=int(t.num_attention_heads),
            num_kv_heads=int(getattr(t, "num_key_value_heads", None) or t.num_attention_heads),
            head_dim=int(head_dim),
            hidden_size=int(t.hidden_size),
            vocab_size=int(t.vocab_size),
            dtype=self.dtype,
            eos_token_ids=self._eos_token_ids(),
            max_context=limit,
            image_token_id=self.image_token_id,
            image_placeholder=self.image_placeholder,
        )

    def _eos_token_ids(self) -> tuple[int, ...]:
        try:  # what generate() stops on
            gen = GenerationConfig.from_pretrained(self.model_dir, local_files_only=True)
            eos: Any = gen.eos_token_id
        except OSError:
            eos = None
        if eos is None:
            eos = getattr(self.text_config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ModelLoadError(f"{self.model_dir}: no eos_token_id in any config")
        return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))

    # ---- loading -----------------------------------------------------------------------------
    def _load_weights(self) -> None:
        parts: list[str] = []
        if "encode" in self.stages:
            parts += self.encoder_parts
        if self.stages & {"prefill", "decode"}:
            parts += self.lm_parts
        if not parts:
            return
        files = weight_files(self.model_dir)
        seed = random_weights_seed(self.model_dir)
        if not files and seed is None:
            raise ModelLoadError(
                f"{self.model_dir} has no *.safetensors weights (and no epdrt.json marker for"
                " random weights)"
            )
        index = WeightIndex(files, self._key_name) if files else None
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        materialize(
            self.model,
            parts,
            index,
            self.device,
            self.dtype,
            seed=seed or 0,
            may_miss=frozenset({"lm_head.weight"}) if tied else frozenset(),
        )
        if "lm_head" in parts:
            tie_lm_head(self.model)

    def _key_name(self, key: str) -> str:
        """Module name of checkpoint tensor ``key`` (legacy prefixes renamed)."""
        if key.startswith(tuple(p + "." for p in self.encoder_parts + self.lm_parts)):
            return key
        for old, new in self.legacy_prefixes:
            if key.startswith(old):
                return new + key[len(old) :]
        return key

    def _require(self, stage: str) -> None:
        if stage == "encode":
            ok = "encode" in self.stages
        else:
            ok = bool(self.stages & {"prefill", "decode"})
        if not ok:
            raise RuntimeError(
                f"this adapter was loaded with stages={sorted(self.stages)}; {stage} needs"
                f" {'encode' if stage == 'encode' else 'prefill or decode'}"
            )

    # ---- preprocessing (router) --------------------------------------------------------------
    def load_image(self, src: ImageSource, limits: ImageLimits | None = None) -> Image.Image:
        """Decodes and checks ``src`` (path, bytes or PIL image); see ``images.load_image``."""
        return load_image(src, limits or self.limits)

    def preprocess_image(self, img: ImageSource) -> ImageInput:
        """Runs the model's image processor (PIL backend) on one image.

        ``img`` is an RGB PIL image from ``load_image``, or any ``ImageSource`` (then loaded
        with this adapter's limits).
        """
        if not (isinstance(img, Image.Image) and img.mode == "RGB"):
            img = self.load_image(img)
        tensors, num_tokens = self._preprocess(img)
        key = digest(b"epdrt-image-v1", self.identity, self.processor_digest, pixel_digest(img))
        return ImageInput(tensors, num_tokens, key, (img.width, img.height))

    def tokenize(
        self, prompt: str, images: Sequence[ImageInput] = (), *, max_new_tokens: int = 0
    ) -> PreparedRequest:
        """Tokenizes ``prompt``, expanding the i-th placeholder to ``images[i].num_tokens`` tokens.

        The expansion is the HF processor's: each image token in the text is repeated, then the
        whole text goes through the tokenizer (special tokens added as the processor adds them).

        Raises:
            RequestError: too many images, placeholders not matching the images, or
                ``len(input_ids) + max_new_tokens`` over ``spec.max_context``.
        """
        if not isinstance(prompt, str):
            raise RequestError(f"the prompt must be a str, got {type(prompt).__name__}")
        if len(images) > self.limits.max_images:
            raise RequestError(
                f"{len(images)} images, more than the limit of {self.limits.max_images} per request"
            )
        self._check_placeholders(prompt, len(images))
        self._check_prompt(prompt)
        pieces = prompt.split(self.image_token)
        text = pieces[0] + "".join(
            self.image_token * im.num_tokens + piece for im, piece in zip(images, pieces[1:])
        )
        input_ids = [int(t) for t in self.tokenizer(text)["input_ids"]]
        starts = self._image_starts(input_ids, images)
        total = len(input_ids) + max_new_tokens
        if total > self.spec.max_context:
            raise RequestError(
                f"the prompt has {len(input_ids)} tokens (images expanded)"
                + (f" + {max_new_tokens} to generate" if max_new_tokens else "")
                + f", more than the model's context of {self.spec.max_context}"
            )
        extras = self._request_extras(input_ids, images)
        return PreparedRequest(input_ids, list(images), starts, extras)

    def prepare(
        self,
        prompt: str,
        images: Sequence[ImageSource] = (),
        *,
        max_new_tokens: int = 0,
        limits: ImageLimits | None = None,
    ) -> PreparedRequest:
        """``load_image`` + ``preprocess_image`` for each image, then ``tokenize``."""
        limits = limits or self.limits
        if len(images) > limits.max_images:
            raise RequestError(
                f"{len(images)} images, more than the limit of {limits.max_images} per request"
            )
        self._check_placeholders(prompt, len(images))
        inputs = [self.preprocess_image(self.load_image(src, limits)) for src in images]
        return self.tokenize(prompt, inputs, max_new_tokens=max_new_tokens)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """Text of generated ``token_ids`` (special tokens skipped)."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def _check_placeholders(self, prompt: str, num_images: int) -> None:
        if not isinstance(prompt, str):
            raise RequestError(f"the prompt must be a str, got {type(prompt).__name__}")
        placeholders = prompt.count(self.image_placeholder)
        tokens = prompt.count(self.image_token)
        if placeholders != tokens:
            raise RequestError(
                f"the prompt has {tokens} {self.image_token!r} but {placeholders} complete image"
                f" placeholders {self.image_placeholder!r}"
            )
        if placeholders != num_images:
            raise RequestError(
                f"the prompt has {placeholders} image placeholders {self.image_placeholder!r}"
                f" for {num_images} images"
            )

    def _image_starts(self, input_ids: list[int], images: Sequence[ImageInput]) -> list[int]:
        where = [i for i, t in enumerate(input_ids) if t == self.image_token_id]
        if len(where) != sum(im.num_tokens for im in images):
            raise RequestError(
                f"the tokenized prompt has {len(where)} image tokens, the images need"
                f" {sum(im.num_tokens for im in images)}"
            )
        starts, offset = [], 0
        for im in images:
            run = where[offset : offset + im.num_tokens]
            if run[-1] - run[0] != im.num_tokens - 1:
                raise RequestError("an image's tokens are not contiguous after tokenization")
            starts.append(run[0])
            offset += im.num_tokens
        return starts

    # ---- stages ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: Sequence[ImageInput | Extras]) -> list[torch.Tensor]:
        """Image tokens of a batch of images (sizes may differ where the model allows it).

        Args:
            images: ``ImageInput`` s, or their ``tensors`` dicts (as shipped to an encoder).

        Returns:
            One ``[num_tokens_i, hidden_size]`` tensor per image, ``spec.dtype``, on the device.
        """
        self._require("encode")
        if not images:
            return []
        items = [im.tensors if isinstance(im, ImageInput) else im for im in images]
        out = self._encode_batch(items)
        for im, feats in zip(images, out):
            if isinstance(im, ImageInput) and feats.shape[0] != im.num_tokens:
                raise RuntimeError(
                    f"the encoder gave {feats.shape[0]} tokens for an image expected to give"
                    f" {im.num_tokens}"
                )
        return [f.to(self.dtype) for f in out]

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Text embeddings ``[n, hidden_size]`` (``spec.dtype``) of ``input_ids [n]`` int64.

        Image placeholder rows hold the placeholder token's embedding: the caller overwrites
        them with the image tokens (see ``insert_image_tokens``).
        """
        self._require("embed")
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        return self._lm.get_input_embeddings()(ids)

    @torch.no_grad()
    def forward(
        self, inputs_embeds: torch.Tensor, batch: FlatBatch, extras: Sequence[Extras]
    ) -> torch.Tensor:
        """Runs a flat batch's new tokens through the language model over the paged KV cache.

        Each new token's K/V is written into ``batch.cache`` at its slot as the layers run;
        attention reads the pages (see ``epdrt.models.paged``). Prompts, prompt chunks and
        decode tokens may share one batch.

        Args:
            inputs_embeds: ``[T, hidden_size]``, the batch's new tokens in batch order (text
                embeddings with image tokens inserted, or ``embed`` of decode tokens).
            batch: where the tokens go and what each sequence attends to.
            extras: per sequence, its prompt's ``PreparedRequest.extras`` (prefill) or its
                ``decode_extras`` (decode); they give model-specific positions.

        Returns:
            ``[b, vocab]`` float32: logits of each sequence's last new token (a prompt chunk
            that does not end its prompt gets a row too; the caller ignores it).
        """
        self._require("prefill")
        if inputs_embeds.shape != (batch.num_tokens, self.spec.hidden_size):
            raise ValueError(
                f"inputs_embeds must be [{batch.num_tokens}, {self.spec.hidden_size}] for this"
                f" batch, got {list(inputs_embeds.shape)}"
            )
        if len(extras) != len(batch.seq_ids):
            raise ValueError(f"{len(extras)} extras for {len(batch.seq_ids)} sequences")
        positions = self._flat_positions(extras, batch.starts, batch.query_lens)
        with paged_attention_of(self._lm.config):
            out = self._lm(
                inputs_embeds=inputs_embeds[None].to(self.dtype),
                position_ids=positions,
                use_cache=False,
                **{BATCH_KWARG: batch},
            )
        hidden = out.last_hidden_state[0]  # [T, hidden]
        rows = torch.from_numpy(batch.last_rows).to(self.device)
        return self._logits(hidden.index_select(0, rows))

    def decode_extras(self, extras: Extras) -> dict[str, torch.Tensor]:
        """What decoding needs of a request (CPU tensors), taken from its prompt's extras."""
        return {}

    # ---- helpers -----------------------------------------------------------------------------
    def _text_positions(self, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """``[T]`` host: each new token's position in its sequence, sequences concatenated."""
        seq = np.repeat(np.arange(len(counts)), counts)
        first_row = np.cumsum(counts) - counts
        return np.arange(int(counts.sum())) - first_row[seq] + starts[seq]

    def _flat_positions(
        self, extras: Sequence[Extras], starts: np.ndarray, counts: np.ndarray
    ) -> torch.Tensor:
        """Position ids of a flat batch's tokens, ``[1, T]`` (``[3, 1, T]`` for M-RoPE)."""
        return torch.from_numpy(self._text_positions(starts, counts))[None].to(self.device)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()


def insert_image_tokens(
    embeds: torch.Tensor, starts: Sequence[int], image_tokens: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Writes ``image_tokens[i] [n_i, hidden]`` over rows ``starts[i] : starts[i] + n_i`` of
    ``embeds [n, hidden]`` in place (reference for the runtime's kernel) and returns it."""
    for start, tokens in zip(starts, image_tokens):
        embeds[start : start + tokens.shape[0]] = tokens.to(embeds.dtype)
    return embeds


def _resolve_dtype(dtype: torch.dtype | str | None, config) -> torch.dtype:
    if dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}")
    return dtype
