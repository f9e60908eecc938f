"""Budget mode: the type of every tensor chosen to meet a size with the least measured error.

Each quantizable tensor of the trunk is a group. Its error under each candidate type is
measured once (sensitivity.py) and cached; then a greedy allocation over each group's lower
convex hull of (bytes, error) spends the budget where an extra byte removes the most error,
which is optimal for the convex relaxation. The MTP blocks keep the base recipe's types: they
only draft, so their precision moves the acceptance rate and never the output the error
measures. The result is an ordinary recipe (one rule per tensor) stored in the GGUF, so the
file records exactly how it was made.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Callable

from gguf import GGMLQuantizationType as Q

from ..core.errors import StepGGUFError
from ..core.gguf_names import layer_of_gguf
from ..core.recipe import NEEDS_IMATRIX, PINNED_1D, PINNED_ROUTER, Recipe, Rule, fallback, tensor_bytes
from ..files.imatrix import Imatrix
from ..files.resume import source_fingerprint
from .output_tensors import FLOAT_TYPES, OutputTensor
from .sensitivity import MAX_MATRICES, MAX_ROWS, Measured, logit_errors, measure_tensor, usage

log = logging.getLogger(__name__)

# every type stock llama.cpp runs, cheapest first. IQ4_XS and IQ4_NL quantize without importance
# data (ggml_quantize_requires_imatrix leaves them out; the field runs IQ4_XS experts widely);
# the IQ2/IQ3 types only with it: ggml refuses IQ2_XS without, and IQ3 is poor without
LADDER = (Q.Q2_K, Q.Q3_K, Q.IQ4_XS, Q.IQ4_NL, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0)
LADDER_IMATRIX = (Q.IQ2_XS, Q.IQ3_XXS, Q.IQ3_S)


class BudgetError(StepGGUFError):
    """A size target that no plan can meet."""


def candidates(plan: OutputTensor, has_imatrix: bool) -> list[Q]:
    ladder = LADDER + (LADDER_IMATRIX if has_imatrix else ())
    types = {fallback(t, plan.shape[-1]) for t in ladder}
    return sorted((t for t in types if has_imatrix or t not in NEEDS_IMATRIX),
                  key=lambda t: tensor_bytes(plan.shape, t))


def _hull(points: list[tuple[int, float, Q]]) -> list[tuple[int, float, Q]]:
    """The lower convex hull of (bytes, error) points, cheapest first: each step buys the most
    error reduction per byte that is still on offer."""
    pts = []
    for b, e, t in sorted(points, key=lambda p: (p[0], p[1])):
        if pts and e >= pts[-1][1]:
            continue  # more bytes, no less error: never worth it
        while len(pts) >= 2:
            (b1, e1, _), (b2, e2, _) = pts[-2], pts[-1]
            if (e1 - e2) * (b - b2) <= (e2 - e) * (b2 - b1):  # pts[-1] lies above the chord
                pts.pop()
            else:
                break
        pts.append((b, e, t))
    return pts


def _cache_key(plans: list[OutputTensor], imat: Imatrix | None) -> str:
    h = hashlib.sha256(json.dumps([MAX_MATRICES, MAX_ROWS]).encode())
    h.update(source_fingerprint(plans).encode())  # what is read and how it is transformed
    if imat is not None:  # token shares come from its counts
        st = os.stat(imat.path)
        h.update(f"{imat.path.resolve()}{st.st_size}{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def trunk(plans: list[OutputTensor], n_layer: int) -> list[OutputTensor]:
    """The plans outside the MTP blocks (layers from `n_layer` on): what the budget moves."""
    return [p for p in plans if (layer_of_gguf(p.name) or 0) < n_layer]


def measure_tensors(plans: list[OutputTensor], imat: Imatrix | None, top_k: int, cache: Path | None,
                    on_tensor: Callable[[str], None] = lambda name: None,
                    threads: int | None = None) -> dict[str, Measured]:
    """tensor -> its energy and relative error per candidate type, for every quantizable
    tensor; the measurements run on all cores and are cached in `cache`/<key>.json as they
    finish."""
    path = cache / f"{_cache_key(plans, imat)}.json" if cache is not None else None
    raw: dict[str, dict] = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    todo = []
    for p in plans:
        if p.rule in (PINNED_1D, PINNED_ROUTER) or p.src is None:
            continue
        types = candidates(p, p.imatrix is not None)
        got = raw.get(p.name)
        if got is None or set(got["relative_error"]) != {t.name for t in types}:
            todo.append((p, types))

    def one(job: tuple[OutputTensor, list[Q]]) -> tuple[str, Measured]:
        p, types = job
        on_tensor(p.name)
        return p.name, measure_tensor(p, types, usage(p, imat, top_k))

    with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
        for name, m in pool.map(one, todo):
            raw[name] = {"energy": m.energy, "relative_error": m.relative_error}
            if path is not None:  # an interrupted measurement resumes from here
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(raw))
                os.replace(tmp, path)
    return {n: Measured(r["energy"], r["relative_error"]) for n, r in raw.items()
            if n in {p.name for p in plans}}


def measure(plans: list[OutputTensor], imat: Imatrix | None, top_k: int, cache: Path | None,
            on_tensor: Callable[[str], None] = lambda name: None,
            threads: int | None = None, routing_weight: float = 1.0) -> dict[str, dict[str, float]]:
    """tensor -> {type: error on the logit scale} for every quantizable tensor (measure_tensors),
    weighed by how much the depth it enters at moves the output where the imatrix measured it
    (`step-gguf imatrix` does)."""
    return logit_errors(measure_tensors(plans, imat, top_k, cache, on_tensor, threads),
                        [p.name for p in plans], imat.propagation if imat is not None else None,
                        routing_weight)


def _hulls(plans: list[OutputTensor], errors: dict[str, dict[str, float]]) -> tuple[int, dict[str, list]]:
    """(bytes of the tensors the budget does not move, each moved tensor's hull)"""
    fixed = sum(p.nbytes for p in plans if p.name not in errors)
    return fixed, {p.name: _hull([(tensor_bytes(p.shape, Q[t]), e, Q[t]) for t, e in errors[p.name].items()])
                   for p in plans if p.name in errors}


def span(plans: list[OutputTensor], errors: dict[str, dict[str, float]]) -> tuple[int, int]:
    """Bytes of tensor data of the smallest and of the largest allocation: every measured tensor
    at its cheapest type, and at the type past which more bytes remove no error."""
    fixed, hulls = _hulls(plans, errors)
    return fixed + sum(h[0][0] for h in hulls.values()), fixed + sum(h[-1][0] for h in hulls.values())


def allocate(plans: list[OutputTensor], errors: dict[str, dict[str, float]], target: int,
             base: str, n_layer: int) -> Recipe:
    """The least-error recipe whose file holds at most `target` bytes of tensor data; the MTP
    blocks (layers from `n_layer` on) keep their planned types."""
    fixed, hulls = _hulls(plans, errors)
    step = {name: 0 for name in hulls}
    total = fixed + sum(h[0][0] for h in hulls.values())
    if total > target:
        raise BudgetError(f"target {target} bytes is below the smallest plan ({total} bytes, "
                          f"every tensor at its cheapest type); raise the target")

    def offer(name: str) -> None:
        h, i = hulls[name], step[name]
        if i + 1 < len(h):
            (b0, e0, _), (b1, e1, _) = h[i], h[i + 1]
            heapq.heappush(heap, (-(e0 - e1) / max(b1 - b0, 1), name, i))

    heap: list = []
    for name in hulls:
        offer(name)
    while heap:
        _, name, i = heapq.heappop(heap)
        h = hulls[name]
        cost = h[i + 1][0] - h[i][0]
        if total + cost > target:
            continue  # this step does not fit; a cheaper one elsewhere may
        total += cost
        step[name] = i + 1
        offer(name)
    rules = [Rule("^" + re.escape(name) + "$", hulls[name][step[name]][2],
                  f"measured error {hulls[name][step[name]][1]:.4g}") for name in hulls]
    moved = {p.name for p in trunk(plans, n_layer)}
    rules += [Rule("^" + re.escape(p.name) + "$", p.qtype, "MTP block: drafts only, the base recipe's type")
              for p in plans if p.name not in moved and p.qtype not in FLOAT_TYPES]
    log.info("budget plan: %d bytes of %d", total, target)
    return Recipe(f"{base}-budget", f"per-tensor types for at most {target} bytes, least measured "
                  "error", tuple(rules) + (Rule(".", Q.F32, "not quantized"),))


def measured(plans: list[OutputTensor], imat: Imatrix | None, top_k: int, cache: Path | None,
             n_layer: int, routing_weight: float = 1.0,
             on_tensor: Callable[[str], None] = lambda name: None
             ) -> tuple[list[OutputTensor], dict[str, dict[str, float]]]:
    """(`plans` with their importance data, every trunk tensor's error per type): measured, or
    reused from `cache`; what allocate() takes."""
    ready = [replace(p, imatrix=imat[p.name]) if imat is not None and p.name in imat and p.imatrix is None
             and p.qtype not in FLOAT_TYPES else p for p in plans]
    return ready, measure(trunk(ready, n_layer), imat, top_k, cache, on_tensor, routing_weight=routing_weight)


def budget_recipe(plans: list[OutputTensor], imat: Imatrix | None, top_k: int, target: int,
                    base: str, cache: Path | None, n_layer: int, routing_weight: float = 1.0,
                    on_tensor: Callable[[str], None] = lambda name: None) -> Recipe:
    """Measure (or reuse) every trunk tensor's error per type, then allocate `target` bytes."""
    ready, errors = measured(plans, imat, top_k, cache, n_layer, routing_weight, on_tensor)
    return allocate(ready, errors, target, base, n_layer)
