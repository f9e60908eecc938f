"""Unit tests on the model facts: config parsing, the name table, expected shapes, RoPE factors."""

from __future__ import annotations

import math
import re

import pytest

from step_gguf.core.errors import CheckpointError
from step_gguf.core.model import TENSOR_MAP, Step35Config, gguf_name

# The published Step 3.5 Flash config (shared/STEP35.md §1)
REAL = {
    "architectures": ["Step3p5ForCausalLM"], "model_type": "step3p5", "hidden_size": 4096,
    "num_hidden_layers": 45, "num_nextn_predict_layers": 3, "vocab_size": 128896,
    "num_attention_heads": 64, "num_attention_groups": 8,
    "attention_other_setting": {"num_attention_heads": 96, "num_attention_groups": 8},
    "head_dim": 128,
    "layer_types": ["full_attention" if i % 4 == 0 else "sliding_attention" for i in range(48)],
    "sliding_window": 512,
    "partial_rotary_factors": [0.5 if i % 4 == 0 else 1.0 for i in range(48)],
    "rope_theta": [5e6 if i % 4 == 0 else 1e4 for i in range(48)],
    "rope_scaling": {"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 32.0, "original_max_position_embeddings": 131072},
    "max_position_embeddings": 262144, "intermediate_size": 11264,
    "moe_layers_enum": ",".join(str(i) for i in range(3, 45)),
    "moe_num_experts": 288, "moe_top_k": 8, "moe_intermediate_size": 1280,
    "share_expert_dim": 1280, "norm_expert_weight": True, "moe_router_scaling_factor": 3.0,
    "swiglu_limits": [0.0] * 43 + [7.0, 7.0] + [0.0] * 3,
    "swiglu_limits_shared": [0.0] * 43 + [16.0, 16.0] + [0.0] * 3,
    "rms_norm_eps": 1e-5,
}


def test_real_config_matches_published_facts():
    cfg = Step35Config.from_dict(REAL)
    assert cfg.n_layer_all == 48
    assert sum(not s for s in cfg.is_swa[:45]) == 12 and sum(cfg.is_swa[:45]) == 33
    assert cfg.n_head[0] == 64 and cfg.n_head[1] == 96 and set(cfg.n_head_kv) == {8}
    assert cfg.leading_dense == 3
    assert (cfg.rope_theta, cfg.rope_theta_swa) == (5e6, 1e4)
    assert cfg.swiglu_limits[43:45] == (7.0, 7.0) and cfg.swiglu_limits_shared[44] == 16.0


def test_real_shapes_add_up_to_196b_parameters():
    shapes = Step35Config.from_dict(REAL).expected_shapes(with_mtp=False)
    total = sum(math.prod(s) for s in shapes.values())
    experts = sum(math.prod(s) for n, s in shapes.items() if "moe." in n and "_proj" in n)
    assert 190e9 < total < 200e9
    assert 0.96 < experts / total < 0.98  # "routed experts are about 97% of the bytes"


def test_every_tensor_maps_to_a_distinct_step35_name():
    shapes = Step35Config.from_dict(REAL).expected_shapes()
    names = [gguf_name(n) for n in shapes]
    assert None not in names
    assert len(set(names)) == len(names)
    # names llama.cpp's step35 loader asks for (src/models/step35.cpp, shared/STEP35.md §4)
    loader = re.compile(r"^(token_embd|output_norm|output)\.weight$|^blk\.\d+\.("
                        r"attn_norm|attn_q|attn_k|attn_v|attn_q_norm|attn_k_norm|attn_gate|"
                        r"attn_output|ffn_norm|ffn_gate|ffn_up|ffn_down|ffn_gate_inp|ffn_gate_exps|"
                        r"ffn_up_exps|ffn_down_exps|ffn_gate_shexp|ffn_up_shexp|ffn_down_shexp|"
                        r"nextn\.eh_proj|nextn\.enorm|nextn\.hnorm|nextn\.shared_head_norm|"
                        r"nextn\.shared_head_head)\.weight$|^blk\.\d+\.exp_probs_b\.bias$")
    assert all(loader.match(n) for n in names), [n for n in names if not loader.match(n)]
    assert {gguf_name(f"model.layers.{i}.eh_proj.weight") for i in (45, 46, 47)} == \
        {f"blk.{i}.nextn.eh_proj.weight" for i in (45, 46, 47)}


def test_name_table_is_total_over_templates():
    for hf in TENSOR_MAP:
        assert gguf_name(hf.replace("{bid}", "7")) == TENSOR_MAP[hf].replace("{bid}", "7")
    assert gguf_name("model.layers.3.self_attn.rotary_emb.inv_freq") is None


def test_llama3_factors_match_transformers():
    pytest.importorskip("transformers")
    from transformers.models.step3p7.configuration_step3p7 import Step3p7TextConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    import torch

    cfg = Step35Config.from_dict(REAL)
    tcfg = Step3p7TextConfig(**{k: v for k, v in REAL.items() if k not in ("architectures", "model_type")})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](tcfg, "cpu", layer_type="full_attention")
    dim = 64  # full layers rotate half of head_dim 128
    plain = 1.0 / (5e6 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    want = (plain / scaled.to(torch.float64)).tolist()
    got = cfg.llama3_rope_factors()
    assert len(got) == 64 and got[32:] == [1.0] * 32
    assert got[:32] == pytest.approx(want, rel=1e-5)
    assert min(got) == pytest.approx(1.0) and max(got) == pytest.approx(2.0)


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["LlamaForCausalLM"]}, "unknown architecture"),
    ({"partial_rotary_factors": [1.0] * 48}, "partial_rotary_factor"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type"),
    ({"layer_types": ["chunked_attention"] * 48}, "unsupported layer_types"),
])
def test_config_errors_say_what_is_wrong(change, message):
    with pytest.raises(CheckpointError, match=message):
        Step35Config.from_dict(REAL | change)


def test_missing_field_is_named():
    broken = {k: v for k, v in REAL.items() if k != "hidden_size"}
    with pytest.raises(CheckpointError, match="'hidden_size'"):
        Step35Config.from_dict(broken)


def test_step3p7_wrapper_reads_text_config():
    wrapped = {"architectures": ["Step3p7ForConditionalGeneration"], "model_type": "step3p7",
               "text_config": {k: v for k, v in REAL.items() if k != "architectures"}}
    assert Step35Config.from_dict(wrapped).expected_shapes() == Step35Config.from_dict(REAL).expected_shapes()
