"""What tests of GGUF files share: their keys, and whether a split set holds one model."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from step_gguf.files.gguf_source import open_gguf

SPLIT_KEYS = {"split.no", "split.count", "split.tensors.count"}


def gguf_fields(path: Path) -> dict:
    """Every key of a GGUF but the reader's own, with its value and types."""
    return {f.name: (f.contents(), tuple(f.types)) for f in gguf.GGUFReader(path).fields.values()
            if not f.name.startswith("GGUF.")}


def same_model(source, whole: Path) -> None:
    """`source` (an opened split set) holds exactly the tensors and metadata of `whole`."""
    ref = open_gguf(whole)
    assert [(t.name, t.tensor_type, t.shape) for t in source.tensors] == \
           [(t.name, t.tensor_type, t.shape) for t in ref.tensors]
    for a, b in zip(source.tensors, ref.tensors):
        assert np.asarray(a.data).tobytes() == np.asarray(b.data).tobytes(), a.name
        assert a.ref().read() == b.ref().read(), a.name  # the offsets point into the right shard
    assert {k: f.contents() for k, f in source.fields.items() if not k.startswith("GGUF.")} == \
           {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}
