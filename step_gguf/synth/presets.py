"""The shapes `step-gguf synth` makes: data alone, so the command line lists them without
loading the synthesiser."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    hidden: int
    n_layer: int
    n_dense: int
    n_nextn: int
    head_dim: int
    n_head: int
    n_head_swa: int
    n_kv: int
    n_expert: int
    top_k: int
    expert_ff: int
    shexp_ff: int
    ff: int
    vocab: int
    window: int
    shard_bytes: int
    swiglu: tuple[float, float]   # (routed, shared) limits on the last two trunk layers
    fp8_block: int
    rope_orig_ctx: int            # llama3 scaling's original context: small enough to bite
    # hidden channels whose norm scale is `outlier_gain` times the rest, as trained models have
    # ("massive activations"): the few input channels quantization must not lose
    outliers: int = 0
    outlier_gain: float = 1.0


PRESETS: dict[str, Preset] = {
    "tiny": Preset(hidden=64, n_layer=8, n_dense=2, n_nextn=3, head_dim=32, n_head=4,
                   n_head_swa=6, n_kv=2, n_expert=8, top_k=4, expert_ff=48, shexp_ff=32,
                   ff=96, vocab=1024, window=16, shard_bytes=2**20, swiglu=(1.5, 2.5),
                   fp8_block=32, rope_orig_ctx=64),
    "small": Preset(hidden=256, n_layer=12, n_dense=3, n_nextn=3, head_dim=64, n_head=4,
                    n_head_swa=6, n_kv=2, n_expert=16, top_k=6, expert_ff=128, shexp_ff=128,
                    ff=512, vocab=2048, window=32, shard_bytes=8 * 2**20, swiglu=(2.0, 4.0),
                    fp8_block=128, rope_orig_ctx=256),
    "wide": Preset(hidden=4096, n_layer=4, n_dense=1, n_nextn=3, head_dim=128, n_head=64,
                   n_head_swa=96, n_kv=8, n_expert=16, top_k=8, expert_ff=1280, shexp_ff=1280,
                   ff=11264, vocab=16384, window=512, shard_bytes=2 * 2**30, swiglu=(7.0, 16.0),
                   fp8_block=128, rope_orig_ctx=131072),
    # quantization quality: real byte proportions (routed experts ~96% of the weights), widths
    # K-quants accept, outlier input channels; small enough to score in seconds
    "quant": Preset(hidden=256, n_layer=8, n_dense=1, n_nextn=1, head_dim=64, n_head=4,
                    n_head_swa=8, n_kv=2, n_expert=128, top_k=8, expert_ff=256, shexp_ff=256,
                    ff=512, vocab=2048, window=64, shard_bytes=64 * 2**20, swiglu=(4.0, 8.0),
                    fp8_block=128, rope_orig_ctx=256, outliers=4, outlier_gain=12.0),
}
