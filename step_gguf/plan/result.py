"""What a placement returns: the devices and what each holds, and the llama-server flags
(context, batches, cache type, GPU layers, CPU overrides, RPC split, MTP drafting) and JSON
that carry it out."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from ..core.errors import StepGGUFError
from ..core.gguf_names import layer_of_gguf
from ..core.model_facts import ModelFacts, Tensor
from .machines import Profile
from .memory import KvType, kv_bytes

PROMPT_CACHE_MAX_MIB = 8192  # llama-server's own default for --cache-ram


def _to_cpu(patterns: list[str]) -> str:
    """One `-ot`/`-otd` value keeping every pattern's tensors on the CPU: llama.cpp takes them
    comma-separated (given the flag again, it warns "only last value will be used"). Our
    patterns are alternations of layer numbers and names: they hold no comma."""
    assert not any("," in p for p in patterns), patterns
    return ",".join(f"{p}=CPU" for p in patterns)


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


@dataclass(frozen=True)
class ExpertCache:
    """Device memory for routed experts the plan keeps in system memory (patch 0021)."""

    bytes: int          # given to the slots
    share: float        # of the routed experts' bytes in system memory
    hit_rate: float     # predicted
    displaced: int      # expert tensors it took the place of on the GPU
    speedup: float      # predicted decode speed over the same plan without it


@dataclass
class Plan:
    model: ModelFacts
    profile: Profile
    ctx: int
    kv_type: KvType
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
    # tokens MTP drafts a round; None: each round chooses, up to every head, from the measured
    # acceptance and cost (patch 0013), so that drafting never makes decoding slower
    draft_max: int | None = None
    expert_cache: ExpertCache | None = None
    prompt_cache_cap: int | None = None     # MiB the user gave the prompt cache (0: off); None: the plan's

    @property
    def draft_length(self) -> int | str | None:
        """Tokens drafted a round as reported: a number, "adaptive", or None without drafting."""
        return (self.draft_max or "adaptive") if self.mtp else None

    def drafting(self, draft_max: int | None) -> Plan:
        """This plan drafting a fixed `draft_max` tokens a round (None: as it is); a one-line
        error where the model has too few heads, or none."""
        if draft_max is None:
            return self
        if not self.mtp:
            raise StepGGUFError(f"--draft-max {draft_max}: {self.model.name} has no MTP heads to draft "
                                "with (give --draft FILE, or leave --draft-max out)")
        if draft_max > self.model.n_nextn:
            raise StepGGUFError(f"--draft-max {draft_max}: {self.model.name} has {self.model.n_nextn} MTP "
                                f"heads, one per drafted token; give 1 to {self.model.n_nextn}")
        return replace(self, draft_max=draft_max)

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

    @property
    def prompt_cache_mib(self) -> int:
        """llama-server's cache of earlier prompts' state in system memory (--cache-ram), MiB: half
        of what the plan leaves free there, at most llama-server's own default, unless the user
        gave a size (--prompt-cache). Left to that default (8 GiB), a server that holds the
        experts in system memory grows into the memory the machine needs."""
        if self.prompt_cache_cap is not None:
            return self.prompt_cache_cap
        cpu = next((d for d in self.devices if d.name == "CPU"), None)
        return max(0, min(PROMPT_CACHE_MAX_MIB, cpu.free // 2 // 2**20)) if cpu else 0

    def server_flags(self) -> list[str]:
        """llama-server's flags for the plan, all but the model."""
        # -c is the pool all slots share: each of the -np slots gets ctx of it
        args = ["-c", str(self.ctx * self.parallel), "-b", str(self.n_batch),
                "-ub", str(self.n_ubatch), "-np", str(self.parallel),
                "--ctx-checkpoints", str(self.checkpoints), "--cache-ram", str(self.prompt_cache_mib),
                "-ctk", self.kv_type,
                "-ctv", self.kv_type, "-fa", "on", "-ngl", str(self.gpu_layers)]
        if self.rpc:
            args += ["--rpc", ",".join(self.rpc),
                     "--tensor-split", ",".join(map(str, self.tensor_split))]
        if self.gpu_layers and self.cpu_tensors:
            args += ["-ot", _to_cpu(self.override_patterns())]
        if self.expert_cache:  # the cache copies experts as the file holds them
            args.append("--no-repack")
        if self.profile.unified:
            # read in, not mapped: the page cache would hold a second copy in the pool (the
            # vendored llama-server has no --no-mmap: it refuses the flag and exits)
            args += ["--load-mode", "none"]
        if self.mtp:
            # the draft context takes its cache type from the -ctkd/-ctvd pair (f16 otherwise)
            args += ["--spec-type", "draft-mtp", "--spec-draft-n-max", str(self.draft_max or self.model.n_nextn),
                     "-ctkd", self.kv_type, "-ctvd", self.kv_type]
            if self.draft_max is None:
                args.append("--spec-draft-adaptive")
            if self.model.draft:  # a second model: its own layer count and overrides
                args += ["--spec-draft-model", self.model.draft, "-ngld", str(self.gpu_layers)]
                if self.gpu_layers and (patterns := self.draft_cpu_patterns()):
                    args += ["-otd", _to_cpu(patterns)]
        if self.model.vision is not None:  # on the GPU the plan counted it on, if any
            args += ["--mmproj", self.model.vision.path, *([] if self.gpu_layers else ["--no-mmproj-offload"])]
        return args + ["--jinja", "--reasoning-format", "deepseek"]

    def server_env(self) -> dict[str, str]:
        """The environment llama-server (or an in-process load) runs the plan with: patch
        0021's expert cache, its budget and the CPU's and the link's rates."""
        if not self.expert_cache:
            return {}
        cpu = next(d for d in self.devices if d.name == "CPU")
        return {"LLAMA_EXPERT_CACHE_MIB": f"{self.expert_cache.bytes / 2**20:.6f}",  # to the byte
                "LLAMA_EXPERT_CACHE_CPU_BW": f"{cpu.bandwidth:.0f}",
                "LLAMA_EXPERT_CACHE_LINK_BW": f"{self.profile.link_bw:.0f}"}

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
            "model": self.model.name, "profile": self.profile.name,
            "backend": self.profile.backend or None, "ctx": self.ctx,
            "kv_type": self.kv_type, "kv_bytes": self.kv_bytes, "n_batch": self.n_batch,
            "n_ubatch": self.n_ubatch, "parallel": self.parallel,
            "ctx_checkpoints": self.checkpoints, "prompt_cache_mib": self.prompt_cache_mib, "mtp": self.mtp,
            "draft_max": self.draft_length, "gpu_layers": self.gpu_layers,
            "draft": self.model.draft if self.mtp else None,
            "mmproj": self.model.vision.path if self.model.vision is not None else None,
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
            "expert_cache": None if not self.expert_cache else {
                "bytes": self.expert_cache.bytes, "share": round(self.expert_cache.share, 4),
                "predicted_hit_rate": round(self.expert_cache.hit_rate, 4),
                "displaced_tensors": self.expert_cache.displaced,
                "predicted_speedup": round(self.expert_cache.speedup, 3)},
            "server_args": self.server_args(model_path), "server_env": self.server_env(),
            "notes": self.notes,
        }
