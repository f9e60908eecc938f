"""Weights under which a synthetic checkpoint follows a script: greedy decoding emits fixed
tokens in order, and each MTP head predicts them, or on a chosen share of its inputs a token
verification rejects (the draft acceptance tests and benches set)."""

from __future__ import annotations

import math

import gguf
import numpy as np


def scripted_weights(name: str, shape: tuple[int, ...], successor: dict[int, int]):
    """Weights under which greedy decoding follows `successor` (token -> next token; every
    token not in it -> successor[-1]), for the trunk and each MTP head alike.

    Every layer's update of the residual stream is zero (o_proj and down projections), so the
    final hidden state is the current token's embedding. Embeddings are one-hot: channel 0 for
    any token outside the script, channel k for the script's k-th token. The head maps channel
    k to its successor's logit; an MTP head reads only the embedding half of its input
    ([enorm(embedding), hnorm(hidden)] in llama.cpp), so it predicts the same successor.
    Other weights stay random: attention, routing and norms all run, with no effect on
    the tokens. Zero-centred norms scale by 1 + w, positive for the random w used here."""
    channel = {tok: k + 1 for k, tok in enumerate(t for t in successor if t >= 0)}
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        w = np.zeros(shape, np.float32)
    elif name.endswith("embed_tokens.weight"):
        w = np.zeros(shape, np.float32)
        w[:, 0] = 1.0
        for tok, k in channel.items():
            w[tok] = 0.0
            w[tok, k] = 1.0
    elif name.endswith(("lm_head.weight", "shared_head.output.weight")):
        w = np.zeros(shape, np.float32)
        gain = 20.0 / math.sqrt(shape[1])   # a clear winner: logit ~20 against 0
        w[successor[-1], 0] = gain
        for tok, k in channel.items():
            w[successor[tok], k] = gain
    elif name.endswith("eh_proj.weight"):
        w = np.zeros(shape, np.float32)
        w[:, : shape[0]] = np.eye(shape[0], dtype=np.float32)
    else:
        return None
    return lambda: iter([gguf.quants.quantize(w, gguf.GGMLQuantizationType.BF16).tobytes()])


def head_successors(successor: dict[int, int], accuracy: float, rng_seed: tuple[int, int]) -> dict[int, int]:
    """An MTP head's successor map: the script's, but for a share 1 - `accuracy` of its inputs
    (chosen by `rng_seed`, so each head errs on its own inputs) the token two ahead, which
    verification always rejects."""
    def after(tok: int) -> int:
        return successor.get(tok, successor[-1])

    inputs = sorted(successor)
    n_wrong = round((1.0 - accuracy) * len(inputs))
    wrong = np.random.default_rng(list(rng_seed)).choice(inputs, n_wrong, replace=False)
    return {**successor, **{int(tok): after(after(int(tok))) for tok in wrong}}
