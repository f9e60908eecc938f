"""Streaming access to a sharded safetensors checkpoint.

Only headers are parsed up front; tensor bytes are read on demand by offset, so memory stays
bounded whatever the model size. Missing and truncated shards are caught before any output
is written.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import CheckpointError, malformed
from ..core.hub_layout import checkpoint_file
from ..core.model import normalise_name

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"  # FP8: `x.weight_scale_inv` holds the block scales of `x.weight`

# safetensors dtypes a Step 3.5 checkpoint may hold -> bytes per element
ELEMENT_BYTES: dict[str, int] = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1}


@dataclass(frozen=True)
class TensorRef:
    name: str          # normalised (3.5 layout) name
    raw_name: str      # name as stored
    shard: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int        # absolute byte offset of the data in the shard
    nbytes: int

    def read(self, start: int = 0, length: int | None = None) -> bytes:
        """Raw bytes [start, start+length) of this tensor's data."""
        length = self.nbytes - start if length is None else length
        with open(self.shard, "rb") as f:
            data = os.pread(f.fileno(), length, self.offset + start)
        if len(data) != length:
            raise self.truncated()
        return data

    def truncated(self) -> CheckpointError:
        return CheckpointError(f"{self.shard.name} is truncated inside {self.raw_name}")

    def array(self) -> np.ndarray:
        """The whole tensor as float32 (for small tensors: norms, biases, scales)."""
        return decode(self.read(), self.dtype).reshape(self.shape)


def _fp8_e4m3_table() -> np.ndarray:
    bits = np.arange(256, dtype=np.uint32)
    sign = np.where(bits & 0x80, -1.0, 1.0)
    exp = (bits >> 3) & 0xF
    man = (bits & 0x7).astype(np.float64)
    value = np.where(exp == 0, man / 8 * 2.0 ** -6, (1 + man / 8) * 2.0 ** (exp.astype(np.float64) - 7))
    value = np.where((exp == 0xF) & ((bits & 0x7) == 0x7), np.nan, value)  # e4m3fn: only NaN, no inf
    return (sign * value).astype(np.float32)


FP8_E4M3_VALUES = _fp8_e4m3_table()  # code -> value


def fp8_scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """Shape of the `weight_scale_inv` grid: one scale per block of the last two dims."""
    return (*shape[:-2], math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1]))


def decode(raw: bytes | memoryview, dtype: str) -> np.ndarray:
    """Raw little-endian bytes of a safetensors dtype -> flat float32 array."""
    if dtype == "F32":
        return np.frombuffer(raw, "<f4").astype(np.float32, copy=False)
    if dtype == "F16":
        return np.frombuffer(raw, "<f2").astype(np.float32)
    if dtype == "BF16":
        return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
    if dtype == "F8_E4M3":
        return FP8_E4M3_VALUES[np.frombuffer(raw, np.uint8)]
    raise CheckpointError(f"unsupported tensor dtype {dtype}; expected BF16, F16, F32 or F8_E4M3")


def read_header(shard: Path) -> tuple[dict, int]:
    """(header dict, offset of the data section) of one safetensors file."""
    try:
        with open(shard, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{shard.name} is truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if n > 100 * 2**20:
                raise CheckpointError(f"{shard.name} is not a safetensors file (header size {n})")
            blob = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"shard {shard.name} is missing from {shard.parent}; "
                              "download the complete checkpoint") from None
    except IsADirectoryError:
        raise CheckpointError(f"shard {shard.name} is a folder, not a safetensors file") from None
    if len(blob) < n:
        raise CheckpointError(f"{shard.name} is truncated (header cut short)")
    try:
        header = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{shard.name} has a corrupt safetensors header (not UTF-8 JSON); "
                              "re-download the shard") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{shard.name} has a corrupt safetensors header (not a JSON object)")
    return header, 8 + n


def _shard_name(name: object, index: Path) -> str:
    """A shard name from the index, refused unless it is a plain file name inside the folder:
    a checkpoint from the internet must not make us read anything outside it."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name
            or "\\" in name or "\0" in name):
        raise CheckpointError(f"{index.name} names shard {name!r}; shard names must be plain file "
                              "names inside the checkpoint folder")
    return name


class Checkpoint:
    """The decoder tensors of a Step 3.5 (or 3.7) checkpoint folder, by normalised name."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.tensors: dict[str, TensorRef] = {}
        self.scales: dict[str, TensorRef] = {}
        self.outside: dict[str, TensorRef] = {}    # by stored name: the vision tower and projector
        for shard in self._shards():
            self._index_shard(shard)

    def _shards(self) -> list[Path]:
        index = checkpoint_file(self.path, INDEX)
        if index.is_file():
            with malformed(index, CheckpointError):
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                names = sorted({_shard_name(s, index) for s in weight_map.values()})
            shards = [self.path / s for s in names]
        elif (self.path / SINGLE).is_file():
            shards = [self.path / SINGLE]
        else:
            raise CheckpointError(f"no {INDEX} or {SINGLE} in {self.path}; is this a checkpoint folder?")
        for shard in shards:
            checkpoint_file(self.path, shard.name, f"shard {shard.name}")
        return shards

    def _index_shard(self, shard: Path) -> None:
        header, data_start = read_header(shard)
        size = shard.stat().st_size
        for raw_name, info in header.items():
            if raw_name == "__metadata__":
                continue
            name = normalise_name(raw_name)
            ref = _tensor_ref(shard, raw_name, name or raw_name, info, data_start)
            if ref.offset + ref.nbytes > size:
                raise CheckpointError(
                    f"{shard.name} is truncated: {raw_name} ends at byte {ref.offset + ref.nbytes}, "
                    f"file has {size}; re-download the shard"
                )
            if name is None:  # vision tower, projector: not part of the text decoder
                self.outside[raw_name] = ref
            elif name.endswith(SCALE_SUFFIX):
                self.scales[name.removesuffix(SCALE_SUFFIX)] = ref
            else:
                self.tensors[name] = ref


def _tensor_ref(shard: Path, raw_name: str, name: str, info: object, data_start: int) -> TensorRef:
    """One header entry, checked: a known dtype, a shape of non-negative ints, and offsets that
    hold exactly that many bytes."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{shard.name}: header entry {raw_name!r} {what}; the shard is corrupt")

    if not isinstance(info, dict):
        raise bad("is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in ELEMENT_BYTES:
        raise bad(f"has unsupported dtype {dtype!r} (expected one of {', '.join(ELEMENT_BYTES)})")
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape)):
        raise bad(f"has an invalid shape {str(shape)[:80]}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and 0 <= o < 2**50 for o in offsets)
            or offsets[0] > offsets[1]):
        raise bad(f"has invalid data_offsets {str(offsets)[:80]}")
    nbytes = offsets[1] - offsets[0]
    if nbytes != math.prod(shape) * ELEMENT_BYTES[dtype]:
        raise bad(f"spans {nbytes} bytes, but {dtype} {shape} needs {math.prod(shape) * ELEMENT_BYTES[dtype]}")
    return TensorRef(name, raw_name, shard, dtype, tuple(shape), data_start + offsets[0], nbytes)
