"""The speed model of a placement: decode is bound by the bytes each device reads per token
(plus synchronisation and network hops), prompt processing by the matmul rate of the device
doing it (plus the copies of system-memory experts to a GPU)."""

from __future__ import annotations

from ..core.gguf_names import is_routed
from ..core.model_facts import ModelFacts
from .machines import Profile
from .memory import KvType, kv_read
from .result import Device


# share of the read bandwidth a CPU decode step reaches: llama.cpp decoded `wide` int4-mixed
# at 88% of probe.read_bandwidth() here (bench/decode.py)
CPU_EFFICIENCY = 0.85


# a CPU-only decode step also pays thread synchronisation on every op of every layer
CPU_LAYER_S = 50e-6


# a layer whose experts sit in system RAM while the rest is on the GPU costs two small copies
# and a synchronisation per token
SPLIT_LAYER_S = 40e-6


# an RPC host costs each token a few messages (inputs, graph, outputs): ~3 LAN round trips
RPC_ROUND_TRIP_S = 300e-6


def decode_tps(m: ModelFacts, devices: list[Device], kv_type: KvType, pos: int) -> float:
    """Tokens/s of plain decoding at position `pos`: bytes read on each device over its rate,
    the synchronisation of CPU-computed layers, and the network hops to RPC hosts."""
    seconds = 0.0
    gpu = any(d.name == "GPU" for d in devices)
    for d in devices:
        read = sum(m.read_per_token(t) for t in d.tensors if m.in_trunk(t))
        seconds += (read + kv_read(m, pos, kv_type, d.kv_layers)) / d.bandwidth
        if d.endpoint is not None:
            moved = 2 * 4 * m.n_embd + 4 * m.n_vocab * d.output
            seconds += RPC_ROUND_TRIP_S + moved / d.link_bw
        if d.endpoint is not None or (d.name == "CPU" and not gpu):
            seconds += CPU_LAYER_S * sum(1 for i in d.kv_layers if i < m.n_layer)
    if gpu:
        split = {t.layer for d in devices if d.name == "CPU" for t in d.tensors
                 if m.kind(t) == "experts"}
        seconds += SPLIT_LAYER_S * len(split)
    return 1 / seconds if seconds else 0.0


def prompt_tps(m: ModelFacts, devices: list[Device], profile: Profile, n_ubatch: int) -> float:
    """Tokens/s of prompt processing: compute-bound on the device doing the matmuls (RPC hosts
    are taken as CPUs like this one); with a GPU, llama.cpp also copies system-memory experts
    to it once per micro-batch."""
    def flops(ds) -> float:
        return 2 * sum(m.active_params(t) for d in ds for t in d.tensors if m.in_trunk(t))

    local = [d for d in devices if d.endpoint is None]
    seconds = flops([d for d in devices if d.endpoint is not None]) / profile.cpu_flops
    if any(d.name == "GPU" for d in local):
        seconds += flops(local) / profile.gpu_flops
        if not profile.unified:
            seconds += sum(t.bytes for d in local if d.name == "CPU" for t in d.tensors
                           if is_routed(t.name)) / (profile.link_bw * n_ubatch)
    else:
        seconds += flops(local) / profile.cpu_flops
    return 1 / seconds if seconds else 0.0
