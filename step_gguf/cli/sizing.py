"""`quantize --for`: the machine a file is sized for, the size the planner chooses there (budget
mode's allocation on the weights, or a dry run's estimate from shapes), and what it prints."""

from __future__ import annotations

from pathlib import Path

import click

from .planning import FIGURES, profile_machine, this_machine
from ..core.units import human_size

# the contexts a dry run prices when none is given
DRY_RUN_CONTEXTS = (32768, 65536, 131072)
ALL = "all"     # --dry-run --for all: every named profile


def for_options(f):
    for option in reversed([
        click.option("--for", "for_profile", default=None, metavar="PROFILE",
                     help="Size the file for a machine: the largest file the plan fits there at "
                          "--ctx with the MTP heads and every slot's cache (a named profile, custom "
                          "with --ram/--mem-bw/--vram/--gpu-bw, or this: this machine's memory as "
                          "the runtime sees it); budget mode then makes it. With --dry-run, from "
                          "shapes alone (a bare config.json will do); --for all prices every named "
                          "profile."),
        click.option("--ctx", type=click.IntRange(1), default=None,
                     help="With --for: the context every slot holds [65536, or the model's own "
                          f"when shorter; a dry run prices {', '.join(f'{c // 1024}K' for c in DRY_RUN_CONTEXTS)}]."),
        click.option("--parallel", type=click.IntRange(1), default=1, show_default=True,
                     help="With --for: server slots, each with its own cache of --ctx tokens."),
        click.option("--min-decode", type=float, default=None, metavar="TPS",
                     help="With --for: the largest file whose predicted decode speed is at least "
                          "TPS tokens/s (experts in system memory cost read bandwidth per token)."),
    ]):
        f = option(f)
    return f


def machine_for(profile: str, figures: dict):
    from ..plan.machines import THIS

    if profile == THIS:
        if any(v is not None for v in figures.values()):
            raise click.UsageError("--for this measures this machine: leave out "
                                   f"{', '.join('--' + k.replace('_', '-') for k in FIGURES)}")
        return this_machine()
    return profile_machine(profile, figures)


def sized(src: Path, recipe, options, profile: str, figures: dict, ctx: int | None, parallel: int,
          min_decode: float | None, on_stage):
    """(`options` sized for the machine: budget mode at the tensor budget the planner chose, the
    file marked with its machine; the source as prepared for it); says which size and why."""
    from dataclasses import replace

    from ..pipeline.machine_fit import budget_sizes, even_sizes
    from ..pipeline.quantize_options import Target
    from ..plan import SLOT_CTX
    from ..plan.sizing import Demand, accepted, largest

    shapes = even_sizes(src, recipe, mtp=options.mtp, has_imatrix=options.imatrix is not None)
    cheapest = shapes.facts_at(shapes.smallest)
    demand = Demand(machine_for(profile, figures), ctx or min(SLOT_CTX, cheapest.n_ctx_train), parallel,
                    min_decode)
    accepted(cheapest, demand)  # refused from shapes, before measuring, where the cheapest types do not fit
    sizes = budget_sizes(src, recipe, options, on_stage)
    choice = largest(sizes.facts_at, demand, sizes.smallest, sizes.largest)
    p = choice.plan
    click.echo(f"sized for {demand.profile.name} ({demand.profile.what}): "
               f"{human_size(sum(t.bytes for t in p.model.tensors))} of tensor data; {choice.why}; "
               f"predicted decode {p.predicted_decode_tps:.1f} tok/s")
    return replace(options, target=Target(data=choice.budget), made_for=choice.made_for()), sizes.prepared


def dry_run_table(src: Path, recipe, mtp, profile: str, figures: dict, ctx: int | None,
                  parallel: int, min_decode: float | None, has_imatrix: bool) -> None:
    """For each machine and context: the file the planner fits, its bits per weight and
    predicted decode speed, and where it lands among the published GGUFs of the real model."""
    from ..core.errors import StepGGUFError
    from ..core.published import landing
    from ..pipeline.machine_fit import even_sizes
    from ..plan import PROFILES
    from ..plan.sizing import Demand, largest

    sizes = even_sizes(src, recipe, mtp=mtp, has_imatrix=has_imatrix)
    machines = [profile_machine(n, dict.fromkeys(FIGURES)) for n in PROFILES] if profile == ALL \
        else [machine_for(profile, figures)]
    n_params = sum(t.n_params for t in sizes.facts_at(sizes.smallest).tensors)
    rows = []
    for machine in machines:
        for n in [ctx] if ctx else DRY_RUN_CONTEXTS:
            try:
                rows.append((machine, n, largest(sizes.facts_at, Demand(machine, n, parallel, min_decode),
                                                 sizes.smallest, sizes.largest)))
            except StepGGUFError as exc:
                if len(machines) == 1 and ctx:
                    raise  # one question: the refusal is the answer, in one line
                rows.append((machine, n, exc))
    click.echo("an estimate from shapes: every quantizable tensor the same share of the way from its "
               "cheapest to its best type (budget mode spends the same bytes where they remove most error)")
    click.echo(f"{'machine':<12} {'ctx':>7} {'size':>10} {'bpw':>5} {'tok/s':>6}  bound; published scale")
    for machine, n, choice in rows:
        if isinstance(choice, StepGGUFError):
            click.echo(f"{machine.name:<12} {n:>7} {'-':>10} {'-':>5} {'-':>6}  {choice}")
            continue
        size = sum(t.bytes for t in choice.plan.model.tensors)
        click.echo(f"{machine.name:<12} {n:>7} {human_size(size):>10} {size * 8 / n_params:>5.2f} "
                   f"{choice.plan.predicted_decode_tps:>6.1f}  {choice.bound}; {landing(size * 8 / n_params)}")
