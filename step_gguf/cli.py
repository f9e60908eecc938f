"""`step-gguf`: a thin click layer over the Python API. Only this module prints."""

from __future__ import annotations

import logging
import os
import shlex
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


class _StepProgress:
    """Stages and compile steps of a long build on stderr: a bar of steps done of total on a
    terminal, else (CI, a log file) a line at every tenth of the steps, with the time taken."""

    def __init__(self) -> None:
        self.start, self.bar, self.shown = time.monotonic(), None, -1

    def _elapsed(self) -> str:
        s = int(time.monotonic() - self.start)
        return f"{s // 60}m{s % 60:02d}s"

    def stage(self, what: str) -> None:
        self.close()
        click.echo(f"{what} ... ({self._elapsed()})", err=True)

    def step(self, done: int, total: int) -> None:
        if sys.stderr.isatty():
            if self.bar is None:
                self.bar = click.progressbar(length=total, label="compile steps", show_pos=True,
                                             show_eta=True, file=sys.stderr)
                self.bar.__enter__()
            self.bar.length = total
            self.bar.update(done - self.bar.pos)
        elif (tenth := 10 * done // max(total, 1)) > self.shown:
            self.shown = tenth
            click.echo(f"  compiled {done}/{total} steps ({self._elapsed()})", err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


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


def _card_options(f):
    """--name, --basename, --license: the model card's fields, over what the checkpoint says."""
    for option in reversed([
        click.option("--name", "card_name", default=None, metavar="TEXT", help="general.name "
                     "[from README.md's front matter, config.json or the folder name]."),
        click.option("--basename", "card_basename", default=None, metavar="TEXT",
                     help="general.basename, the model family (e.g. Step-3.5-Flash)."),
        click.option("--license", "card_license", default=None, metavar="ID",
                     help="general.license (e.g. apache-2.0) [from README.md's front matter]."),
    ]):
        f = option(f)
    return f


def _card(name: str | None, basename: str | None, license_id: str | None):
    from .model_card import CardOverrides

    return CardOverrides(name, basename, license_id)


def _split_options(f):
    """--split-max-size, --split-max-tensors: llama.cpp's gguf-split flags, for the output."""
    for option in reversed([
        click.option("--split-max-size", default=None, metavar="SIZE",
                     help="Write OUT as shards OUT-00001-of-0000N.gguf ... (llama.cpp's gguf-split "
                          "layout, loaded from the first shard), each file at most SIZE: 50G "
                          "(50*10^9 bytes, as gguf-split reads it), 500M, 48GiB or bytes."),
        click.option("--split-max-tensors", type=click.IntRange(1), default=None, metavar="N",
                     help="Shards of at most N tensors each (with --split-max-size: whichever "
                          "limit comes first)."),
    ]):
        f = option(f)
    return f


def _split(max_size: str | None, max_tensors: int | None):
    from .convert import SplitLimits, parse_split_size

    if max_size is None and max_tensors is None:
        return None
    return SplitLimits(parse_split_size(max_size) if max_size else 0, max_tensors or 0)


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
@click.option("--no-resume", is_flag=True, help="Start over instead of continuing the partial "
              "output an interrupted run of the same conversion left.")
@_card_options
@_split_options
def convert(src: Path, out: Path, outtype: str, mtp: str, draft_out: Path | None,
            tokenizer_pre: str | None, no_resume: bool, card_name: str | None,
            card_basename: str | None, card_license: str | None, split_max_size: str | None,
            split_max_tensors: int | None) -> None:
    """Convert the Step 3.5 checkpoint folder SRC to a GGUF file.

    Reads config.json itself (Step 3.5 or the Step 3.7 text_config wrapper), accepts BF16, F16,
    F32 and FP8 (block-scaled) weights, validates every tensor shape before writing, and
    streams tensor by tensor with bounded memory.

    \b
    Example:
      step-gguf convert ./Step-3.5-Flash -o step35-q8_0.gguf --outtype q8_0
    """
    from .convert import convert as run_convert
    from .draft import draft_path

    if mtp == "split" and draft_out is None:
        draft_out = draft_path(out)  # where run/serve/plan look for it
    bar = _ByteBar(f"converting {src.name}")
    start = time.perf_counter()
    try:
        result = run_convert(src, out, outtype=outtype, mtp=mtp,
                             draft_out=draft_out if mtp == "split" else None,
                             tokenizer_pre=tokenizer_pre, resume=not no_resume,
                             card=_card(card_name, card_basename, card_license),
                             split=_split(split_max_size, split_max_tensors),
                             on_start=bar.start, on_bytes=bar.advance)
    finally:
        bar.close()
    secs = time.perf_counter() - start
    for path in result.outputs:
        click.echo(f"wrote {path} ({_human(path.stat().st_size)})")
    click.echo(f"{result.n_tensors} tensors, {_human(result.source_bytes)} read in {secs:.1f} s "
               f"({_human(result.source_bytes / max(secs, 1e-9))}/s)")


def _print_plan(pricing, stock=None) -> None:
    """The per-tensor plan as a table, then totals by type and against stock."""
    stock_types = stock.types if stock else {}
    width = max((len(r.name) for r in pricing.rows), default=10)
    head = f"{'tensor':<{width}}  {'type':<7} {'bytes':>10}"
    click.echo(head + ("  stock  " if stock else "  ") + "why")
    for r in pricing.rows:
        extra = f"  {stock_types.get(r.name, '?'):<6} " if stock else "  "
        click.echo(f"{r.name:<{width}}  {r.qtype:<7} {_human(r.bytes):>10}{extra}{r.why}")
    click.echo("")
    for qtype, n in pricing.by_type().items():
        click.echo(f"  {qtype:<7} {_human(n):>10}  {100 * n / max(pricing.total_bytes, 1):5.1f}%")
    click.echo(f"{pricing.recipe}: {_human(pricing.total_bytes)} ({pricing.total_bytes} bytes), "
               f"{pricing.bpw:.3f} bits per weight")
    if stock:
        ratio = pricing.total_bytes / stock.total_bytes
        click.echo(f"stock {stock.ftype} (llama.cpp's quantizer): {_human(stock.total_bytes)} "
                   f"({stock.total_bytes} bytes); {pricing.recipe} is {ratio:.3f}x its size")


@main.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None,
              help="Output GGUF (written aside and renamed when complete).")
@click.option("--scheme", default=None, metavar="NAME", help="Built-in recipe: int4-mixed "
              "(default), int8, int3-mixed, int2-mixed; or one ggml type for every matrix (Q8_0).")
@click.option("--recipe", "recipe_file", type=click.Path(path_type=Path), default=None,
              help="Your own recipe file (TOML; `step-gguf recipes int4-mixed --toml` prints one "
              "to start from).")
@click.option("--dry-run", is_flag=True, help="Print the per-tensor plan and its size; read no weight.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: the plan as JSON.")
@click.option("--compare-stock", default=None, metavar="FTYPE", help="Also price a stock "
              "llama.cpp type mix (e.g. Q4_K_M) with llama.cpp's own quantizer.")
@click.option("--imatrix", "imatrix_file", type=click.Path(path_type=Path), default=None,
              help="Importance matrix (step-gguf imatrix) weighting each input channel.")
@click.option("--equalize/--no-equalize", "equalization", default=None,
              help="Per-channel equalization from the --imatrix statistics: fold scales into each "
              "norm and the matrices it feeds, kept only where they lower the measured error "
              "[on with --imatrix].")
@click.option("--target-size", default=None, metavar="SIZE", help="Budget mode: choose each "
              "tensor's type to fit SIZE (e.g. 100GiB; tensor data, as llama.cpp counts model "
              "size) with the least measured error.")
@click.option("--target-bpw", type=float, default=None, metavar="X", help="Budget mode with a "
              "bits-per-weight target instead of a size.")
@click.option("--allow-requantize", is_flag=True, help="Accept a source GGUF that is already "
              "quantized (its rounding error adds to the new one).")
@click.option("--mtp", type=click.Choice(["keep", "drop", "split"]), default="keep",
              show_default=True, help="MTP blocks: keep, drop, or split into --draft-out "
              "(checkpoint sources).")
@click.option("--draft-out", type=click.Path(path_type=Path), default=None,
              help="Draft GGUF for --mtp split (default: OUT with a -mtp suffix).")
@click.option("-t", "--threads", type=int, default=None, help="Quantizing threads [all cores].")
@click.option("--no-resume", is_flag=True, help="Start over instead of continuing the partial "
              "output an interrupted run of the same command left.")
@_card_options
@_split_options
def quantize(src: Path, out: Path | None, scheme: str | None, recipe_file: Path | None,
             dry_run: bool, as_json: bool, compare_stock: str | None, imatrix_file: Path | None,
             equalization: bool | None, target_size: str | None, target_bpw: float | None,
             allow_requantize: bool, mtp: str, draft_out: Path | None, threads: int | None,
             no_resume: bool, card_name: str | None, card_basename: str | None,
             card_license: str | None, split_max_size: str | None,
             split_max_tensors: int | None) -> None:
    """Quantize SRC (a checkpoint folder or a GGUF) to a mixed-precision GGUF in one pass.

    A recipe picks each tensor's ggml type by name and layer; ggml's own quantizers encode
    it, on all cores, streaming with bounded memory. SRC may also be a bare config.json for
    --dry-run, so the real model can be priced without its weights.

    \b
    Examples:
      step-gguf quantize ./Step-3.5-Flash -o step35-int4.gguf
      step-gguf quantize config.json --dry-run --compare-stock Q4_K_M
      step-gguf quantize ./Step-3.5-Flash -o step35-int3.gguf --scheme int3-mixed --imatrix imatrix.gguf
      step-gguf quantize ./Step-3.5-Flash -o step35-100g.gguf --imatrix imatrix.gguf --target-size 100GiB
    """
    import json as _json

    from . import quantize as q
    from .budget import parse_size
    from .recipe import load_recipe

    if scheme and recipe_file:
        raise click.UsageError("give --scheme or --recipe, not both")
    if target_size and target_bpw:
        raise click.UsageError("give --target-size or --target-bpw, not both")
    if dry_run and (target_size or target_bpw):
        raise click.UsageError("budget mode measures the weights, so it cannot be a --dry-run; "
                               "its plan is printed when it runs")
    recipe = load_recipe(scheme, recipe_file)
    if equalization is None:
        equalization = imatrix_file is not None
    target = None
    if target_size or target_bpw:
        target = q.Target(parse_size(target_size) if target_size else None, target_bpw)
    if dry_run:
        pricing = q.dry_run(src, recipe, mtp=mtp)
        stock = q.price_stock(src, compare_stock, mtp=mtp) if compare_stock else None
        if as_json:
            doc = pricing.to_json() | ({"stock": stock.to_json()} if stock else {})
            click.echo(_json.dumps(doc, indent=1))
        else:
            _print_plan(pricing, stock)
        return
    if out is None:
        raise click.UsageError("give -o OUT.gguf (or --dry-run to price the plan)")
    if mtp == "split" and draft_out is None:
        from .draft import draft_path

        draft_out = draft_path(out)  # where run/serve/plan look for it
    if target is not None and imatrix_file is None:
        click.echo("note: without --imatrix, budget mode weighs every input channel alike", err=True)
    bar = _ByteBar(f"quantizing {src.name} ({recipe.name})")
    start = time.perf_counter()

    def stage(what: str) -> None:
        if sys.stderr.isatty():
            click.echo(f"\r\033[K{what}", err=True, nl=False)

    try:
        result = q.quantize(src, out, recipe, mtp=mtp, draft_out=draft_out if mtp == "split" else None,
                            allow_requantize=allow_requantize, imatrix=imatrix_file,
                            equalization=equalization, target=target, threads=threads,
                            resume=not no_resume, card=_card(card_name, card_basename, card_license),
                            split=_split(split_max_size, split_max_tensors),
                            on_stage=stage, on_start=bar.start, on_bytes=bar.advance)
    finally:
        bar.close()
    secs = time.perf_counter() - start
    for e in result.equalized:
        click.echo(f"equalized {e.norm}: alpha {e.alpha:.2f}, measured error "
                   f"{e.error_before:.4g} -> {e.error_after:.4g}")
    if target is not None:
        _print_plan(result.pricing)
    for path in result.outputs:
        click.echo(f"wrote {path} ({_human(path.stat().st_size)})")
    click.echo(f"{result.recipe.name}: {result.pricing.bpw:.3f} bits per weight; {_human(result.source_bytes)} "
               f"read in {secs:.1f} s ({_human(result.source_bytes / max(secs, 1e-9))}/s)")


@main.command()
@click.argument("name", required=False)
@click.option("--toml", "as_toml", is_flag=True, help="Print the recipe as a file to edit and "
              "pass to --recipe.")
def recipes(name: str | None, as_toml: bool) -> None:
    """List the built-in quantization recipes, or show one's rules (pattern, layers, type, why)."""
    from .recipe import builtin_names, load_recipe

    if name is None:
        for n in builtin_names():
            click.echo(f"{n:<12} {load_recipe(n).summary}")
        return
    recipe = load_recipe(name)
    if as_toml:
        click.echo(recipe.to_toml(), nl=False)
        return
    click.echo(f"{recipe.name}: {recipe.summary}")
    width = max(len(r.pattern) for r in recipe.rules)
    click.echo(f"{'match':<{width}}  {'layers':<16} {'type':<7} why")
    for r in recipe.rules:
        click.echo(f"{r.pattern:<{width}}  {(r.layers.text if r.layers else 'all'):<16} "
                   f"{r.qtype.name:<7} {r.why}")


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--preset", type=click.Choice(["tiny", "small", "wide", "quant"]), default="tiny",
              show_default=True, help="tiny: seconds, for tests; small: a larger toy; wide: the "
              "real per-expert shapes (4096x1280), ~4.8 GB, for speed work; quant: real byte proportions "
              "and outlier channels, for quantization quality.")
@click.option("--seed", type=int, default=0, show_default=True, help="Weights are a pure "
              "function of the seed.")
@click.option("--fp8", is_flag=True, help="Store projections as float8-e4m3 with block scales, "
              "as the FP8 releases do.")
@click.option("--step3p7", is_flag=True, help="Wrap the decoder the Step 3.7 way "
              "(text_config, model.language_model. prefixes, a vision tower to ignore).")
@click.option("--chat-template", "template", type=click.Choice(["simple", "step35"]),
              default="simple", show_default=True,
              help="step35: Step 3.5 Flash's own template (reasoning block, XML tool calls), "
                   "taken from the llama.cpp sources in the llama-cpp-python sdist.")
@click.option("--script", "script_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="A JSON list of distinct text pieces: greedy decoding then "
                                 "emits them in order after any prompt, and the MTP heads "
                                 "predict them (for testing parsers and drafting).")
def synth(out: Path, preset: str, seed: int, fp8: bool, step3p7: bool, template: str,
          script_file: Path | None) -> None:
    """Write a synthetic Step 3.5 checkpoint (hub layout, random weights) to the new folder OUT."""
    import json

    from .synth import synth as run_synth

    script: list = []
    if script_file is not None:
        try:
            script = json.loads(script_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise StepGGUFError(f"{script_file} is not JSON ({exc})") from None
        if not isinstance(script, list) or not all(isinstance(x, str) for x in script):
            raise StepGGUFError(f"{script_file} must hold a JSON list of strings")
    chat_template = None
    if template == "step35":
        from .runtime.build import STEP35_TEMPLATE, sdist_text

        chat_template = sdist_text(STEP35_TEMPLATE)
    bar = _ByteBar(f"writing {preset} checkpoint")
    try:
        run_synth(out, preset, seed=seed, fp8=fp8, step3p7=step3p7, on_start=bar.start,
                  on_bytes=bar.advance, script=script, chat_template=chat_template)
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
@click.option("--stock", is_flag=True, help="Build stock llama.cpp from the same source, none of "
              "our patches (libllama and llama-bench, for comparisons); never installed.")
def runtime_build(backend: str, cmake_args: tuple[str, ...], jobs: int | None,
                  no_install: bool, stock: bool) -> None:
    """Build llama-cpp-python with step-gguf's patch series and install it.

    Downloads the pinned llama-cpp-python source from PyPI, applies patches/ in series order,
    compiles the library plus llama-server, llama-bench and ggml-rpc-server (ccache is used
    when installed), and caches the result: a second call with the same options is instant.
    A cold CPU build takes about 10 minutes on 2 cores. `--stock` builds the same tree without
    the patches, to measure against: `bench/kernels.py` does.
    """
    from .runtime import build as b
    from .runtime import llama

    spec = b.BuildSpec(backend, tuple(cmake_args), series=0 if stock else None)
    no_install = no_install or stock
    cached = b.cached_build(spec)
    if cached:
        click.echo(f"runtime {spec.key} is cached at {cached.root}")
        result = cached
    else:
        click.echo(f"building runtime {spec.key} (llama-cpp-python {b.LLAMA_CPP_PYTHON_VERSION}, "
                   f"{'no patches' if stock else f'patch series {b.series_id()}'}, {backend})")
        progress = _StepProgress()
        result = b.build(spec, jobs=jobs, on_step=progress.step, on_stage=progress.stage)
        progress.close()
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


def _profiles_help() -> str:
    from .plan import CUSTOM, PROFILES

    return "; ".join(f"{p.name}: {p.what}" for p in PROFILES.values()) + \
        f"; {CUSTOM}: give --ram and --mem-bw (and --vram, --gpu-bw)"


_rpc_option = click.option(
    "--rpc", default=None, metavar="HOST:PORT[=GiB],...",
    help="ggml RPC hosts (`step-gguf rpc-server` on each) that take whole layers this machine "
         "cannot hold; each host's free memory is asked unless given as =GiB. Hosts are taken "
         "to read memory as fast as this machine.")

_draft_option = click.option(
    "--draft", type=click.Path(path_type=Path), default=None, metavar="FILE",
    help="Draft with the MTP heads of this separate GGUF (`--mtp split`'s output, or another "
         "tool's step35 draft) [for a GGUF without heads of its own: NAME-mtp.gguf beside it, "
         "if there].")


def _drafting(model: Path, draft: Path | None, mtp: bool, say: bool = True) -> Path | None:
    """The separate draft to load (given, or found beside the model); says on stderr which
    was found unless the output is JSON (which names it)."""
    from .draft import resolve

    found = resolve(model, draft, mtp)
    if say and draft is None and found is not None:
        click.echo(f"drafting with {found}, found beside {model.name}", err=True)
    return found


def _rpc_hosts(spec: str | None, machine) -> tuple:
    if not spec:
        return ()
    from .runtime import rpc

    return tuple(rpc.hosts(spec, machine.mem_bw))


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--profile", required=True, metavar="NAME",
              help="The machine. " + _profiles_help() + ".")
@click.option("-c", "--ctx", type=click.IntRange(1), default=32768, show_default=True,
              help="Context length in tokens.")
@click.option("--scheme", default=None,
              help="For a checkpoint or config.json: the quantization scheme to price "
                   "[int4-mixed]. A GGUF is planned as it is.")
@click.option("--kv-type", default=None, help="KV cache type (f16, q8_0, q4_0, ...) [chosen].")
@click.option("--parallel", type=click.IntRange(1), default=1, show_default=True,
              help="Sequences llama-server decodes at once (its -np).")
@click.option("--no-mtp", is_flag=True, help="Plan without the MTP draft heads.")
@_draft_option
@click.option("--vram", type=float, default=None, help="GPU memory, GiB (overrides the profile).")
@click.option("--ram", type=float, default=None, help="System memory, GiB.")
@click.option("--mem-bw", type=float, default=None, help="System memory read bandwidth, GB/s.")
@click.option("--gpu-bw", type=float, default=None, help="GPU memory read bandwidth, GB/s.")
@_rpc_option
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(model: Path, profile: str, ctx: int, scheme: str | None, kv_type: str | None,
         parallel: int, no_mtp: bool, draft: Path | None, vram: float | None, ram: float | None,
         mem_bw: float | None, gpu_bw: float | None, rpc: str | None, as_json: bool) -> None:
    """Where MODEL's tensors go on a machine, what the KV cache and buffers take, the
    predicted prompt and decode speed, and the llama-server command that runs it so.

    MODEL is a GGUF, a checkpoint folder or a bare config.json (priced under --scheme, so the
    real 196B model can be planned without its weights). Everything that runs for every token
    goes on the GPU first, MTP heads included; then as many routed experts as fit. With
    --rpc, RPC hosts take whole layers, only those this machine cannot hold.
    """
    import json

    from . import plan as planner

    machine = planner.machine(profile, vram_gb=vram, ram_gb=ram, mem_bw_gbs=mem_bw,
                              gpu_bw_gbs=gpu_bw)
    draft = _drafting(model, draft, not no_mtp, say=not as_json)
    p = planner.plan(planner.facts(model, scheme, draft), machine, ctx, kv_type=kv_type,
                     mtp=not no_mtp, parallel=parallel, rpc=_rpc_hosts(rpc, machine))
    # a config or checkpoint is planned as the GGUF it would become; a split GGUF is loaded from
    # its first shard, whichever shard was named
    from .gguf_source import first_shard

    target = str(first_shard(model)) if model.is_file() and model.suffix == ".gguf" else "MODEL.gguf"
    if as_json:
        click.echo(json.dumps(p.to_json(target), indent=1))
        return
    click.echo(f"{p.model.name} on {machine.name} ({machine.what}), ctx {ctx}, KV {p.kv_type}, "
               f"batch {p.n_batch}/{p.n_ubatch}, MTP {'on' if p.mtp else 'off'}"
               + (f" (heads from {Path(p.model.draft).name})" if p.mtp and p.model.draft else ""))
    classes = p.classes()
    kinds = sorted({k for per in classes.values() for k in per})
    for d in p.devices:
        if d.endpoint:
            click.echo(f"{d.name} is the RPC host {d.endpoint}")
    click.echo(f"{'':<22}" + "".join(f"{d.name:>12}" for d in p.devices))
    for k in kinds:
        click.echo(f"{k:<22}" + "".join(f"{_human(classes[d.name].get(k, 0)):>12}" for d in p.devices))
    for k in sorted({k for d in p.devices for k in d.extra}):
        click.echo(f"{k:<22}" + "".join(f"{_human(d.extra.get(k, 0)):>12}" for d in p.devices))
    click.echo(f"{'total / usable':<22}" + "".join(
        f"{_human(d.bytes) + ' / ' + _human(d.capacity):>24}" for d in p.devices))
    click.echo(f"predicted: prompt {p.predicted_prompt_tps:.0f} tok/s, decode "
               f"{p.predicted_decode_tps:.1f} tok/s ({p.predicted_decode_tps_full:.1f} at a full "
               f"context), without MTP drafting")
    for note in p.notes:
        click.echo(f"note: {note}")
    click.echo("llama-server " + shlex.join(p.server_args(target)))


def _planned(model: Path, profile: str | None, ctx: int, mtp: bool, rpc: str | None = None,
             draft: Path | None = None, say: bool = True):
    """The placement plan `run`, `chat` and `serve` start llama-server with: the named profile,
    or without one this machine's memory on the CPU (a GPU build needs --profile); drafting
    with `draft` or the draft found beside the model, checked before any server starts."""
    from . import plan as planner
    from .runtime import llama

    if profile is None:
        if llama.check().backend != "cpu":
            raise StepGGUFError("this runtime is built for a GPU: give --profile (see step-gguf "
                                "plan --help) so that the plan knows its memory")
        from .probe import ram_bytes

        machine = planner.machine("cpu", ram_gb=ram_bytes() / planner.GiB)
    else:
        machine = planner.machine(profile)
    draft = _drafting(model, draft, mtp, say)
    return planner.plan(planner.facts(model, draft=draft), machine, ctx, mtp=mtp,
                        rpc=_rpc_hosts(rpc, machine))


def _stream(kind: str, text: str) -> None:
    # reasoning goes to stderr, dimmed, so that stdout holds the answer alone
    if kind == "reasoning":
        click.secho(text, nl=False, err=True, dim=True)
    else:
        click.echo(text, nl=False)


def _model_options(f):
    for option in reversed([
        click.option("-c", "--ctx", type=click.IntRange(1), default=4096, show_default=True,
                     help="Context length."),
        click.option("--profile", default=None, metavar="NAME",
                     help="Machine profile for the placement plan (see step-gguf plan) "
                          "[this machine's CPU]."),
        click.option("--no-mtp", is_flag=True,
                     help="Do not draft with MTP heads, the GGUF's or a draft's (on by default "
                          "when there are some)."),
        _draft_option,
        _rpc_option,
    ]):
        f = option(f)
    return click.argument("model", type=click.Path(path_type=Path))(f)


@main.command()
@_model_options
@click.option("-p", "--prompt", default="Hello! Who are you?", show_default=True,
              help="User message, sent through the GGUF's chat template.")
@click.option("-n", "--max-tokens", type=click.IntRange(1), default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True,
              help="Print text, reasoning, tool calls, token counts, tok/s and MTP acceptance as JSON.")
def run(model: Path, ctx: int, profile: str | None, no_mtp: bool, draft: Path | None,
        rpc: str | None, prompt: str, max_tokens: int, seed: int, as_json: bool) -> None:
    """Answer one PROMPT with the GGUF MODEL, placed by the plan for your machine, drafting
    with its MTP heads. The answer streams to stdout, the reasoning to stderr."""
    import json

    from .runtime import llama

    p = _planned(model, profile, ctx, not no_mtp, rpc, draft, say=not as_json)
    with llama.serve(model, plan=p) as url:
        reply = llama.chat(url, [{"role": "user", "content": prompt}], max_tokens=max_tokens,
                           seed=seed, on_text=None if as_json else _stream)
    if as_json:
        click.echo(json.dumps(reply.to_json() | {"mtp_enabled": p.mtp,
                                                 "mtp_draft": p.model.draft if p.mtp else None},
                              indent=1))
        return
    click.echo("")
    accepted = f", MTP acceptance {reply.acceptance:.0%}" if reply.acceptance is not None else ""
    click.echo(f"[{reply.prompt_tokens} prompt tokens at {reply.prompt_tps:.1f} tok/s, "
               f"{reply.completion_tokens} generated at {reply.decode_tps:.1f} tok/s{accepted}]",
               err=True)


@main.command()
@_model_options
@click.option("-n", "--max-tokens", type=click.IntRange(1), default=1024, show_default=True)
@click.option("--system", default=None, help="System message.")
def chat(model: Path, ctx: int, profile: str | None, no_mtp: bool, draft: Path | None,
         rpc: str | None, max_tokens: int, system: str | None) -> None:
    """Talk with the GGUF MODEL in the terminal (end with Ctrl-D or /exit)."""
    from .runtime import llama

    p = _planned(model, profile, ctx, not no_mtp, rpc, draft)
    messages = [{"role": "system", "content": system}] if system else []
    with llama.serve(model, plan=p) as url:
        while True:
            try:
                line = click.prompt("you", prompt_suffix="> ", default="", show_default=False)
            except (EOFError, click.Abort):
                break
            if line.strip() in ("/exit", "/quit"):
                break
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            reply = llama.chat(url, messages, max_tokens=max_tokens, on_text=_stream)
            click.echo("")
            messages.append({"role": "assistant", "content": reply.text})


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM ends the server the way Ctrl-C does


def _hold_until_stopped(server, announce: str) -> None:
    """Keep the `server` context (yielding its address) open until Ctrl-C or SIGTERM; print
    the address alone on stdout for scripts, `announce` (formatted with it) on stderr."""
    import signal

    # SIGINT too: a process started in the background inherits SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler of its own
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    try:
        with server as address:
            click.echo(announce.format(address), err=True)
            click.echo(address)
            sys.stdout.flush()
            signal.pause()
    except KeyboardInterrupt:
        click.echo("stopped", err=True)


@main.command()
@_model_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback needs --api-key.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--api-key", default=None, help="Key clients must send (Authorization: Bearer).")
def serve(model: Path, ctx: int, profile: str | None, no_mtp: bool, draft: Path | None,
          rpc: str | None, host: str, port: int, api_key: str | None) -> None:
    """Serve MODEL with an OpenAI-compatible API (our llama-server, with the plan's placement,
    MTP drafting, the GGUF's chat template, reasoning and tool-call parsing) until Ctrl-C."""
    import contextlib

    from .runtime import llama

    @contextlib.contextmanager
    def base_url():
        with llama.serve(model, plan=_planned(model, profile, ctx, not no_mtp, rpc, draft),
                         host=host, port=port, api_key=api_key) as url:
            yield f"{url}/v1"

    _hold_until_stopped(base_url(), f"serving {model.name} at {{}} (OpenAI-compatible); Ctrl-C stops")


@main.command("rpc-server")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. ggml's RPC protocol has no authentication: bind a LAN "
                   "address only on a network you trust.")
@click.option("--port", type=click.IntRange(1, 65535), default=50052, show_default=True,
              help="Port to listen on (ggml-rpc-server's own default).")
@click.option("-t", "--threads", type=click.IntRange(1), default=None, help="CPU threads [all cores].")
def rpc_server(host: str, port: int, threads: int | None) -> None:
    """Lend this machine's memory to another's `step-gguf run/serve --rpc HOST:PORT`: runs
    our ggml-rpc-server (same build, same protocol) until Ctrl-C."""
    from .runtime import llama, rpc

    if host not in llama.LOOPBACK:
        click.echo(f"warning: {host}:{port} accepts unauthenticated RPC from anyone who can "
                   "reach it", err=True)
    _hold_until_stopped(rpc.start(port, host, threads),
                        "ggml RPC host at {0}; use --rpc {0} on the machine that runs the model; "
                        "Ctrl-C stops")


@main.command()
@click.option("--keep", type=click.Path(path_type=Path), default=None,
              help="Keep the checkpoint and GGUF in this new folder instead of a temporary one.")
def demo(keep: Path | None) -> None:
    """The whole flow on the embedded tiny synthetic model: synth, convert, quantize, chat."""
    from . import quantize as q
    from .convert import convert as run_convert
    from .recipe import load_recipe
    from .runtime import llama
    from .synth import synth as run_synth

    llama.check()  # fail before doing work if the runtime is missing
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
        click.echo(f"converted to {gguf_path} ({_human(gguf_path.stat().st_size)}, "
                   f"{result.n_tensors} tensors) in {t2 - t1:.2f} s")
        quantized = q.quantize(ckpt, int4_path, load_recipe("int4-mixed"))
        t3 = time.perf_counter()
        click.echo(f"quantized the checkpoint in one pass to {int4_path} "
                   f"({_human(int4_path.stat().st_size)}, {quantized.pricing.bpw:.2f} bits per weight; "
                   f"tiny widths take K-quant fallbacks) in {t3 - t2:.2f} s")
        with llama.load(int4_path, n_ctx=256) as m:
            t4 = time.perf_counter()
            click.echo(f"loaded with the patched runtime in {t4 - t3:.2f} s")
            chat = m.chat([{"role": "user", "content": "Hello! Who are you?"}], max_tokens=16)
        click.echo(f"reply (random weights, so gibberish): {chat.text!r}")
        click.echo(f"{chat.prompt_tokens} prompt + {chat.completion_tokens} generated tokens in "
                   f"{chat.seconds:.3f} s ({chat.completion_tokens / max(chat.seconds, 1e-9):.0f} tok/s)")
        if keep:
            click.echo(f"kept {ckpt}, {gguf_path} and {int4_path}")


@main.command()
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
    Compute it on the highest-precision GGUF you have (BF16 or Q8_0).

    \b
    Example:
      step-gguf imatrix step35-bf16.gguf -o imatrix.gguf
      step-gguf quantize ./Step-3.5-Flash -o step35-int3.gguf --scheme int3-mixed --imatrix imatrix.gguf
    """
    from .imatrix import load_imatrix
    from .runtime import tools

    bar = _ByteBar(f"imatrix of {model.name}")
    done_before = 0

    def on_progress(done: int, total: int) -> None:
        nonlocal done_before
        if not done_before:
            bar.start(total)
        bar.advance(done - done_before)
        done_before = done

    start = time.perf_counter()
    try:
        tools.imatrix(model, out, text_file, ctx=ctx, chunks=chunks, threads=threads,
                      on_progress=on_progress)
    finally:
        bar.close()
    result = load_imatrix(out)
    click.echo(f"wrote {out} ({len(result)} matrices, {result.chunk_count} chunks of "
               f"{result.chunk_size} tokens) in {time.perf_counter() - start:.1f} s")


@main.command("eval")
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

    from .runtime import tools

    stats = tools.kld(quant, reference, text_file, ctx=ctx, threads=threads)
    if as_json:
        click.echo(_json.dumps(stats, indent=1))
        return
    click.echo(f"mean KLD        {stats['kld_mean']:.6f}")
    click.echo(f"99th pct KLD    {stats['kld_p99']:.6f}")
    click.echo(f"same top token  {stats['top1_pct']:.3f} %")
    click.echo(f"PPL             {stats['ppl']:.4f} (reference {stats['ppl_reference']:.4f})")
    click.echo(f"over {stats['chunks']} chunks of {stats['ctx']} tokens")


if __name__ == "__main__":
    main()
