"""Step 3.5 Flash as llama.cpp's `step35` architecture sees it.

`Step35Config` reads the hub `config.json` directly (never through transformers, whose
normalised config drops fields such as `partial_rotary_factors`). `TENSOR_MAP` is the
HF -> GGUF name table; the only transform is the `+1` folded into zero-centred norms.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .config_schema import hub_schema
from .errors import CheckpointError, describe, malformed
from .hub_layout import checkpoint_file

ARCH = "step35"
ARCHITECTURES = {"Step3p5ForCausalLM": "step3p5", "Step3p7ForConditionalGeneration": "step3p7"}
# Step 3.7 nests the text decoder; normalise its names to the 3.5 layout.
TEXT_PREFIXES = ("model.language_model.",)

# HF name (with {bid}) -> GGUF name. Order is irrelevant; names are matched exactly.
TENSOR_MAP: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{bid}.input_layernorm.weight": "blk.{bid}.attn_norm.weight",
    "model.layers.{bid}.post_attention_layernorm.weight": "blk.{bid}.ffn_norm.weight",
    "model.layers.{bid}.self_attn.q_proj.weight": "blk.{bid}.attn_q.weight",
    "model.layers.{bid}.self_attn.k_proj.weight": "blk.{bid}.attn_k.weight",
    "model.layers.{bid}.self_attn.v_proj.weight": "blk.{bid}.attn_v.weight",
    "model.layers.{bid}.self_attn.o_proj.weight": "blk.{bid}.attn_output.weight",
    "model.layers.{bid}.self_attn.q_norm.weight": "blk.{bid}.attn_q_norm.weight",
    "model.layers.{bid}.self_attn.k_norm.weight": "blk.{bid}.attn_k_norm.weight",
    "model.layers.{bid}.self_attn.g_proj.weight": "blk.{bid}.attn_gate.weight",
    "model.layers.{bid}.mlp.gate_proj.weight": "blk.{bid}.ffn_gate.weight",
    "model.layers.{bid}.mlp.up_proj.weight": "blk.{bid}.ffn_up.weight",
    "model.layers.{bid}.mlp.down_proj.weight": "blk.{bid}.ffn_down.weight",
    "model.layers.{bid}.moe.gate.weight": "blk.{bid}.ffn_gate_inp.weight",
    "model.layers.{bid}.moe.router_bias": "blk.{bid}.exp_probs_b.bias",
    "model.layers.{bid}.moe.gate_proj.weight": "blk.{bid}.ffn_gate_exps.weight",
    "model.layers.{bid}.moe.up_proj.weight": "blk.{bid}.ffn_up_exps.weight",
    "model.layers.{bid}.moe.down_proj.weight": "blk.{bid}.ffn_down_exps.weight",
    "model.layers.{bid}.share_expert.gate_proj.weight": "blk.{bid}.ffn_gate_shexp.weight",
    "model.layers.{bid}.share_expert.up_proj.weight": "blk.{bid}.ffn_up_shexp.weight",
    "model.layers.{bid}.share_expert.down_proj.weight": "blk.{bid}.ffn_down_shexp.weight",
    "model.layers.{bid}.eh_proj.weight": "blk.{bid}.nextn.eh_proj.weight",
    "model.layers.{bid}.enorm.weight": "blk.{bid}.nextn.enorm.weight",
    "model.layers.{bid}.hnorm.weight": "blk.{bid}.nextn.hnorm.weight",
    "model.layers.{bid}.transformer.shared_head.norm.weight": "blk.{bid}.nextn.shared_head_norm.weight",
    "model.layers.{bid}.transformer.shared_head.output.weight": "blk.{bid}.nextn.shared_head_head.weight",
}

_PATTERNS = [
    (re.compile("^" + re.escape(hf).replace(r"\{bid\}", r"(\d+)") + "$"), gg)
    for hf, gg in TENSOR_MAP.items()
]
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _bounded(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
            or not lo <= int(value) <= hi:
        raise CheckpointError(f"config.json {name} = {str(value)[:40]} is not a whole number from "
                              f"{lo} to {hi}")
    return int(value)


def gguf_name(hf_name: str) -> str | None:
    """GGUF name for a (normalised) HF tensor name, or None when it has no mapping."""
    for pattern, template in _PATTERNS:
        if m := pattern.match(hf_name):
            return template.format(bid=m.group(1)) if m.groups() else template
    return None


def layer_of(hf_name: str) -> int | None:
    m = _LAYER.match(hf_name)
    return int(m.group(1)) if m else None


def is_zero_centred_norm(hf_name: str) -> bool:
    """Step norms compute x/rms(x)·(1+w); llama.cpp multiplies by w, so store 1+w."""
    return hf_name.endswith("norm.weight")


def normalise_name(name: str) -> str | None:
    """Map a checkpoint name into the 3.5 text layout; None for tensors outside the decoder."""
    for prefix in TEXT_PREFIXES:
        if name.startswith(prefix):
            return "model." + name[len(prefix):]
    if name.startswith("model.") and not name.startswith(("model.vision", "model.multi_modal")):
        return name
    if name == "lm_head.weight":
        return name
    return None


def read_config(path: Path) -> dict:
    """The checkpoint folder's config.json, parsed."""
    cfg_path = checkpoint_file(path, "config.json")
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path} not found; point to a Step 3.5 checkpoint folder")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({describe(exc)})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_path} is not a JSON object")
    return raw


def routing_weight(scale: float, normalized: bool, top_k: int) -> float:
    """A chosen expert's typical weight in the MoE output: the top-k weights sum to `scale` when
    normalized; otherwise each is at most `scale`."""
    return scale / max(top_k, 1) if normalized else scale


@dataclass(frozen=True)
class Step35Config:
    hidden_size: int
    n_layer: int                 # trunk layers; MTP layers follow them
    n_nextn: int
    vocab_size: int
    head_dim: int
    n_head: tuple[int, ...]      # per layer, trunk + MTP
    n_head_kv: tuple[int, ...]
    is_swa: tuple[bool, ...]
    sliding_window: int
    rope_theta: float            # full-attention layers
    rope_theta_swa: float
    rope_scaling: dict | None    # llama3 parameters, full-attention layers only
    context_length: int
    intermediate_size: int
    moe_layers: frozenset[int]
    n_expert: int
    n_expert_used: int
    expert_ff: int
    shexp_ff: int
    expert_weights_norm: bool
    expert_weights_scale: float
    swiglu_limits: tuple[float, ...]
    swiglu_limits_shared: tuple[float, ...]
    rms_eps: float
    fp8_block: tuple[int, int]    # FP8 releases: rows x cols sharing one scale

    @property
    def n_layer_all(self) -> int:
        return self.n_layer + self.n_nextn

    @property
    def routing_weight(self) -> float:
        return routing_weight(self.expert_weights_scale, self.expert_weights_norm, self.n_expert_used)

    @property
    def leading_dense(self) -> int:
        return min(self.moe_layers, default=self.n_layer)

    @classmethod
    def from_dir(cls, path: Path, raw: dict | None = None) -> "Step35Config":
        """The config of the checkpoint folder `path` (`raw`: its config.json, when read already)."""
        raw = read_config(path) if raw is None else raw
        with malformed(checkpoint_file(path, "config.json"), CheckpointError, "has a field of the wrong type or value"):
            return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict) -> "Step35Config":
        archs = raw.get("architectures") or []
        known = [a for a in archs if a in ARCHITECTURES]
        if not known:
            raise CheckpointError(
                f"unknown architecture {archs or raw.get('model_type')}; step-gguf converts "
                f"Step 3.5 Flash ({', '.join(ARCHITECTURES)})"
            )
        text = raw.get("text_config", raw) if ARCHITECTURES[known[0]] == "step3p7" else raw
        try:
            return cls._parse(hub_schema(text), raw.get("quantization_config") or text.get("quantization_config"))
        except KeyError as exc:
            raise CheckpointError(f"config.json lacks required field {exc.args[0]!r}") from None

    @classmethod
    def _parse(cls, c: dict, quant: dict | None) -> "Step35Config":
        n_layer = _bounded("num_hidden_layers", c["num_hidden_layers"], 1, 4096)
        n_nextn = _bounded("num_nextn_predict_layers", c.get("num_nextn_predict_layers", 0), 0, 64)
        n_all = n_layer + n_nextn
        is_swa = _sliding_layers(c, n_layer, n_all)
        theta_full, theta_swa, scaling = _rope(c, is_swa, n_layer, n_all)

        other = c.get("attention_other_setting") or {}
        n_head = int(c["num_attention_heads"])
        n_kv = int(c.get("num_attention_groups", c.get("num_key_value_heads", n_head)))
        n_head_swa = int(other.get("num_attention_heads", c.get("num_sliding_attention_heads") or n_head))
        n_kv_swa = int(other.get("num_attention_groups", n_kv))
        per_layer = c.get("per_layer_config") or {}   # transformers' per-layer overrides

        def heads(key: str, full: int, swa: int) -> tuple[int, ...]:
            return tuple(int(per_layer.get(str(i), {}).get(key, swa if s else full)) for i, s in enumerate(is_swa))

        def limits(key):
            return tuple(0.0 if v is None else float(v)
                         for v in _per_layer(c.get(key) or [0.0] * n_layer, 0.0, n_all))

        block = tuple(int(x) for x in (quant or {}).get("weight_block_size", (128, 128)))

        return cls(
            hidden_size=int(c["hidden_size"]),
            n_layer=n_layer,
            n_nextn=n_nextn,
            vocab_size=int(c["vocab_size"]),
            head_dim=int(c.get("head_dim", int(c["hidden_size"]) // n_head)),
            n_head=heads("num_attention_heads", n_head, n_head_swa),
            n_head_kv=heads("num_key_value_heads", n_kv, n_kv_swa),
            is_swa=is_swa,
            sliding_window=int(c.get("sliding_window") or 0),
            rope_theta=theta_full,
            rope_theta_swa=theta_swa,
            rope_scaling=scaling,
            context_length=int(c.get("max_position_embeddings", 4096)),
            intermediate_size=int(c["intermediate_size"]),
            moe_layers=_moe_layers(c, n_layer),
            n_expert=int(c.get("moe_num_experts", c.get("n_routed_experts", 0))),
            n_expert_used=int(c.get("moe_top_k", c.get("num_experts_per_tok", 0))),
            expert_ff=int(c.get("moe_intermediate_size", 0)),
            shexp_ff=int(c.get("share_expert_dim", 0)),
            expert_weights_norm=bool(c.get("norm_expert_weight", True)),
            expert_weights_scale=float(c.get("moe_router_scaling_factor", 1.0)),
            swiglu_limits=limits("swiglu_limits"),
            swiglu_limits_shared=limits("swiglu_limits_shared"),
            rms_eps=float(c.get("rms_norm_eps", 1e-5)),
            fp8_block=block,
        )

    def __post_init__(self) -> None:
        # sizes far beyond any real model are corrupt input, not a model to plan for
        for name, value, lo, hi in (
                ("hidden_size", self.hidden_size, 1, 1 << 20), ("vocab_size", self.vocab_size, 1, 1 << 21),
                ("head_dim", self.head_dim, 1, 1 << 16), ("intermediate_size", self.intermediate_size, 1, 1 << 24),
                ("moe_num_experts", self.n_expert, 0, 1 << 16), ("moe_top_k", self.n_expert_used, 0, 1 << 16),
                ("moe_intermediate_size", self.expert_ff, 0, 1 << 24),
                ("share_expert_dim", self.shexp_ff, 0, 1 << 24),
                ("attention heads", max(self.n_head + self.n_head_kv), 1, 1 << 16),
                ("attention groups", min(self.n_head_kv), 1, 1 << 16)):
            _bounded(name, value, lo, hi)
        if self.moe_layers and (self.n_expert < 1 or not 1 <= self.n_expert_used <= self.n_expert
                                or self.expert_ff < 1 or min(self.moe_layers) < 0):
            raise CheckpointError("config.json describes MoE layers without a valid expert count, "
                                  "top-k and expert width")
        if any(h % kv for h, kv in zip(self.n_head, self.n_head_kv)):
            raise CheckpointError("config.json has attention heads that are not a multiple of its "
                                  "attention groups")
        if not all(b >= 1 for b in self.fp8_block) or len(self.fp8_block) != 2:
            raise CheckpointError(f"quantization_config weight_block_size {list(self.fp8_block)} is "
                                  "not two positive sizes")

    def expected_shapes(self, with_mtp: bool = True) -> dict[str, tuple[int, ...]]:
        """Every decoder tensor (normalised HF name) with its PyTorch [out, in] shape."""
        H, V, hd = self.hidden_size, self.vocab_size, self.head_dim
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (V, H),
            "model.norm.weight": (H,),
            "lm_head.weight": (V, H),
        }
        for i in range(self.n_layer_all if with_mtp else self.n_layer):
            p = f"model.layers.{i}."
            nh, nkv = self.n_head[i], self.n_head_kv[i]
            shapes |= {
                p + "input_layernorm.weight": (H,),
                p + "post_attention_layernorm.weight": (H,),
                p + "self_attn.q_proj.weight": (nh * hd, H),
                p + "self_attn.k_proj.weight": (nkv * hd, H),
                p + "self_attn.v_proj.weight": (nkv * hd, H),
                p + "self_attn.o_proj.weight": (H, nh * hd),
                p + "self_attn.q_norm.weight": (hd,),
                p + "self_attn.k_norm.weight": (hd,),
                p + "self_attn.g_proj.weight": (nh, H),
            }
            if i in self.moe_layers:
                E, Ie, Is = self.n_expert, self.expert_ff, self.shexp_ff
                shapes |= {
                    p + "moe.gate.weight": (E, H),
                    p + "moe.router_bias": (E,),
                    p + "moe.gate_proj.weight": (E, Ie, H),
                    p + "moe.up_proj.weight": (E, Ie, H),
                    p + "moe.down_proj.weight": (E, H, Ie),
                    p + "share_expert.gate_proj.weight": (Is, H),
                    p + "share_expert.up_proj.weight": (Is, H),
                    p + "share_expert.down_proj.weight": (H, Is),
                }
            else:
                I = self.intermediate_size
                shapes |= {
                    p + "mlp.gate_proj.weight": (I, H),
                    p + "mlp.up_proj.weight": (I, H),
                    p + "mlp.down_proj.weight": (H, I),
                }
            if i >= self.n_layer:
                shapes |= {
                    p + "eh_proj.weight": (H, 2 * H),
                    p + "enorm.weight": (H,),
                    p + "hnorm.weight": (H,),
                    p + "transformer.shared_head.norm.weight": (H,),
                    p + "transformer.shared_head.output.weight": (V, H),
                }
        return shapes

    def llama3_rope_factors(self) -> list[float] | None:
        """llama.cpp's `rope_freqs`: per-frequency divisors for the full-attention rotary dims.

        Full layers rotate head_dim/2 dims; the tensor has head_dim/2 entries (the widest
        layer's n_rot/2) and the tail, unused by full layers, stays 1.0.
        """
        if not self.rope_scaling:
            return None
        import math

        s = self.rope_scaling
        factor = float(s.get("factor", 8.0))
        low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
        orig = float(s.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = orig / low, orig / high
        dim = self.head_dim // 2
        factors = []
        for j in range(0, dim, 2):
            freq = 1.0 / (self.rope_theta ** (j / dim))
            wavelen = 2 * math.pi / freq
            if wavelen < high_wavelen:
                factors.append(1.0)
            elif wavelen > low_wavelen:
                factors.append(factor)
            else:
                smooth = (orig / wavelen - low) / (high - low)
                factors.append(1.0 / ((1 - smooth) / factor + smooth))
        return factors + [1.0] * (self.head_dim // 2 - len(factors))


def _per_layer(value, default, n_all: int) -> list:
    """A per-layer config value (a list, or one value for every layer) over all `n_all` layers,
    padded with `default`."""
    values = list(value) if isinstance(value, list) else [value] * n_all
    return values[:n_all] + [default] * (n_all - len(values))


def _sliding_layers(c: dict, n_layer: int, n_all: int) -> tuple[bool, ...]:
    """Which layers use sliding-window attention; each must rotate the share of its dims that
    llama.cpp's step35 rotates (half on full layers, all on sliding ones)."""
    # MTP entries default to full attention, as llama.cpp's own converter assumes
    layer_types = _per_layer(c.get("layer_types") or ["full_attention"] * n_layer, "full_attention", n_all)
    unknown = set(layer_types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise CheckpointError(f"unsupported layer_types {sorted(unknown)}")
    is_swa = tuple(t == "sliding_attention" for t in layer_types)
    factors = _per_layer(c.get("partial_rotary_factors") or [0.5 if not s else 1.0 for s in is_swa], 0.5, n_all)
    for i, (f, swa) in enumerate(zip(factors, is_swa)):
        if float(f) != (1.0 if swa else 0.5):
            raise CheckpointError(
                f"layer {i}: partial_rotary_factor {f} is not representable in llama.cpp's step35 "
                "(it rotates half the dims on full layers, all on sliding layers)"
            )
    return is_swa


def _rope(c: dict, is_swa: tuple[bool, ...], n_layer: int, n_all: int) -> tuple[float, float, dict | None]:
    """(RoPE base of the full layers, of the sliding layers, llama3 scaling or None)."""
    thetas = _per_layer(c.get("rope_theta", 10000.0), None, n_all)
    full_t = {float(t) for t, s in zip(thetas[:n_layer], is_swa) if not s}
    swa_t = {float(t) for t, s in zip(thetas[:n_layer], is_swa) if s}
    if len(full_t) > 1 or len(swa_t) > 1:
        raise CheckpointError("rope_theta differs between layers of one attention type; "
                              "llama.cpp's step35 has one base for full and one for sliding layers")
    theta_full = full_t.pop() if full_t else 10000.0
    scaling = c.get("rope_scaling")
    if scaling:
        kind = scaling.get("rope_type") or scaling.get("type")
        if kind != "llama3":
            raise CheckpointError(f"rope_scaling type {kind!r} is not supported (only llama3)")
    return theta_full, swa_t.pop() if swa_t else theta_full, dict(scaling) if scaling else None


def _moe_layers(c: dict, n_layer: int) -> frozenset[int]:
    moe_enum = c.get("moe_layers_enum")
    if isinstance(moe_enum, str):
        return frozenset(int(x) for x in moe_enum.split(",") if x.strip())
    if isinstance(moe_enum, list):
        return frozenset(int(x) for x in moe_enum)
    return frozenset(range(3, n_layer))
