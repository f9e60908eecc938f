"""The plan a command runs under: the machine (a profile and its figures, or this machine as the
runtime sees it), the MTP draft, RPC hosts and the expert cache, as options several commands
share, and the plan they make."""

from __future__ import annotations

from pathlib import Path

import click

from ..core.errors import StepGGUFError


def profiles_help() -> str:
    from ..plan import CUSTOM, PROFILES

    return "; ".join(f"{p.name}: {p.what}" for p in PROFILES.values()) + \
        f"; {CUSTOM}: give --ram and --mem-bw (and --vram, --gpu-bw)"


rpc_option = click.option(
    "--rpc", default=None, metavar="HOST:PORT[=GiB],...",
    help="ggml RPC hosts (`step-gguf rpc-server` on each) that take whole layers this machine "
         "cannot hold; each host's free memory is asked unless given as =GiB. Hosts are taken "
         "to read memory as fast as this machine.")


draft_option = click.option(
    "--draft", type=click.Path(path_type=Path), default=None, metavar="FILE",
    help="Draft with the MTP heads of this separate GGUF (`--mtp split`'s output, or another "
         "tool's step35 draft) [for a GGUF without heads of its own: NAME-mtp.gguf beside it, "
         "if there].")


draft_max_option = click.option(
    "--draft-max", type=click.IntRange(1), default=None, metavar="N",
    help="Draft N tokens every round [chosen each round, up to every MTP head and down to none, "
         "from the acceptance and cost measured as it runs, so drafting never slows decoding].")


def cache_request(ctx, param, value: str):
    """--expert-cache's value as the planner takes it: "off", "auto" or bytes."""
    if value in ("off", "auto"):
        return value
    from ..core.units import parse_size

    return parse_size(value, "--expert-cache")


expert_cache_option = click.option(
    "--expert-cache", default="auto", show_default=True, callback=cache_request, metavar="off|auto|SIZE",
    help="GPU memory for a cache of the routed experts the plan leaves in system memory (patch "
         "0021): auto gives it the room that predicts the fastest decode, freeing GPU memory from "
         "placed experts where that pays, and none where nothing gains (no discrete GPU, every "
         "expert on it, a link too slow for the copies); SIZE (4GiB, 500M) fixes it; off.")


def prompt_cache_request(ctx, param, value: str) -> int | None:
    """--prompt-cache's value: MiB (0: off), or None for the plan's size."""
    if value == "auto":
        return None
    if value == "off":
        return 0
    from ..core.units import parse_size

    return parse_size(value, "--prompt-cache") // 2**20


prompt_cache_option = click.option(
    "--prompt-cache", default="auto", show_default=True, callback=prompt_cache_request, metavar="off|auto|SIZE",
    help="System memory for llama-server's cache of earlier prompts' state (--cache-ram), which "
         "answers a request that comes back to a prompt without recomputing it: auto gives it half "
         "of what the plan leaves free, up to 8 GiB; SIZE (2GiB, 500M) fixes it; off.")


def with_draft_max(p, draft_max: int | None, no_mtp: bool):
    """`p` drafting a fixed `draft_max` tokens a round (one line when it cannot)."""
    if draft_max is not None and no_mtp:
        raise StepGGUFError("--draft-max and --no-mtp contradict each other; give one")
    return p.drafting(draft_max)


def drafting(model: Path, draft: Path | None, mtp: bool, say: bool = True) -> Path | None:
    """The separate draft to load (given, or found beside the model); says on stderr which
    was found unless the output is JSON (which names it)."""
    from ..files.draft import resolve

    found = resolve(model, draft, mtp)
    if say and draft is None and found is not None:
        click.echo(f"drafting with {found}, found beside {model.name}", err=True)
    return found


def seeing(model: Path, mmproj: Path | None, say: bool = True) -> Path | None:
    """The mmproj to load for images (given, or found beside the model; none with
    --no-mmproj); says on stderr which was found unless the output is JSON."""
    from ..files.mmproj import resolve_mmproj

    if mmproj == Path():  # --no-mmproj
        return None
    found = resolve_mmproj(model, mmproj)
    if say and mmproj is None and found is not None:
        click.echo(f"images: with {found}, found beside {model.name}", err=True)
    return found


def mmproj_options(f):
    """--mmproj FILE, --no-mmproj (Path(), which seeing() reads as none): the images' tower."""
    for option in reversed([
        click.option("--mmproj", type=click.Path(path_type=Path), default=None, metavar="FILE",
                     help="Step 3.7's vision tower (convert --mmproj), for images [NAME-mmproj.gguf "
                          "beside the model, when there is one]."),
        click.option("--no-mmproj", "mmproj", flag_value=Path(), help="Text only: do not load an mmproj "
                     "found beside the model."),
    ]):
        f = option(f)
    return f


FIGURES = ("vram", "ram", "mem_bw", "gpu_bw", "unified", "link_bw")


def machine_options(f):
    """--vram/--ram/--mem-bw/--gpu-bw/--unified, handed to the command as one `figures` dict
    (what planner.machine takes besides the profile's name)."""
    import functools

    @functools.wraps(f)
    def wrapper(**kw):
        figures = {k: kw.pop(k) for k in FIGURES}
        return f(figures=figures, **kw)

    for option in reversed([
        click.option("--vram", type=float, default=None, help="GPU memory, GiB (overrides the profile)."),
        click.option("--ram", type=float, default=None, help="System memory, GiB."),
        click.option("--mem-bw", type=float, default=None, help="System memory read bandwidth, GB/s."),
        click.option("--gpu-bw", type=float, default=None, help="GPU memory read bandwidth, GB/s."),
        click.option("--unified/--discrete", default=None,
                     help="The GPU's memory is part of system memory (one pool, as on DGX Spark "
                          "and Strix Halo: read in, not memory-mapped) [as the profile says]."),
        click.option("--link-bw", type=float, default=None,
                     help="Host-to-GPU copy bandwidth, GB/s [25: PCIe 4.0 x16; 3.5 is PCIe 3.0 x4]."),
    ]):
        wrapper = option(wrapper)
    return wrapper


def profile_machine(profile: str, figures: dict):
    from .. import plan as planner

    return planner.machine(profile, vram_gb=figures["vram"], ram_gb=figures["ram"],
                           mem_bw_gbs=figures["mem_bw"], gpu_bw_gbs=figures["gpu_bw"],
                           unified=figures["unified"], link_bw_gbs=figures["link_bw"])


def rpc_hosts(spec: str | None, machine) -> tuple:
    if not spec:
        return ()
    from ..runtime import rpc

    return tuple(rpc.hosts(spec, machine.mem_bw))


def this_machine():
    """This machine's memory and the GPU the runtime would offload to, if it sees one."""
    from .. import plan as planner
    from ..native.machine_probe import ram_bytes
    from ..runtime import devices
    from ..native import installed

    gpus = devices.gpus() if installed.check().backend != "cpu" else []
    if not gpus:
        return planner.this_machine(ram_bytes())
    gpu = gpus[0]  # llama.cpp fills the first device first
    return planner.this_machine(ram_bytes(), gpu.free, gpu.integrated, f"{gpu.name} ({gpu.description})")


def planned(model: Path, profile: str | None, ctx: int | None, mtp: bool, rpc: str | None = None,
             draft: Path | None = None, say: bool = True, parallel: int | None = 1,
             draft_max: int | None = None, figures: dict | None = None, expert_cache="auto",
             prompt_cache: int | None = None, mmproj: Path | None = None):
    """The placement plan `run`, `chat` and `serve` start llama-server with: the named profile
    (its figures replaced by `figures`), or without one this machine as the runtime sees it
    (its memory, and the free memory of the GPU llama.cpp would use); drafting with `draft` or
    the draft found beside the model, checked before any server starts, `draft_max` tokens a
    round or as many as pay, `prompt_cache` MiB for earlier prompts (None: the plan's
    size), and images with `mmproj` or the one beside the model. Without `ctx`, what a file
    made with `quantize --for` was sized for on this machine, or the longest context the
    machine holds with the model; without `parallel`, as many slots as fit (planner.serving)."""
    from .. import plan as planner
    from ..pipeline.source_facts import read_facts

    if profile is None:
        if figures and any(v is not None for v in figures.values()):
            raise StepGGUFError("--vram, --ram, --mem-bw, --gpu-bw, --link-bw and --unified change a profile: "
                                "give --profile too (custom for a machine of your own figures)")
        machine = this_machine()
    else:
        machine = profile_machine(profile, figures or dict.fromkeys(FIGURES))
    draft = drafting(model, draft, mtp, say)
    facts = read_facts(model, draft=draft, mmproj=seeing(model, mmproj, say))
    p = with_draft_max(planner.serving(facts, machine, ctx, parallel, mtp=mtp, rpc=rpc_hosts(rpc, machine),
                                        expert_cache=expert_cache, prompt_cache=prompt_cache),
                        draft_max, not mtp)
    if say and (ctx is None or parallel is None):
        slots = f"{p.parallel} slots of " if p.parallel > 1 else ""
        made = planner.sized_for(facts.made_for, machine)
        chosen = "" if ctx else (f", what {model.name} was sized for on {machine.name}"
                                 if made is not None and (made.ctx, made.parallel) == (p.ctx, p.parallel)
                                 else f", the longest {machine.name} holds with this model")
        choose = " and ".join(o for o, given in (("--ctx", ctx), ("--parallel", parallel)) if not given)
        click.echo(f"context: {slots}{p.ctx} tokens{chosen} ({p.kv_type} cache; {choose} "
                   f"choose{'s' if ' and ' not in choose else ''} otherwise)", err=True)
    return p


def model_options(f):
    for option in reversed([
        click.option("-c", "--ctx", type=click.IntRange(1), default=None,
                     help="Context length [what a file made with quantize --for was sized for on "
                          "this machine, else the longest the machine holds with the model, up to "
                          "the model's own: agents' prompts and tool lists alone take 10-20K]."),
        click.option("--profile", default=None, metavar="NAME",
                     help="Machine profile for the placement plan (see step-gguf plan) "
                          "[this machine: its memory, and the GPU llama.cpp sees]."),
        click.option("--no-mtp", is_flag=True,
                     help="Do not draft with MTP heads, the GGUF's or a draft's (on by default "
                          "when there are some)."),
        draft_option,
        draft_max_option,
        rpc_option,
        expert_cache_option,
        prompt_cache_option,
        mmproj_options,
    ]):
        f = option(f)
    return click.argument("model", type=click.Path(path_type=Path))(machine_options(f))
