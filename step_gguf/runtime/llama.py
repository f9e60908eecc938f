"""The one module that owns llama-cpp-python and the llama.cpp binaries.

Everything else talks to the runtime through `check()`, `load()` and `serve()`. Each refuses
to run on a llama-cpp-python that was not built from our patch series, and says how to fix it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from ..errors import RuntimeMissingError, StepGGUFError
from .build import MANIFEST, series_id

if TYPE_CHECKING:
    from ..plan import Plan

log = logging.getLogger(__name__)

_FIX = "run `step-gguf runtime build` to build and install the patched runtime"


@dataclass(frozen=True)
class RuntimeInfo:
    series_id: str
    backend: str
    bin_dir: Path

    def tool(self, name: str) -> Path:
        path = self.bin_dir / name
        if not path.is_file():
            raise RuntimeMissingError(f"{name} is missing from {self.bin_dir}; {_FIX}")
        return path


def check() -> RuntimeInfo:
    """The installed runtime, if it is ours and current; otherwise a RuntimeMissingError."""
    try:
        import llama_cpp.llama_cpp as lib  # noqa: PLC0415 (import cost only when needed)
    except ImportError as exc:
        raise RuntimeMissingError(f"llama-cpp-python is not installed ({exc}); {_FIX}") from exc
    except (OSError, RuntimeError) as exc:  # installed, but its shared library is absent or broken
        raise RuntimeMissingError(f"llama-cpp-python cannot load its library ({exc}); {_FIX}") from exc
    try:
        probe = lib._lib.step_gguf_build_id
    except AttributeError:
        raise RuntimeMissingError(
            f"the installed llama-cpp-python is not built from step-gguf's patches; {_FIX}"
        ) from None
    probe.restype = ctypes.c_char_p
    built = probe().decode()
    if built != series_id():
        raise RuntimeMissingError(
            f"the installed runtime was built from patch series {built}, this step-gguf needs "
            f"{series_id()}; {_FIX}"
        )
    manifest = json.loads(resources.files("llama_cpp").joinpath(MANIFEST).read_text())
    return RuntimeInfo(built, manifest["backend"], Path(manifest["bin_dir"]))


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

    def chat(self, messages: list[dict], max_tokens: int = 32, temperature: float = 0.0,
             seed: int = 0) -> "ChatResult":
        """Apply the GGUF's chat template and generate; timings cover prompt and decode."""
        llm = self._llm
        llm.reset()
        start = time.perf_counter()
        out = llm.create_chat_completion(messages=messages, max_tokens=max_tokens,
                                         temperature=temperature, seed=seed)
        wall = time.perf_counter() - start
        usage = out["usage"]
        return ChatResult(out["choices"][0]["message"]["content"] or "",
                          usage["prompt_tokens"], usage["completion_tokens"], wall)


@dataclass(frozen=True)
class ChatResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float


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


def _buffer_type(name: str) -> int:
    """The ggml buffer type called `name` ("CPU", "CUDA0", ...) on this build's devices."""
    from llama_cpp._ggml import libggml  # noqa: PLC0415

    for fn, res, args in (("ggml_backend_dev_count", ctypes.c_size_t, []),
                          ("ggml_backend_dev_get", ctypes.c_void_p, [ctypes.c_size_t]),
                          ("ggml_backend_dev_buffer_type", ctypes.c_void_p, [ctypes.c_void_p]),
                          ("ggml_backend_buft_name", ctypes.c_char_p, [ctypes.c_void_p])):
        getattr(libggml, fn).restype, getattr(libggml, fn).argtypes = res, args
    names = []
    for i in range(libggml.ggml_backend_dev_count()):
        buft = libggml.ggml_backend_dev_buffer_type(libggml.ggml_backend_dev_get(i))
        names.append(libggml.ggml_backend_buft_name(buft).decode())
        if names[-1] == name:
            return buft
    raise StepGGUFError(f"this runtime has no {name} buffer type (it has {', '.join(names)})")


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
    import llama_cpp  # noqa: PLC0415
    from llama_cpp import Llama  # noqa: PLC0415

    kwargs: dict = {"n_ctx": n_ctx, "n_batch": min(n_ctx, 512), "n_gpu_layers": n_gpu_layers}
    if plan is not None:
        kv = getattr(llama_cpp, f"GGML_TYPE_{plan.kv_type.upper()}")
        kwargs = {"n_ctx": plan.ctx, "n_batch": plan.n_batch, "n_ubatch": plan.n_ubatch,
                  "n_gpu_layers": plan.gpu_layers, "type_k": kv, "type_v": kv, "flash_attn": True}
        if plan.gpu_layers and plan.cpu_tensors:
            cpu = _buffer_type("CPU")
            kwargs["tensor_buft_overrides"] = [(p, cpu) for p in plan.override_patterns()]
    if exact:
        kwargs |= {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
    try:
        with _captured_log() as lines:
            llm = Llama(str(path), n_threads=n_threads, logits_all=logits_all, verbose=verbose,
                        swa_full=swa_full, **kwargs)
    except ValueError as exc:
        raise StepGGUFError(f"llama.cpp could not load {path}: {exc}") from exc
    try:
        yield Model(llm, lines)
    finally:
        llm.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(gguf_path: str | os.PathLike, *, port: int | None = None, n_ctx: int = 4096,
          extra_args: Sequence[str] = (), startup_timeout: float = 120.0,
          log_path: Path | None = None) -> Iterator[str]:
    """Run our `llama-server` on loopback for the block's duration; yields its base URL."""
    server = check().tool("llama-server")
    port = port or _free_port()
    args = [str(server), "-m", str(gguf_path), "--host", "127.0.0.1", "--port", str(port),
            "-c", str(n_ctx), *extra_args]
    sink = open(log_path, "w") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise StepGGUFError(f"llama-server exited with code {proc.returncode} while "
                                    f"loading {gguf_path}" + (f"; see {log_path}" if log_path else ""))
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise StepGGUFError(f"llama-server did not become healthy in {startup_timeout:.0f}s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log_path:
            sink.close()
