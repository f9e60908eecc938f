"""Memory arithmetic of a placement: the KV cache llama.cpp allocates per layer (window-sized
on sliding layers), compute buffers, llama-server's context checkpoints, and what a decode
step reads of the cache."""

from __future__ import annotations

from typing import Literal, get_args

from ..core.model_facts import ModelFacts, VisionFacts

# the KV cache types llama.cpp takes (--cache-type-k/-v), and their bytes per value
KvType = Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"]
KV_TYPES: dict[KvType, float] = dict(zip(get_args(KvType), (4.0, 2.0, 2.0, 34 / 32, 24 / 32, 22 / 32, 20 / 32,
                                                           18 / 32)))


def pad256(n: int) -> int:
    return -(-n // 256) * 256


def kv_positions(m: ModelFacts, layer: int, ctx: int, n_ubatch: int, n_seq: int = 1) -> int:
    """Cache cells llama.cpp allocates for `layer` with `n_seq` slots of `ctx` tokens each: one
    stream per slot (llama-server's -np without a unified cache), a sliding layer's stream
    sized to its window plus a micro-batch (src/llama-kv-cache-iswa.cpp)."""
    if m.is_swa[layer] and m.window:
        return n_seq * pad256(min(ctx, m.window + n_ubatch))
    return n_seq * pad256(ctx)


def _position_bytes(m: ModelFacts, layer: int, kv_type: KvType) -> float:
    """K and V of one cached position of `layer`."""
    return m.n_head_kv[layer] * m.head_dim * 2 * KV_TYPES[kv_type]


def kv_bytes(m: ModelFacts, layers: range, ctx: int, kv_type: KvType, n_ubatch: int,
             n_seq: int = 1) -> int:
    return int(sum(kv_positions(m, i, ctx, n_ubatch, n_seq) * _position_bytes(m, i, kv_type)
                   for i in layers))


def mask_bytes(m: ModelFacts, ctx: int, n_ubatch: int) -> int:
    """The attention masks of one graph at `n_ubatch` tokens: f16, a cache cell a column, for the
    full layers' cache of `ctx` cells and the sliding layers' window-sized one. They grow with
    the context: 512 MiB at 128K tokens and a 2048-token micro-batch."""
    swa = next((i for i in range(m.n_layer) if m.is_swa[i]), None)
    swa_cells = kv_positions(m, swa, ctx, n_ubatch) if swa is not None else 0
    return 2 * n_ubatch * (pad256(ctx) + swa_cells)


def input_buffer(m: ModelFacts, ctx: int, n_ubatch: int) -> int:
    """What a graph's inputs take in system memory when its layers run on a GPU (llama.cpp's
    host compute buffer): the masks, and the token embeddings with their positions."""
    return mask_bytes(m, ctx, n_ubatch) + 3 * 4 * m.n_embd * n_ubatch


def compute_buffer(m: ModelFacts, ctx: int, n_ubatch: int) -> int:
    """Scratch of one context's graph at `n_ubatch` tokens with flash attention, on the device
    that runs its layers: the attention masks (copied there from the host), then the widest
    activations: the routed experts' gate, up and product, queries, and residual copies.
    llama.cpp reserves the logits of one output a sequence, not a batch's: the vocabulary does
    not count per token. Not exact: llama.cpp's peak moves between the MoE, dense-FFN and
    attention stages. On the tiny model llama.cpp allocated 66-77% of it; over 11 of 12 shapes
    sized on the CPU (width, experts, expert and shared widths, heads, head size varied) at
    most 100%, but 125% where the dense FFN (not in ModelFacts) was 16x the expert width."""
    per_token = 3 * m.n_expert_used * m.expert_ff + 3 * m.max_heads * m.head_dim + 9 * m.n_embd
    return mask_bytes(m, ctx, n_ubatch) + 4 * n_ubatch * per_token


def vision_bytes(v: VisionFacts) -> int:
    """The mmproj's weights and the graph that encodes one image (its largest: image_size
    square) on the device mtmd runs it on: each patch's q, k, v and FFN activations, twice over
    for the residual copies and the convolutions' im2col."""
    return v.weights + 2 * 4 * v.patches * (3 * v.width + v.ff)


def checkpoint_bytes(m: ModelFacts, kv_type: KvType, n_ubatch: int) -> int:
    """One llama-server context checkpoint: the sliding layers' cache of one sequence, at most
    a window plus a micro-batch of positions."""
    return int(sum((m.window + n_ubatch) * _position_bytes(m, i, kv_type)
                   for i in range(m.n_layer) if m.is_swa[i]))


def kv_read(m: ModelFacts, pos: int, kv_type: KvType, layers: range | set[int] | None = None) -> float:
    """Cache bytes one decode step at position `pos` reads in `layers` (default: the trunk):
    every past position of a full layer, at most a window of a sliding one."""
    return sum(min(pos, m.window if m.is_swa[i] and m.window else pos) * _position_bytes(m, i, kv_type)
               for i in (range(m.n_layer) if layers is None else layers) if i < m.n_layer)
