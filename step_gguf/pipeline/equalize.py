"""Per-channel equalization: move quantization error onto the channels that matter least.

A zero-centred RMSNorm multiplies each channel j by g_j before the matrices that read it. Scaling
those matrices' input columns by s_j and the norm by 1/s_j leaves the function unchanged in exact
arithmetic; but a block quantizer shares one scale across 32 or 256 columns, so larger s_j on
channels with large activations gives those columns more of the block's precision. Every
consumer of one norm takes the same s (the attention norm feeds q, k, v and the head gate; the
FFN norm feeds the router, the routed experts and the shared expert, or the dense FFN).

s = (E[x²] / geometric mean)^(α/2) from the importance matrix. For each norm, α is chosen from a
small grid by the measured relative output error of its consumers (sensitivity.py) under the
plan's own types;
α = 0 (no change) wins unless another lowers that error by more than 1%.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from ..core.gguf_names import norm_consumers
from ..files.imatrix import Imatrix
from .output_tensors import FLOAT_TYPES, OutputTensor
from .sensitivity import measure_tensor, usage

log = logging.getLogger(__name__)

ALPHAS = (0.0, 0.25, 0.5)
MIN_GAIN = 0.01  # keep a scaling only where it lowers the measured error by more than this


@dataclass(frozen=True)
class Equalized:
    norm: str
    alpha: float
    error_before: float
    error_after: float


def _scales(activation: np.ndarray, alpha: float) -> np.ndarray:
    a = np.maximum(activation.astype(np.float64), 1e-6 * activation.mean() + 1e-30)
    s = a ** (alpha / 2)
    return (s / np.exp(np.log(s).mean())).astype(np.float32)  # geometric mean 1


def _apply(norm: OutputTensor, consumers: list[OutputTensor], s: np.ndarray) -> tuple[OutputTensor, list[OutputTensor]]:
    scaled = [replace(p, col_scale=s[None, :],  # one row: every expert reads the same channels
                      imatrix=p.imatrix / (s * s) if p.imatrix is not None else None)
              for p in consumers]
    return replace(norm, col_scale=(1.0 / s)[None, :]), scaled


def _groups(plans: list[OutputTensor], imat: Imatrix):
    """(norm, its consumers, their input statistics) for every norm the imatrix has seen."""
    by_name = {p.name: p for p in plans}
    for name, norm in by_name.items():
        names = norm_consumers(name)
        if names is None:
            continue
        stats = next((imat[n][0] for n in names if n in imat and imat.entries[n].counts.size == 1), None)
        if stats is not None:
            yield norm, [by_name[n] for n in names if n in by_name], stats


def _replace(plans: list[OutputTensor], new: list[OutputTensor]) -> list[OutputTensor]:
    by_name = {p.name: p for p in new}
    return [by_name.get(p.name, p) for p in plans]


def fold(plans: list[OutputTensor], imat: Imatrix, alpha: float) -> list[OutputTensor]:
    """Every norm's scales folded in with one fixed alpha (the function stays the same)."""
    new = []
    for norm, consumers, stats in _groups(plans, imat):
        new_norm, scaled = _apply(norm, consumers, _scales(stats, alpha))
        new += [new_norm, *scaled]
    return _replace(plans, new)


def equalize(plans: list[OutputTensor], imat: Imatrix, top_k: int,
             alphas: tuple[float, ...] = ALPHAS) -> tuple[list[OutputTensor], list[Equalized]]:
    """Plans with per-norm scales folded in where they lower the measured error."""
    new: list[OutputTensor] = []
    report = []
    for norm, consumers, stats in _groups(plans, imat):
        name = norm.name
        quantized = [c for c in consumers if c.qtype not in FLOAT_TYPES]

        def error(cs: list[OutputTensor]) -> float:  # the consumers' relative output errors
            return sum(measure_tensor(c, [c.qtype], usage(c, imat, top_k)).relative_error[c.qtype.name]
                       for c in cs if c.qtype not in FLOAT_TYPES)

        base = error(quantized)
        best = (base, 0.0, None)
        for alpha in alphas:
            if alpha == 0.0:
                continue
            new_norm, scaled = _apply(norm, consumers, _scales(stats, alpha))
            err = error(scaled)
            if err < best[0]:
                best = (err, alpha, (new_norm, scaled))
        if best[2] is not None and best[0] < (1 - MIN_GAIN) * base:
            new_norm, scaled = best[2]
            new += [new_norm, *scaled]
            report.append(Equalized(name, best[1], base, best[0]))
            log.info("equalized %s: alpha %.2f, error %.4g -> %.4g", name, best[1], base, best[0])
    return _replace(plans, new), report
