"""How much a perturbation of the residual stream at each depth moves the model's output,
measured on the model itself with llama.cpp.

One chunk of the calibration text runs once clean, then once per point of the stream with
Gaussian noise of a small relative energy added there: the token embeddings ("embd"), each
layer after its attention ("attn-L") and after its FFN ("ffn-L"), and the final norm ("output",
what the output matrix reads). The gain of a point is the mean KL divergence of
the next-token distributions from the clean run's, per unit of relative noise energy: what a
quantization error of a writer there costs, per unit of the stream energy it adds. Errors early
in a network pass through every later layer, which can amplify them; budget mode weighs each
tensor's measured error by the gain of the point it writes to (sensitivity.logit_errors).

The noise is added by llama.cpp's graph callback, in place, as each point's tensor is computed:
2 * n_layer + 3 forward passes of one chunk, with the model loaded once (memory-mapped).
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np

from ..core.errors import StepGGUFError
from ..files.imatrix import EMBD_POINT, OUTPUT_POINT, layer_point
from . import ggml
from .installed import check

log = logging.getLogger(__name__)

EPS = 1e-3  # relative noise energy: about what one 4-bit tensor writes into the stream


def points(n_layer: int) -> dict[str, str]:
    """The stream's points, in model order: name -> the llama.cpp graph tensor that holds it
    (step35's graph renames a layer's output as the next layer's input, the last one's as the
    hidden state the MTP heads read)."""
    out = {EMBD_POINT: "attn_norm_in-0"}
    for il in range(n_layer):
        out[layer_point("attn", il)] = f"ffn_inp-{il}"
        out[layer_point("ffn", il)] = f"attn_norm_in-{il + 1}" if il + 1 < n_layer else "h_nextn"
    return out | {OUTPUT_POINT: "result_norm"}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _typed(lib: ctypes.CDLL) -> ctypes.CDLL:
    """libggml-base with the accessors the callback reads a tensor through."""
    for name, restype in (("ggml_get_name", ctypes.c_char_p), ("ggml_get_data_f32", ctypes.POINTER(ctypes.c_float)),
                          ("ggml_nelements", ctypes.c_int64), ("ggml_nbytes", ctypes.c_size_t)):
        getattr(lib, name).restype, getattr(lib, name).argtypes = restype, [ctypes.c_void_p]
    return lib


class _Probe:
    """A model loaded once (memory-mapped, on the CPU) with a context over one chunk, whose
    graph callback adds noise to the tensor named `target` as it is computed."""

    def __init__(self, model_gguf: str | os.PathLike, text: str, ctx: int, threads: int | None,
                 eps: float, seed: int) -> None:
        check()
        from llama_cpp import _logger  # noqa: PLC0415 (our build, checked above)
        from llama_cpp import llama_cpp as L  # noqa: PLC0415

        self.L, self.lib, self.path, self.eps = L, _typed(ggml.library()), model_gguf, eps
        self.rng, self.target, self.hit = np.random.default_rng(seed), None, 0
        self._restore_log = _logger.llama_log_callback
        self._quiet = L.llama_log_callback(lambda level, text, user: None)
        self._callback = L.ggml_backend_sched_eval_callback(self._perturb)
        L.llama_log_set(self._quiet, ctypes.c_void_p(0))
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        # no devices, named: by default llama.cpp asks every registered device, RPC hosts this
        # process registered earlier included, and a host that is gone aborts the process
        self._no_devices = (ctypes.c_void_p * 1)()
        mp.devices = ctypes.cast(self._no_devices, ctypes.c_void_p)
        self.model = L.llama_model_load_from_file(str(model_gguf).encode(), mp)
        self.ctx = self.batch = None
        if not self.model:
            self.close()
            raise StepGGUFError(f"llama.cpp could not load {model_gguf}")
        self.n_layer, self.n_embd = L.llama_model_n_layer(self.model), L.llama_model_n_embd(self.model)
        vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(vocab)
        raw = text.encode()
        tokens = (L.llama_token * (len(raw) + 16))()
        self.n_tok = min(ctx, L.llama_tokenize(vocab, raw, len(raw), tokens, len(tokens), True, True))
        if self.n_tok < 16:
            self.close()
            raise StepGGUFError(f"the text gives {self.n_tok} tokens; measuring propagation needs at least 16")
        cp = L.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = self.n_tok
        cp.n_threads = cp.n_threads_batch = threads or os.cpu_count() or 1
        cp.cb_eval, cp.cb_eval_user_data = self._callback, None
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            self.close()
            raise StepGGUFError(f"llama.cpp could not make a context for {model_gguf}")
        self.batch = L.llama_batch_init(self.n_tok, 0, 1)
        for i in range(self.n_tok):
            self.batch.token[i], self.batch.pos[i], self.batch.n_seq_id[i] = tokens[i], i, 1
            self.batch.seq_id[i][0], self.batch.logits[i] = 0, True
        self.batch.n_tokens = self.n_tok

    def _perturb(self, tensor, ask, _user) -> bool:
        n = self.lib.ggml_nelements(tensor)
        if self.lib.ggml_get_name(tensor) != self.target or self.lib.ggml_nbytes(tensor) != 4 * n:  # F32, dense
            return False
        if not ask:
            x = np.ctypeslib.as_array(self.lib.ggml_get_data_f32(tensor), shape=(n,)).reshape(-1, self.n_embd)
            rms = np.sqrt(np.mean(np.square(x, dtype=np.float64), axis=1, keepdims=True))
            x += (self.rng.standard_normal(x.shape) * rms * np.sqrt(self.eps)).astype(np.float32)
            self.hit += 1
        return True

    def log_probs(self, tensor: str | None) -> np.ndarray:
        """Next-token log-probabilities of every position, with noise added at `tensor`."""
        self.target, self.hit = tensor.encode() if tensor else None, 0
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        if self.L.llama_decode(self.ctx, self.batch) != 0:
            raise StepGGUFError(f"llama.cpp could not evaluate {self.path}")
        if tensor and not self.hit:
            raise StepGGUFError(f"{self.path}'s graph has no tensor {tensor}; is it a step35 model?")
        logits = np.ctypeslib.as_array(self.L.llama_get_logits(self.ctx), shape=(self.n_tok * self.n_vocab,))
        return _log_softmax(logits.reshape(self.n_tok, self.n_vocab))

    def close(self) -> None:
        if self.batch is not None:
            self.L.llama_batch_free(self.batch)
        if self.ctx:
            self.L.llama_free(self.ctx)
        if self.model:
            self.L.llama_model_free(self.model)
        self.L.llama_log_set(self._restore_log, ctypes.c_void_p(0))


def measure(model_gguf: str | os.PathLike, text: str, *, ctx: int = 256, eps: float = EPS,
            threads: int | None = None, seed: int = 0,
            on_progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """point -> mean KL divergence per unit of relative noise energy there, for `model_gguf`
    (its first shard for a split model) over the first `ctx` tokens of `text`;
    `on_progress(done, total)` follows the points."""
    probe = _Probe(model_gguf, text, ctx, threads, eps, seed)
    try:
        clean = probe.log_probs(None)
        gains: dict[str, float] = {}
        todo = points(probe.n_layer)
        for point, tensor in todo.items():
            noisy = probe.log_probs(tensor)
            gains[point] = max(float((np.exp(clean) * (clean - noisy)).sum(axis=1).mean()), 0.0) / eps
            log.debug("propagation %s: %.4g", point, gains[point])
            if on_progress:
                on_progress(len(gains), len(todo))
        return gains
    finally:
        probe.close()


def measure_file(model_gguf: str | os.PathLike, text_file: Path, **kw) -> dict[str, float]:
    """measure() over a text file."""
    return measure(model_gguf, text_file.read_text(encoding="utf-8", errors="replace"), **kw)
