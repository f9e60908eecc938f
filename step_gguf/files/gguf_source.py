"""Reading a GGUF input: one file, or a set of shards in llama.cpp's gguf-split layout.

A split model is `NAME-00001-of-0000N.gguf` ... `NAME-0000N-of-0000N.gguf` (llama.cpp's
`llama_split_path`: "%s-%05d-of-%05d.gguf", numbered from 1). Each shard is a valid GGUF with
`split.no` (u16, from 0), `split.count` (u16) and `split.tensors.count` (i32: the tensors of
the whole set); the first shard holds all the metadata, the later ones the split keys and
their tensors only. Any shard's path opens the whole set: its tensors are the shards' tensors
in shard order, each with its shard and absolute data offset, so a reader never needs to know
that the model was split. Whatever can be wrong with a set (a missing, renamed, foreign or
truncated shard, a wrong count, a tensor twice) is a one-line SourceError saying what to do.

Neither gguf-split nor llama.cpp records which set a shard belongs to: two sets with the same
tensor names, shapes and types (two uploads of one quantization) cannot be told apart.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from ..core.errors import SourceError, malformed
from ..core.model import ARCH
from .checkpoint import TensorRef

SPLIT_NO = gguf.Keys.Split.LLM_KV_SPLIT_NO                    # "split.no"
SPLIT_COUNT = gguf.Keys.Split.LLM_KV_SPLIT_COUNT              # "split.count"
SPLIT_TENSORS = gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT    # "split.tensors.count"
SPLIT_KEYS = (SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS)
MAX_SHARDS = 65535  # split.count is a u16
_MISSING = object()
_SHARD_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def shard_path(out: str | os.PathLike, no: int, count: int) -> Path:
    """Shard `no` (from 0) of `count` of the split output `out`: llama.cpp's
    llama_split_path with `out` less its .gguf suffix as the prefix (m.gguf -> m-00001-of-00003.gguf)."""
    out = Path(out)
    return out.with_name(f"{out.name.removesuffix('.gguf')}-{no + 1:05d}-of-{count:05d}.gguf")


def parse_shard_name(path: str | os.PathLike) -> tuple[Path, int, int] | None:
    """(the set's output path, shard number from 0, shard count) of a name in llama.cpp's split
    form, else None."""
    path = Path(path)
    m = _SHARD_NAME.match(path.name)
    if not m or int(m["no"]) < 1 or int(m["no"]) > int(m["count"]):
        return None
    return path.with_name(m["prefix"] + ".gguf"), int(m["no"]) - 1, int(m["count"])


def first_shard(path: str | os.PathLike) -> Path:
    """The path llama.cpp must be given to load the model `path` belongs to: the first shard of
    a split set (from any shard's path, by name), else `path` itself. llama.cpp checks the set
    as it loads it; open_gguf checks everything first."""
    path = Path(path)
    parsed = parse_shard_name(path)
    if parsed is None or parsed[1] == 0:
        return path
    out, no, count = parsed
    first = shard_path(out, 0, count)
    if not first.is_file():
        raise SourceError(f"{path.name} is shard {no + 1} of {count}, but the first shard {first.name} "
                          f"is missing from {path.parent}; download all {count} shards")
    return first


class _Truncated(Exception):
    def __init__(self, tensor: str) -> None:
        super().__init__(tensor)
        self.tensor = tensor


class _UnknownType(Exception):
    def __init__(self, tensor: str, type_id: int) -> None:
        super().__init__(tensor)
        self.tensor, self.type_id = tensor, type_id


# ggml types newer than some gguf package releases (gguf 0.19.0 on PyPI lacks Q2_0)
_GGML_TYPE_NAMES = {39: "MXFP4", 40: "NVFP4", 41: "Q1_0", 42: "Q2_0"}


class _Reader(gguf.GGUFReader):
    """gguf's reader, telling a tensor that ends past the end of the file (a cut download),
    or one of a ggml type the installed gguf package does not know, apart from a malformed header."""

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        size = len(self.data)
        for f in fields:
            _, name, _, dims, raw_dtype, offset = f.parts
            type_id = int(raw_dtype[0])
            try:
                block, type_size = gguf.GGML_QUANT_SIZES[Q(type_id)]
            except (ValueError, KeyError):
                raise _UnknownType(bytes(name).decode("utf-8", "replace"), type_id) from None
            end = int(start_offs) + int(offset[0]) + math.prod(int(d) for d in dims) * type_size // block
            if end > size:
                raise _Truncated(bytes(name).decode("utf-8", "replace"))
        super()._build_tensors(start_offs, fields)


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return f"gguf {version('gguf')}"
    except PackageNotFoundError:
        return "gguf"


def _read(path: Path) -> gguf.GGUFReader:
    try:
        with malformed(path, SourceError, "is not a readable GGUF"):
            return _Reader(path)
    except _Truncated as exc:
        raise SourceError(f"{path} is truncated: {exc.tensor} ends past the end of the file; "
                          "download or write it again") from None
    except _UnknownType as exc:
        kind = _GGML_TYPE_NAMES.get(exc.type_id, "unknown")
        raise SourceError(f"{path} stores {exc.tensor} as ggml type {exc.type_id} ({kind}), which the "
                          f"installed {_gguf_version()} package cannot read; quantize the model "
                          "to another type (Q2_K, IQ2_S, Q4_K_M, ...)") from None
    except OSError as exc:
        raise SourceError(f"{path} cannot be read ({exc.strerror or exc})") from None


def _int_key(reader: gguf.GGUFReader, path: Path, key: str) -> int | None:
    f = reader.get_field(key)
    if f is None:
        return None
    value = f.contents() if f.types and f.types[0] != gguf.GGUFValueType.ARRAY else None
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise SourceError(f"{path} has a malformed {key} ({value!r}); it is not a usable split shard")
    return int(value)


KvField = tuple[str, Any, gguf.GGUFValueType, gguf.GGUFValueType | None]


def kv_fields(reader: gguf.GGUFReader, skip: tuple[str, ...]) -> list[KvField]:
    """The key/value fields of `reader` but those whose key starts with one of `skip`, decoded
    (a corrupt value fails here, not while writing) as GGUFWriter.add_key_value takes them."""
    return [(f.name, f.contents(), f.types[0], f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
            for f in reader.fields.values() if not f.name.startswith(skip)]


def add_kv_fields(writer: gguf.GGUFWriter, fields: list[KvField]) -> None:
    for name, value, vtype, sub in fields:
        writer.add_key_value(name, value, vtype, sub_type=sub)


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of the model, wherever its shard is; named as gguf's ReaderTensor, plus its shard."""

    name: str
    tensor_type: Q
    shape: tuple[int, ...]       # ggml order: ne0 (the row width) first, as gguf's reader gives it
    n_elements: int
    n_bytes: int
    shard: Path
    data_offset: int             # absolute byte offset of the data in `shard`
    data: np.ndarray = field(compare=False, repr=False)   # the reader's view of the bytes

    @property
    def torch_shape(self) -> tuple[int, ...]:
        """PyTorch order (the row width last), as OutputTensor and the config use."""
        return tuple(reversed(self.shape))

    def ref(self) -> TensorRef:
        """Where the bytes are, for the converter's readers."""
        return TensorRef(self.name, self.name, self.shard, self.tensor_type.name, self.torch_shape,
                         self.data_offset, self.n_bytes)


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF model, one file or a checked set of shards."""

    path: Path                   # the file llama.cpp loads: the first shard, or the one file
    shards: tuple[Path, ...]     # every file, in order (one for an unsplit model)
    fields: dict[str, Any] = field(repr=False)       # the first shard's ReaderFields less split.*
    tensors: tuple[SourceTensor, ...] = field(repr=False)
    readers: tuple[gguf.GGUFReader, ...] = field(repr=False, compare=False)

    @property
    def split(self) -> bool:
        return len(self.shards) > 1

    @property
    def arch(self) -> str | None:
        f = self.fields.get(gguf.Keys.General.ARCHITECTURE)
        return f.contents() if f is not None else None

    def get_field(self, key: str):
        return self.fields.get(key)

    def kv(self, key: str, default: Any = _MISSING) -> Any:
        """The value of an architecture key, named as gguf.Keys names it ("{arch}.block_count"):
        the default for a missing key, or a one-line SourceError without one."""
        name = key.format(arch=self.arch)
        f = self.fields.get(name)
        if f is not None:
            return f.contents()
        if default is _MISSING:
            raise SourceError(f"{self.path} lacks the key {name}")
        return default

    @property
    def layers(self) -> tuple[int, int]:
        """(trunk layers, MTP blocks): block_count counts both."""
        n_all = int(self.kv(gguf.Keys.LLM.BLOCK_COUNT))
        n_nextn = int(self.kv(gguf.Keys.LLM.NEXTN_PREDICT_LAYERS, 0))
        return n_all - n_nextn, n_nextn

    @property
    def experts_used(self) -> int:
        """Experts each token uses: a scalar, or llama.cpp's per-layer array form (the largest)."""
        value = self.kv(gguf.Keys.LLM.EXPERT_USED_COUNT, 1)
        return max(int(k) for k in value) if isinstance(value, list) and value else int(value or 1)


def open_gguf(path: str | os.PathLike, *, arch: str | None = ARCH) -> GGUFSource:
    """Open the GGUF model at `path` (a file, or any shard of a split set) and check it: every
    shard present and of this set, every tensor inside its file, once; and, unless `arch` is
    None, the architecture."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path} does not exist; give a GGUF file (any shard of a split model)")
    with malformed(path, SourceError, "is not a readable GGUF"):
        reader = _read(path)
        count = _int_key(reader, path, SPLIT_COUNT)
        if count is None or count <= 1:  # a plain file (gguf-split writes "-of-00001" with count 1)
            source = _assemble(path, [path], [reader])
        else:
            source = _open_set(path, reader, count)
        found = source.arch
    if arch is not None and found != arch:
        raise SourceError(f"{source.path} is not a Step 3.5 GGUF (architecture "
                          f"{found or 'missing'}, expected {arch})")
    return source


def _open_set(path: Path, reader: gguf.GGUFReader, count: int) -> GGUFSource:
    no = _int_key(reader, path, SPLIT_NO)
    if no is None or not 0 <= no < count:
        raise SourceError(f"{path} says it is one of {count} shards but has no valid {SPLIT_NO} "
                          f"({no}); it is not a usable split shard")
    if count > MAX_SHARDS:
        raise SourceError(f"{path} says the model has {count} shards, more than a split GGUF can")
    parsed = parse_shard_name(path)
    if parsed is None or parsed[1:] != (no, count):
        raise SourceError(f"{path.name} is shard {no + 1} of {count} by its {SPLIT_NO}/{SPLIT_COUNT} "
                          f"keys, so it must be named {shard_path(path.with_name('NAME.gguf'), no, count).name} "
                          "(llama.cpp finds the shards by name); rename it back")
    out = parsed[0]
    paths = [shard_path(out, i, count) for i in range(count)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SourceError(f"shard {missing[0].name}{more} of this {count}-shard model is missing from "
                          f"{path.parent}; download all {count} shards")
    readers = [reader if p == path else _read(p) for p in paths]
    first = readers[0]
    total = _int_key(first, paths[0], SPLIT_TENSORS)
    if total is None:
        raise SourceError(f"{paths[0].name} has no {SPLIT_TENSORS} key; it is not a usable split shard")
    for i, (p, r) in enumerate(zip(paths, readers)):
        r_no, r_count = _int_key(r, p, SPLIT_NO), _int_key(r, p, SPLIT_COUNT)
        r_total = _int_key(r, p, SPLIT_TENSORS)
        if r_count != count or r_no != i:
            got = "no split keys" if r_count is None else f"shard {(r_no or 0) + 1} of {r_count}"
            raise SourceError(f"{p.name} is {got} by its keys, not shard {i + 1} of {count}: it is "
                              "not part of this set (a file of another model, or renamed); "
                              f"download shard {i + 1} of this model again")
        if r_total != total:
            raise SourceError(f"{p.name} belongs to a model of {r_total} tensors, {paths[0].name} to one "
                              f"of {total}: the shards come from two different models; download "
                              "all shards of one model")
    if first.get_field(gguf.Keys.General.ARCHITECTURE) is None:
        raise SourceError(f"{paths[0].name} holds no metadata: it is not the first shard of a model "
                          "(files of another set, or renamed); download the set again")
    source = _assemble(paths[0], paths, readers)
    if len(source.tensors) != total:
        raise SourceError(f"the {count} shards of {paths[0].name} hold {len(source.tensors)} tensors, "
                          f"its {SPLIT_TENSORS} says {total}: shards of different models or a "
                          "damaged set; download all shards of one model")
    return source


def _assemble(first: Path, paths: list[Path], readers: list[gguf.GGUFReader]) -> GGUFSource:
    tensors: list[SourceTensor] = []
    seen: dict[str, Path] = {}
    for p, r in zip(paths, readers):
        for t in r.tensors:
            if t.name in seen:  # within one file gguf's reader already refuses a duplicate
                raise SourceError(f"tensor {t.name} is in both {seen[t.name].name} and {p.name}: the "
                                  "shards come from two different models; download all shards of one model")
            seen[t.name] = p
            tensors.append(SourceTensor(t.name, Q(t.tensor_type), tuple(int(d) for d in t.shape),
                                        int(t.n_elements), int(t.n_bytes), p, int(t.data_offset),
                                        t.data))
    fields = {name: f for name, f in readers[0].fields.items() if not name.startswith("split.")}
    return GGUFSource(first, tuple(paths), fields, tuple(tensors), tuple(readers))


def resolve(path: str | os.PathLike) -> Path:
    """The checked path to give llama.cpp's tools for the GGUF model at `path` (any shard)."""
    return open_gguf(path, arch=None).path

