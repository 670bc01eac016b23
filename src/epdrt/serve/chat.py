# SPDX-License-Identifier: Apache-2.0
"""Chat messages as a prompt in the model's own format, rendered by ``transformers``.

The template is ``--chat-template FILE`` when given, else the model directory's
(``chat_template.jinja``, ``chat_template.json`` of the processor, or the tokenizer's own).
Image parts become ``{"type": "image"}`` parts, which a multimodal template renders as the
model's image placeholder; the rendering must hold exactly one placeholder per image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from epdrt.serve.media import image_bytes
from epdrt.serve.protocol import ApiError, Message

ROLES = ("system", "user", "assistant", "developer", "tool")


def load_template(model_dir: Path, override: str | None, tokenizer: Any) -> str | None:
    """The chat template's text: ``override`` (a file), else the model's; None without one."""
    if override is not None:
        return Path(override).read_text()
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    processor = model_dir / "chat_template.json"
    if processor.is_file():
        return json.loads(processor.read_text()).get("chat_template")
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) else None


class ChatRenderer:
    """Turns OpenAI ``messages`` into ``(prompt, images)`` for the cluster."""

    def __init__(
        self,
        tokenizer: Any,
        template: str | None,
        placeholder: str,
        *,
        allowed_media: Path | None,
        max_image_bytes: int,
    ) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.placeholder = placeholder
        self.allowed_media = allowed_media
        self.max_image_bytes = max_image_bytes

    def render(self, messages: list[Message]) -> tuple[str, list[bytes]]:
        """The prompt and the images' bytes, in prompt order. ApiError 400 when the model has
        no template, a part is unknown, an image cannot be had, or the template drops one."""
        if self.template is None:
            raise ApiError(
                400, "this model has no chat template: use /v1/completions, or start the server"
                " with --chat-template FILE",
            )  # fmt: skip
        conversation, images = [], []
        for i, msg in enumerate(messages):
            if msg.role not in ROLES:
                raise ApiError(400, f"messages[{i}].role {msg.role!r} is not one of {ROLES}")
            if msg.content is None or isinstance(msg.content, str):
                conversation.append({"role": msg.role, "content": msg.content or ""})
                continue
            parts = []
            for j, part in enumerate(msg.content):
                where = f"messages[{i}].content[{j}]"
                if part.type == "text" and part.text is not None:
                    parts.append({"type": "text", "text": part.text})
                elif part.type == "image_url" and part.image_url is not None:
                    url = part.image_url.url
                    media, limit = self.allowed_media, self.max_image_bytes
                    images.append(image_bytes(url, allowed_dir=media, max_bytes=limit))
                    parts.append({"type": "image"})
                else:
                    raise ApiError(400, f"{where}: unsupported part type {part.type!r}")
            conversation.append({"role": msg.role, "content": parts})
        try:
            prompt = self.tokenizer.apply_chat_template(
                conversation, chat_template=self.template, tokenize=False,
                add_generation_prompt=True,
            )  # fmt: skip
        except TemplateError as exc:
            raise ApiError(
                400, f"the chat template could not render these messages: {exc}"
            ) from exc
        found = prompt.count(self.placeholder)
        if found != len(images):
            raise ApiError(
                400, f"the chat template rendered {found} image placeholders for {len(images)}"
                " images",
            )  # fmt: skip
        return prompt, images
