"""The numeric oracle: transformers' Step 3.5 text decoder, loaded from a hub-layout checkpoint.

Test-only code. It reads the safetensors with the `safetensors` package and dequantises FP8
with torch, independently of step_gguf's own readers, so a converter bug cannot hide in both.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers.models.step3p7.configuration_step3p7 import Step3p7TextConfig
from transformers.models.step3p7.modeling_step3p7 import Step3p7TextModel


def _hub_state(src: Path) -> tuple[dict, dict]:
    raw = json.loads((src / "config.json").read_text())
    text = raw.get("text_config", raw)
    quant = raw.get("quantization_config") or text.get("quantization_config")
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index.values())):
        state |= load_file(src / shard)
    # the text decoder alone: Step 3.7's vision tower (vision_model.*, vit_large_projector) is not
    state = {k.replace("model.language_model.", "model.", 1): v for k, v in state.items()
             if k.startswith(("model.", "lm_head.")) and not k.startswith(("model.vision", "model.multi_modal"))}
    if quant:
        block = quant["weight_block_size"]
        for name in [k for k in state if k.endswith("_scale_inv")]:
            scale = state.pop(name)
            wname = name.removesuffix("_scale_inv")
            w = state[wname].to(torch.float32)
            R, C = w.shape[-2:]
            s = scale.repeat_interleave(block[0], -2)[..., :R, :].repeat_interleave(block[1], -1)[..., :C]
            state[wname] = w * s
    return text, {k: v.to(torch.float32) for k, v in state.items()}


class Oracle:
    """Step3p7TextModel + lm_head in float32, eager attention."""

    def __init__(self, src: Path) -> None:
        text, hub = _hub_state(Path(src))
        cfg = Step3p7TextConfig(**{k: v for k, v in text.items() if k not in ("architectures", "model_type")})
        cfg._attn_implementation = "eager"
        self.config = cfg
        self.model = Step3p7TextModel(cfg).to(torch.float32).eval()
        n = cfg.num_hidden_layers
        state = {}
        for name, t in hub.items():
            if name == "lm_head.weight":
                continue
            parts = name.split(".")
            if parts[1] == "layers" and int(parts[2]) >= n:
                continue  # MTP blocks are not part of the trunk forward
            key = name.removeprefix("model.")
            key = (key.replace(".moe.gate.weight", ".mlp.gate.weight")
                      .replace(".moe.router_bias", ".mlp.gate.e_score_correction_bias")
                      .replace(".moe.down_proj.weight", ".mlp.experts.down_proj")
                      .replace(".share_expert.", ".mlp.shared_experts."))
            if ".moe.gate_proj." in key or ".moe.up_proj." in key:
                continue
            state[key] = t
        for i in range(n):
            gate = hub.get(f"model.layers.{i}.moe.gate_proj.weight")
            if gate is not None:
                up = hub[f"model.layers.{i}.moe.up_proj.weight"]
                state[f"layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [m for m in missing if "rotary" not in m]
        assert not missing and not unexpected, (missing, unexpected)
        self.lm_head = hub["lm_head.weight"]

    @torch.no_grad()
    def logits(self, tokens: list[int]) -> torch.Tensor:
        out = self.model(input_ids=torch.tensor([tokens]), use_cache=False)
        return (out.last_hidden_state[0] @ self.lm_head.T).to(torch.float64)


def kl_mean(p_logits, q_logits) -> float:
    """Mean over positions of KL(P || Q) between the softmaxes of two logit arrays."""
    p = torch.log_softmax(torch.as_tensor(p_logits, dtype=torch.float64), -1)
    q = torch.log_softmax(torch.as_tensor(q_logits, dtype=torch.float64), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())
