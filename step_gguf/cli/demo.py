"""`step-gguf demo`: the whole flow on the embedded tiny synthetic model."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click

from ..core.units import human_size


@click.command()
@click.option("--keep", type=click.Path(path_type=Path), default=None,
              help="Keep the checkpoint and GGUF in this new folder instead of a temporary one.")
def demo(keep: Path | None) -> None:
    """The whole flow on the embedded tiny synthetic model: synth, convert, quantize, chat."""
    from ..pipeline import quantize as q
    from ..pipeline.convert import convert as run_convert
    from ..core.recipe import load_recipe
    from ..native import installed
    from ..runtime import server
    from ..synth.writer import synth as run_synth

    installed.check()  # fail before doing work if the runtime is missing
    with tempfile.TemporaryDirectory() as tmp:
        work = keep or Path(tmp)
        ckpt, gguf_path = work / "step35-tiny", work / "step35-tiny-bf16.gguf"
        int4_path = work / "step35-tiny-int4-mixed.gguf"
        t0 = time.perf_counter()
        run_synth(ckpt, "tiny", seed=0)
        t1 = time.perf_counter()
        click.echo(f"synthesised tiny Step 3.5 checkpoint at {ckpt} in {t1 - t0:.2f} s")
        result = run_convert(ckpt, gguf_path, outtype="bf16")
        t2 = time.perf_counter()
        click.echo(f"converted to {gguf_path} ({human_size(gguf_path.stat().st_size)}, "
                   f"{result.n_tensors} tensors) in {t2 - t1:.2f} s")
        quantized = q.quantize(ckpt, int4_path, load_recipe("int4-mixed"))
        t3 = time.perf_counter()
        click.echo(f"quantized the checkpoint in one pass to {int4_path} "
                   f"({human_size(int4_path.stat().st_size)}, {quantized.pricing.bpw:.2f} bits per weight; "
                   f"tiny widths take K-quant fallbacks) in {t3 - t2:.2f} s")
        with server.serve(int4_path, n_ctx=256) as url:
            t4 = time.perf_counter()
            click.echo(f"loaded with the patched runtime (our llama-server) in {t4 - t3:.2f} s")
            reply = server.chat(url, [{"role": "user", "content": "Hello! Who are you?"}], max_tokens=16)
        click.echo(f"reply (random weights, so gibberish): {reply.text!r}")
        click.echo(f"{reply.prompt_tokens} prompt + {reply.completion_tokens} generated tokens "
                   f"({reply.prompt_tps:.0f} tok/s prompt, {reply.decode_tps:.0f} tok/s decode)")
        if keep:
            click.echo(f"kept {ckpt}, {gguf_path} and {int4_path}")
