"""The routed-expert cache (patch 0021) in a plan: device memory for slots holding the routed
experts a placement keeps in system memory, sized where it pays and left off where it cannot
(no GPU of its own, one memory pool, no experts in system memory, a link too slow for copies).

A byte of cache serves more reads than a byte of experts placed for good, because decoding
routes to recently used experts again: llama.cpp #27861 found LRU over 64 of 256 experts hit
67% of routed experts, where a fixed quarter of them serves a quarter. So the plan weighs
giving the VRAM of the last expert tensors it placed to the cache instead, and keeps the mix
that predicts the fastest decode."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable, Literal, Union

from ..core.errors import StepGGUFError
from ..core.gguf_names import is_routed
from ..core.model_facts import Tensor
from .result import Device, ExpertCache, Plan
from .speed import decode_tps

# hit rate = share ** LOCALITY, share = cache bytes over the experts in system memory
# (#27861: 0.25 ** 0.29 = 0.67); runs refine it (Locality.fitted)
LOCALITY = 0.29
# misses copied in: patch 0021 copies an expert once its recent uses pay for the copy, so a
# one-off expert stays on the CPU
ADMITTED = 0.25
# a cache predicting less than this speed-up is left off: the prediction is not that exact
MIN_GAIN = 1.02
# sizes tried between none and all the room there is
STEPS = 16

CacheRequest = Union[Literal["off", "auto"], int]   # an int: bytes


@dataclass(frozen=True)
class Locality:
    """How routing repeats itself: the hit rate a cache of a given share of the experts gets."""

    exponent: float = LOCALITY

    def hit_rate(self, share: float) -> float:
        return min(1.0, share) ** self.exponent if share > 0 else 0.0

    @classmethod
    def fitted(cls, runs: Iterable[tuple[float, float]]) -> Locality:
        """The curve through measured (share, hit rate) pairs: the mean of their exponents;
        the published one where no run measured a share and hit rate strictly inside (0, 1)."""
        exps = [math.log(h) / math.log(s) for s, h in runs if 0 < s < 1 and 0 < h < 1]
        return cls(sum(exps) / len(exps)) if exps else cls()


def with_cache(p: Plan, request: CacheRequest = "auto", locality: Locality = Locality()) -> Plan:
    """`p` with the expert cache `request` asks for: "off", "auto" (the size that predicts the
    fastest decode, none where none gains MIN_GAIN) or a size in bytes (one line when it does
    not fit or the plan has nothing to cache)."""
    if request == "off":
        return p
    why_not = _why_no_cache(p)
    if why_not:
        if request == "auto":
            return p
        raise StepGGUFError(f"--expert-cache {request}: {why_not}; leave it off")
    options = list(_options(p, request, locality))
    if not options and request == "auto":
        return p
    if not options:
        raise StepGGUFError(f"--expert-cache {request}: more than the GPU can free for it by "
                            "giving its experts back to system memory; give less")
    best = max(tps for tps, _, _ in options)
    tps, moved, size = min((o for o in options if o[0] >= best * 0.99), key=lambda o: o[2])
    if request == "auto" and tps < MIN_GAIN * p.predicted_decode_tps:
        return p
    return _cached(p, moved, size, locality)


def _why_no_cache(p: Plan) -> str | None:
    gpu = [d for d in p.devices if d.name == "GPU"]
    if not gpu or p.profile.unified:
        return "it needs a discrete GPU (one memory pool has nothing to copy)"
    if p.rpc:
        return "not with RPC hosts"
    if not any(is_routed(t.name) for d in p.devices if d.name == "CPU" for t in d.tensors):
        return "every routed expert is on the GPU already"
    return None


def _options(p: Plan, request: CacheRequest, locality: Locality):
    """(predicted decode tok/s, tensors moved, cache bytes) for each mix tried: the last k
    expert tensors placed on the GPU given back to system memory, and a cache in the room that
    makes. The placement's own time is computed once a mix, the cache's a size."""
    gpu, cpu = _gpu_cpu(p.devices)
    placed = [t for t in gpu.tensors if is_routed(t.name)]
    for k in sorted({round(i * len(placed) / STEPS) for i in range(STEPS + 1)}):
        moved = placed[len(placed) - k:] if k else []
        if sum(t.bytes for t in moved) > cpu.free:
            break
        room = gpu.free + sum(t.bytes for t in moved)
        devices = _moved(p.devices, moved)
        seconds = 1 / decode_tps(p.model, devices, p.kv_type, 0)
        # whole MiB: what patch 0021 is given, and the same for plans a few bytes apart
        sizes = [room * i // STEPS >> 20 << 20 for i in range(1, STEPS + 1)] if request == "auto" else [request]
        for size in sizes:
            if 0 < size <= room:
                yield 1 / (seconds - _saved(p, devices, size, locality)[0]), moved, size


def _gpu_cpu(devices: list[Device]) -> tuple[Device, Device]:
    return next(d for d in devices if d.name == "GPU"), next(d for d in devices if d.name == "CPU")


def _moved(devices: list[Device], moved: list[Tensor]) -> list[Device]:
    """`devices` with `moved` taken from the GPU to system memory (copies: the plan's stay)."""
    gone = {id(t) for t in moved}
    out = [replace(d, tensors=[t for t in d.tensors if id(t) not in gone], extra=dict(d.extra))
           for d in devices]
    _gpu_cpu(out)[1].tensors += moved
    return out


def _saved(p: Plan, devices: list[Device], size: int, locality: Locality) -> tuple[float, float, float]:
    """(seconds a token saves, share of the system-memory experts cached, hit rate) with a
    cache of `size` bytes beside `devices`: hits read the GPU instead of system memory, a share
    ADMITTED of the misses is copied over the link."""
    gpu, cpu = _gpu_cpu(devices)
    m = p.model
    in_ram = [t for t in cpu.tensors if is_routed(t.name)]
    share = size / sum(t.bytes for t in in_ram)
    hit = locality.hit_rate(share)
    read = sum(m.read_per_token(t) for t in in_ram if m.in_trunk(t))   # a token's expert bytes there
    saved = hit * read * (1 / cpu.bandwidth - 1 / gpu.bandwidth)
    return saved - (1 - hit) * read * ADMITTED / p.profile.link_bw, min(1.0, share), hit


def _cached(p: Plan, moved: list[Tensor], size: int, locality: Locality) -> Plan:
    devices = _moved(p.devices, moved)
    _gpu_cpu(devices)[0].extra["expert_cache"] = size
    saved, share, hit = _saved(p, devices, size, locality)
    fast, full = (1 / (1 / decode_tps(p.model, devices, p.kv_type, pos) - saved) for pos in (0, p.ctx))
    cache = ExpertCache(size, share, hit, len(moved), fast / p.predicted_decode_tps)
    note = (f"expert cache: {size / 2**30:.2f} GiB on the GPU for the experts in system memory "
            f"({share:.0%} of them; predicted hit rate {hit:.0%}"
            + (f", in place of {len(moved)} expert tensor(s)" if moved else "")
            + f"): decode {cache.speedup:.2f}x")
    return replace(p, devices=devices, cpu_tensors=p.cpu_tensors + [t.name for t in moved],
                   predicted_decode_tps=fast, predicted_decode_tps_full=full,
                   notes=[*p.notes, note], expert_cache=cache)
