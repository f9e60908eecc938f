"""An image through llama.cpp's mtmd in this process (our build, the runtime's llama-cpp-python
bindings), as llama-server feeds it to the model: the image chunk's features, and the logits
after a text around it."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np


def embed_and_decode(model: Path, mmproj: Path, rgb: np.ndarray, before: str, after: str
                     ) -> tuple[np.ndarray, list[int | None], np.ndarray]:
    """(the image's features [tokens, width], the sequence mtmd decodes with None where an image
    feature stands, the logits after its last token) for `before` <image> `after`."""
    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd

    from step_gguf.runtime import llama

    with llama.load(model, n_ctx=512, exact=True) as lm:
        params = mtmd.mtmd_context_params_default()
        params.use_gpu, params.n_threads, params.warmup = False, 2, False
        ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), lm._llm.model, params)
        assert ctx, f"mtmd could not load {mmproj}"
        pixels = np.ascontiguousarray(rgb, dtype=np.uint8)
        bitmap = mtmd.mtmd_bitmap_init(pixels.shape[1], pixels.shape[0],
                                       (ctypes.c_ubyte * pixels.size).from_buffer_copy(pixels.tobytes()))
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            text = (before + mtmd.mtmd_default_marker().decode() + after).encode()
            prompt = mtmd.mtmd_input_text(text, len(text), False, True)
            assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(prompt), (ctypes.c_void_p * 1)(bitmap), 1) == 0
            features, sequence, width = None, [], lm._llm.n_embd()
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                    assert mtmd.mtmd_encode_chunk(ctx, chunk) == 0
                    features = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(ctx), shape=(n * width,))
                    features = features.reshape(n, width).astype(np.float64)
                    sequence += [None] * n
                else:
                    n = ctypes.c_size_t()
                    tokens = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    sequence += tokens[:n.value]
            past = ctypes.c_int32()
            assert mtmd.mtmd_helper_eval_chunks(ctx, lm._llm.ctx, chunks, 0, 0, 512, True, ctypes.byref(past)) == 0
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(lm._llm.ctx, -1), shape=(lm.n_vocab,))
            return features, sequence, logits.astype(np.float64)
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)
            mtmd.mtmd_free(ctx)


def png(rgb: np.ndarray) -> bytes:
    """`rgb` (height x width x 3, uint8) as a PNG file: what a client uploads."""
    return _png(rgb.shape[1], (np.ascontiguousarray(row, dtype=np.uint8).tobytes() for row in rgb))


def blank_png(width: int, height: int) -> bytes:
    """A black PNG of any size, compressed row by row (20000 x 20000 is 1 MB, 1.2 GB decoded)."""
    return _png(width, (bytes(3 * width) for _ in range(height)), height)


def _png(width: int, rows, height: int | None = None) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, n, data = zlib.compressobj(), 0, []
    for row in rows:
        data.append(packer.compress(b"\x00" + row))  # filter type 0 per row
        n += 1
    header = struct.pack(">IIBBBBB", width, height or n, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(data) + packer.flush())
            + chunk(b"IEND", b""))
