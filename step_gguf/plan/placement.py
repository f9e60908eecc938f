"""Placement: everything that runs for every token on the GPU first (attention, norms, router,
shared experts, dense layers, output, the MTP heads, the KV cache and both contexts' compute
buffers), then as many routed-expert tensors as fit, tensor by tensor; RPC hosts take whole
layers, only those this machine cannot hold."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..core.errors import StepGGUFError
from ..core.gguf_names import is_routed, mtp_required
from ..core.model_facts import ModelFacts, Tensor
from .machines import GiB, Profile, RpcHost, sized_for, usable
from .memory import (KV_TYPES, KvType, checkpoint_bytes, compute_buffer, input_buffer, kv_bytes, mask_bytes,
                     vision_bytes)
from .expert_cache import CacheRequest, Locality, with_cache
from .result import Device, Plan
from .speed import CPU_EFFICIENCY, decode_tps, prompt_tps


# quantized KV when f16 would take more than this share of the usable VRAM
KV_SHARE = 1 / 6


def plan(m: ModelFacts, profile: Profile, ctx: int, *, kv_type: KvType | None = None,
         mtp: bool = True, parallel: int = 1, n_ubatch: int = 512, checkpoints: int = 8,
         rpc: tuple[RpcHost, ...] = (), expert_cache: CacheRequest = "auto",
         locality: Locality = Locality(), prompt_cache: int | None = None) -> Plan:
    """Place `m` on `profile` for a context of `ctx` tokens; raises when it cannot fit.

    Without `kv_type` the cache is f16, or q8_0 where f16 would take more than KV_SHARE of a
    discrete GPU or would not fit at all. `rpc` hosts take whole layers, only what this machine
    cannot hold. `expert_cache` ("off", "auto" or bytes) gives GPU memory to patch 0021's cache
    of the routed experts left in system memory, predicted with `locality`. `prompt_cache`
    (MiB, 0: off) fixes llama-server's cache of earlier prompts instead of the plan's size.
    """
    p = with_cache(_plan(m, profile, ctx, kv_type=kv_type, mtp=mtp, parallel=parallel,
                         n_ubatch=n_ubatch, checkpoints=checkpoints, rpc=rpc), expert_cache, locality)
    return replace(p, prompt_cache_cap=prompt_cache)


def _plan(m: ModelFacts, profile: Profile, ctx: int, *, kv_type: KvType | None, mtp: bool,
          parallel: int, n_ubatch: int, checkpoints: int, rpc: tuple[RpcHost, ...]) -> Plan:
    if ctx < 1 or parallel < 1 or n_ubatch < 1 or checkpoints < 0:
        raise StepGGUFError("--ctx, --parallel and the batch size must be at least 1")
    if kv_type is not None and kv_type not in KV_TYPES:
        raise StepGGUFError(f"unknown KV type {kv_type!r}; choose one of {', '.join(KV_TYPES)}")
    mtp = mtp and any(m.kind(t) == "mtp" for t in m.tensors)
    if ctx > m.n_ctx_train:  # llama-server would cap it the same way
        capped = _plan(m, profile, m.n_ctx_train, kv_type=kv_type, mtp=mtp, parallel=parallel,
                       n_ubatch=n_ubatch, checkpoints=checkpoints, rpc=rpc)
        return replace(capped, notes=[f"context capped at the model's {m.n_ctx_train} tokens",
                                      *capped.notes])
    setup = _Setup(m, profile, ctx, "f16", mtp, parallel, n_ubatch, checkpoints, tuple(rpc))
    if kv_type is not None:
        return _place(replace(setup, kv_type=kv_type), [])
    gpu_cap, _ = usable(profile)
    if profile.has_gpu and not profile.unified and \
            kv_bytes(m, range(m.n_layer), ctx, "f16", n_ubatch, parallel) > KV_SHARE * gpu_cap:
        return _place(replace(setup, kv_type="q8_0"),
                      [f"KV cache in q8_0: in f16 it would take over {KV_SHARE:.0%} of the "
                       "GPU's memory"])
    try:
        return _place(setup, [])
    except StepGGUFError:
        return _place(replace(setup, kv_type="q8_0"),
                      ["KV cache in q8_0: in f16 the model and cache do not fit"])


def longest(m: ModelFacts, profile: Profile, *, floor: int = 4096, **kw) -> Plan:
    """The plan with the longest context that fits `profile` (KV type and llama-server's
    checkpoints included), up to the model's own, in steps of 256 (llama.cpp's cache padding);
    `kw` as for plan(). Raises as plan() does when not even `floor` tokens fit."""
    step = 256
    try:
        return plan(m, profile, m.n_ctx_train, **kw)
    except StepGGUFError:
        pass
    lo = min(floor, m.n_ctx_train)
    best = plan(m, profile, lo, **kw)
    fits, fails = lo // step, m.n_ctx_train // step  # memory grows with the context
    while fails - fits > 1:
        mid = (fits + fails) // 2
        try:
            best, fits = plan(m, profile, mid * step, **kw), mid
        except StepGGUFError:
            fails = mid
    return best


# serve's default: as many slots as fit, up to MAX_SLOTS, while each keeps SLOT_CTX (an agent's
# prompt and tools alone take 10-20K). Idle slots cost only their cache; busy ones decode in
# one batch, where a step of 4 tokens costs ~1.3 steps of one on our AVX-512 kernels and ~2.7
# on plain AVX2 (bench/kernels.py): 3x and 1.5x the rate of one user.
MAX_SLOTS = 4
SLOT_CTX = 65536


def serving(m: ModelFacts, profile: Profile, ctx: int | None = None, parallel: int | None = None,
            **kw) -> Plan:
    """The plan a server runs: `parallel` slots of `ctx` tokens each. Without `ctx`, the longest
    context that fits; without `parallel`, the most slots, up to MAX_SLOTS, that fit and (when
    the context is chosen) still leave every slot SLOT_CTX, or the model's own when shorter;
    one slot when two do not; on the machine the file was sized for (`quantize --for`), the
    context and slots it was sized for. `kw` as for plan()."""
    def at(n: int) -> Plan:
        return plan(m, profile, ctx, parallel=n, **kw) if ctx else longest(m, profile, parallel=n, **kw)

    made = sized_for(m.made_for, profile)
    if ctx is None and made is not None and parallel in (None, made.parallel):
        try:
            p = plan(m, profile, made.ctx, parallel=made.parallel, **kw)
            return replace(p, notes=[f"context: the {made.ctx} tokens this file was sized for "
                                     "(quantize --for)", *p.notes])
        except StepGGUFError:
            pass  # the machine has less free memory than when it was sized: the longest that fits

    if parallel is not None:
        return at(parallel)
    for n in (MAX_SLOTS, 2):
        try:
            p = at(n)
        except StepGGUFError:
            continue
        if ctx or p.ctx >= min(SLOT_CTX, m.n_ctx_train):
            return p
    return at(1)


@dataclass(frozen=True)
class _Setup:
    m: ModelFacts
    profile: Profile
    ctx: int
    kv_type: KvType
    mtp: bool
    parallel: int
    n_ubatch: int
    checkpoints: int
    rpc: tuple[RpcHost, ...]

    @property
    def n_all(self) -> int:
        return self.m.n_layer + self.m.n_nextn

    def used(self, t: Tensor) -> bool:
        """Whether llama.cpp loads `t`: without drafting it skips the MTP blocks' required
        tensors (input projection, norms, attention) but still loads their optional ones,
        the routed and shared experts among them (src/models/step35.cpp). A separate draft
        file is loaded whole, and only to draft."""
        if t.draft:
            return self.mtp
        return self.mtp or self.m.kind(t) != "mtp" or not mtp_required(t.name)

    def on_cpu(self, t: Tensor) -> bool:
        """Tensors that stay in system memory whatever the GPU holds: the input layer (llama.cpp
        keeps it on the CPU, in the draft model too) and a draft's copy of the output matrix
        that no head reads (-otd keeps it there, mapped and never touched)."""
        if self.m.kind(t) == "embeddings":
            return True
        return t.draft and t.layer is None and (
            t.name.startswith("token_embd.") or (t.name == "output.weight" and self.m.heads_have_lm_head()))

    def kv(self, layers: range) -> int:
        """Cache bytes of `layers` (trunk and, with drafting, MTP heads)."""
        n_layer = self.m.n_layer
        if not self.mtp:
            layers = range(layers.start, min(layers.stop, n_layer))
        return kv_bytes(self.m, layers, self.ctx, self.kv_type, self.n_ubatch, self.parallel)


class _NoFit(StepGGUFError):
    def __init__(self, needed: int, room: int):
        self.needed, self.room = needed, room
        super().__init__(f"needs {_gib(needed)}, has {_gib(room)}")


def _place(s: _Setup, notes: list[str]) -> Plan:
    """This machine alone when it can hold the model; otherwise the RPC hosts take whole
    layers, as few as possible. llama.cpp orders the layers CPU, RPC hosts, GPU: a CPU machine
    keeps the first layers and the hosts the last; with a GPU the hosts take the first."""
    try:
        local: list[str] = []  # what this machine alone says, kept only if it holds the model
        devices, rest, gpu_used = _local(s, 0, s.n_all, True, local)
        notes += local
        if s.rpc:
            notes.append("the model fits this machine: the RPC hosts are left unused (each "
                         "would cost a network round trip per token)")
        return _finish(s, devices, rest, [], notes,
                       gpu_layers=s.n_all + 1 if gpu_used else 0, split=[])
    except _NoFit as exc:
        if not s.rpc:
            raise _refusal(s, exc.needed, exc.room) from None
        needed, room = exc.needed, exc.room
    room += sum(h.capacity for h in s.rpc)
    if s.profile.has_gpu:  # hosts take layers [0, k); the GPU plan runs the rest
        for k in range(1, s.n_all + 1):
            hosts = _fill_hosts(s, range(0, k), output=False)
            if hosts is None:
                break
            try:
                devices, rest, gpu_used = _local(s, k, s.n_all, True, [])
            except _NoFit:
                continue
            if gpu_used:
                counts = [len(h.kv_layers) for h in hosts]
                return _finish(s, devices, rest, hosts, notes, gpu_layers=s.n_all + 1,
                               split=counts + [s.n_all + 1 - k])
    else:  # this machine keeps layers [0, k); the hosts take the rest and the output
        for k in range(s.n_all, -1, -1):
            try:
                devices, rest, _ = _local(s, 0, k, False, [])
            except _NoFit:
                continue
            hosts = _fill_hosts(s, range(k, s.n_all), output=True)
            if hosts is not None:
                counts = [len(h.kv_layers) + h.output for h in hosts]
                return _finish(s, devices, rest, hosts, notes, gpu_layers=s.n_all + 1 - k,
                               split=counts)
            break  # keeping fewer layers here only gives the hosts more
    raise _refusal(s, needed, room, f" with {len(s.rpc)} RPC host(s)")


def _refusal(s: _Setup, needed: int, room: int, where: str = "") -> StepGGUFError:
    return StepGGUFError(
        f"{s.m.name} does not fit {s.profile.name}{where}: it needs {_gib(needed)} (weights, "
        f"{s.kv_type} KV cache and buffers at ctx {s.ctx}) but there is {_gib(room)} usable; "
        "use a smaller scheme or context, or a larger machine")


def _buffers(s: _Setup, layers: range, heads: range) -> dict[str, int]:
    """What the machine running trunk `layers` and drafting with MTP `heads` holds beside
    weights: the KV caches and compute graphs, and the image encoder's when there is one."""
    out = {"kv": s.kv(layers), "compute": compute_buffer(s.m, s.ctx, s.n_ubatch)}
    if s.m.vision is not None:  # mtmd encodes images on this machine: on its GPU when one is used
        out["vision"] = vision_bytes(s.m.vision)
    if heads:  # the draft context: its heads' cache and its own graph
        out["kv_mtp"] = s.kv(heads)
        out["compute_mtp"] = compute_buffer(s.m, s.ctx, s.n_ubatch)
    return out


def _local(s: _Setup, lo: int, hi: int, output: bool,
           notes: list[str]) -> tuple[list[Device], list[Tensor], bool]:
    """Layers [lo, hi) (and the output layer when `output`) on this machine: (devices,
    experts overridden to the CPU, whether a GPU is used). Raises _NoFit."""
    m, profile = s.m, s.profile
    gpu_cap, ram_cap = usable(profile)

    def here(t: Tensor) -> bool:
        if t.layer is not None:
            return lo <= t.layer < hi
        return output or m.kind(t) != "output"  # embeddings and shared tables stay here

    used = [t for t in m.tensors if s.used(t) and here(t)]
    heads = range(max(lo, m.n_layer), hi)
    drafting = s.mtp and bool(heads)
    buffers = _buffers(s, range(lo, min(hi, m.n_layer)), heads if drafting else range(0))
    embd = [t for t in used if s.on_cpu(t)]
    # MTP experts before the trunk's: a draft step runs one head alone, so a head in system
    # memory pays a GPU->CPU round trip for every drafted token
    heads_experts = [t for t in used if is_routed(t.name) and m.kind(t) == "mtp"]
    trunk_experts = [t for t in used if m.kind(t) == "experts"]
    experts = heads_experts + trunk_experts if s.mtp else trunk_experts + heads_experts
    first = [t for t in used if t not in embd and t not in experts]
    ckpt = checkpoint_bytes(m, s.kv_type, s.n_ubatch) * s.checkpoints * s.parallel
    cpu = Device("CPU", ram_cap, profile.mem_bw * CPU_EFFICIENCY, list(embd),
                 {"context_checkpoints": ckpt})
    layers = set(range(lo, hi))
    gpu = None
    if profile.has_gpu:
        gpu = Device("GPU", min(gpu_cap, ram_cap) if profile.unified else gpu_cap,
                     profile.gpu_bw * profile.gpu_efficiency, list(first), dict(buffers), layers)
        if gpu.free < 0:
            notes.append(f"the GPU cannot hold the non-expert weights, KV cache and buffers "
                         f"({_gib(gpu.bytes)} > {_gib(gpu.capacity)}): everything runs on the CPU")
            gpu = None
    rest: list[Tensor] = []
    if gpu is None:
        cpu.tensors, devices = list(used), [cpu]
        cpu.extra.update(buffers)
        cpu.kv_layers = layers
    else:
        for t in experts:
            room = gpu.free
            if profile.unified:  # one pool: what the CPU holds is gone for the GPU too
                room = min(room, ram_cap - gpu.bytes - cpu.bytes)
            (gpu.tensors if t.bytes <= room else rest).append(t)
        cpu.tensors += rest
        cpu.extra["compute_host"] = input_buffer(m, s.ctx, s.n_ubatch)  # the graph's inputs
        if drafting:  # the heads take the trunk's hidden state on the device: masks only
            cpu.extra["compute_host_mtp"] = mask_bytes(m, s.ctx, s.n_ubatch)
        if profile.unified:
            cpu.capacity = ram_cap - gpu.bytes
        devices = [gpu, cpu]
    if cpu.bytes > cpu.capacity:
        room = gpu_cap + ram_cap if gpu is not None and not profile.unified else ram_cap
        raise _NoFit(sum(d.bytes for d in devices), room)
    return devices, rest, gpu is not None


def _fill_hosts(s: _Setup, layers: range, output: bool) -> list[Device] | None:
    """The RPC hosts holding `layers` in order (and then the output layer), each filled
    before the next; None when they cannot hold them all."""
    m = s.m
    hosts = [Device(f"RPC{i}", h.capacity, h.bandwidth * CPU_EFFICIENCY, endpoint=h.endpoint,
                    link_bw=h.link_bw)
             for i, h in enumerate(s.rpc)]
    items: list[tuple[int | None, list[Tensor]]] = [
        (i, [t for t in m.tensors if t.layer == i and s.used(t)]) for i in layers]
    if output:
        items.append((None, [t for t in m.tensors if t.layer is None and m.kind(t) == "output"]))
    j = 0
    for layer, tensors in items:
        while True:
            if j == len(hosts):
                return None
            h = hosts[j]
            add = {"compute": compute_buffer(m, s.ctx, s.n_ubatch)} if not h.extra else {}
            if layer is not None:
                add["kv"] = s.kv(range(layer, layer + 1))
                if layer >= m.n_layer and s.mtp and "compute_mtp" not in h.extra:
                    add["compute_mtp"] = compute_buffer(m, s.ctx, s.n_ubatch)
            if sum(t.bytes for t in tensors) + sum(add.values()) <= h.free:
                break
            j += 1
        h.tensors += tensors
        for k, v in add.items():
            h.extra[k] = h.extra.get(k, 0) + v
        if layer is None:
            h.output = True
        else:
            h.kv_layers.add(layer)
    return hosts


def _finish(s: _Setup, devices: list[Device], rest: list[Tensor], hosts: list[Device],
            notes: list[str], *, gpu_layers: int, split: list[int]) -> Plan:
    gpu_used = any(d.name == "GPU" for d in devices)
    if hosts and s.mtp and any(t.layer is not None and t.layer >= s.m.n_layer
                               for h in hosts for t in h.tensors):
        notes.append("the MTP heads sit on an RPC host: each drafted token crosses the network")
    devices = devices + [h for h in hosts if h.tensors]
    return Plan(s.m, s.profile, s.ctx, s.kv_type, max(s.n_ubatch, 2048) if gpu_used else s.n_ubatch,
                s.n_ubatch, s.parallel, s.checkpoints, s.mtp, devices, gpu_layers,
                [t.name for t in rest],
                *(decode_tps(s.m, devices, s.kv_type, pos) for pos in (0, s.ctx)),
                prompt_tps(s.m, devices, s.profile, s.n_ubatch), notes,
                [h.endpoint for h in hosts] if hosts else [], split if hosts else [])


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"
