"""Where each tensor of a Step 3.5 GGUF lives on a given machine, and how fast it will run.

Pure arithmetic over tensor sizes and a machine profile: this module imports no runtime. The
placement puts everything that runs for every token on the GPU first (attention, norms,
router, shared experts, dense layers, output, the MTP heads, the KV cache and both contexts'
compute buffers), then as many routed-expert tensors as fit, tensor by tensor. Decode speed
comes from a bandwidth model: each token reads the non-expert weights and top_k/n_expert of
every expert tensor, from wherever they live.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import SourceError, StepGGUFError, malformed
from .recipe import layer_of_gguf


GiB = 1 << 30
GB = 1e9

# ----------------------------------------------------------------------------- machines


@dataclass(frozen=True)
class Profile:
    name: str
    what: str
    ram: int                # bytes of system memory (unified: the whole pool)
    mem_bw: float           # bytes/s the CPU reads system memory at
    vram: int = 0           # bytes the GPU may use (0: no GPU)
    gpu_bw: float = 0.0     # bytes/s the GPU reads its memory at
    unified: bool = False   # GPU memory is part of `ram` (DGX Spark, Apple)
    link_bw: float = 25 * GB    # host->GPU copies (PCIe 4.0 x16); prompt batches stream CPU experts
    gpu_flops: float = 0.0      # dense f16 matmul rate llama.cpp reaches, FLOP/s
    gpu_efficiency: float = 0.65  # share of gpu_bw a decode step reaches (DGX Spark: ~20 tok/s reported)
    cpu_flops: float = 0.5e12   # quantized matmul rate of the CPU, FLOP/s

    @property
    def has_gpu(self) -> bool:
        return self.vram > 0


PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("gpu-12gb", "12 GB GPU (RTX 4070 class), 64 GB dual-channel DDR5",
            ram=64 * GiB, mem_bw=70 * GB, vram=12 * GiB, gpu_bw=504 * GB, gpu_flops=30e12),
    Profile("gpu-16gb", "16 GB GPU (RTX 4070 Ti Super class), 96 GB dual-channel DDR5",
            ram=96 * GiB, mem_bw=70 * GB, vram=16 * GiB, gpu_bw=672 * GB, gpu_flops=45e12),
    Profile("gpu-24gb", "24 GB GPU (RTX 4090 class), 128 GB dual-channel DDR5",
            ram=128 * GiB, mem_bw=75 * GB, vram=24 * GiB, gpu_bw=1008 * GB, gpu_flops=80e12),
    Profile("gpu-32gb", "32 GB GPU (RTX 5090 class), 128 GB dual-channel DDR5",
            ram=128 * GiB, mem_bw=80 * GB, vram=32 * GiB, gpu_bw=1792 * GB, gpu_flops=105e12,
            link_bw=50 * GB),
    Profile("dgx-spark", "NVIDIA DGX Spark: 128 GB unified LPDDR5x",
            ram=128 * GiB, mem_bw=273 * GB, vram=128 * GiB, gpu_bw=273 * GB, unified=True,
            gpu_flops=50e12, cpu_flops=1e12),
    Profile("apple-128gb", "Apple silicon Ultra, 128 GB unified memory (GPU may wire 75%)",
            ram=128 * GiB, mem_bw=400 * GB, vram=96 * GiB, gpu_bw=800 * GB, unified=True,
            gpu_flops=20e12, cpu_flops=1e12, gpu_efficiency=0.35),  # M1 Ultra: ~36 tok/s reported
    Profile("cpu", "CPU only, 128 GB DDR5 (no GPU)", ram=128 * GiB, mem_bw=75 * GB),
)}
CUSTOM = "custom"

# what the plan keeps free: the CUDA context and allocator slack on a GPU, the OS and page
# cache for the running program in system memory
GPU_RESERVE = 512 << 20
GPU_MARGIN = 0.05
RAM_RESERVE = 4 * GiB
RAM_MARGIN = 0.05
# share of the read bandwidth a CPU decode step reaches: llama.cpp decoded `wide` int4-mixed
# at 88% of probe.read_bandwidth() here (bench/decode.py)
CPU_EFFICIENCY = 0.85
# a CPU-only decode step also pays thread synchronisation on every op of every layer
CPU_LAYER_S = 50e-6
# a layer whose experts sit in system RAM while the rest is on the GPU costs two small copies
# and a synchronisation per token
SPLIT_LAYER_S = 40e-6
# quantized KV when f16 would take more than this share of the usable VRAM
KV_SHARE = 1 / 6
# an RPC host costs each token a few messages (inputs, graph, outputs): ~3 LAN round trips
RPC_ROUND_TRIP_S = 300e-6


@dataclass(frozen=True)
class RpcHost:
    """A ggml-rpc-server the plan may give whole layers to (`--rpc`)."""

    endpoint: str               # host:port
    memory: int                 # bytes its device reports free
    bandwidth: float            # bytes/s its backend reads memory at
    link_bw: float = 117e6      # bytes/s of the network to it (gigabit Ethernet)

    @property
    def capacity(self) -> int:
        """Bytes the plan may fill there, kept as system memory is."""
        return _usable_memory(self.memory, RAM_MARGIN, RAM_RESERVE)


def machine(profile: str = CUSTOM, *, vram_gb: float | None = None, ram_gb: float | None = None,
            mem_bw_gbs: float | None = None, gpu_bw_gbs: float | None = None) -> Profile:
    """A named profile, with any of its figures replaced (GB and GB/s are 10^9 units;
    capacities are taken as GiB, as vendors sell them)."""
    if profile == CUSTOM:
        if ram_gb is None or mem_bw_gbs is None:
            raise StepGGUFError("the custom profile needs --ram and --mem-bw (and --vram and "
                                "--gpu-bw for a GPU)")
        if bool(vram_gb) != bool(gpu_bw_gbs):
            raise StepGGUFError("give --vram and --gpu-bw together for a GPU")
        base = Profile(CUSTOM, "custom machine", ram=0, mem_bw=0)
    elif profile in PROFILES:
        base = PROFILES[profile]
    else:
        raise StepGGUFError(f"unknown profile {profile!r}; choose one of "
                            f"{', '.join([*PROFILES, CUSTOM])}")
    changes: dict = {}
    for key, value, unit in (("vram", vram_gb, GiB), ("ram", ram_gb, GiB),
                             ("mem_bw", mem_bw_gbs, GB), ("gpu_bw", gpu_bw_gbs, GB)):
        if value is not None:
            if not (value >= 0 and math.isfinite(value)):
                raise StepGGUFError(f"--{key.replace('_', '-')} must be a non-negative number")
            changes[key] = int(value * unit) if unit == GiB else value * unit
    out = replace(base, **changes)
    if out.vram and not out.gpu_flops:
        out = replace(out, gpu_flops=out.gpu_bw * 60)  # typical FLOP:byte balance of consumer GPUs
    if out.ram <= 0 or out.mem_bw <= 0:
        raise StepGGUFError("the machine needs positive --ram and --mem-bw")
    return out


# ----------------------------------------------------------------------------- the model

KV_TYPES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32,
            "q5_0": 22 / 32, "q4_1": 20 / 32, "q4_0": 18 / 32}

_EXPERTS = re.compile(r"^blk\.\d+\.ffn_(gate|up|down)_exps\.")
_MTP_SKIPPED = re.compile(r"\.(nextn\.(eh_proj|enorm|hnorm)|attn_(norm|q|k|v|qkv|output)|ffn_norm)\.weight$")


@dataclass(frozen=True)
class Tensor:
    name: str
    bytes: int
    n_params: int
    draft: bool = False     # from a separate draft GGUF (llama.cpp loads it as a second model)

    @property
    def layer(self) -> int | None:
        return layer_of_gguf(self.name)


@dataclass(frozen=True)
class ModelFacts:
    """What placement needs to know about a model, from a GGUF header or a config + recipe."""

    name: str
    n_layer: int                    # trunk
    n_nextn: int                    # MTP blocks after the trunk
    is_swa: tuple[bool, ...]        # per layer, trunk + MTP
    n_head_kv: tuple[int, ...]
    head_dim: int
    window: int
    n_vocab: int
    n_embd: int
    n_expert: int
    n_expert_used: int
    expert_ff: int
    max_heads: int
    n_ctx_train: int
    tensors: tuple[Tensor, ...]
    draft: str | None = None        # the separate draft GGUF whose tensors are among `tensors`

    def kind(self, t: Tensor) -> str:
        """The class a tensor is reported and placed under."""
        layer = t.layer
        if layer is not None and layer >= self.n_layer:
            return "mtp"
        if t.draft:  # the draft file's own embeddings, output and norms, loaded a second time
            return "draft_shared"
        if _EXPERTS.match(t.name):
            return "experts"
        if t.name.startswith("token_embd"):
            return "embeddings"
        if t.name.startswith("output"):
            return "output"
        if "_shexp" in t.name:
            return "shared"
        if "attn" in t.name:
            return "attention"
        if "ffn_gate_inp" in t.name or "exp_probs" in t.name:
            return "router"
        if "norm" in t.name:
            return "norms"
        return "dense"

    def read_per_token(self, t: Tensor) -> float:
        """Bytes one decoded token reads of `t`."""
        if t.name.startswith("token_embd"):
            return t.bytes / self.n_vocab
        if _EXPERTS.match(t.name):
            return t.bytes * self.n_expert_used / self.n_expert
        return t.bytes

    def active_params(self, t: Tensor) -> float:
        return self.read_per_token(t) / t.bytes * t.n_params if t.bytes else 0.0

    def in_trunk(self, t: Tensor) -> bool:
        """Whether a plain decoding step (no drafting) reads `t`."""
        return not t.draft and (t.layer is None or t.layer < self.n_layer)

    def heads_have_lm_head(self) -> bool:
        """Whether every MTP head has its own LM head (nextn.shared_head_head): the output
        matrix then serves the trunk alone, and a draft file's copy of it is never read."""
        names = {t.name for t in self.tensors}
        return all(f"blk.{i}.nextn.shared_head_head.weight" in names
                   for i in range(self.n_layer, self.n_layer + self.n_nextn))


def facts(src: str | os.PathLike, scheme: str | None = None,
          draft: str | os.PathLike | None = None) -> ModelFacts:
    """Sizes and shapes of a GGUF as it is, or of a checkpoint folder / config.json under a
    quantization scheme (default int4-mixed), priced by the quantizer's dry run. `draft`: a
    separate MTP draft GGUF for the GGUF `src` (checked against it), loaded beside it."""
    from .quantize import open_source  # noqa: PLC0415 (headers only, no runtime)
    from .recipe import load_recipe  # noqa: PLC0415

    src = Path(src)
    if src.is_file() and src.suffix != ".json":
        if scheme:
            raise StepGGUFError(f"{src} is already a GGUF; --scheme prices a checkpoint or config")
        if draft is not None:
            from .draft import check  # noqa: PLC0415

            check(src, draft)
            with malformed(draft, SourceError, "is not a readable GGUF"):
                d = _gguf_facts(Path(draft))
        with malformed(src, SourceError, "is not a readable GGUF"):
            m = _gguf_facts(src)
        return m if draft is None else _with_draft(m, d, draft)
    if draft is not None:
        raise StepGGUFError(f"--draft goes with a GGUF model; {src} is a checkpoint or config, "
                            "planned with its own MTP heads")
    source = open_source(src, load_recipe(scheme or "int4-mixed"))
    cfg = source.cfg
    tensors = tuple(Tensor(p.name, p.nbytes, p.n_params) for p in source.plans)
    return ModelFacts(src.name, cfg.n_layer, cfg.n_nextn, cfg.is_swa, cfg.n_head_kv, cfg.head_dim,
                      cfg.sliding_window, cfg.vocab_size, cfg.hidden_size, cfg.n_expert,
                      cfg.n_expert_used, cfg.expert_ff, max(cfg.n_head), cfg.context_length,
                      tensors)


def _gguf_facts(path: Path) -> ModelFacts:
    """Facts of a GGUF: one file, or the whole set from any shard's path (named by the first
    shard, the file llama.cpp loads)."""
    from .gguf_source import open_gguf  # noqa: PLC0415

    reader = open_gguf(path)
    kv = reader.kv
    path = reader.path
    n_all = int(kv("block_count"))
    n_nextn = int(kv("nextn_predict_layers", 0))

    def per_layer(value) -> tuple:
        values = tuple(value) if isinstance(value, list) else (value,) * n_all
        if len(values) < n_all:
            raise SourceError(f"{path} has a per-layer array shorter than block_count {n_all}")
        return values[:n_all]

    def largest(value) -> int:  # a scalar, or llama.cpp's per-layer array form of the key
        return max(int(x) for x in per_layer(value))

    tensors = tuple(Tensor(t.name, int(t.n_bytes), int(t.n_elements)) for t in reader.tensors)
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise SourceError(f"{path} has no token_embd.weight")
    # head counts may be scalars or per-layer arrays; like llama.cpp's loader, the KV heads
    # default to the heads and the head size to embedding_length / the first layer's heads
    n_embd = int(kv("embedding_length"))
    n_head = tuple(int(x) for x in per_layer(kv("attention.head_count")))
    n_head_kv = tuple(int(x) for x in per_layer(kv("attention.head_count_kv", list(n_head))))
    head_dim = int(kv("attention.key_length", n_embd // n_head[0] if n_head[0] else 0))
    return ModelFacts(
        path.name, n_all - n_nextn, n_nextn,
        tuple(bool(x) for x in per_layer(kv("attention.sliding_window_pattern", [False] * n_all))),
        n_head_kv, head_dim, int(kv("attention.sliding_window", 0)),
        int(embd.shape[1]), n_embd, int(kv("expert_count", 1)),
        largest(kv("expert_used_count", 1)), largest(kv("expert_feed_forward_length", 0)),
        max(n_head), int(kv("context_length")), tensors)


def _with_draft(m: ModelFacts, d: ModelFacts, path: str | os.PathLike) -> ModelFacts:
    """The trunk `m` drafting with the heads of the separate draft `d`. llama.cpp loads the
    draft file as a second model, every tensor of it: its copies of the embeddings, output
    norm, output and RoPE factors come on top of the trunk's, as class draft_shared."""
    from .gguf_source import first_shard  # noqa: PLC0415

    heads = slice(m.n_layer, m.n_layer + d.n_nextn)
    return replace(m, n_nextn=d.n_nextn, is_swa=m.is_swa[:m.n_layer] + d.is_swa[heads],
                   n_head_kv=m.n_head_kv[:m.n_layer] + d.n_head_kv[heads],
                   max_heads=max(m.max_heads, d.max_heads),
                   tensors=m.tensors + tuple(replace(t, draft=True) for t in d.tensors),
                   draft=str(first_shard(path)))


# ----------------------------------------------------------------------------- memory


def pad256(n: int) -> int:
    return -(-n // 256) * 256


def kv_positions(m: ModelFacts, layer: int, ctx: int, n_ubatch: int, n_seq: int = 1) -> int:
    """Cache cells llama.cpp allocates for `layer` (window-sized sliding cache, unified KV:
    src/llama-kv-cache-iswa.cpp)."""
    if m.is_swa[layer] and m.window:
        return pad256(min(ctx, m.window * n_seq + n_ubatch))
    return pad256(ctx)


def _position_bytes(m: ModelFacts, layer: int, kv_type: str) -> float:
    """K and V of one cached position of `layer`."""
    return m.n_head_kv[layer] * m.head_dim * 2 * KV_TYPES[kv_type]


def kv_bytes(m: ModelFacts, layers: range, ctx: int, kv_type: str, n_ubatch: int,
             n_seq: int = 1) -> int:
    return int(sum(kv_positions(m, i, ctx, n_ubatch, n_seq) * _position_bytes(m, i, kv_type)
                   for i in layers))


def compute_buffer(m: ModelFacts, n_ubatch: int) -> int:
    """Scratch of one context's graph at `n_ubatch` tokens with flash attention: the f32
    logits dominate, then the experts' gate/up activations, queries and residual copies."""
    per_token = m.n_vocab + 2 * m.n_expert_used * m.expert_ff + 3 * m.max_heads * m.head_dim \
        + 8 * m.n_embd
    return 4 * n_ubatch * per_token


def checkpoint_bytes(m: ModelFacts, kv_type: str, n_ubatch: int) -> int:
    """One llama-server context checkpoint: the sliding layers' cache of one sequence, at most
    a window plus a micro-batch of positions."""
    return int(sum((m.window + n_ubatch) * _position_bytes(m, i, kv_type)
                   for i in range(m.n_layer) if m.is_swa[i]))


def kv_read(m: ModelFacts, pos: int, kv_type: str, layers: range | set[int] | None = None) -> float:
    """Cache bytes one decode step at position `pos` reads in `layers` (default: the trunk):
    every past position of a full layer, at most a window of a sliding one."""
    return sum(min(pos, m.window if m.is_swa[i] and m.window else pos) * _position_bytes(m, i, kv_type)
               for i in (range(m.n_layer) if layers is None else layers) if i < m.n_layer)


# ----------------------------------------------------------------------------- the plan


@dataclass
class Device:
    name: str
    capacity: int               # bytes the plan may use here
    bandwidth: float            # bytes/s a decode step reads at
    tensors: list[Tensor] = field(default_factory=list)
    extra: dict[str, int] = field(default_factory=dict)   # KV, compute buffers, checkpoints
    kv_layers: set[int] = field(default_factory=set)      # layers whose cache lives here
    endpoint: str | None = None                           # an RPC host's host:port
    link_bw: float = 0.0                                  # bytes/s of the network to it
    output: bool = False                                  # an RPC host holding the output layer

    @property
    def weights(self) -> int:
        return sum(t.bytes for t in self.tensors)

    @property
    def bytes(self) -> int:
        return self.weights + sum(self.extra.values())

    @property
    def free(self) -> int:
        return self.capacity - self.bytes


@dataclass
class Plan:
    model: ModelFacts
    profile: Profile
    ctx: int
    kv_type: str
    n_batch: int
    n_ubatch: int
    parallel: int
    checkpoints: int
    mtp: bool
    devices: list[Device]
    gpu_layers: int                 # llama.cpp's -ngl: layers (the output counts as one) off the CPU
    cpu_tensors: list[str]          # tensors overridden to the CPU while the layers are on the GPU
    predicted_decode_tps: float
    predicted_decode_tps_full: float
    predicted_prompt_tps: float
    notes: list[str]
    rpc: list[str] = field(default_factory=list)          # every --rpc endpoint, in order
    tensor_split: list[int] = field(default_factory=list)  # layers per RPC host, then the GPU

    @property
    def kv_bytes(self) -> int:
        return kv_bytes(self.model, range(self.model.n_layer), self.ctx, self.kv_type,
                        self.n_ubatch, self.parallel)

    def classes(self) -> dict[str, dict[str, int]]:
        """Weight bytes per class on each device."""
        out: dict[str, dict[str, int]] = {}
        for d in self.devices:
            per = out.setdefault(d.name, {})
            for t in d.tensors:
                k = self.model.kind(t)
                per[k] = per.get(k, 0) + t.bytes
        return out

    def override_patterns(self) -> list[str]:
        """`-ot` regexes that keep exactly `cpu_tensors` in system memory: one per set of
        layers, naming the tensors that set keeps there."""
        by_tensor: dict[str, set[int]] = {}
        for name in self.cpu_tensors:
            layer, _, suffix = name.partition(".")[2].partition(".")
            by_tensor.setdefault(suffix, set()).add(int(layer))
        by_layers: dict[tuple[int, ...], list[str]] = {}
        for suffix, layers in by_tensor.items():
            by_layers.setdefault(tuple(sorted(layers)), []).append(re.escape(suffix))
        return [rf"^blk\.({'|'.join(map(str, layers))})\.({'|'.join(sorted(tails))})$"
                for layers, tails in by_layers.items()]

    def server_args(self, model_path: str) -> list[str]:
        """The llama-server command line that runs the plan."""
        return ["-m", model_path, *self.server_flags()]

    def server_flags(self) -> list[str]:
        """llama-server's flags for the plan, all but the model."""
        args = ["-c", str(self.ctx), "-b", str(self.n_batch),
                "-ub", str(self.n_ubatch), "-np", str(self.parallel),
                "--ctx-checkpoints", str(self.checkpoints), "-ctk", self.kv_type,
                "-ctv", self.kv_type, "-fa", "on", "-ngl", str(self.gpu_layers)]
        if self.rpc:
            args += ["--rpc", ",".join(self.rpc),
                     "--tensor-split", ",".join(map(str, self.tensor_split))]
        if self.gpu_layers:
            args += [a for p in self.override_patterns() for a in ("-ot", f"{p}=CPU")]
        if self.profile.unified:
            args.append("--no-mmap")  # otherwise the page cache holds a second copy in the pool
        if self.mtp:
            # the draft context takes its cache type from the -ctkd/-ctvd pair (f16 otherwise)
            args += ["--spec-type", "draft-mtp", "--spec-draft-n-max", str(self.model.n_nextn),
                     "-ctkd", self.kv_type, "-ctvd", self.kv_type]
            if self.model.draft:  # a second model: its own layer count and overrides
                args += ["--spec-draft-model", self.model.draft, "-ngld", str(self.gpu_layers)]
                if self.gpu_layers:
                    args += [a for p in self.draft_cpu_patterns() for a in ("-otd", f"{p}=CPU")]
        return args + ["--jinja", "--reasoning-format", "deepseek"]

    def draft_cpu_patterns(self) -> list[str]:
        """`-otd` regexes for the draft model: its experts the plan keeps in system memory, and
        its copy of the output matrix when no head reads it."""
        heads = [n for n in self.cpu_tensors if (layer_of_gguf(n) or 0) >= self.model.n_layer]
        keep = replace(self, cpu_tensors=heads).override_patterns()
        if self.model.heads_have_lm_head():
            keep.append(r"^output\.weight$")
        return keep

    def to_json(self, model_path: str) -> dict:
        classes = self.classes()
        return {
            "model": self.model.name, "profile": self.profile.name, "ctx": self.ctx,
            "kv_type": self.kv_type, "kv_bytes": self.kv_bytes, "n_batch": self.n_batch,
            "n_ubatch": self.n_ubatch, "parallel": self.parallel,
            "ctx_checkpoints": self.checkpoints, "mtp": self.mtp, "gpu_layers": self.gpu_layers,
            "draft": self.model.draft if self.mtp else None,
            "rpc": self.rpc, "tensor_split": self.tensor_split,
            # a draft file's tensors apart: its copies share names with the model's
            "devices": [{"name": d.name, "endpoint": d.endpoint, "capacity": d.capacity,
                         "bytes": d.bytes, "weights": d.weights, "buffers": dict(d.extra),
                         "classes": classes.get(d.name, {}),
                         "tensors": [t.name for t in d.tensors if not t.draft],
                         "draft_tensors": [t.name for t in d.tensors if t.draft]}
                        for d in self.devices],
            "cpu_overrides": self.override_patterns() if self.gpu_layers else [],
            "predicted_decode_tps": round(self.predicted_decode_tps, 3),
            "predicted_decode_tps_full_ctx": round(self.predicted_decode_tps_full, 3),
            "predicted_prompt_tps": round(self.predicted_prompt_tps, 3),
            "server_args": self.server_args(model_path), "notes": self.notes,
        }


def _usable(profile: Profile) -> tuple[int, int]:
    """(GPU bytes, system bytes) the plan may fill; small machines keep proportionally less."""
    return (_usable_memory(profile.vram, GPU_MARGIN, GPU_RESERVE),
            _usable_memory(profile.ram, RAM_MARGIN, RAM_RESERVE))


def _usable_memory(total: int, margin: float, reserve: int) -> int:
    return max(int(total * (1 - margin)) - min(reserve, total // 8), 0)


def plan(m: ModelFacts, profile: Profile, ctx: int, *, kv_type: str | None = None,
         mtp: bool = True, parallel: int = 1, n_ubatch: int = 512, checkpoints: int = 8,
         rpc: tuple[RpcHost, ...] = ()) -> Plan:
    """Place `m` on `profile` for a context of `ctx` tokens; raises when it cannot fit.

    Without `kv_type` the cache is f16, or q8_0 where f16 would take more than KV_SHARE of a
    discrete GPU or would not fit at all. `rpc` hosts take whole layers, only what this machine
    cannot hold.
    """
    if ctx < 1 or parallel < 1 or n_ubatch < 1 or checkpoints < 0:
        raise StepGGUFError("--ctx, --parallel and the batch size must be at least 1")
    if kv_type is not None and kv_type not in KV_TYPES:
        raise StepGGUFError(f"unknown KV type {kv_type!r}; choose one of {', '.join(KV_TYPES)}")
    mtp = mtp and any(m.kind(t) == "mtp" for t in m.tensors)
    if ctx > m.n_ctx_train:  # llama-server would cap it the same way
        return replace(
            plan(m, profile, m.n_ctx_train, kv_type=kv_type, mtp=mtp, parallel=parallel,
                 n_ubatch=n_ubatch, checkpoints=checkpoints, rpc=rpc),
            notes=[f"context capped at the model's {m.n_ctx_train} tokens"])
    setup = _Setup(m, profile, ctx, "f16", mtp, parallel, n_ubatch, checkpoints, tuple(rpc))
    if kv_type is not None:
        return _place(replace(setup, kv_type=kv_type), [])
    gpu_cap, _ = _usable(profile)
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


@dataclass(frozen=True)
class _Setup:
    m: ModelFacts
    profile: Profile
    ctx: int
    kv_type: str
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
        return self.mtp or self.m.kind(t) != "mtp" or not _MTP_SKIPPED.search(t.name)

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
        devices, rest, gpu_used = _local(s, 0, s.n_all, True, notes)
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


def _local(s: _Setup, lo: int, hi: int, output: bool,
           notes: list[str]) -> tuple[list[Device], list[Tensor], bool]:
    """Layers [lo, hi) (and the output layer when `output`) on this machine: (devices,
    experts overridden to the CPU, whether a GPU is used). Raises _NoFit."""
    m, profile = s.m, s.profile
    gpu_cap, ram_cap = _usable(profile)

    def here(t: Tensor) -> bool:
        if t.layer is not None:
            return lo <= t.layer < hi
        return output or m.kind(t) != "output"  # embeddings and shared tables stay here

    used = [t for t in m.tensors if s.used(t) and here(t)]
    buffers = {"kv": s.kv(range(lo, min(hi, m.n_layer))), "compute": compute_buffer(m, s.n_ubatch)}
    heads = range(max(lo, m.n_layer), hi)
    if s.mtp and heads:  # the draft context: its heads' cache and its own graph
        buffers["kv_mtp"] = s.kv(heads)
        buffers["compute_mtp"] = compute_buffer(m, s.n_ubatch)
    embd = [t for t in used if s.on_cpu(t)]
    # MTP experts before the trunk's: a draft step runs one head alone, so a head in system
    # memory pays a GPU->CPU round trip for every drafted token
    heads_experts = [t for t in used if _EXPERTS.match(t.name) and m.kind(t) == "mtp"]
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
        if rest:
            cpu.extra["compute_host"] = compute_buffer(m, s.n_ubatch)
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
            add = {"compute": compute_buffer(m, s.n_ubatch)} if not h.extra else {}
            if layer is not None:
                add["kv"] = s.kv(range(layer, layer + 1))
                if layer >= m.n_layer and s.mtp and "compute_mtp" not in h.extra:
                    add["compute_mtp"] = compute_buffer(m, s.n_ubatch)
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
                *(_decode_tps(s.m, devices, s.kv_type, pos) for pos in (0, s.ctx)),
                _prompt_tps(s.m, devices, s.profile, s.n_ubatch), notes,
                [h.endpoint for h in hosts] if hosts else [], split if hosts else [])


def _decode_tps(m: ModelFacts, devices: list[Device], kv_type: str, pos: int) -> float:
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


def _prompt_tps(m: ModelFacts, devices: list[Device], profile: Profile, n_ubatch: int) -> float:
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
                           if _EXPERTS.match(t.name)) / (profile.link_bw * n_ubatch)
    else:
        seconds += flops(local) / profile.cpu_flops
    return 1 / seconds if seconds else 0.0


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"
