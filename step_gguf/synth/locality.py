"""Routing with locality for a synthetic checkpoint: consecutive tokens favour the experts recent
tokens used, with no fixed hot set, as traced routing of trained MoE models does (llama.cpp
#27861: the 32 most used experts of a held-out text cover 10% of it; LRU over 64 experts hits
67%). Random weights route by a fixed bias instead, the same few experts for every token.

How: the first sliding-window layer attends uniformly (its queries and head gates are zero),
so its output is the mean of the window's values, a vector that drifts a little each token
and far over a text. That layer alone writes it, into a few hidden channels no other layer
writes; the routers read mostly those channels and a little of the current token."""

from __future__ import annotations

import math
import re
from typing import Callable

import numpy as np

from ..core.model import Step35Config

# the hidden channels that carry the window's mean: the last 1/CONTEXT_SHARE of them
CONTEXT_SHARE = 16
# router logit spread from the window's mean, and from the current token
FROM_CONTEXT, FROM_TOKEN = 2.5, 1.5   # bench/expert_cache.py: LRU over 64 of 288 experts hits 92%
ROUTER_BIAS_STD = 0.05

Transform = Callable[[np.ndarray, int], np.ndarray]   # (rows of a chunk, index of its first row)


def context_channels(hidden: int) -> np.ndarray:
    """The hidden channels that carry the window's mean."""
    return np.arange(hidden - max(1, hidden // CONTEXT_SHARE), hidden)


def context_layer(cfg: Step35Config) -> int:
    """The layer whose uniform attention makes the context: the first sliding-window one."""
    return cfg.is_swa.index(True)


def transform(name: str, shape: tuple[int, ...], cfg: Step35Config) -> Transform | None:
    """How locality changes the random weights of tensor `name` (None: not at all)."""
    hidden = cfg.hidden_size
    cols = context_channels(hidden)
    own = context_layer(cfg)
    m = re.search(r"layers\.(\d+)\.(.+)$", name)
    layer, tail = (int(m.group(1)), m.group(2)) if m else (None, name)

    def rows_in(block: np.ndarray, row0: int, keep: bool) -> np.ndarray:
        hidden_row = (np.arange(row0, row0 + len(block)) % hidden)
        mask = np.isin(hidden_row, cols) != keep
        block[mask] = 0
        return block

    if layer == own and tail in ("self_attn.q_proj.weight", "self_attn.g_proj.weight"):
        return lambda block, row0: block * 0    # scores and gates constant: uniform attention
    if layer == own and tail == "self_attn.o_proj.weight":
        # only the context channels, scaled so that the window's mean is O(1) there
        gain = 1 / (0.3 * 0.18)   # o_proj's std is 0.3/sqrt(fan-in); a 32-token mean, ~0.18
        return lambda block, row0: rows_in(block * np.float32(gain), row0, keep=True)
    if tail.endswith(("o_proj.weight", "down_proj.weight")):
        return lambda block, row0: rows_in(block, row0, keep=False)   # nobody else writes there
    if name.endswith("embed_tokens.weight"):
        def no_context(block: np.ndarray, row0: int) -> np.ndarray:
            block[:, cols] = 0
            return block
        return no_context
    if tail == "moe.gate.weight":
        scale = np.full(hidden, FROM_TOKEN * math.sqrt(hidden / (hidden - len(cols))), np.float32)
        scale[cols] = FROM_CONTEXT * math.sqrt(hidden / len(cols))
        return lambda block, row0: block * scale
    if tail == "moe.router_bias":
        return lambda block, row0: block * np.float32(ROUTER_BIAS_STD)
    return None
