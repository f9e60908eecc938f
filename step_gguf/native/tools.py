"""llama.cpp's command-line tools from our runtime build, run to completion as child processes
(`process.run`): importance matrices (`llama-imatrix`), KL divergence (`llama-perplexity`) and
the stock quantizer's dry run (`llama-quantize`)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import struct
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..core.errors import StepGGUFError
from ..files.gguf_source import resolve
from ..files.imatrix import load_imatrix, model_shapes, with_propagation
from . import propagation
from .installed import check
from .process import error_line, run

log = logging.getLogger(__name__)

# llama.cpp tools: mark log lines by level ("E " = error), and no debugger backtrace on an abort,
# so that the last meaningful line of a failure is the error itself
_TOOL_ARGS = ("--log-prefix", "--no-log-timestamps")
_TOOL_ENV = {"GGML_NO_BACKTRACE": "1"}


def default_text() -> Path:
    """The calibration text shipped with step-gguf: prose, code, maths, chat and tool calls in
    Step 3.5's format, in a dozen languages."""
    return Path(str(resources.files("step_gguf.recipes") / "calibration.txt"))


def _tool(name: str, args: Sequence[str | os.PathLike], what: str, binary: Path | None = None,
          **kw) -> None:
    """Run llama.cpp's tool `name` from the runtime (or the `binary` of another build)."""
    run([binary or check().tool(name), *args, *_TOOL_ARGS], what, env=os.environ | _TOOL_ENV, **kw)


def _threads(threads: int | None) -> list[str]:
    return ["-t", str(threads)] if threads else []


def _existing(path: Path, what: str) -> Path:
    if not path.is_file():
        raise StepGGUFError(f"{what} {path} does not exist")
    return path


def _hidden_beside(path: Path, suffix: str) -> Path:
    """A fresh hidden name beside `path`, for a temporary renamed into place or deleted."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}")


_CHUNKS = re.compile(r"computing over (\d+) chunks")
_CHUNK_DONE = re.compile(r"^\[(\d+)\]")  # llama-imatrix prints "[3]5.1234," as chunk 3 ends


def imatrix(model_gguf: str | os.PathLike, out: str | os.PathLike,
            text_file: str | os.PathLike | None = None, *, ctx: int = 512, chunks: int | None = None,
            threads: int | None = None,
            on_progress: Callable[[int, int], None] | None = None,
            on_gains: Callable[[int, int], None] | None = None) -> Path:
    """Compute the importance matrix of `model_gguf` over `text_file` (default: the bundled
    calibration text) with llama-imatrix and write it, in GGUF form, to `out`, with how a
    perturbation at each depth of the model moves its output (propagation.measure, on the
    text's first `ctx` tokens: 2 * layers + 3 forward passes of one chunk).

    The file appears at `out` only once complete and checked against the model; a failure
    leaves nothing new there (an existing file survives). `on_progress(done, total)` follows
    the chunks of `ctx` tokens, `on_gains(done, total)` the depths. Returns `out`.
    """
    # any shard of a split model: llama.cpp loads the set from the first shard's path
    model, out = resolve(_existing(Path(model_gguf), "model")), Path(out)
    text = _existing(Path(text_file) if text_file else default_text(), "calibration text")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _hidden_beside(out, ".partial.gguf")  # llama-imatrix warns on other suffixes
    total = 0

    def progress(line: str) -> None:
        nonlocal total
        if m := _CHUNKS.search(line):
            total = int(m.group(1))
        elif on_progress and total and (m := _CHUNK_DONE.match(line)):
            on_progress(int(m.group(1)), total)

    # --parse-special: chat markup in the text (<|im_start|>...) becomes control tokens, as in use;
    # --process-output: the output matrices get statistics too, so every matrix has them
    args = ["-m", model, "-f", text, "-o", tmp, "--output-format", "gguf", "--parse-special",
            "--process-output", "-c", str(ctx), *(["--chunks", str(chunks)] if chunks else []),
            *_threads(threads)]
    log_file = out.with_name(out.name + ".log")  # kept only when the tool fails
    try:
        _tool("llama-imatrix", args, f"computing the importance matrix of {model}",
              log_file=log_file, on_line=progress, separators="\n,")
        missing = load_imatrix(tmp).check_against(model_shapes(model))
        if missing:
            log.warning("%d matrices of %s got no statistics (e.g. %s); they will be quantized "
                        "without importance data", len(missing), model, missing[0])
        with_propagation(tmp, propagation.measure_file(model, text, ctx=ctx, threads=threads,
                                                       on_progress=on_gains))
        os.replace(tmp, out)
        log_file.unlink()
    finally:
        tmp.unlink(missing_ok=True)
    log.info("wrote the importance matrix of %s to %s", model, out)
    return out


_STATS = {
    "kld_mean": re.compile(r"^Mean\s+KLD:\s*(\S+)"),
    "kld_p99": re.compile(r"^99\.0%\s+KLD:\s*(\S+)"),
    "top1_pct": re.compile(r"^Same top p:\s*(\S+)"),
    "ppl": re.compile(r"^Mean PPL\(Q\)\s*:\s*(\S+)"),
    "ppl_reference": re.compile(r"^Mean PPL\(base\)\s*:\s*(\S+)"),
}
_MIN_SCORED = 100  # llama-perplexity prints no statistics over fewer scored tokens


@dataclass(frozen=True)
class ReferenceScores:
    """A reference model's log-probabilities on a text, as llama-perplexity writes them: scored
    once, then compared with any number of quantizations (`kld_against`)."""

    reference: Path
    ctx: int
    logits: Path    # large (n_vocab 16-bit steps per scored token): on disk, removed after


@contextlib.contextmanager
def reference_scores(reference_gguf: str | os.PathLike, text_file: str | os.PathLike | None = None, *,
                     ctx: int = 512, threads: int | None = None, reference_args: Sequence[str] = (),
                     beside: Path | None = None) -> Iterator[ReferenceScores]:
    """`reference_gguf` scored on `text_file` (default: the bundled calibration text) in
    `ctx`-token chunks by the runtime's llama-perplexity, with `reference_args` (e.g. `-dev
    none` for the CPU alone); the scores live in a hidden file beside `beside` (default: the
    reference) until the block ends."""
    reference = resolve(_existing(Path(reference_gguf), "reference model"))
    text = _existing(Path(text_file) if text_file else default_text(), "text")
    logits = _hidden_beside(beside or reference, ".kld-base")
    try:
        _tool("llama-perplexity", ["-m", reference, "-f", text, "--kl-divergence-base", logits, "-c", str(ctx),
                                   *_threads(threads), *reference_args], f"scoring the reference {reference}")
        if problem := _logits_problem(logits):
            raise StepGGUFError(f"scoring the reference {reference} failed: {problem}")
        yield ReferenceScores(reference, ctx, logits)
    finally:
        logits.unlink(missing_ok=True)


def kld(quant_gguf: str | os.PathLike, reference_gguf: str | os.PathLike,
        text_file: str | os.PathLike | None = None, *, ctx: int = 512,
        threads: int | None = None, perplexity: Path | None = None,
        quant_args: Sequence[str] = (), reference_args: Sequence[str] = ()) -> dict:
    """How far `quant_gguf`'s next-token distributions are from `reference_gguf`'s on `text_file`
    (default: the bundled calibration text), as llama-perplexity measures it: `kld_against`
    the reference's `reference_scores`, made for this one comparison."""
    quant = resolve(_existing(Path(quant_gguf), "quantized model"))
    with reference_scores(reference_gguf, text_file, ctx=ctx, threads=threads, reference_args=reference_args,
                          beside=quant) as scores:
        return kld_against(quant, scores, threads=threads, perplexity=perplexity, quant_args=quant_args)


def kld_against(quant_gguf: str | os.PathLike, scores: ReferenceScores, *, threads: int | None = None,
                perplexity: Path | None = None, quant_args: Sequence[str] = ()) -> dict:
    """How far `quant_gguf`'s next-token distributions are from the reference's `scores`.

    Scored are the second halves of consecutive `ctx`-token chunks. Returns kld_mean (mean
    KL divergence, nats), kld_p99 (its 99th percentile over tokens), top1_pct (how often both
    models rank the same token first, percent), ppl and ppl_reference (perplexities), chunks
    and ctx. The quantized model is scored by the runtime's llama-perplexity, or by
    `perplexity` (another build's, e.g. stock llama.cpp's) when given, with `quant_args` (e.g.
    `-ngl 99` to run it on a GPU).
    """
    quant = resolve(_existing(Path(quant_gguf), "quantized model"))
    ctx, reference = scores.ctx, scores.reference
    what = f"comparing {quant} with {reference}"
    lines: list[str] = []
    _tool("llama-perplexity", ["-m", quant, "--kl-divergence-base", scores.logits, "--kl-divergence",
                               "-c", str(ctx), *_threads(threads), *quant_args], what, binary=perplexity,
          on_line=lines.append)
    stats = {key: float(m.group(1)) for line in lines for key, rx in _STATS.items()
             if (m := rx.match(line))}
    chunks = next((int(m.group(1)) for line in lines if (m := _CHUNKS.search(line))), 0)
    scored = chunks * (ctx - 1 - ctx // 2)
    if any("inconsistent vocabulary" in line for line in lines):
        raise StepGGUFError(f"{quant} and {reference} have different vocabularies; compare "
                            "quantizations of the same model")
    if len(stats) < len(_STATS):
        why = (f"the text gives {scored} scored tokens at ctx {ctx}, llama-perplexity needs "
               f"{_MIN_SCORED}: use a longer text or a smaller ctx" if scored < _MIN_SCORED
               else _last_error(lines) or "llama-perplexity printed no error")
        raise StepGGUFError(f"{what} gave no statistics: {why}")
    return stats | {"chunks": chunks, "ctx": ctx}


def _logits_problem(path: Path) -> str | None:
    """What is wrong with the reference's log-probabilities that llama-perplexity wrote to `path`,
    None if nothing. The file: "_logits_", n_ctx, n_vocab, n_chunk, the tokens, then per chunk
    each scored position's log-probs as 16-bit steps (n_vocab rounded up to even, plus 4)."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
        size = path.stat().st_size
    except FileNotFoundError:
        size, head = 0, b""
    if len(head) < 12 or head[:8] != b"_logits_":
        return "it wrote no log-probabilities"
    n_ctx = struct.unpack_from("<I", head, 8)[0]
    if len(head) < 20:  # it stops after n_ctx when the text is too short
        return f"the text is too short: at ctx {n_ctx} it needs at least {2 * n_ctx} tokens"
    n_vocab, n_chunk = struct.unpack_from("<iI", head, 12)
    per_position = 2 * ((n_vocab + 1) // 2) + 4
    if size != 20 + 4 * n_chunk * n_ctx + 2 * n_chunk * (n_ctx - 1 - n_ctx // 2) * per_position:
        return "its log-probabilities are incomplete"
    return None


def _last_error(lines: list[str]) -> str | None:
    return next((e for line in reversed(lines) if (e := error_line(line))), None)


# "[  12/ 805] blk.0.attn_q.weight  - [ 4096, 8192, 1, 1], type =   bf16, size = 64.00 MiB -> 18.00 MiB (q4_K)"
_DRY_RUN_ROW = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\w+), size =[^(]*(?:\((\w+)\))?")


def stock_dry_run(model_gguf: str | os.PathLike, ftype: str) -> dict[str, str]:
    """The type llama.cpp's own quantizer gives each tensor of `model_gguf` for `ftype`
    (e.g. Q4_K_M), from `llama-quantize --dry-run`: tensor name -> ggml type name."""

    types: dict[str, str] = {}

    def take(line: str) -> None:
        if m := _DRY_RUN_ROW.match(line):
            types[m.group(1)] = (m.group(3) or m.group(2)).upper()

    run([check().tool("llama-quantize"), "--dry-run", model_gguf, ftype],
        f"pricing {ftype} with llama-quantize --dry-run", on_line=take)
    if not types:
        raise StepGGUFError(f"llama-quantize --dry-run reported no tensors for {ftype}; is "
                            f"{ftype} an ftype it knows (llama-quantize --help lists them)?")
    return types
