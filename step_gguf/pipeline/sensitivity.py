"""How much error a tensor adds to the model when stored as a given type, measured on its weights.

For each tensor: its output energy per token E||W x||² and the error quantizing adds,
E||ΔW x||² = Σ_m P(m) Σ_i Σ_j ΔW_mij² E[x_j²], with E[x_j²] from the importance matrix (the
mean squared activation of each input channel; 1 without one) and P(m) the share of tokens
that reach matrix m (an expert's routing frequency; 1 for a dense matrix). The token embedding
is looked up, not multiplied: its energy and error are the mean over rows. ΔW comes from ggml's
own quantizer and dequantizer on a sample of rows, scaled to the whole tensor, so measuring
costs a small fraction of quantizing. `logit_errors` then puts every tensor on one scale: the
relative perturbation it causes in what reaches the logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as Q

from ..core.gguf_names import is_head, is_routed, stream_writer, writer
from ..files.imatrix import EMBD_POINT, OUTPUT_POINT, Imatrix, layer_point
from .output_tensors import OutputTensor
from .tensor_data import transformed_rows

MAX_MATRICES = 8    # experts sampled per stacked tensor
MAX_ROWS = 128      # rows sampled per matrix


@dataclass(frozen=True)
class Usage:
    """Per input channel mean squared activation and per matrix share of tokens."""

    activation: np.ndarray  # float32 (n_mat, cols)
    share: np.ndarray       # float64 (n_mat,)


def usage(plan: OutputTensor, imat: Imatrix | None, top_k: int) -> Usage:
    """The plan's own importance data (as transformed by equalization) where it has some;
    token shares from the imatrix counts, else top_k of n experts."""
    n_mat = _n_mat(plan)
    cols = plan.shape[-1]
    if plan.name.startswith("token_embd."):  # one row per token: the mean row error
        return Usage(np.ones((1, cols), np.float32), np.array([1.0 / plan.shape[0]]))
    activation = plan.imatrix if plan.imatrix is not None else np.ones((n_mat, cols), np.float32)
    if imat is not None and plan.name in imat:
        tokens = max(int(e.counts.max()) for e in imat.entries.values())
        return Usage(activation, imat.entries[plan.name].counts / max(tokens, 1))
    return Usage(activation, np.full(n_mat, min(1.0, top_k / n_mat)))


def _n_mat(plan: OutputTensor) -> int:
    return math.prod(plan.shape[:-2]) if len(plan.shape) > 2 else 1


def sample(plan: OutputTensor, use: Usage) -> list[tuple[int, int, int]]:
    """(matrix, first row, rows): the matrices most tokens reach (experts a router never picks
    say nothing), rows evenly spread through each."""
    rows = plan.shape[-2] if len(plan.shape) > 1 else 1
    busiest = np.argsort(-use.share, kind="stable")[:MAX_MATRICES]
    n = min(rows, MAX_ROWS)
    block = min(16, n)
    starts = np.unique(np.linspace(0, rows - block, n // block).round().astype(int))
    return [(int(m), int(r0), block) for m in sorted(busiest) for r0 in starts]


@dataclass(frozen=True)
class Measured:
    """A tensor's output energy per token, E||W x||², and, per type, the share of it that
    quantizing adds as error, E||ΔW x||² / E||W x||²."""

    energy: float
    relative_error: dict[str, float]


def measure_tensor(plan: OutputTensor, qtypes: list[Q], use: Usage) -> Measured:
    """Quantize a sample of the plan's rows (with its own transforms and importance data) to
    each type with ggml, and compare."""
    from ..native import ggml  # noqa: PLC0415

    mats: dict[int, list] = {}
    for m, r0, n in sample(plan, use):
        x = transformed_rows(plan, m, r0, n)
        imat = plan.imatrix[m] if plan.imatrix is not None else None
        errs = []
        for t in qtypes:
            y = ggml.dequantize(ggml.quantize(x, t, imat), t, x.size).reshape(x.shape)
            errs.append(float(((y - x) ** 2 @ use.activation[m]).sum()))
        acc = mats.setdefault(m, [0.0, np.zeros(len(qtypes)), 0])
        acc[0] += float((x * x @ use.activation[m]).sum())
        acc[1] += errs
        acc[2] += n
    full_rows = plan.shape[-2] if len(plan.shape) > 1 else 1
    order = sorted(mats)
    share = use.share[order]
    # per-token energy and error of each sampled matrix, scaled to all its rows; matrices not
    # sampled (experts) count as the sampled ones do, in proportion to their token shares
    energy = np.array([mats[m][0] * full_rows / mats[m][2] for m in order])
    error = np.array([mats[m][1] * full_rows / mats[m][2] for m in order])
    total_share = float(use.share.sum())
    norm = float(share.sum()) or 1.0
    e = float((energy * share).sum() / norm * total_share)
    err = (error * share[:, None]).sum(0) / norm * total_share
    return Measured(e, {t.name: float(v / e) if e > 0 else 0.0 for t, v in zip(qtypes, err)})


# How far a depth's measured gain carries into a quantized tensor's cost. Single-group changes on
# two synthetic checkpoints (bench/sensitivity.py: 19 groups each moved to Q2_K) follow about the
# square root of the gains, which span 27x from the embeddings to the output (log error of the
# prediction 0.46-0.52 at 0.5, 0.71 at 1), and budget mode's files came out best with it
GAIN_POWER = 0.5


def stream_point(name: str) -> str | None:
    """The point of the residual stream a tensor's error enters (native/propagation.py's names):
    its own or its writer's; None for tensors outside the trunk's stream (the MTP blocks)."""
    into = writer(name)
    if into == "token_embd.weight":
        return EMBD_POINT
    if is_head(name):
        return OUTPUT_POINT if name == "output.weight" else None
    at = stream_writer(into)
    return layer_point(*at) if at is not None else None


def logit_errors(measured: dict[str, Measured], order: list[str],
                 gains: dict[str, float] | None = None, routing_weight: float = 1.0) -> dict[str, dict[str, float]]:
    """Each tensor's error on one scale: the relative perturbation it causes where it enters
    the residual stream, times how much a perturbation there moves the output.

    A matrix writing into the residual stream perturbs it by its error over the stream's energy
    at that point (the embedding plus every earlier writer, taken as independent); a routed
    expert writes its output times its routing weight, so its energy counts that squared. An inner
    matrix (q/k/v, gate/up) perturbs its writer's output by its own relative error. The heads
    perturb the logits directly. `gains` (point -> KL divergence per unit of relative
    perturbation, measured on the model: native/propagation.py) weigh each point, to the power
    GAIN_POWER; without them every point counts alike, as if a relative perturbation reached
    the logits unchanged.
    `order` is the model's tensor order.
    """
    stream = 0.0
    weight: dict[str, float] = {}
    for name in order:  # residual energy seen by each writer: what was written before it
        if name not in measured:
            continue
        into = writer(name)
        if is_head(name):
            weight[name] = 1.0
        elif into == name:  # token_embd, attn_output, ffn_down*, nextn.eh_proj
            energy = measured[name].energy * (routing_weight ** 2 if is_routed(name) else 1.0)
            stream += energy
            weight[name] = energy / stream
    for name in measured:
        if name not in weight:
            into = writer(name)
            weight[name] = weight.get(into, 0.0) if into != name else 0.0
    if gains:
        weight = {n: w * gains.get(stream_point(n) or "", 1.0) ** GAIN_POWER for n, w in weight.items()}
    return {n: {t: r * weight[n] for t, r in m.relative_error.items()} for n, m in measured.items()}
