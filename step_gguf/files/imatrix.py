"""Importance matrices in llama.cpp's GGUF format, read exactly as llama-quantize reads them.

`llama-imatrix` stores, for each weight it saw in a matrix multiplication, `<name>.in_sum2`
(F32, n_mat rows of n_per_row: the sum over tokens of each input channel's squared activation)
and `<name>.counts` (F32, n_mat: how many tokens each matrix saw). n_mat is the number of
experts for a 3-D expert tensor, whose rows are counted per expert, and 1 otherwise.
llama-quantize turns them into importance values `in_sum2 / count` in float32, 1.0 for a matrix
that saw no token; `Imatrix` gives the same float32 values, so ggml gets bit-identical data
through our quantizer.

`step-gguf imatrix` adds how a perturbation of the residual stream at each depth moves the
output (native/propagation.py) as two arrays under PROPAGATION_POINTS/PROPAGATION_GAINS;
llama-quantize ignores them, budget mode weighs each tensor's error by them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from ..core.errors import StepGGUFError, malformed
from .gguf_source import add_kv_fields, kv_fields

SUMS, COUNTS = ".in_sum2", ".counts"
PROPAGATION_POINTS, PROPAGATION_GAINS = "step_gguf.propagation.points", "step_gguf.propagation.gains"
# the residual stream's points those arrays name: the token embeddings, each layer after its
# attention and after its FFN (layer_point), what the output matrix reads
EMBD_POINT, OUTPUT_POINT = "embd", "output"
# llama-quantize refuses a GGUF imatrix without all three
_KEYS = ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")
_RECOMPUTE = "recompute it with `step-gguf imatrix`"


class ImatrixError(StepGGUFError):
    """An importance matrix that is malformed or made for another model."""


@dataclass(frozen=True)
class ImatrixEntry:
    """The raw statistics of one weight tensor."""

    sums: np.ndarray    # float32 (n_mat, n_per_row): Σ activation² per input channel
    counts: np.ndarray  # int64 (n_mat,): tokens each matrix (expert) saw

    @property
    def importance(self) -> np.ndarray:
        """float32 (n_mat, n_per_row): the per-channel mean squared activation, as llama-quantize
        computes it (float32 sum / float32 count), 1.0 for a matrix that saw no token."""
        count = self.counts.astype(np.float32)[:, None]
        seen = count > 0
        return np.where(seen, self.sums / np.where(seen, count, np.float32(1)), np.float32(1))


class Imatrix(Mapping[str, np.ndarray]):
    """An importance matrix: weight tensor name -> importance values (n_mat, n_per_row), float32."""

    def __init__(self, path: Path, entries: dict[str, ImatrixEntry], datasets: tuple[str, ...],
                 chunk_count: int, chunk_size: int, propagation: dict[str, float] | None = None) -> None:
        self.path, self.entries, self.datasets = path, entries, datasets
        self.chunk_count, self.chunk_size = chunk_count, chunk_size
        # stream point -> KL divergence per unit of relative perturbation there, when measured
        self.propagation = propagation

    def __getitem__(self, name: str) -> np.ndarray:
        return self.entries[name].importance

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def check_against(self, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
        """Refuse an imatrix made for another model; return the model's matrices it has no data for.

        `shapes` maps the model's GGUF tensor names to their shapes in GGUF order (ne0 = input
        width first, then output rows, then experts), as `model_shapes()` and gguf's reader
        give them. Every entry the model has must take ne0 inputs for each of its ne2
        matrices, and at least one of the model's matrices must have an entry. Entries for
        tensors the model lacks (MTP blocks dropped from it, say) are ignored, as llama-quantize
        ignores them.
        """
        matmuls = sorted(name for name, shape in shapes.items() if _is_matmul(name, shape))
        for name in matmuls:
            if name in self.entries:
                ne0, n_mat = shapes[name][0], _n_mat(shapes[name])
                got = self.entries[name].sums.shape
                if got != (n_mat, ne0):
                    raise ImatrixError(
                        f"{self.path}: {name} has importance values for {got[0]} matrices of "
                        f"{got[1]} inputs, the model's tensor is {n_mat} of {ne0}; this imatrix "
                        f"was made for another model, {_RECOMPUTE}")
        missing = [name for name in matmuls if name not in self.entries]
        if matmuls and len(missing) == len(matmuls):
            raise ImatrixError(f"{self.path} has no entry for any of the model's {len(matmuls)} "
                               f"weight matrices; it was made for another model, {_RECOMPUTE}")
        return missing


def _n_mat(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape[2:], dtype=np.int64))


def _is_matmul(name: str, shape: tuple[int, ...]) -> bool:
    # the token embedding is looked up by row, never multiplied, so it never has statistics
    return len(shape) >= 2 and name.endswith(".weight") and not name.startswith("token_embd.")


def model_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape in GGUF order (ne0 first) of the GGUF model at `path` (one file, or
    every shard of a split set from any shard's path)."""
    from .gguf_source import open_gguf  # noqa: PLC0415

    return {t.name: t.shape for t in open_gguf(path, arch=None).tensors}


def load_imatrix(path: str | os.PathLike) -> Imatrix:
    """Read and validate a GGUF importance matrix (as written by llama-imatrix)."""
    path = Path(path)

    def bad(what: str) -> ImatrixError:
        return ImatrixError(f"{path}: {what}; {_RECOMPUTE}")

    if not path.is_file():
        raise ImatrixError(f"{path} does not exist; compute one with `step-gguf imatrix`")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise bad("not a GGUF file (the legacy .dat imatrix format is not supported)")
    with malformed(path, ImatrixError, f"is truncated or corrupt; {_RECOMPUTE}"):
        reader = gguf.GGUFReader(path)
        tensors = {t.name: t for t in reader.tensors}
        meta = {key: reader.fields.get(key) for key in _KEYS}
        if any(field is None for field in meta.values()):
            absent = ", ".join(key for key, field in meta.items() if field is None)
            raise bad(f"not an importance matrix from llama-imatrix (no {absent} metadata)")
        if meta["imatrix.datasets"].types != [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING]:
            raise bad("imatrix.datasets is not a list of strings")
        datasets = tuple(meta["imatrix.datasets"].contents())
        chunk_count, chunk_size = (int(meta[key].contents()) for key in _KEYS[1:])
        propagation = _propagation(reader, bad)

        entries: dict[str, ImatrixEntry] = {}
        for name, sums_t in tensors.items():
            if not name.endswith(SUMS):
                continue
            weight = name[: -len(SUMS)]
            counts_t = tensors.get(weight + COUNTS)
            if counts_t is None:
                raise bad(f"{name} has no {weight + COUNTS} partner")
            if {sums_t.tensor_type, counts_t.tensor_type} != {gguf.GGMLQuantizationType.F32}:
                raise bad(f"{weight}'s sums and counts must be F32")
            entries[weight] = _entry(weight, np.asarray(sums_t.data), np.asarray(counts_t.data), bad)
    orphans = [n for n in tensors if n.endswith(COUNTS) and n[: -len(COUNTS)] not in entries]
    if orphans:
        raise bad(f"{orphans[0]} has no {orphans[0][: -len(COUNTS)] + SUMS} partner")
    if not entries:
        raise bad(f"no {SUMS}/{COUNTS} tensors: not an importance matrix")
    return Imatrix(path, entries, datasets, chunk_count, chunk_size, propagation)


def layer_point(kind: str, layer: int) -> str:
    """The stream point after layer `layer`'s attention (`kind` "attn") or FFN ("ffn")."""
    return f"{kind}-{layer}"


def _propagation(reader: gguf.GGUFReader, bad) -> dict[str, float] | None:
    points, gains = reader.fields.get(PROPAGATION_POINTS), reader.fields.get(PROPAGATION_GAINS)
    if points is None and gains is None:
        return None
    names = points.contents() if points is not None else []
    values = gains.contents() if gains is not None else []
    if len(names) != len(values) or not all(isinstance(v, float) and v >= 0 and np.isfinite(v) for v in values):
        raise bad(f"{PROPAGATION_POINTS} and {PROPAGATION_GAINS} must pair names with non-negative gains")
    return dict(zip(names, values))


def with_propagation(path: str | os.PathLike, gains: dict[str, float]) -> None:
    """Rewrite the importance matrix at `path` with `gains` (stream point -> gain) added; its
    own keys and tensors are kept as they are."""
    path = Path(path)
    reader = gguf.GGUFReader(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.propagation")
    writer = gguf.GGUFWriter(tmp, arch="", endianess=reader.endianess)
    try:
        add_kv_fields(writer, kv_fields(reader, ("GGUF.", PROPAGATION_POINTS, PROPAGATION_GAINS)))
        writer.add_array(PROPAGATION_POINTS, list(gains))
        writer.add_array(PROPAGATION_GAINS, [float(v) for v in gains.values()])
        for t in reader.tensors:
            writer.add_tensor(t.name, np.asarray(t.data), raw_shape=list(reversed(t.shape.tolist())),
                              raw_dtype=t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _entry(weight: str, sums: np.ndarray, counts: np.ndarray, bad) -> ImatrixEntry:
    n_mat = counts.size
    if n_mat == 0 or sums.size == 0 or sums.size % n_mat:
        raise bad(f"{weight} has {sums.size} sums for {n_mat} counts; they must divide evenly")
    sums = sums.reshape(n_mat, sums.size // n_mat)  # llama-quantize's reading: matrix j's row is j
    counts = counts.reshape(n_mat)
    if not (np.isfinite(sums).all() and (sums >= 0).all()):
        raise bad(f"{weight} has non-finite or negative sums of squares")
    # whole, non-negative and far below 2^63, so that they convert to int64 exactly
    if not (np.isfinite(counts).all() and (counts >= 0).all() and (counts < 2.0**53).all()
            and (counts == np.round(counts)).all()):
        raise bad(f"{weight} has counts that are not whole non-negative numbers")
    return ImatrixEntry(np.asarray(sums, dtype=np.float32), counts.astype(np.int64))
