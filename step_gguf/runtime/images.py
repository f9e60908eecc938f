"""Images as clients send them to llama-server: a file as an OpenAI `image_url` part holding a
data URL (llama-server decodes PNG, JPEG, GIF, BMP, ...; it tells the format from the bytes)."""

from __future__ import annotations

import base64
import mimetypes
import os
from pathlib import Path

from ..core.errors import StepGGUFError

MAX_BYTES = 64 << 20    # an image file larger than this is not a photo: refused before sending


def image_part(path: str | os.PathLike) -> dict:
    """The chat content part that carries the image file at `path`."""
    path = Path(path)
    if not path.is_file():
        raise StepGGUFError(f"{path} does not exist; give an image file (PNG, JPEG, ...)")
    if path.stat().st_size > MAX_BYTES:
        raise StepGGUFError(f"{path} is {path.stat().st_size >> 20} MiB; give an image under {MAX_BYTES >> 20} MiB")
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    data = base64.b64encode(path.read_bytes()).decode()
    return {"type": "image_url", "image_url": {"url": f"data:{kind};base64,{data}"}}


def user_message(text: str, images: tuple[str | os.PathLike, ...] = ()) -> dict:
    """A user turn: `text`, after the images when there are any."""
    if not images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [*map(image_part, images), {"type": "text", "text": text}]}
