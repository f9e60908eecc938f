"""Our llama-server for the length of a block (`running`, `serve`), and the one chat client
step-gguf talks to it with (`chat`, returning a `Reply`)."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from ..core.errors import StepGGUFError
from ..files.gguf_source import first_shard
from ..native.installed import check
from ..native.process import Child, child, free_port
from .loadlog import expert_cache_counters

if TYPE_CHECKING:
    from ..plan import Plan

log = logging.getLogger(__name__)


LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class Running:
    """A llama-server of ours that is up: where clients reach it, and its process."""

    url: str
    process: Child

    def expert_cache(self, wait: float = 5.0) -> dict[str, float] | None:
        """The expert cache's counters after the request just answered (None without a
        cache): llama-server logs them as the slot finishes, a moment after the reply."""
        deadline = time.monotonic() + wait
        while True:
            text = Path(self.process.log_path).read_text(errors="replace") if self.process.log_path else ""
            if (found := expert_cache_counters(text)) or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


def log_path_for(port: int) -> Path:
    """Where a server on `port` writes its log unless told otherwise (kept after it ends)."""
    from ..native.build import cache_dir

    folder = cache_dir() / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"llama-server-{port}.log"


@contextlib.contextmanager
def running(gguf_path: str | os.PathLike, *, plan: "Plan | None" = None, port: int | None = None,
            host: str = "127.0.0.1", n_ctx: int = 4096, extra_args: Sequence[str] = (),
            api_key: str | None = None, startup_timeout: float = 120.0,
            log_path: Path | None = None, server: Path | None = None) -> Iterator[Running]:
    """Run our `llama-server` for the block's duration. `plan` gives its context, placement,
    cache, batch and MTP flags (then `n_ctx` is the plan's). It binds to loopback unless `host`
    says otherwise, which needs an `api_key`. `server` runs the llama-server of another build
    instead (stock llama.cpp, for comparisons). A plan made with a separate draft GGUF
    (facts.read(..., draft=)) drafts from it. Its log goes to `log_path` (by default
    `log_path_for(port)`); an error in the block after it died says how it died."""
    if plan is not None and plan.mtp and plan.model.draft:
        # checked against the model when planned; it must still be there
        if not Path(plan.model.draft).is_file():
            raise StepGGUFError(f"draft {plan.model.draft} does not exist any more; plan again")
        log.info("drafting with the MTP heads of %s", plan.model.draft)
    check_exposure(host, api_key)
    server = server or check().tool("llama-server")
    if not Path(gguf_path).is_file():
        raise StepGGUFError(f"{gguf_path} does not exist; give a GGUF file")
    gguf_path = first_shard(gguf_path)  # any shard of a split model: llama.cpp wants the first
    port = port or free_port()
    args = [str(server), "-m", str(gguf_path), "--host", host, "--port", str(port),
            *(plan.server_flags() if plan is not None else ["-c", str(n_ctx)]), *extra_args]
    if api_key:
        args += ["--api-key", api_key]
    url = base_url(host, port)
    with child(args, f"llama-server loading {gguf_path}", lambda: _healthy(url), startup_timeout,
               log_path or log_path_for(port), plan.server_env() if plan is not None else None) as process:
        yield Running(url, process)


@contextlib.contextmanager
def serve(gguf_path: str | os.PathLike, **options) -> Iterator[str]:
    """`running(...)`, yielding only the server's base URL."""
    with running(gguf_path, **options) as r:
        yield r.url


def check_exposure(host: str, api_key: str | None) -> None:
    """Refuse to serve beyond loopback without a key."""
    if host not in LOOPBACK and not api_key:
        raise StepGGUFError(f"serving on {host} exposes the model to the network; give --api-key "
                            "(or serve on 127.0.0.1)")


def base_url(host: str, port: int) -> str:
    """The address clients reach a server bound to `host` at: a wildcard bind is reached on
    loopback, and an IPv6 address goes in brackets (RFC 3986)."""
    host = {"0.0.0.0": "127.0.0.1", "localhost": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def has_page(url: str) -> bool:
    """Whether the server at `url` serves llama.cpp's chat page (a runtime built with npm)."""
    # llama-server sends the page gzipped, to clients that take gzip (every browser)
    req = urllib.request.Request(f"{url}/", headers={"Accept-Encoding": "gzip"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status == 200 and resp.headers.get_content_type() == "text/html"
    except OSError:
        return False


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@dataclass
class Reply:
    """One chat turn as llama-server returned it: the answer apart from the reasoning, parsed
    tool calls, token counts, speeds and what MTP drafting achieved."""

    text: str = ""
    reasoning: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    prompt_tokens: int = 0
    prompt_evaluated: int = 0     # of the prompt tokens, those not taken from the slot's cache
    completion_tokens: int = 0
    prompt_tps: float = 0.0
    decode_tps: float = 0.0
    draft_tokens: int = 0
    draft_accepted: int = 0
    draft_rounds: list[int] = field(default_factory=list)         # decode rounds by draft length 0, 1, ...
    draft_acceptance: list[float] = field(default_factory=list)   # by draft position, given the earlier ones

    @property
    def acceptance(self) -> float | None:
        return self.draft_accepted / self.draft_tokens if self.draft_tokens else None

    def to_json(self) -> dict:
        return {"text": self.text, "reasoning": self.reasoning, "tool_calls": self.tool_calls,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "prompt_tps": round(self.prompt_tps, 2), "decode_tps": round(self.decode_tps, 2),
                "mtp": {"drafted": self.draft_tokens, "accepted": self.draft_accepted,
                        "acceptance": None if self.acceptance is None else round(self.acceptance, 4),
                        "rounds_by_draft_length": self.draft_rounds,
                        "acceptance_by_position": [round(a, 4) for a in self.draft_acceptance]}}


def chat(url: str, messages: list[dict], *, max_tokens: int = 256, seed: int = 0,
         temperature: float = 0.0, tools: list[dict] | None = None, api_key: str | None = None,
         on_text: Callable[[str, str], None] | None = None, timeout: float = 600,
         ignore_eos: bool = False) -> Reply:
    """One chat completion from a running server. With `on_text`, the reply streams and each
    piece is passed on as (kind, text), kind being "reasoning" or "text". `ignore_eos`
    generates `max_tokens` whatever the model would end on (for measurements)."""
    body = {"messages": messages, "max_tokens": max_tokens, "seed": seed,
            "temperature": temperature, "stream": on_text is not None}
    if ignore_eos:
        body["ignore_eos"] = True
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
    except (OSError, ValueError, http.client.HTTPException) as exc:  # HTTPException: a cut stream
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
        reply.prompt_evaluated = t.get("prompt_n", reply.prompt_evaluated)
        reply.prompt_tps = t.get("prompt_per_second", reply.prompt_tps) or 0.0
        reply.decode_tps = t.get("predicted_per_second", reply.decode_tps) or 0.0
        reply.draft_tokens = t.get("draft_n", reply.draft_tokens)
        reply.draft_accepted = t.get("draft_n_accepted", reply.draft_accepted)
        reply.draft_rounds = t.get("draft_lengths", reply.draft_rounds)
        reply.draft_acceptance = t.get("draft_acceptance", reply.draft_acceptance)
