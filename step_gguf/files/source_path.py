"""What a path given as a model source is, decided once for quantize, plan, eval and the facts
reader: a checkpoint folder (safetensors shards beside config.json), a config.json alone (a
folder holding one without weights, or the file: priced from shapes, never read) or a GGUF
(one file or any shard of a split set)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from ..core.errors import SourceError

SourceKind = Literal["checkpoint", "config", "gguf"]


def locate(src: str | os.PathLike) -> tuple[SourceKind, Path]:
    """The kind of source `src` is, and the path its reader opens."""
    src = Path(src)
    if src.is_dir():
        if not any(src.glob("*.safetensors")) and (src / "config.json").is_file():
            return "config", src / "config.json"
        return "checkpoint", src
    if not src.is_file():
        raise SourceError(f"{src} does not exist; give a checkpoint folder, its config.json or a GGUF")
    return ("config" if src.suffix == ".json" else "gguf"), src
