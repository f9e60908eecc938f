"""The files a source can become at each size, as facts the planner sizes for a machine
(`quantize --for`): budget mode's allocation at a tensor budget, measured on the weights, or,
for a dry run from shapes alone, every quantizable tensor moved evenly between its cheapest
and its best candidate type."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Callable

from ..core.model_facts import ModelFacts
from ..core.recipe import PINNED_1D, PINNED_ROUTER, Recipe, tensor_bytes
from ..native.build import cache_dir
from .budget import candidates, allocate, measured, span, trunk
from .output_tensors import OutputTensor
from .quantize import Prepared, Source, open_source, prepare, retype
from .quantize_options import QuantizeOptions
from .source_facts import planned_facts, planned_tensors, read_facts


@dataclass(frozen=True)
class Sizes:
    """A source's files by tensor budget: facts_at(bytes) for any budget in [smallest, largest]."""

    facts_at: Callable[[int], ModelFacts]
    smallest: int
    largest: int
    prepared: Prepared | None = None   # budget mode's: what quantize() writes from without preparing again


def _facts(source: Source, plans: list[OutputTensor]) -> ModelFacts:
    name = source.path.name
    if source.cfg is not None:
        return planned_facts(name, source.cfg, plans)
    return replace(read_facts(source.path), tensors=planned_tensors(plans))


def budget_sizes(src: str | os.PathLike, recipe: Recipe, options: QuantizeOptions = QuantizeOptions(),
                 on_stage: Callable[[str], None] = lambda what: None) -> Sizes:
    """The files budget mode makes of `src` (prepared as `quantize` with `options` prepares it:
    importance data, equalization), measuring every trunk tensor once."""
    source, imat, report = prepare(src, recipe, options, on_stage)
    ready, errors = measured(source.plans, imat, source.top_k, cache_dir() / "sensitivity", source.n_layer,
                             source.routing_weight, on_tensor=lambda name: on_stage(f"measuring {name}"))
    base = _facts(source, ready)

    def facts_at(budget: int) -> ModelFacts:
        plans = retype(ready, allocate(ready, errors, budget, recipe.name, source.n_layer), source.n_layer)
        return replace(base, tensors=planned_tensors(plans))
    return Sizes(facts_at, *span(ready, errors), prepared=(source, imat, report))


def even_sizes(src: str | os.PathLike, recipe: Recipe, *, mtp="keep", has_imatrix: bool = False) -> Sizes:
    """The files of `src` (a config is enough) whose every trunk tensor budget mode moves sits the same
    share of the way from its cheapest candidate type to its best, in bytes: a dry run's stand-in
    for budget mode, which spends more bits where they remove more error."""
    source = open_source(src, recipe, mtp=mtp)
    base = _facts(source, source.plans)
    moved = {p.name: [tensor_bytes(p.shape, t) for t in candidates(p, has_imatrix)]
             for p in trunk(source.plans, source.n_layer) if p.rule not in (PINNED_1D, PINNED_ROUTER)}
    fixed = sum(t.bytes for t in base.tensors if t.name not in moved)
    low = fixed + sum(b[0] for b in moved.values())
    high = fixed + sum(b[-1] for b in moved.values())

    def facts_at(budget: int) -> ModelFacts:
        share = min(max((budget - low) / max(high - low, 1), 0.0), 1.0)
        return replace(base, tensors=tuple(
            replace(t, bytes=int(moved[t.name][0] + share * (moved[t.name][-1] - moved[t.name][0])))
            if t.name in moved else t for t in base.tensors))
    return Sizes(facts_at, low, high)
