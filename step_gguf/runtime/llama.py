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
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import RuntimeMissingError, StepGGUFError
from .build import MANIFEST, series_id

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


class Model:
    """A loaded GGUF. Create it with `load()`; its lifetime is the `with` block."""

    def __init__(self, llm) -> None:
        self._llm = llm

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
def load(gguf_path: str | os.PathLike, *, n_ctx: int = 4096, n_threads: int | None = None,
         n_gpu_layers: int = 0, logits_all: bool = False, exact: bool = False,
         verbose: bool = False) -> Iterator[Model]:
    """Load a GGUF with the patched runtime.

    `exact` keeps the KV cache in F32 (parity tests): with the default F16 cache, logits of an
    F32 GGUF move by ~1e-4 relative (4e-7 with F32) on the tiny synthetic model.
    """
    check()
    path = Path(gguf_path)
    if not path.is_file():
        raise StepGGUFError(f"{path} does not exist; convert a checkpoint first (step-gguf convert)")
    from llama_cpp import Llama  # noqa: PLC0415

    kv = {}
    if exact:
        import llama_cpp  # noqa: PLC0415
        kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
    try:
        llm = Llama(str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=n_threads,
                    n_gpu_layers=n_gpu_layers, logits_all=logits_all, verbose=verbose, **kv)
    except ValueError as exc:
        raise StepGGUFError(f"llama.cpp could not load {path}: {exc}") from exc
    try:
        yield Model(llm)
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
