"""Synthetic checkpoints: hub layout, every feature on, deterministic by seed."""

from __future__ import annotations

import hashlib
import json
import math

import pytest

from click.testing import CliRunner

from step_gguf.cli import main
from step_gguf.core.model import Step35Config
from step_gguf.files.checkpoint import Checkpoint
from step_gguf.synth.writer import PRESETS, preset_config, synth


def _digest(folder) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a, b, c = (synth(tmp_path / n, "tiny", seed=s) for n, s in (("a", 7), ("b", 7), ("c", 8)))
    assert _digest(a) == _digest(b)
    shard = sorted(a.glob("*.safetensors"))[0].name
    assert (a / shard).read_bytes() != (c / shard).read_bytes()


def test_hub_layout_with_every_feature(checkpoint):
    src = checkpoint("tiny")
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1  # sharded
    cfg = Step35Config.from_dir(src)
    assert set(Checkpoint(src).tensors) == set(cfg.expected_shapes()) == set(index)
    assert 0 < cfg.leading_dense < cfg.n_layer and cfg.n_nextn == 3
    assert any(cfg.is_swa) and not all(cfg.is_swa[: cfg.n_layer])
    swa, full = cfg.is_swa.index(True), cfg.is_swa.index(False)
    assert cfg.n_head[swa] != cfg.n_head[full]
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_theta != cfg.rope_theta_swa
    assert max(cfg.swiglu_limits[cfg.n_layer - 2: cfg.n_layer]) > 0 and cfg.swiglu_limits[0] == 0
    assert Checkpoint(src).tensors["model.layers.3.moe.router_bias"].dtype == "F32"
    tok = json.loads((src / "tokenizer_config.json").read_text())
    assert "{% for message in messages %}" in tok["chat_template"]


def test_three_to_one_attention_pattern_over_the_trunk():
    cfg = Step35Config.from_dict(preset_config(PRESETS["small"], 0))
    trunk = cfg.is_swa[: cfg.n_layer]
    assert sum(trunk) == 3 * (len(trunk) - sum(trunk))


def test_fp8_stores_e4m3_with_block_scales(checkpoint):
    ckpt = Checkpoint(checkpoint("tiny-fp8-3p7"))
    ref = ckpt.tensors["model.layers.2.moe.gate_proj.weight"]
    assert ref.raw_name.startswith("model.language_model.") and ref.dtype == "F8_E4M3"
    scale = ckpt.scales["model.layers.2.moe.gate_proj.weight"]
    E, R, C = ref.shape
    assert scale.shape == (E, -(-R // 32), -(-C // 32))
    assert ckpt.tensors["model.embed_tokens.weight"].dtype == "BF16"


def test_cli_refuses_an_existing_folder(tmp_path):
    (tmp_path / "x").mkdir()
    result = CliRunner().invoke(main, ["synth", str(tmp_path / "x")])
    assert result.exit_code == 1 and "already exists" in result.output


def test_wide_has_real_expert_shapes_and_benchmark_size():
    shapes = Step35Config.from_dict(preset_config(PRESETS["wide"], 0)).expected_shapes()
    assert shapes["model.layers.1.moe.gate_proj.weight"][1:] == (1280, 4096)
    assert shapes["model.layers.1.moe.down_proj.weight"][1:] == (4096, 1280)
    bf16_bytes = 2 * sum(math.prod(s) for s in shapes.values())
    assert 4.5e9 < bf16_bytes < 5.2e9


@pytest.mark.parametrize("accuracy", [0.0, 0.3, 1.0])
def test_each_mtp_head_errs_on_its_own_share_of_inputs(accuracy):
    from step_gguf.synth.script import head_successors

    chain = list(range(100, 141))  # 40 script tokens, then the end of turn
    successor = {-1: chain[0], **dict(zip(chain[:-1], chain[1:]))}
    heads = [head_successors(successor, accuracy, (0, layer)) for layer in (45, 46, 47)]
    for head in heads:
        assert head.keys() == successor.keys()
        wrong = {t for t in successor if head[t] != successor[t]}
        assert len(wrong) == round((1 - accuracy) * len(successor))
        # the wrong token is never the right one, nor anything verification would take
        assert all(head[t] not in (successor[t], t) for t in wrong)
    if 0 < accuracy < 1:  # drawn per head: the heads do not err on the same inputs
        assert len({frozenset(t for t in successor if h[t] != successor[t]) for h in heads}) == 3


def test_head_accuracy_needs_a_script(tmp_path):
    result = CliRunner().invoke(main, ["synth", str(tmp_path / "x"), "--head-accuracy", "0.5"])
    assert result.exit_code == 1 and "needs a script" in result.output and not (tmp_path / "x").exists()


def test_routing_locality_routes_by_the_window_alone_writes(tmp_path):
    """`--routing-locality`: the first sliding-window layer attends uniformly (zero queries and
    head gates) and alone writes the context channels, which embeddings leave empty; routers
    read them FROM_CONTEXT / FROM_TOKEN times harder than the token's own channels, with a
    bias too small to fix a hot set."""
    import numpy as np

    from step_gguf.synth import locality

    out = tmp_path / "local"
    assert CliRunner().invoke(main, ["synth", str(out), "--routing-locality"]).exit_code == 0
    ckpt = Checkpoint(out)
    cfg = Step35Config.from_dir(out)

    def weights(name: str) -> np.ndarray:
        ref = ckpt.tensors[name]
        raw = np.frombuffer(ref.read(), dtype=np.float32 if ref.dtype == "F32" else np.uint16)
        w = raw if ref.dtype == "F32" else (raw.astype(np.uint32) << 16).view(np.float32)
        return w.reshape(ref.shape)

    H = cfg.hidden_size
    ctx = locality.context_channels(H)
    own = locality.context_layer(cfg)
    assert not weights(f"model.layers.{own}.self_attn.q_proj.weight").any()
    assert not weights(f"model.layers.{own}.self_attn.g_proj.weight").any()
    assert not weights("model.embed_tokens.weight")[:, ctx].any()
    writers = [n for n in ckpt.tensors if n.endswith(("o_proj.weight", "down_proj.weight"))]
    for name in writers:
        w = weights(name)
        rows = w[..., ctx, :]
        if name == f"model.layers.{own}.self_attn.o_proj.weight":
            assert rows.any() and not np.delete(w, ctx, axis=-2).any(), name
        else:
            assert not rows.any(), name
    moe = sorted(cfg.moe_layers)[0]
    router = np.abs(weights(f"model.layers.{moe}.moe.gate.weight"))
    ratio = router[:, ctx].mean() / np.delete(router, ctx, axis=1).mean()
    expected = locality.FROM_CONTEXT / locality.FROM_TOKEN * math.sqrt((H - len(ctx)) / len(ctx))
    assert ratio == pytest.approx(expected, rel=0.25)
    assert np.abs(weights(f"model.layers.{moe}.moe.router_bias")).max() < 5 * locality.ROUTER_BIAS_STD
