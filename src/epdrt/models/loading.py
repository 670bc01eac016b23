# SPDX-License-Identifier: Apache-2.0
"""Loading only some parts of a ``transformers`` model, and fingerprinting a model directory.

The whole model is first built on the ``meta`` device (module objects, no memory). The parts a
stage needs (e.g. ``model.visual`` for encode, ``model.language_model`` and ``lm_head`` for the LM
stages) are then rebuilt on the target device and filled from the directory's safetensors
files; the other parts stay on ``meta`` and cost nothing.

NOTE: a part that is a ``PreTrainedModel`` is rebuilt with its own class from its own config
(``_from_config``), so its non-persistent buffers (rotary ``inv_freq``, position ids) are
computed exactly as ``from_pretrained`` computes them. Any other part (projector, ``lm_head``) must
hold only parameters and persistent buffers; it is moved off ``meta`` with ``to_empty``.

A directory without weights may carry ``epdrt.json`` = ``{"weights": "random", "seed": N}``
(written by ``make-tiny-model --size``): its parts are then initialized by the model's own
initializer, seeded per part so that every process builds the same weights.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import PreTrainedModel

from epdrt.models.errors import ModelLoadError
from epdrt.models.images import digest

#: File marking a config-only directory whose weights are drawn at load time.
RANDOM_WEIGHTS_FILE = "epdrt.json"
#: Files up to this size are hashed whole for the model identity; larger ones are sampled.
FULL_HASH_BYTES = 256 * 2**20
_SAMPLES = 64
_SAMPLE_BYTES = 2**20

KeyMap = Callable[[str], str]


def weight_files(model_dir: Path) -> list[Path]:
    """The directory's ``*.safetensors`` files, sorted by name."""
    return sorted(model_dir.glob("*.safetensors"))


def random_weights_seed(model_dir: Path) -> int | None:
    """The seed of a random-weights directory, or None when the directory has no marker."""
    marker = model_dir / RANDOM_WEIGHTS_FILE
    if not marker.exists():
        return None
    try:
        info = json.loads(marker.read_text())
        if info.get("weights") != "random":
            raise ValueError(f"unknown weights mode {info.get('weights')!r}")
        return int(info.get("seed", 0))
    except (ValueError, TypeError, AttributeError) as exc:
        raise ModelLoadError(f"{marker}: {exc}") from exc


class WeightIndex:
    """Lazy access to the tensors of a directory's safetensors files, under module names.

    Args:
        files: safetensors files (one or several shards).
        key_map: checkpoint key -> module parameter name (e.g. legacy prefixes to 5.x names).
    """

    def __init__(self, files: Sequence[Path], key_map: KeyMap) -> None:
        self._where: dict[str, tuple[Path, str]] = {}
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                        self._where[key_map(key)] = (path, key)
            except Exception as exc:
                raise ModelLoadError(f"cannot read weights file {path}: {exc}") from exc

    def names_under(self, prefix: str) -> list[str]:
        """Module names of the stored tensors under ``prefix`` ('' = all)."""
        return [n for n in self._where if not prefix or n.startswith(prefix + ".")]

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def load(self, names: Iterable[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The tensors ``names`` (module names), read onto ``device``."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self._where[name][0], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for path, group in by_file.items():
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for name in group:
                    out[name] = f.get_tensor(self._where[name][1])
        return out


def build_skeleton(
    model_class: type[PreTrainedModel], config, dtype: torch.dtype
) -> PreTrainedModel:
    """The whole model on the ``meta`` device (no memory), in eval mode."""
    with torch.device("meta"):
        model = model_class._from_config(config, dtype=dtype)
    return model.eval()


def materialize(
    model: PreTrainedModel,
    parts: Sequence[str],
    weights: WeightIndex | None,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    may_miss: frozenset[str] = frozenset(),
) -> None:
    """Rebuilds ``parts`` (dotted submodule paths) of ``model`` on ``device`` and fills them.

    With ``weights`` every parameter and persistent buffer of a part must be in the checkpoint,
    except the names in ``may_miss`` (e.g. a tied ``lm_head.weight``); extra checkpoint tensors
    are ignored. Without ``weights`` the parts get seeded random weights.
    """
    for path in parts:
        module = model.get_submodule(path)
        with ExitStack() as stack:
            devices = [device] if device.type == "cuda" else []
            stack.enter_context(torch.random.fork_rng(devices=devices))
            torch.manual_seed(_part_seed(seed, path))
            if isinstance(module, PreTrainedModel):
                with torch.device(device):
                    new = type(module)._from_config(module.config, dtype=dtype)
            else:
                _check_plain(path, module)
                new = module.to_empty(device=device)
                if weights is None:
                    _init_plain(new, _initializer_range(model.config))
        new.eval().requires_grad_(False)
        _set_submodule(model, path, new)
        if weights is not None:
            _load_part(path, new, weights, device, may_miss)


def tie_lm_head(model: PreTrainedModel) -> None:
    """Shares the input embedding with ``lm_head`` when the config ties them (as HF does)."""
    if getattr(model.config, "tie_word_embeddings", False):
        model.lm_head.weight = model.get_input_embeddings().weight


def model_identity(model_dir: Path, model_type: str) -> bytes:
    """32-byte digest naming the model: its config and a fingerprint of its weights.

    NOTE: weight files up to ``FULL_HASH_BYTES`` are hashed whole. Larger files are fingerprinted
    by their safetensors header (names, dtypes, shapes, offsets) plus 64 evenly spaced 1 MiB
    samples, so that a 15 GB checkpoint is named in milliseconds; two checkpoints that differ
    only outside the samples would share a name (fine-tunes change every tensor).
    """
    parts = [b"epdrt-model-v1", model_type.encode()]
    try:
        parts.append((model_dir / "config.json").read_bytes())
        files = weight_files(model_dir)
        for path in files:
            parts += [path.name.encode(), _file_fingerprint(path)]
        if not files:
            seed = random_weights_seed(model_dir)
            parts.append(f"random-weights seed={seed}".encode())
    except OSError as exc:
        raise ModelLoadError(f"cannot read model directory {model_dir}: {exc}") from exc
    return digest(*parts)


def _file_fingerprint(path: Path) -> bytes:
    size = path.stat().st_size
    h = hashlib.blake2b(digest_size=32)
    h.update(size.to_bytes(8, "little"))
    with path.open("rb") as f:
        if size <= FULL_HASH_BYTES:
            while chunk := f.read(2**22):
                h.update(chunk)
            return h.digest()
        header_len = int.from_bytes(f.read(8), "little")
        h.update(f.read(min(header_len, size - 8)))
        for i in range(_SAMPLES):
            f.seek((size - _SAMPLE_BYTES) * i // (_SAMPLES - 1))
            h.update(f.read(_SAMPLE_BYTES))
    return h.digest()


def _part_seed(seed: int, path: str) -> int:
    raw = hashlib.blake2b(f"{seed}:{path}".encode(), digest_size=8).digest()
    return int.from_bytes(raw, "little") & (2**63 - 1)


def _initializer_range(config) -> float:
    text = config.get_text_config()
    return float(getattr(text, "initializer_range", None) or config.initializer_range or 0.02)


def _check_plain(path: str, module: nn.Module) -> None:
    for name, sub in module.named_modules():
        if sub._non_persistent_buffers_set:
            raise ModelLoadError(
                f"part {path}: submodule {name or '(root)'} has non-persistent buffers"
                f" {sorted(sub._non_persistent_buffers_set)}; the adapter must list it as a"
                " PreTrainedModel part"
            )


@torch.no_grad()
def _init_plain(module: nn.Module, std: float) -> None:
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, std)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)  # norm scales


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def _load_part(
    path: str,
    module: nn.Module,
    weights: WeightIndex,
    device: torch.device,
    may_miss: frozenset[str],
) -> None:
    expected = set(module.state_dict())
    stored = {n[len(path) + 1 :] for n in weights.names_under(path)}
    missing = {n for n in expected - stored if f"{path}.{n}" not in may_miss}
    expected &= stored
    if missing:
        shown = ", ".join(sorted(missing)[:5])
        raise ModelLoadError(
            f"the checkpoint lacks {len(missing)} tensors of {path} (e.g. {shown})"
        )
    tensors = weights.load([f"{path}.{n}" for n in expected], device)
    state = {n[len(path) + 1 :]: t for n, t in tensors.items()}
    try:
        module.load_state_dict(state, strict=False)  # completeness was checked above
    except RuntimeError as exc:
        raise ModelLoadError(f"checkpoint tensors do not fit {path}: {exc}") from exc
