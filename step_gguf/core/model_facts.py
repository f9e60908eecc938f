"""What placement and pricing know of a Step 3.5 model, whichever file it came from: its
tensors (GGUF names and sizes) and the shapes that size its caches and buffers. Pure data:
read from a GGUF or a checkpoint by `facts`, consumed by the planner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .gguf_names import is_routed, layer_of_gguf


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
class MadeFor:
    """The machine and context a file was sized for (`quantize --for`), stored in it so that
    `run` and `serve` on that machine take that context by default."""

    profile: str            # the profile's name (custom, this, or a named one)
    ram: int                # its bytes of system memory and of GPU memory, as planned
    vram: int
    ctx: int
    parallel: int

    KEYS = ("step_gguf.for.profile", "step_gguf.for.ram", "step_gguf.for.vram", "step_gguf.for.ctx",
            "step_gguf.for.parallel")

    def values(self) -> tuple:
        return self.profile, self.ram, self.vram, self.ctx, self.parallel


@dataclass(frozen=True)
class VisionFacts:
    """An mmproj GGUF beside the model (Step 3.7's vision tower): what its weights take and the
    shapes that size the graph encoding one image."""

    path: str
    weights: int            # bytes
    patches: int            # of the largest image one graph encodes (image_size / patch_size)^2
    width: int
    ff: int


# the class a tensor is reported and placed under (ModelFacts.kind)
TensorKind = Literal["mtp", "draft_shared", "experts", "embeddings", "output", "shared", "attention", "router",
                     "norms", "dense"]


@dataclass(frozen=True, kw_only=True)
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
    made_for: MadeFor | None = None
    vision: VisionFacts | None = None   # images, with the mmproj llama-server loads beside the model

    def kind(self, t: Tensor) -> TensorKind:
        """The class a tensor is reported and placed under."""
        layer = t.layer
        if layer is not None and layer >= self.n_layer:
            return "mtp"
        if t.draft:  # the draft file's own embeddings, output and norms, loaded a second time
            return "draft_shared"
        if is_routed(t.name):
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
        if is_routed(t.name):
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
