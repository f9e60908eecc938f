"""Commands that measure a model with llama.cpp's tools: imatrix, eval."""

from __future__ import annotations

import time
from pathlib import Path

import click

from .progress import ByteBar


@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="Output importance matrix, GGUF format (written aside and renamed when complete).")
@click.option("--text", "text_file", type=click.Path(path_type=Path), default=None,
              help="Calibration text [the bundled one: prose, code, maths, tool calls, chat, "
              "a dozen languages].")
@click.option("-c", "--ctx", type=int, default=512, show_default=True,
              help="Tokens per chunk; each chunk is evaluated from an empty context.")
@click.option("--chunks", type=int, default=None, help="Use at most this many chunks [all].")
@click.option("-t", "--threads", type=int, default=None, help="CPU threads [all cores].")
def imatrix(model: Path, out: Path, text_file: Path | None, ctx: int, chunks: int | None,
            threads: int | None) -> None:
    """Compute the importance matrix of the GGUF MODEL with llama-imatrix.

    Runs MODEL over the calibration text and records, for every weight matrix (each expert
    separately), the mean squared activation of each input channel. Low-bit quantization
    uses it (step-gguf quantize --imatrix) to keep the channels that matter most precise.
    Then it measures how much noise added at each depth of MODEL (after the embeddings, after
    each layer's attention and FFN) moves its output, on one chunk: budget mode
    (--target-size) weighs every tensor's error by the depth it enters at. Compute it on the
    highest-precision GGUF you have (BF16 or Q8_0).

    \b
    Example:
      step-gguf imatrix step35-bf16.gguf -o imatrix.gguf
      step-gguf quantize ./Step-3.5-Flash -o step35-int3.gguf --scheme int3-mixed --imatrix imatrix.gguf
    """
    from ..files.imatrix import load_imatrix
    from ..native import tools

    bars = {"chunks": ByteBar(f"imatrix of {model.name}"), "depths": ByteBar("depth gains")}
    done_before = dict.fromkeys(bars, 0)

    def following(which: str):
        def on_progress(done: int, total: int) -> None:
            if not done_before[which]:
                bars["chunks"].close()  # done by the time the depths start
                bars[which].start(total)
            bars[which].advance(done - done_before[which])
            done_before[which] = done
        return on_progress

    start = time.perf_counter()
    try:
        tools.imatrix(model, out, text_file, ctx=ctx, chunks=chunks, threads=threads,
                      on_progress=following("chunks"), on_gains=following("depths"))
    finally:
        for bar in bars.values():
            bar.close()
    result = load_imatrix(out)
    click.echo(f"wrote {out} ({len(result)} matrices, {result.chunk_count} chunks of "
               f"{result.chunk_size} tokens, gains of {len(result.propagation or {})} depths) in "
               f"{time.perf_counter() - start:.1f} s")


@click.command("eval")
@click.argument("quant", type=click.Path(path_type=Path))
@click.option("--reference", type=click.Path(path_type=Path), required=True,
              help="The GGUF to compare against: the same model at higher precision (BF16).")
@click.option("--text", "text_file", type=click.Path(path_type=Path), default=None,
              help="Evaluation text [the bundled calibration text].")
@click.option("-c", "--ctx", type=int, default=512, show_default=True,
              help="Tokens per chunk; the second half of each chunk is scored.")
@click.option("-t", "--threads", type=int, default=None, help="CPU threads [all cores].")
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as a JSON object.")
def eval_(quant: Path, reference: Path, text_file: Path | None, ctx: int, threads: int | None,
          as_json: bool) -> None:
    """Measure how far the GGUF QUANT drifts from its reference, with llama-perplexity.

    Prints the mean KL divergence of QUANT's next-token distributions from the reference's
    and its 99th percentile over tokens, how often both rank the same token first, and both
    perplexities. Lower KLD is better; 0 means identical predictions.

    \b
    Example:
      step-gguf eval step35-int4.gguf --reference step35-bf16.gguf
      step-gguf eval step35-int4.gguf --reference step35-bf16.gguf --json
    """
    import json as _json

    from ..native import tools

    stats = tools.kld(quant, reference, text_file, ctx=ctx, threads=threads)
    if as_json:
        click.echo(_json.dumps(stats, indent=1))
        return
    click.echo(f"mean KLD        {stats['kld_mean']:.6f}")
    click.echo(f"99th pct KLD    {stats['kld_p99']:.6f}")
    click.echo(f"same top token  {stats['top1_pct']:.3f} %")
    click.echo(f"PPL             {stats['ppl']:.4f} (reference {stats['ppl_reference']:.4f})")
    click.echo(f"over {stats['chunks']} chunks of {stats['ctx']} tokens")
