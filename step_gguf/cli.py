"""`step-gguf`: a thin click layer over the Python API. Only this module prints."""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

import click

from .errors import StepGGUFError


class _Group(click.Group):
    """Turns StepGGUFError into a one-line message and exit status 1."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except StepGGUFError as exc:
            raise click.ClickException(str(exc)) from None


def _human(n: float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"


class _ByteBar:
    """A progress bar on stderr that counts bytes, shown only when stderr is a terminal."""

    def __init__(self, label: str) -> None:
        self.label, self.bar = label, None

    def start(self, total: int) -> None:
        if not sys.stderr.isatty():
            return
        self.bar = click.progressbar(length=total, label=self.label, show_eta=True,
                                     show_percent=True, file=sys.stderr,
                                     item_show_func=lambda _: None)
        self.bar.__enter__()

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log what each step does.")
def main(verbose: bool) -> None:
    """Convert Step 3.5 Flash checkpoints to GGUF and run them on a patched llama.cpp.

    \b
    Typical flow:
      step-gguf runtime build                    # once: patched llama.cpp + llama-cpp-python
      step-gguf convert ./Step-3.5-Flash -o step35-bf16.gguf
      step-gguf demo                             # the whole flow on a tiny synthetic model
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="Output GGUF path (written aside and renamed when complete).")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default="bf16",
              show_default=True, help="Type of the weight matrices; norms, biases and the "
              "router stay F32.")
@click.option("--mtp", "mtp", type=click.Choice(["keep", "drop", "split"]), default="keep",
              show_default=True, help="Multi-token-prediction layers: keep them in the GGUF, "
              "drop them, or split them into a separate draft GGUF (--draft-out).")
@click.option("--draft-out", type=click.Path(path_type=Path), default=None,
              help="Draft GGUF for --mtp split (default: OUT with a -mtp suffix).")
@click.option("--tokenizer-pre", default=None, metavar="NAME",
              help="llama.cpp pre-tokenizer name, overriding detection from tokenizer.json.")
def convert(src: Path, out: Path, outtype: str, mtp: str, draft_out: Path | None,
            tokenizer_pre: str | None) -> None:
    """Convert the Step 3.5 checkpoint folder SRC to a GGUF file.

    Reads config.json itself (Step 3.5 or the Step 3.7 text_config wrapper), accepts BF16, F16,
    F32 and FP8 (block-scaled) weights, validates every tensor shape before writing, and
    streams tensor by tensor with bounded memory.

    \b
    Example:
      step-gguf convert ./Step-3.5-Flash -o step35-q8_0.gguf --outtype q8_0
    """
    from .convert import convert as run_convert

    if mtp == "split" and draft_out is None:
        draft_out = out.with_name(out.stem + "-mtp" + out.suffix)
    bar = _ByteBar(f"converting {src.name}")
    start = time.perf_counter()
    try:
        result = run_convert(src, out, outtype=outtype, mtp=mtp,
                             draft_out=draft_out if mtp == "split" else None,
                             tokenizer_pre=tokenizer_pre, on_start=bar.start, on_bytes=bar.advance)
    finally:
        bar.close()
    secs = time.perf_counter() - start
    for path in result.outputs:
        click.echo(f"wrote {path} ({_human(path.stat().st_size)})")
    click.echo(f"{result.n_tensors} tensors, {_human(result.source_bytes)} read in {secs:.1f} s "
               f"({_human(result.source_bytes / max(secs, 1e-9))}/s)")


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--preset", type=click.Choice(["tiny", "small", "wide"]), default="tiny",
              show_default=True, help="tiny: seconds, for tests; small: a larger toy; wide: the "
              "real per-expert shapes (4096x1280), ~4.8 GB, for speed work.")
@click.option("--seed", type=int, default=0, show_default=True, help="Weights are a pure "
              "function of the seed.")
@click.option("--fp8", is_flag=True, help="Store projections as float8-e4m3 with block scales, "
              "as the FP8 releases do.")
@click.option("--step3p7", is_flag=True, help="Wrap the decoder the Step 3.7 way "
              "(text_config, model.language_model. prefixes, a vision tower to ignore).")
def synth(out: Path, preset: str, seed: int, fp8: bool, step3p7: bool) -> None:
    """Write a synthetic Step 3.5 checkpoint (hub layout, random weights) to the new folder OUT."""
    from .synth import synth as run_synth

    bar = _ByteBar(f"writing {preset} checkpoint")
    try:
        run_synth(out, preset, seed=seed, fp8=fp8, step3p7=step3p7, on_start=bar.start,
                  on_bytes=bar.advance)
    finally:
        bar.close()
    click.echo(f"wrote {out}")


@main.group()
def runtime() -> None:
    """Build and inspect the patched llama.cpp runtime."""


@runtime.command("build")
@click.option("--backend", type=click.Choice(["cpu", "cuda", "metal"]), default="cpu",
              show_default=True, help="ggml backend to compile.")
@click.option("--cmake-arg", "cmake_args", multiple=True, metavar="-DNAME=VALUE",
              help="Extra CMake option (repeatable), e.g. -DCMAKE_CUDA_ARCHITECTURES=89.")
@click.option("-j", "--jobs", type=int, default=None, help="Parallel compile jobs [all cores].")
@click.option("--no-install", is_flag=True, help="Build into the cache only; do not install "
              "llama-cpp-python into this environment.")
def runtime_build(backend: str, cmake_args: tuple[str, ...], jobs: int | None,
                  no_install: bool) -> None:
    """Build llama-cpp-python with step-gguf's patch series and install it.

    Downloads the pinned llama-cpp-python source from PyPI, applies patches/ in series order,
    compiles the library plus llama-server, llama-bench and ggml-rpc-server (ccache is used
    when installed), and caches the result: a second call with the same options is instant.
    A cold CPU build takes about 10 minutes on 2 cores.
    """
    from .runtime import build as b
    from .runtime import llama

    spec = b.BuildSpec(backend, tuple(cmake_args))
    cached = b.cached_build(spec)
    if cached:
        click.echo(f"runtime {spec.key} is cached at {cached.root}")
        result = cached
    else:
        click.echo(f"building runtime {spec.key} (llama-cpp-python {b.LLAMA_CPP_PYTHON_VERSION}, "
                   f"patch series {b.series_id()}, {backend})")
        with click.progressbar(length=1, label="compiling", show_percent=True, file=sys.stderr) as bar:
            def on_step(done: int, total: int) -> None:
                bar.length = total
                bar.update(done - bar.pos)
            result = b.build(spec, jobs=jobs, on_step=on_step)
    if no_install:
        click.echo(f"tools in {result.bin_dir}")
        return
    try:
        if llama.check().bin_dir == result.bin_dir:
            click.echo("patched llama-cpp-python already installed")
            return
    except StepGGUFError:
        pass
    b.install(result)
    click.echo(f"installed patched llama-cpp-python; tools in {result.bin_dir}")


@runtime.command("status")
def runtime_status() -> None:
    """Say whether the installed runtime is ours and current, and where its tools are."""
    from .runtime import llama

    info = llama.check()
    click.echo(f"patch series {info.series_id} ({info.backend}), tools in {info.bin_dir}")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-p", "--prompt", default="Hello! Who are you?", show_default=True,
              help="User message, sent through the GGUF's chat template.")
@click.option("-n", "--max-tokens", type=int, default=32, show_default=True)
@click.option("-c", "--ctx", type=int, default=4096, show_default=True, help="Context length.")
@click.option("-t", "--threads", type=int, default=None, help="CPU threads [all cores].")
def run(model: Path, prompt: str, max_tokens: int, ctx: int, threads: int | None) -> None:
    """Generate a chat reply from the GGUF MODEL with the patched runtime."""
    from .runtime import llama

    with llama.load(model, n_ctx=ctx, n_threads=threads) as m:
        result = m.chat([{"role": "user", "content": prompt}], max_tokens=max_tokens)
    click.echo(result.text)
    click.echo(f"[{result.prompt_tokens} prompt + {result.completion_tokens} generated tokens in "
               f"{result.seconds:.2f} s, {result.completion_tokens / max(result.seconds, 1e-9):.1f} tok/s]",
               err=True)


@main.command()
@click.option("--keep", type=click.Path(path_type=Path), default=None,
              help="Keep the checkpoint and GGUF in this new folder instead of a temporary one.")
def demo(keep: Path | None) -> None:
    """The whole flow on the embedded tiny synthetic model: synth, convert, load, chat."""
    from .convert import convert as run_convert
    from .runtime import llama
    from .synth import synth as run_synth

    llama.check()  # fail before doing work if the runtime is missing
    with tempfile.TemporaryDirectory() as tmp:
        work = keep or Path(tmp)
        ckpt, gguf_path = work / "step35-tiny", work / "step35-tiny-bf16.gguf"
        t0 = time.perf_counter()
        run_synth(ckpt, "tiny", seed=0)
        t1 = time.perf_counter()
        click.echo(f"synthesised tiny Step 3.5 checkpoint at {ckpt} in {t1 - t0:.2f} s")
        result = run_convert(ckpt, gguf_path, outtype="bf16")
        t2 = time.perf_counter()
        click.echo(f"converted to {gguf_path} ({_human(gguf_path.stat().st_size)}, "
                   f"{result.n_tensors} tensors) in {t2 - t1:.2f} s")
        with llama.load(gguf_path, n_ctx=256) as m:
            t3 = time.perf_counter()
            click.echo(f"loaded with the patched runtime in {t3 - t2:.2f} s")
            chat = m.chat([{"role": "user", "content": "Hello! Who are you?"}], max_tokens=16)
        click.echo(f"reply (random weights, so gibberish): {chat.text!r}")
        click.echo(f"{chat.prompt_tokens} prompt + {chat.completion_tokens} generated tokens in "
                   f"{chat.seconds:.3f} s ({chat.completion_tokens / max(chat.seconds, 1e-9):.0f} tok/s)")
        if keep:
            click.echo(f"kept {ckpt} and {gguf_path}")


if __name__ == "__main__":
    main()
