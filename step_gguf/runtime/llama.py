"""A GGUF loaded in this process through llama-cpp-python (`load()`): logits, tokens and the
placement llama.cpp reports, with a plan's placement applied. Chat goes through our
llama-server instead (`server`): llama-cpp-python has no MTP drafting loop."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from ..core.errors import StepGGUFError
from ..files.gguf_source import first_shard
from ..native.installed import check
from .devices import buffer_type, local_gpus

if TYPE_CHECKING:
    from ..plan import Plan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVCache:
    """One KV cache llama.cpp allocated, as its load log reports it."""

    cells: int
    layers: int
    bytes: int


_KV_LINE = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells, +(\d+) layers")
_OVERRIDE_LINE = re.compile(r"tensor (\S+) \(.*\) buffer type overridden to (\S+)")


class Model:
    """A loaded GGUF. Create it with `load()`; its lifetime is the `with` block."""

    def __init__(self, llm, load_log: list[str]) -> None:
        self._llm = llm
        self.load_log = load_log

    @property
    def overridden(self) -> dict[str, str]:
        """Tensors that a buffer-type override placed, and the buffer type each got."""
        return {m.group(1): m.group(2) for line in self.load_log if (m := _OVERRIDE_LINE.search(line))}

    @property
    def kv_caches(self) -> list[KVCache]:
        """The context's KV caches (a sliding-window model has one for each kind of layer)."""
        return [KVCache(int(m.group(2)), int(m.group(3)), round(float(m.group(1)) * (1 << 20)))
                for line in self.load_log if (m := _KV_LINE.search(line))]

    @property
    def n_vocab(self) -> int:
        return self._llm.n_vocab()

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._llm.metadata)

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        return self._llm.tokenize(text.encode(), add_bos=False, special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._llm.detokenize(list(tokens)).decode(errors="replace")

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits for every position of `tokens` (needs `load(..., logits_all=True)`)."""
        self._llm.reset()
        self._llm.eval(list(tokens))
        return np.array(self._llm.scores[: len(tokens)], dtype=np.float32)

    def time_greedy(self, prompt: Sequence[int], n: int) -> tuple[float, float]:
        """Seconds to evaluate `prompt`, then to decode `n` greedy tokens one step each."""
        llm = self._llm
        llm.reset()
        start = time.perf_counter()
        llm.eval(list(prompt))
        mid = time.perf_counter()
        for _ in range(n):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        return mid - start, time.perf_counter() - mid


@contextlib.contextmanager
def _captured_log() -> Iterator[list[str]]:
    """llama.cpp's log lines (debug level included) while the block runs; the placement and
    cache sizes are read back from them."""
    import llama_cpp  # noqa: PLC0415
    from llama_cpp import _logger  # noqa: PLC0415

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def keep(level, text, user_data):
        line = text.decode(errors="replace")
        lines.append(line)
        log.debug("llama.cpp: %s", line.rstrip())

    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """`env` set while the block runs (llama.cpp reads the expert cache's settings as its
    context is made), as it was afterwards."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def load(gguf_path: str | os.PathLike, *, n_ctx: int = 4096, n_threads: int | None = None,
         n_gpu_layers: int = 0, logits_all: bool = False, exact: bool = False,
         plan: "Plan | None" = None, swa_full: bool = False,
         verbose: bool = False) -> Iterator[Model]:
    """Load a GGUF with the patched runtime.

    `plan` (from `step_gguf.plan`) sets the context, GPU layers, KV cache type, batch sizes,
    flash attention and the tensors kept in system memory (llama.cpp's tensor buffer-type
    overrides). The sliding-window layers cache only their window unless `swa_full`.
    `exact` keeps the KV cache in F32 (parity tests): with the default F16 cache, logits of an
    F32 GGUF move by ~1e-4 relative (4e-7 with F32) on the tiny synthetic model.
    """
    check()
    path = Path(gguf_path)
    if not path.is_file():
        raise StepGGUFError(f"{path} does not exist; convert a checkpoint first (step-gguf convert)")
    path = first_shard(path)  # any shard of a split model: llama.cpp loads the set from the first
    import llama_cpp  # noqa: PLC0415
    from llama_cpp import Llama  # noqa: PLC0415

    # every load names its devices: RPC hosts registered in this process stay registered
    gpus = local_gpus()
    kwargs: dict = {"n_ctx": n_ctx, "n_batch": min(n_ctx, 512), "n_gpu_layers": n_gpu_layers,
                    "devices": gpus}
    if plan is not None:
        kv = getattr(llama_cpp, f"GGML_TYPE_{plan.kv_type.upper()}")
        kwargs = {"n_ctx": plan.ctx, "n_batch": plan.n_batch, "n_ubatch": plan.n_ubatch,
                  "n_gpu_layers": plan.gpu_layers, "type_k": kv, "type_v": kv, "flash_attn": True,
                  "devices": gpus}
        if plan.gpu_layers and plan.cpu_tensors:
            cpu = buffer_type("CPU")
            kwargs["tensor_buft_overrides"] = [(p, cpu) for p in plan.override_patterns()]
        if plan.expert_cache:  # patch 0021 copies the experts as the file holds them
            kwargs["use_extra_bufts"] = False
        if plan.rpc:  # llama.cpp's order: RPC hosts, then this machine's GPU
            from .rpc import devices  # noqa: PLC0415

            kwargs["tensor_split"] = plan.tensor_split
            kwargs["devices"] = devices(plan.rpc) + gpus[:len(plan.tensor_split) - len(plan.rpc)]
    if exact:
        kwargs |= {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
    try:
        with _captured_log() as lines, _environment(plan.server_env() if plan is not None else {}):
            llm = Llama(str(path), n_threads=n_threads, logits_all=logits_all, verbose=verbose,
                        swa_full=swa_full, **kwargs)
    except ValueError as exc:
        raise StepGGUFError(f"llama.cpp could not load {path}: {exc}") from exc
    try:
        yield Model(llm, lines)
    finally:
        llm.close()


