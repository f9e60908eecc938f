"""mmproj GGUFs: Step 3.7's vision tower as llama.cpp's mtmd loads it beside the model, found
(NAME-mmproj.gguf beside NAME.gguf, as `convert --mmproj` writes it) and checked from its header."""

from __future__ import annotations

import os
from pathlib import Path

import gguf

from ..core.errors import SourceError, malformed
from ..core.model_facts import VisionFacts
from ..core.vision import MMPROJ_ARCH, PROJECTOR, mmproj_path
from .gguf_source import open_gguf, parse_shard_name


def read_mmproj(path: str | os.PathLike) -> VisionFacts:
    """The facts of the mmproj at `path`; a one-line error for a file that is not Step's."""
    source = open_gguf(path, arch=None)
    with malformed(path, SourceError, "is not a readable mmproj GGUF"):
        kind = source.kv(gguf.Keys.Clip.PROJECTOR_TYPE, None) or source.kv(gguf.Keys.ClipVision.PROJECTOR_TYPE, None)
        if source.arch != MMPROJ_ARCH or kind != PROJECTOR:
            raise SourceError(f"{path} is not a Step vision mmproj (architecture {source.arch or 'missing'}, "
                              f"projector {kind or 'missing'}; expected {MMPROJ_ARCH}, {PROJECTOR}): give the file "
                              "convert --mmproj wrote")
        v = gguf.Keys.ClipVision
        side = int(source.kv(v.IMAGE_SIZE)) // int(source.kv(v.PATCH_SIZE))
        return VisionFacts(str(source.path), sum(int(t.n_bytes) for t in source.tensors), side * side,
                           int(source.kv(v.EMBEDDING_LENGTH)), int(source.kv(v.FEED_FORWARD_LENGTH)))


def resolve_mmproj(model: str | os.PathLike, given: str | os.PathLike | None) -> Path | None:
    """The mmproj to load with the GGUF `model`: `given`, else the one beside it; None when
    there is none."""
    if given is not None:
        return Path(given)
    parsed = parse_shard_name(model)
    found = mmproj_path(parsed[0] if parsed else model)
    return found if found.is_file() else None
