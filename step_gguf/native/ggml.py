"""ggml's own quantizers and dequantizers, through ctypes, from our runtime build.

The quantizing pipeline encodes every quantized type here (never a Python re-implementation),
so its bytes equal llama.cpp's quantizer's for the same floats and importance data. ctypes
releases the GIL around each call, so threads quantize in parallel.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np

from ..core.errors import RuntimeMissingError
from .installed import check

_F32P = ctypes.POINTER(ctypes.c_float)


class _TypeTraits(ctypes.Structure):
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool),
                ("to_float", ctypes.CFUNCTYPE(None, ctypes.c_void_p, _F32P, ctypes.c_int64)),
                ("from_float_ref", ctypes.c_void_p)]


@functools.cache
def library() -> ctypes.CDLL:
    """libggml-base of our runtime, its quantizer's functions typed."""
    check()
    import llama_cpp  # noqa: PLC0415 (only once the runtime is known to be ours)

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    found = sorted(lib_dir.glob("libggml-base.*")) or sorted(lib_dir.glob("ggml-base.*"))
    if not found:
        raise RuntimeMissingError(f"libggml-base is missing from {lib_dir}; run `step-gguf runtime build`")
    lib = ctypes.CDLL(str(found[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib


def requires_imatrix(qtype: int) -> bool:
    return bool(library().ggml_quantize_requires_imatrix(int(qtype)))


def quantize(rows: np.ndarray, qtype: int, imatrix: np.ndarray | None = None) -> memoryview:
    """Encode float32 `rows` (n_rows x n_per_row) as `qtype`; `imatrix` has n_per_row weights."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n, cols = rows.shape
    lib = library()
    out = np.empty(lib.ggml_row_size(int(qtype), cols) * n, dtype=np.uint8)
    imat = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        assert imatrix.shape == (cols,), (imatrix.shape, cols)
        imat = imatrix.ctypes.data
    size = lib.ggml_quantize_chunk(int(qtype), rows.ctypes.data, out.ctypes.data, 0, n, cols, imat)
    return memoryview(out)[:size]


def dequantize(raw: bytes | memoryview, qtype: int, n_values: int) -> np.ndarray:
    """ggml-encoded bytes -> flat float32 array of `n_values`."""
    traits = library().ggml_get_type_traits(int(qtype)).contents
    out = np.empty(n_values, dtype=np.float32)
    src = np.frombuffer(raw, dtype=np.uint8)
    traits.to_float(src.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(_F32P), n_values)
    return out
