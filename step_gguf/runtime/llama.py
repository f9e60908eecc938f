"""The one module that owns llama-cpp-python and the llama.cpp binaries.

Everything else talks to the runtime through `check()`, `load()` and `serve()`. Each refuses
to run on a llama-cpp-python that was not built from our patch series, and says how to fix it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from ..errors import RuntimeMissingError, StepGGUFError
from ..gguf_source import first_shard
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


_GGML_API = (("ggml_backend_dev_count", ctypes.c_size_t, []),
             ("ggml_backend_dev_get", ctypes.c_void_p, [ctypes.c_size_t]),
             ("ggml_backend_dev_buffer_type", ctypes.c_void_p, [ctypes.c_void_p]),
             ("ggml_backend_dev_type", ctypes.c_int, [ctypes.c_void_p]),
             ("ggml_backend_dev_backend_reg", ctypes.c_void_p, [ctypes.c_void_p]),
             ("ggml_backend_reg_name", ctypes.c_char_p, [ctypes.c_void_p]),
             ("ggml_backend_reg_by_name", ctypes.c_void_p, [ctypes.c_char_p]),
             ("ggml_backend_reg_get_proc_address", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
             ("ggml_backend_reg_dev_get", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t]),
             ("ggml_backend_register", None, [ctypes.c_void_p]),
             ("ggml_backend_buft_name", ctypes.c_char_p, [ctypes.c_void_p]))
_DEVICE_GPU, _DEVICE_IGPU = 1, 2  # enum ggml_backend_dev_type


@functools.cache
def _libggml() -> ctypes.CDLL:
    """The ggml that libllama itself links: its device registry is the one models load from
    (llama-cpp-python's own `_ggml` module opens a second copy with a registry of its own)."""
    check()
    import llama_cpp  # noqa: PLC0415

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    found = sorted(lib_dir.glob("libggml.so.*"), key=lambda f: len(f.name)) or sorted(lib_dir.glob("libggml.*"))
    if not found:
        raise RuntimeMissingError(f"libggml is missing from {lib_dir}; {_FIX}")
    lib = ctypes.CDLL(str(found[0]))
    for fn, res, args in _GGML_API:
        getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, args
    llama_cpp.llama_backend_init()
    return lib


def _buffer_type(name: str) -> int:
    """The ggml buffer type called `name` ("CPU", "CUDA0", ...) on this build's devices."""
    lib = _libggml()
    names = []
    for i in range(lib.ggml_backend_dev_count()):
        buft = lib.ggml_backend_dev_buffer_type(lib.ggml_backend_dev_get(i))
        names.append(lib.ggml_backend_buft_name(buft).decode())
        if names[-1] == name:
            return buft
    raise StepGGUFError(f"this runtime has no {name} buffer type (it has {', '.join(names)})")


def _local_gpus() -> list[int]:
    """This machine's GPU devices, as llama.cpp picks them by default (integrated ones only
    without a discrete one); RPC hosts are not among them."""
    lib = _libggml()
    found: dict[int, list[int]] = {_DEVICE_GPU: [], _DEVICE_IGPU: []}
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        kind = lib.ggml_backend_dev_type(dev)
        reg = lib.ggml_backend_reg_name(lib.ggml_backend_dev_backend_reg(dev)).decode()
        if kind in found and not reg.startswith("RPC"):
            found[kind].append(dev)
    return found[_DEVICE_GPU] or found[_DEVICE_IGPU]


def rpc_device(endpoint: str) -> int:
    """Register the ggml RPC server at `endpoint` in this process; its device. The server must
    have answered already (step_gguf.runtime.rpc probes it): a failed handshake aborts."""
    lib = _libggml()
    rpc = lib.ggml_backend_reg_by_name(b"RPC")
    add = rpc and lib.ggml_backend_reg_get_proc_address(rpc, b"ggml_backend_rpc_add_server")
    if not add:
        raise RuntimeMissingError(f"this runtime was built without ggml RPC; {_FIX}")
    reg = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(add)(endpoint.encode())
    lib.ggml_backend_register(reg)
    return lib.ggml_backend_reg_dev_get(reg, 0)


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
    gpus = _local_gpus()
    kwargs: dict = {"n_ctx": n_ctx, "n_batch": min(n_ctx, 512), "n_gpu_layers": n_gpu_layers,
                    "devices": gpus}
    if plan is not None:
        kv = getattr(llama_cpp, f"GGML_TYPE_{plan.kv_type.upper()}")
        kwargs = {"n_ctx": plan.ctx, "n_batch": plan.n_batch, "n_ubatch": plan.n_ubatch,
                  "n_gpu_layers": plan.gpu_layers, "type_k": kv, "type_v": kv, "flash_attn": True,
                  "devices": gpus}
        if plan.gpu_layers and plan.cpu_tensors:
            cpu = _buffer_type("CPU")
            kwargs["tensor_buft_overrides"] = [(p, cpu) for p in plan.override_patterns()]
        if plan.rpc:  # llama.cpp's order: RPC hosts, then this machine's GPU
            from .rpc import devices  # noqa: PLC0415

            kwargs["tensor_split"] = plan.tensor_split
            kwargs["devices"] = devices(plan.rpc) + gpus[:len(plan.tensor_split) - len(plan.rpc)]
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def die_with_parent() -> None:
    """In the server's child process: have Linux end it when its parent dies, even by
    SIGKILL, so that a killed `step-gguf serve` leaves no server holding the model and port."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def serve(gguf_path: str | os.PathLike, *, plan: "Plan | None" = None, port: int | None = None,
          host: str = "127.0.0.1", n_ctx: int = 4096, extra_args: Sequence[str] = (),
          api_key: str | None = None, startup_timeout: float = 120.0,
          log_path: Path | None = None, server: Path | None = None) -> Iterator[str]:
    """Run our `llama-server` for the block's duration; yields its base URL. `plan` gives its
    context, placement, cache, batch and MTP flags (then `n_ctx` is the plan's). It binds to
    loopback unless `host` says otherwise, which needs an `api_key`. `server` runs the
    llama-server of another build instead (stock llama.cpp, for comparisons). A plan made
    with a separate draft GGUF (plan.facts(..., draft=)) drafts from it."""
    if plan is not None and plan.mtp and plan.model.draft:
        # checked against the model when planned; it must still be there
        if not Path(plan.model.draft).is_file():
            raise StepGGUFError(f"draft {plan.model.draft} does not exist any more; plan again")
        log.info("drafting with the MTP heads of %s", plan.model.draft)
    if host not in LOOPBACK and not api_key:
        raise StepGGUFError(f"serving on {host} exposes the model to the network; give --api-key "
                            "(or serve on 127.0.0.1)")
    server = server or check().tool("llama-server")
    if not Path(gguf_path).is_file():
        raise StepGGUFError(f"{gguf_path} does not exist; give a GGUF file")
    gguf_path = first_shard(gguf_path)  # any shard of a split model: llama.cpp wants the first
    port = port or free_port()
    args = [str(server), "-m", str(gguf_path), "--host", host, "--port", str(port),
            *(plan.server_flags() if plan is not None else ["-c", str(n_ctx)]), *extra_args]
    if api_key:
        args += ["--api-key", api_key]
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', 'localhost') else host}:{port}"
    with child(args, f"llama-server loading {gguf_path}", lambda: _healthy(url),
               startup_timeout, log_path):
        yield url


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def child(args: Sequence[str], what: str, ready: Callable[[], bool], startup_timeout: float,
          log_path: Path | None = None) -> Iterator[subprocess.Popen]:
    """Run a server process (from our build) for the block's duration, once `ready()` says
    it is up; it dies with this process, and is stopped at the end of the block."""
    sink = open(log_path, "w") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    see = f"; see {log_path}" if log_path else ""
    try:
        deadline = time.monotonic() + startup_timeout
        while not ready():
            if proc.poll() is not None:
                raise StepGGUFError(f"{what}: exited with code {proc.returncode}{see}")
            if time.monotonic() > deadline:
                raise StepGGUFError(f"{what}: not up after {startup_timeout:.0f}s{see}")
            time.sleep(0.1)
        yield proc
    finally:
        stop(proc)
        if log_path:
            sink.close()


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """End a child server: SIGTERM, then SIGKILL after `grace` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class Reply:
    """One chat turn as llama-server returned it: the answer apart from the reasoning, parsed
    tool calls, token counts, speeds and what MTP drafting achieved."""

    text: str = ""
    reasoning: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tps: float = 0.0
    decode_tps: float = 0.0
    draft_tokens: int = 0
    draft_accepted: int = 0

    @property
    def acceptance(self) -> float | None:
        return self.draft_accepted / self.draft_tokens if self.draft_tokens else None

    def to_json(self) -> dict:
        return {"text": self.text, "reasoning": self.reasoning, "tool_calls": self.tool_calls,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "prompt_tps": round(self.prompt_tps, 2), "decode_tps": round(self.decode_tps, 2),
                "mtp": {"drafted": self.draft_tokens, "accepted": self.draft_accepted,
                        "acceptance": None if self.acceptance is None else round(self.acceptance, 4)}}


def chat(url: str, messages: list[dict], *, max_tokens: int = 256, seed: int = 0,
         temperature: float = 0.0, tools: list[dict] | None = None, api_key: str | None = None,
         on_text: Callable[[str, str], None] | None = None, timeout: float = 600) -> Reply:
    """One chat completion from a running server. With `on_text`, the reply streams and each
    piece is passed on as (kind, text), kind being "reasoning" or "text"."""
    body = {"messages": messages, "max_tokens": max_tokens, "seed": seed,
            "temperature": temperature, "stream": on_text is not None}
    if tools:
        body["tools"] = tools
    if on_text is not None:
        body["stream_options"] = {"include_usage": True}
    req = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json",
                                  **({"Authorization": f"Bearer {api_key}"} if api_key else {})})
    reply = Reply()
    calls: dict[int, dict] = {}
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            if on_text is None:
                out = json.load(resp)
                msg = out["choices"][0]["message"]
                reply.text, reply.reasoning = msg.get("content") or "", msg.get("reasoning_content") or ""
                reply.tool_calls = msg.get("tool_calls") or []
                _usage(reply, out)
                return reply
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                _usage(reply, chunk)
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    for kind, key in (("reasoning", "reasoning_content"), ("text", "content")):
                        if piece := delta.get(key):
                            setattr(reply, kind, getattr(reply, kind) + piece)
                            on_text(kind, piece)
                    for call in delta.get("tool_calls") or []:
                        _merge_call(calls.setdefault(call.get("index", 0), {}), call)
    except urllib.error.HTTPError as exc:
        raise StepGGUFError(f"llama-server refused the request: {exc.code} "
                            f"{exc.read().decode(errors='replace')[:200]}") from None
    except (OSError, ValueError) as exc:
        raise StepGGUFError(f"talking to llama-server at {url} failed: {exc}") from None
    reply.tool_calls = [calls[i] for i in sorted(calls)]
    return reply


def _merge_call(into: dict, delta: dict) -> None:
    """Streamed tool calls arrive as pieces of one call; join them."""
    into.setdefault("type", "function")
    if "id" in delta:
        into["id"] = delta["id"]
    fn = into.setdefault("function", {"name": "", "arguments": ""})
    for key in ("name", "arguments"):
        fn[key] += (delta.get("function") or {}).get(key) or ""


def _usage(reply: Reply, out: dict) -> None:
    if usage := out.get("usage"):
        reply.prompt_tokens = usage.get("prompt_tokens", reply.prompt_tokens)
        reply.completion_tokens = usage.get("completion_tokens", reply.completion_tokens)
    if t := out.get("timings"):
        reply.prompt_tps = t.get("prompt_per_second", reply.prompt_tps) or 0.0
        reply.decode_tps = t.get("predicted_per_second", reply.decode_tps) or 0.0
        reply.draft_tokens = t.get("draft_n", reply.draft_tokens)
        reply.draft_accepted = t.get("draft_n_accepted", reply.draft_accepted)
