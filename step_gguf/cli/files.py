"""Commands that write model files: convert, quantize (and its dry run), recipes, synth."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from ..core.choices import MTP_MODES, OUTTYPES, MtpMode, OutType
from ..core.errors import StepGGUFError
from ..core.units import SIZE_HELP, human_size, parse_size
from ..synth.presets import PRESETS
from . import sizing
from .planning import machine_options
from .progress import ByteBar
from .output_options import card, card_options, draft_out_for, mmproj_option, mmproj_out, split_limits, split_options
from .sizing import for_options


@click.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="Output GGUF path (written aside and renamed when complete).")
@click.option("--outtype", type=click.Choice(OUTTYPES), default="bf16",
              show_default=True, help="Type of the weight matrices; norms, biases and the "
              "router stay F32.")
@click.option("--mtp", "mtp", type=click.Choice(MTP_MODES), default="keep",
              show_default=True, help="Multi-token-prediction layers: keep them in the GGUF, "
              "drop them, or split them into a separate draft GGUF (--draft-out).")
@click.option("--draft-out", type=click.Path(path_type=Path), default=None,
              help="Draft GGUF for --mtp split (default: OUT with a -mtp suffix).")
@click.option("--tokenizer-pre", default=None, metavar="NAME",
              help="llama.cpp pre-tokenizer name, overriding detection from tokenizer.json.")
@mmproj_option
@click.option("--no-resume", is_flag=True, help="Start over instead of continuing the partial "
              "output an interrupted run of the same conversion left.")
@card_options
@split_options
def convert(src: Path, out: Path, outtype: OutType, mtp: MtpMode, draft_out: Path | None,
            tokenizer_pre: str | None, mmproj: Path | None, no_resume: bool, card_name: str | None,
            card_basename: str | None, card_license: str | None, split_max_size: str | None,
            split_max_tensors: int | None) -> None:
    """Convert the Step 3.5 checkpoint folder SRC to a GGUF file.

    Reads config.json itself (Step 3.5 or the Step 3.7 text_config wrapper), accepts BF16, F16,
    F32 and FP8 (block-scaled) weights, validates every tensor shape before writing, and
    streams tensor by tensor with bounded memory. Step 3.7's vision tower goes to a second
    file with --mmproj.

    \b
    Examples:
      step-gguf convert ./Step-3.5-Flash -o step35-q8_0.gguf --outtype q8_0
      step-gguf convert ./Step-3.7-Flash -o step37.gguf --mmproj
    """
    from ..pipeline.convert import convert as run_convert

    bar = ByteBar(f"converting {src.name}")
    start = time.perf_counter()
    try:
        result = run_convert(src, out, outtype=outtype, mtp=mtp,
                             draft_out=draft_out_for(mtp, draft_out, out), mmproj_out=mmproj_out(mmproj, out),
                             tokenizer_pre=tokenizer_pre, resume=not no_resume,
                             card=card(card_name, card_basename, card_license),
                             split=split_limits(split_max_size, split_max_tensors),
                             on_start=bar.start, on_bytes=bar.advance)
    finally:
        bar.close()
    secs = time.perf_counter() - start
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    for path in result.outputs:
        click.echo(f"wrote {path} ({human_size(path.stat().st_size)})")
    click.echo(f"{result.n_tensors} tensors, {human_size(result.source_bytes)} read in {secs:.1f} s "
               f"({human_size(result.source_bytes / max(secs, 1e-9))}/s)")


def _print_plan(pricing, stock=None) -> None:
    """The per-tensor plan as a table, then totals by type and against stock."""
    stock_types = stock.types if stock else {}
    width = max((len(r.name) for r in pricing.rows), default=10)
    head = f"{'tensor':<{width}}  {'type':<7} {'bytes':>10}"
    click.echo(head + ("  stock  " if stock else "  ") + "why")
    for r in pricing.rows:
        extra = f"  {stock_types.get(r.name, '?'):<6} " if stock else "  "
        click.echo(f"{r.name:<{width}}  {r.qtype:<7} {human_size(r.bytes):>10}{extra}{r.why}")
    click.echo("")
    for qtype, n in pricing.by_type().items():
        click.echo(f"  {qtype:<7} {human_size(n):>10}  {100 * n / max(pricing.total_bytes, 1):5.1f}%")
    click.echo(f"{pricing.recipe}: {human_size(pricing.total_bytes)} ({pricing.total_bytes} bytes), "
               f"{pricing.bpw:.3f} bits per weight")
    if stock:
        ratio = pricing.total_bytes / stock.total_bytes
        click.echo(f"stock {stock.ftype} (llama.cpp's quantizer): {human_size(stock.total_bytes)} "
                   f"({stock.total_bytes} bytes); {pricing.recipe} is {ratio:.3f}x its size")


@click.command()
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
              "tensor's type for the least measured error in a file of at most SIZE, "
              f"{SIZE_HELP}: the whole file, header, tokenizer and the stored plan included; with "
              "--split-max-size, all shards together.")
@click.option("--target-bpw", type=float, default=None, metavar="X", help="Budget mode with a "
              "bits-per-weight target instead of a size.")
@click.option("--allow-requantize", is_flag=True, help="Accept a source GGUF that is already "
              "quantized (its rounding error adds to the new one).")
@click.option("--mtp", type=click.Choice(MTP_MODES), default="keep",
              show_default=True, help="MTP blocks: keep, drop, or split into --draft-out "
              "(checkpoint sources).")
@click.option("--draft-out", type=click.Path(path_type=Path), default=None,
              help="Draft GGUF for --mtp split (default: OUT with a -mtp suffix).")
@mmproj_option
@click.option("-t", "--threads", type=int, default=None, help="Quantizing threads [all cores].")
@click.option("--no-resume", is_flag=True, help="Start over instead of continuing the partial "
              "output an interrupted run of the same command left.")
@card_options
@split_options
@for_options
@machine_options
def quantize(src: Path, out: Path | None, scheme: str | None, recipe_file: Path | None,
             dry_run: bool, as_json: bool, compare_stock: str | None, imatrix_file: Path | None,
             equalization: bool | None, target_size: str | None, target_bpw: float | None,
             allow_requantize: bool, mtp: MtpMode, draft_out: Path | None, mmproj: Path | None,
             threads: int | None,
             no_resume: bool, card_name: str | None, card_basename: str | None,
             card_license: str | None, split_max_size: str | None,
             split_max_tensors: int | None, for_profile: str | None, ctx: int | None,
             parallel: int, min_decode: float | None, figures: dict) -> None:
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
      step-gguf quantize ./Step-3.5-Flash -o step35-4090.gguf --imatrix imatrix.gguf --for gpu-24gb --ctx 65536
      step-gguf quantize config.json --dry-run --for all
    """
    from ..pipeline import quantize as q
    from ..core.recipe import load_recipe

    if scheme and recipe_file:
        raise click.UsageError("give --scheme or --recipe, not both")
    _check_budget(dry_run, target_size, target_bpw)
    _check_for(for_profile, mtp, dry_run, as_json, target_size or target_bpw, ctx, parallel, min_decode, figures)
    recipe = load_recipe(scheme, recipe_file)
    if dry_run and for_profile:
        return sizing.dry_run_table(src, recipe, mtp, for_profile, figures, ctx, parallel, min_decode,
                                    imatrix_file is not None)
    if dry_run:
        return _price(src, recipe, mtp, compare_stock, as_json)
    if out is None:
        raise click.UsageError("give -o OUT.gguf (or --dry-run to price the plan)")
    target = _target(target_size, target_bpw, imatrix_file)
    options = q.QuantizeOptions(mtp=mtp, draft_out=draft_out_for(mtp, draft_out, out), mmproj_out=mmproj_out(mmproj, out),
                                allow_requantize=allow_requantize, imatrix=imatrix_file,
                                equalization=imatrix_file is not None if equalization is None else equalization,
                                target=target, threads=threads, resume=not no_resume,
                                card=card(card_name, card_basename, card_license),
                                split=split_limits(split_max_size, split_max_tensors))
    prepared = None
    if for_profile:
        options, prepared = sizing.sized(src, recipe, options, for_profile, figures, ctx, parallel, min_decode, _stage)
    bar = ByteBar(f"quantizing {src.name} ({recipe.name})")
    start = time.perf_counter()
    try:
        result = q.quantize(src, out, recipe, options, on_stage=_stage, on_start=bar.start, on_bytes=bar.advance,
                            prepared=prepared)
    finally:
        bar.close()
    _report(result, time.perf_counter() - start, budget=options.target is not None)


def _target(target_size: str | None, target_bpw: float | None, imatrix_file: Path | None):
    """Budget mode's size target (None: the recipe's own types)."""
    from ..pipeline.quantize_options import Target

    if not (target_size or target_bpw):
        return None
    if imatrix_file is None:
        click.echo("note: without --imatrix, budget mode weighs every input channel alike", err=True)
    return Target(parse_size(target_size, "--target-size") if target_size else None, target_bpw)


def _check_budget(dry_run: bool, target_size: str | None, target_bpw: float | None) -> None:
    if target_size and target_bpw:
        raise click.UsageError("give --target-size or --target-bpw, not both")
    if dry_run and (target_size or target_bpw):
        raise click.UsageError("budget mode measures the weights, so it cannot be a --dry-run; "
                               "its plan is printed when it runs")


def _check_for(for_profile: str | None, mtp: MtpMode, dry_run: bool, as_json: bool, target: str | float | None,
               ctx: int | None, parallel: int, min_decode: float | None, figures: dict) -> None:
    """--for and the options that go with it, or contradict it."""
    if not for_profile:
        given = [o for o, v in (("--ctx", ctx), ("--parallel", parallel != 1), ("--min-decode", min_decode))
                 if v] + ["--" + k.replace("_", "-") for k, v in figures.items() if v is not None]
        if given:
            raise click.UsageError(f"{', '.join(given)} describe the machine of --for PROFILE; give --for too")
        return
    if target:
        raise click.UsageError("--for chooses the size: leave out --target-size and --target-bpw")
    if for_profile == sizing.ALL and not dry_run:
        raise click.UsageError("--for all prices every named profile: it goes with --dry-run")
    if as_json:
        raise click.UsageError("--json prints --dry-run's per-tensor plan; --for prints its own table")
    if mtp == "split":
        raise click.UsageError("--for sizes one file with its MTP heads; a split draft loads its own copy "
                               "of the embeddings and output beside it: give --mtp keep or drop")


def _price(src: Path, recipe, mtp: MtpMode, compare_stock: str | None, as_json: bool) -> None:
    """--dry-run: the plan and its size, beside a stock mix when asked."""
    import json

    from ..pipeline import quantize as q

    pricing = q.dry_run(src, recipe, mtp=mtp)
    stock = q.price_stock(src, compare_stock, mtp=mtp) if compare_stock else None
    if as_json:
        click.echo(json.dumps(pricing.to_json() | ({"stock": stock.to_json()} if stock else {}), indent=1))
    else:
        _print_plan(pricing, stock)


def _stage(what: str) -> None:
    if sys.stderr.isatty():
        click.echo(f"\r\033[K{what}", err=True, nl=False)


def _report(result, secs: float, budget: bool) -> None:
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    for e in result.equalized:
        click.echo(f"equalized {e.norm}: alpha {e.alpha:.2f}, measured error "
                   f"{e.error_before:.4g} -> {e.error_after:.4g}")
    if budget:
        _print_plan(result.pricing)
    for path in result.outputs:
        click.echo(f"wrote {path} ({human_size(path.stat().st_size)})")
    click.echo(f"{result.recipe.name}: {result.pricing.bpw:.3f} bits per weight; {human_size(result.source_bytes)} "
               f"read in {secs:.1f} s ({human_size(result.source_bytes / max(secs, 1e-9))}/s)")


@click.command()
@click.argument("name", required=False)
@click.option("--toml", "as_toml", is_flag=True, help="Print the recipe as a file to edit and "
              "pass to --recipe.")
def recipes(name: str | None, as_toml: bool) -> None:
    """List the built-in quantization recipes, or show one's rules (pattern, layers, type, why)."""
    from ..core.recipe import builtin_names, load_recipe

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


@click.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--preset", type=click.Choice(list(PRESETS)), default="tiny",
              show_default=True, help="tiny: seconds, for tests; small: a larger toy; wide: the "
              "real per-expert shapes (4096x1280), ~4.8 GB, for speed work; quant: real byte proportions "
              "and outlier channels, for quantization quality.")
@click.option("--seed", type=int, default=0, show_default=True, help="Weights are a pure "
              "function of the seed.")
@click.option("--fp8", is_flag=True, help="Store projections as float8-e4m3 with block scales, "
              "as the FP8 releases do.")
@click.option("--step3p7", is_flag=True, help="Step 3.7 as transformers' save_pretrained writes "
              "it (Step3p7ForConditionalGeneration: text_config, the decoder at model.layers.*) with a "
              "small vision tower and projector at vision_model.* and vit_large_projector.")
@click.option("--chat-template", "template", type=click.Choice(["simple", "step35"]),
              default="simple", show_default=True,
              help="step35: Step 3.5 Flash's own template (reasoning block, XML tool calls), "
                   "taken from the llama.cpp sources in the llama-cpp-python sdist.")
@click.option("--script", "script_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="A JSON list of distinct text pieces: greedy decoding then "
                                 "emits them in order after any prompt, and the MTP heads "
                                 "predict them (for testing parsers and drafting).")
@click.option("--head-accuracy", type=click.FloatRange(0.0, 1.0), default=1.0, show_default=True,
              help="With --script: the share of inputs on which each MTP head predicts right; "
                   "on the rest it predicts a token verification rejects, so draft acceptance "
                   "is set while the output stays the script.")
@click.option("--routing-locality", is_flag=True,
              help="Route consecutive tokens to the experts recent tokens used, with no fixed hot "
                   "set, as trained MoE models do (random weights route by a fixed bias): for "
                   "expert-cache benchmarks (bench/expert_cache.py prints the locality).")
def synth(out: Path, preset: str, seed: int, fp8: bool, step3p7: bool, template: str,
          script_file: Path | None, head_accuracy: float, routing_locality: bool) -> None:
    """Write a synthetic Step 3.5 checkpoint (hub layout, random weights) to the new folder OUT."""
    import json

    from ..synth.writer import synth as run_synth

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
        from ..native.build import STEP35_TEMPLATE, sdist_text

        chat_template = sdist_text(STEP35_TEMPLATE)
    bar = ByteBar(f"writing {preset} checkpoint")
    try:
        run_synth(out, preset, seed=seed, fp8=fp8, step3p7=step3p7, on_start=bar.start,
                  on_bytes=bar.advance, script=script, chat_template=chat_template,
                  head_accuracy=head_accuracy, routing_locality=routing_locality)
    finally:
        bar.close()
    click.echo(f"wrote {out}")
