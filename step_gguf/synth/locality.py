"""Routing with locality for a synthetic checkpoint: consecutive tokens favour the experts recent
tokens used, with no fixed hot set, as traced routing of trained MoE models does (llama.cpp
#27861: the 32 most used experts of a held-out text cover 10% of it; LRU over 64 experts hits
67%). Random weights route by a fixed bias instead, the same few experts for every token.

How: a few "topic" channels carry each multi-byte token's own random vector; embeddings alone
write them. The first sliding-window layer attends uniformly (zero queries and head gates), so
it writes the window's mean of those vectors into a few "context" channels; the first
full-attention layer, also uniform, subtracts the mean over the whole text there. What is left
drifts from token to token and wanders over a text without settling on one place, as a plain
window mean of a text's frequent tokens would. Routers read the context, the token's topic and,
more weakly, the rest of the hidden state; their bias is too small to pick a hot set."""

from __future__ import annotations

import math
import re
from collections import Counter, OrderedDict
from typing import Callable

import numpy as np

from ..core.model import Step35Config

CONTEXT_SHARE = 16            # the topic and context channels: each 1/CONTEXT_SHARE of the hidden
# router logit spread from the context, the token's topic and the rest of the hidden state:
# on the bench's text, LRU over 64 of 288 experts hits ~66% (bench/expert_cache.py prints it)
FROM_CONTEXT, FROM_TOPIC, FROM_TOKEN = 2.5, 2.0, 1.0
# the router bias's spread, well under the sigmoid's steps between the 8th and 9th expert's
# scores (~0.005), which a larger bias would decide, the same way for every token
ROUTER_BIAS_STD = 0.001
BYTES = 256                   # the synthetic tokenizer's ids below this are single bytes

Transform = Callable[[np.ndarray, int], np.ndarray]   # (rows of a chunk, index of its first row)


def channels(cfg: Step35Config) -> tuple[np.ndarray, np.ndarray]:
    """(topic channels, context channels): the last 2/CONTEXT_SHARE of the hidden, at most a
    head's width each, so one head carries a whole mean."""
    k = max(1, min(cfg.hidden_size // CONTEXT_SHARE, cfg.head_dim))
    end = cfg.hidden_size
    return np.arange(end - 2 * k, end - k), np.arange(end - k, end)


def mean_layers(cfg: Step35Config) -> dict[int, float]:
    """The uniform layers and the sign of what they write: the first sliding-window layer adds
    its window's mean, the first full-attention layer subtracts the text's."""
    return {cfg.is_swa.index(True): 1.0, cfg.is_swa.index(False): -1.0}


def transform(name: str, shape: tuple[int, ...], cfg: Step35Config) -> Transform | None:
    """How locality changes the random weights of tensor `name` (None: not at all)."""
    topic, context = channels(cfg)
    m = re.search(r"layers\.(\d+)\.(.+)$", name)
    layer, tail = (int(m.group(1)), m.group(2)) if m else (None, name)
    means = mean_layers(cfg)
    # nothing else is written between the two, so both normalise the topic by the same scale
    between = layer is not None and min(means) <= layer < max(means)
    if layer in means and tail.startswith(("self_attn.", "input_layernorm.")):
        return _mean_layer(tail, cfg.n_head[layer], means[layer], cfg)
    if between and tail.endswith(("down_proj.weight", "o_proj.weight")):
        return lambda block, row0: block * 0
    if tail.endswith(("o_proj.weight", "down_proj.weight")):   # nobody else writes either set
        keep = np.setdiff1d(np.arange(cfg.hidden_size), np.concatenate([topic, context]))

        def others(block: np.ndarray, row0: int) -> np.ndarray:
            block[~np.isin(_hidden_rows(block, row0, cfg.hidden_size), keep)] = 0
            return block
        return others
    if name.endswith("embed_tokens.weight"):
        def no_context(block: np.ndarray, row0: int) -> np.ndarray:
            block[:, context] = 0
            # single bytes (the synthetic tokenizer's first ids) carry no topic: they are a
            # text's most frequent tokens, like function words, and in every window alike
            block[:max(0, BYTES - row0), topic] = 0
            return block
        return no_context
    if tail == "moe.gate.weight":
        return _router(cfg)
    if tail == "moe.router_bias":
        return lambda block, row0: block * np.float32(ROUTER_BIAS_STD)
    return None


def _hidden_rows(block: np.ndarray, row0: int, hidden: int) -> np.ndarray:
    return np.arange(row0, row0 + len(block)) % hidden


def _mean_layer(tail: str, n_head: int, sign: float, cfg: Step35Config) -> Transform | None:
    """A uniform layer's attention: it copies the topic channels' mean into the context ones."""
    topic, context = channels(cfg)
    if tail in ("self_attn.q_proj.weight", "self_attn.g_proj.weight"):
        return lambda block, row0: block * 0    # scores and gates constant: uniform attention
    if tail == "input_layernorm.weight":
        def unit_scale(block: np.ndarray, row0: int) -> np.ndarray:
            block[:, topic] = 0                 # zero-centred: both layers see the same topic
            return block
        return unit_scale
    if tail == "self_attn.v_proj.weight":
        def copy_topic(block: np.ndarray, row0: int) -> np.ndarray:   # every head: the topic
            out = np.zeros_like(block)
            dim = np.arange(row0, row0 + len(block)) % cfg.head_dim
            keep = dim < len(topic)
            out[np.flatnonzero(keep), topic[dim[keep]]] = 1
            return out
        return copy_topic
    if tail == "self_attn.o_proj.weight":
        # the heads' mean, x2 for the gate's 0.5: kept small, so that the hidden state's scale,
        # which both layers normalise by, hardly differs between them
        def write_context(block: np.ndarray, row0: int) -> np.ndarray:
            out = np.zeros_like(block)
            for r, h in enumerate(_hidden_rows(block, row0, cfg.hidden_size)):
                j = np.searchsorted(context, h)
                if j < len(context) and context[j] == h:
                    out[r, np.arange(n_head) * cfg.head_dim + j] = np.float32(sign * 2 / n_head)
            return out
        return write_context
    return None


def _router(cfg: Step35Config) -> Transform:
    hidden = cfg.hidden_size
    topic, context = channels(cfg)
    scale = np.full(hidden, FROM_TOKEN * math.sqrt(hidden / (hidden - len(context))), np.float32)
    scale[topic] = FROM_TOPIC * math.sqrt(hidden / len(topic))
    # the context drifts by ~1/sqrt(window) of a topic vector
    scale[context] = FROM_CONTEXT * math.sqrt(hidden / len(context) * cfg.sliding_window)

    def route(block: np.ndarray, row0: int) -> np.ndarray:
        # every expert's context row equally long: no expert wins more often over a text, as
        # load balancing makes trained routers
        norms = np.linalg.norm(block[:, context], axis=1, keepdims=True)
        block[:, context] *= math.sqrt(len(context)) * block.std() / np.maximum(norms, 1e-30)
        return block * scale
    return route


def lru(steps: list[list[int]], slots: int) -> tuple[int, int]:
    """(hits, copies) of an LRU cache of `slots` experts over one layer's routing, a list of
    each step's experts: every miss copied in, the least recently used evicted."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = copies = 0
    for step in steps:
        for e in step:
            if e in cache:
                hits += 1
                cache.move_to_end(e)
            else:
                copies += 1
                cache[e] = None
                if len(cache) > slots:
                    cache.popitem(last=False)
    return hits, copies


def statistics(trace: list[list[list[int]]], hot: int = 32, recent: int = 64) -> tuple[float, float]:
    """#27861's two figures of a routing trace (per layer, per step, the experts), averaged over
    layers: the share of the second half's routing that the first half's `hot` most used
    experts serve, and the hit rate of LRU over `recent` experts."""
    shares, rates = [], []
    for steps in trace:
        half = len(steps) // 2
        top = {e for e, _ in Counter(e for step in steps[:half] for e in step).most_common(hot)}
        later = [e for step in steps[half:] for e in step]
        shares.append(sum(e in top for e in later) / len(later))
        rates.append(lru(steps, recent)[0] / sum(map(len, steps)))
    return sum(shares) / len(shares), sum(rates) / len(rates)
