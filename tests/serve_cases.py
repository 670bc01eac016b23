# SPDX-License-Identifier: Apache-2.0
"""Request bodies shared by the server's tests: the in-process server (``test_serve``) and a
real ``epdrt serve`` process behind the ``openai`` client (``test_serve_openai``) get the same
bad input and must answer it alike."""

from __future__ import annotations

import base64
from pathlib import Path

from model_utils import make_image, png_bytes

MODEL = "tiny-llava"
#: The servers' limits the bad input is built against (EPDConfig and ServeSettings).
MAX_IMAGES = 2
MAX_IMAGE_PIXELS = 200 * 200
MAX_BODY_BYTES = 1 << 20


def data_url(img_bytes: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(img_bytes).decode()}"


def chat_body(content, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 8,
            **extra}  # fmt: skip


def bad_requests(media: Path | None) -> dict[str, tuple[dict | bytes, int]]:
    """Each kind of bad chat request -> (its body, or raw bytes; the status it must get).
    ``media`` is the server's ``--allowed-local-media-path`` (None: file:// is refused)."""
    png = png_bytes(make_image(40, 30, 2))
    image = lambda url: [{"type": "image_url", "image_url": {"url": url}}]  # noqa: E731
    outside = Path(__file__).resolve()
    side = int(MAX_IMAGE_PIXELS**0.5) + 100
    return {
        "malformed JSON": (b'{"model": ', 400),
        "wrong type": ({"model": MODEL, "messages": "hi"}, 400),
        "unknown model": ({**chat_body("hi"), "model": "gpt-9"}, 404),
        "n > 1": (chat_body("hi", n=2), 400),
        "bad temperature": (chat_body("hi", temperature=-1), 400),
        "zero max_tokens": (chat_body("hi", max_tokens=0), 400),
        "remote URL": (chat_body(image("https://example.com/cat.png")), 400),
        "file outside": (chat_body(image(outside.as_uri())), 403 if media else 400),
        "not an image type": (chat_body(image(data_url(png, "text/plain"))), 400),
        "bad base64": (chat_body(image("data:image/png;base64,@@@")), 400),
        "corrupt image": (chat_body(image(data_url(b"\x89PNG\r\n\x1a\nnot really"))), 400),
        "too many images": (chat_body(image(data_url(png)) * (MAX_IMAGES + 1)), 400),
        "oversized image": (chat_body(image(data_url(png_bytes(make_image(side, side, 4))))), 400),
        "prompt over the context": (chat_body("word " * 5000), 400),
        "body too large": (chat_body("x" * 2 * MAX_BODY_BYTES), 413),
        "unknown part": (chat_body([{"type": "audio_url"}]), 400),
    }
