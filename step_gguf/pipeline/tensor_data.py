"""A tensor's bytes in the output: copied as they are by the kernel (scanned for NaN/Inf on the
side), or read, decoded, transformed and encoded in bounded chunks on all workers."""

from __future__ import annotations

import math
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from ..core.errors import CheckpointError
from ..core.recipe import tensor_bytes
from ..files.checkpoint import ELEMENT_BYTES, TensorRef, decode, fp8_scale_shape
from .output_tensors import OutputTensor


CHUNK_BYTES = 32 * 2**20  # float32 working set per chunk on the decode path


def _encode(x: np.ndarray, qtype: Q, imatrix: np.ndarray | None = None) -> bytes | memoryview:
    if qtype == Q.F32:
        return x.astype(np.float32, copy=False).tobytes()
    if qtype == Q.F16:
        return x.astype(np.float16).tobytes()
    if qtype == Q.BF16:
        return gguf.quants.quantize(x, qtype).tobytes()  # round-to-nearest-even, as ggml
    from ..native import ggml  # noqa: PLC0415 (float outputs need no runtime)
    return ggml.quantize(x.reshape(-1, x.shape[-1]), qtype, imatrix)


def _row_bytes(dtype: str, cols: int) -> int:
    """Bytes of one row of `cols` values stored as `dtype` (safetensors or ggml name)."""
    if dtype in ELEMENT_BYTES:
        return ELEMENT_BYTES[dtype] * cols
    return tensor_bytes((cols,), Q[dtype])


def _decode(raw: bytes, dtype: str, n_values: int) -> np.ndarray:
    if dtype in ELEMENT_BYTES:
        return decode(raw, dtype)
    from ..native import ggml  # noqa: PLC0415 (only quantized GGUF sources need it)
    return ggml.dequantize(raw, Q[dtype], n_values)


def _chunks(plan: OutputTensor) -> list[tuple[int, int, int]]:
    """(matrix, first row, rows) of bounded float32 chunks in file order.

    Chunks stay within one matrix of a stacked tensor (each expert has its own importance
    data), and FP8 chunks start on a block row."""
    cols = plan.shape[-1]
    rows = plan.shape[-2] if len(plan.shape) > 1 else 1
    align = plan.fp8_block[0] if plan.scale is not None else 1
    step = max(align, CHUNK_BYTES // (cols * 4) // align * align)
    return [(m, r0, min(step, rows - r0)) for m in range(math.prod(plan.shape[:-2]))
            for r0 in range(0, rows, step)]


def fp8_scales(plan: OutputTensor) -> np.ndarray:
    """The FP8 scale grid of a plan's source, one [block rows x block columns] plane a matrix."""
    return plan.scale.array().reshape(-1, *fp8_scale_shape(plan.shape, plan.fp8_block)[-2:])


def read_rows(plan: OutputTensor, m: int, r0: int, n: int,
              scales: np.ndarray | None = None) -> np.ndarray:
    """Rows [r0, r0+n) of matrix `m` of the source tensor as float32, FP8 block scales applied
    (`fp8_scales`: the tensor's scale grid; read here when not given)."""
    ref = plan.src
    assert ref is not None
    cols = plan.shape[-1]
    rows = plan.shape[-2] if len(plan.shape) > 1 else 1
    row_bytes = _row_bytes(ref.dtype, cols)
    x = _decode(ref.read((m * rows + r0) * row_bytes, n * row_bytes), ref.dtype, n * cols).reshape(n, cols)
    if plan.scale is not None:
        block = plan.fp8_block
        if scales is None:
            scales = fp8_scales(plan)
        s = scales[m, r0 // block[0]: math.ceil((r0 + n) / block[0])]
        x *= np.repeat(np.repeat(s, block[0], axis=0)[:n], block[1], axis=1)[:, :cols]
    return x


def transformed_rows(plan: OutputTensor, m: int, r0: int, n: int,
                     scales: np.ndarray | None = None) -> np.ndarray:
    """Rows as they are encoded: checked finite, +1 on norms, equalization scales applied."""
    x = read_rows(plan, m, r0, n, scales)
    if not np.isfinite(x).all():
        raise _nonfinite_error(plan)
    if plan.add_one:
        x = x + 1.0
    if plan.col_scale is not None:
        x = x * plan.col_scale[min(m, len(plan.col_scale) - 1)]
    return x


def _encode_chunk(plan: OutputTensor, m: int, r0: int, n: int,
                  scales: np.ndarray | None) -> tuple[bytes | memoryview, int]:
    """Read, decode, transform and encode one chunk: (output bytes, source bytes read)."""
    x = transformed_rows(plan, m, r0, n, scales)
    imatrix = plan.imatrix[m] if plan.imatrix is not None else None
    return _encode(x, plan.qtype, imatrix), n * _row_bytes(plan.src.dtype, plan.shape[-1])


# raw-bit thresholds: a value is NaN/Inf iff its bits, read as signed, reach `pos`, or read
# as unsigned reach `neg` (max-reductions only, no temporaries)
_NONFINITE_BITS = {"BF16": (np.int16, np.uint16, 0x7F80, 0xFF80),
                   "F16": (np.int16, np.uint16, 0x7C00, 0xFC00),
                   "F32": (np.int32, np.uint32, 0x7F800000, 0xFF800000)}


def _has_nonfinite_raw(ref: TensorRef) -> bool:
    if ref.dtype not in _NONFINITE_BITS:
        return False  # quantized GGUF tensors copied as they are: ggml validated them
    signed, unsigned, pos, neg = _NONFINITE_BITS[ref.dtype]
    buf = bytearray(8 * 2**20)
    with open(ref.shard, "rb") as f:
        done = 0
        while done < ref.nbytes:
            n = os.preadv(f.fileno(), [memoryview(buf)[: min(len(buf), ref.nbytes - done)]],
                          ref.offset + done)
            if n <= 0:
                raise ref.truncated()
            view = memoryview(buf)[:n]
            if np.frombuffer(view, signed).max() >= pos or np.frombuffer(view, unsigned).max() >= neg:
                return True
            done += n
    return False


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _copy_range(src: TensorRef, fd: int, on_bytes: Callable[[int], None]) -> None:
    """Append the tensor's bytes to `fd`: in the kernel where it can, else through a buffer."""
    kernel = hasattr(os, "copy_file_range")
    with open(src.shard, "rb") as f:
        offset, left = src.offset, src.nbytes
        while left:
            step = min(left, 8 * CHUNK_BYTES)  # also the progress granularity
            n = 0
            if kernel:
                try:
                    n = os.copy_file_range(f.fileno(), fd, step, offset)
                except OSError:  # e.g. EXDEV on old kernels, some network filesystems
                    kernel = False
            if not kernel:
                data = os.pread(f.fileno(), min(step, CHUNK_BYTES), offset)
                write_all(fd, data)
                n = len(data)
            if n <= 0:
                raise src.truncated()
            offset, left = offset + n, left - n
            on_bytes(n)


def _nonfinite_error(plan: OutputTensor) -> CheckpointError:
    name = plan.src.raw_name if plan.src else plan.name
    return CheckpointError(f"tensor {name} contains NaN or Inf values; the checkpoint is corrupt "
                           "(re-download it)")


def write_tensor(plan: OutputTensor, fd: int, pool: ThreadPoolExecutor, workers: int,
                  on_bytes: Callable[[int], None]) -> None:
    if plan.data is not None:
        write_all(fd, _encode(plan.data, plan.qtype))
        on_bytes(plan.src_nbytes)
        return
    if plan.passthrough:
        scan = pool.submit(_has_nonfinite_raw, plan.src)
        _copy_range(plan.src, fd, on_bytes)
        if scan.result():
            raise _nonfinite_error(plan)
        return
    scales = fp8_scales(plan) if plan.scale is not None else None
    # chunks are read, decoded and encoded on all workers; this thread writes them in order,
    # keeping at most two per worker in flight so memory stays bounded
    inflight: deque[Future] = deque()
    try:
        for spec in _chunks(plan):
            inflight.append(pool.submit(_encode_chunk, plan, *spec, scales))
            while len(inflight) >= 2 * workers or (inflight and inflight[0].done()):
                data, nread = inflight.popleft().result()
                write_all(fd, data)
                on_bytes(nread)
        while inflight:
            data, nread = inflight.popleft().result()
            write_all(fd, data)
            on_bytes(nread)
    finally:
        for f in inflight:
            f.cancel()
