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
    assert ref.raw_name == "model.layers.2.moe.gate_proj.weight" and ref.dtype == "F8_E4M3"  # as transformers saves 3.7
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


def _weights(ckpt: Checkpoint, name: str):
    import numpy as np
    ref = ckpt.tensors[name]
    raw = np.frombuffer(ref.read(), dtype=np.float32 if ref.dtype == "F32" else np.uint16)
    w = raw if ref.dtype == "F32" else (raw.astype(np.uint32) << 16).view(np.float32)
    return w.reshape(ref.shape)


def test_routing_locality_routes_by_the_drift_of_the_window_mean(tmp_path):
    """`--routing-locality`: the first sliding-window and the first full layer attend uniformly
    (zero queries and head gates) and copy the topic channels, which only multi-byte tokens'
    embeddings fill, into the context channels with opposite signs (the window's mean less the
    text's); nobody else writes either set, nothing is written between the two layers, and
    both see the topic at unit norm scale. Every expert's router row is as long on the context;
    the bias is too small to pick a hot set."""
    import numpy as np

    from step_gguf.synth import locality

    out = tmp_path / "local"
    assert CliRunner().invoke(main, ["synth", str(out), "--routing-locality"]).exit_code == 0
    ckpt = Checkpoint(out)
    cfg = Step35Config.from_dir(out)
    H, hd = cfg.hidden_size, cfg.head_dim
    topic, ctx = locality.channels(cfg)
    means = locality.mean_layers(cfg)
    assert sorted(means.values()) == [-1.0, 1.0] and len(topic) == len(ctx) > 0

    def w(name):
        return _weights(ckpt, name)

    embed = w("model.embed_tokens.weight")
    assert not embed[:, ctx].any()
    assert not embed[:locality.BYTES, topic].any() and np.all(embed[locality.BYTES:, topic].any(axis=1))
    for layer, sign in means.items():
        attn = f"model.layers.{layer}.self_attn."
        assert not w(attn + "q_proj.weight").any() and not w(attn + "g_proj.weight").any()
        assert not w(f"model.layers.{layer}.input_layernorm.weight")[topic].any()
        v = w(attn + "v_proj.weight").reshape(cfg.n_head_kv[layer], hd, H)
        assert np.array_equal(v[:, :len(topic), topic], np.broadcast_to(np.eye(len(topic)), v[:, :len(topic), topic].shape))
        assert np.count_nonzero(v) == cfg.n_head_kv[layer] * len(topic)
        o = w(attn + "o_proj.weight").reshape(H, cfg.n_head[layer], hd)
        # each context channel: the heads' mean of its topic channel, doubled for the gate's 0.5
        want = np.zeros_like(o)
        want[ctx, :, np.arange(len(ctx))] = sign * 2 / cfg.n_head[layer]
        np.testing.assert_allclose(o, want, rtol=1e-2)   # bf16
    lo, hi = sorted(means)
    written = np.concatenate([topic, ctx])
    for name in (n for n in ckpt.tensors if n.endswith(("o_proj.weight", "down_proj.weight"))):
        layer = int(name.split(".")[2])
        if layer in means and "self_attn" in name:
            continue
        x = w(name)
        assert not x[..., written, :].any(), name
        if lo <= layer < hi:
            assert not x.any(), name
    moe = sorted(cfg.moe_layers)[0]
    router = w(f"model.layers.{moe}.moe.gate.weight")
    norms = np.linalg.norm(router[:, ctx], axis=1)
    np.testing.assert_allclose(norms, norms[0], rtol=2e-2)   # bf16
    assert np.abs(w(f"model.layers.{moe}.moe.router_bias")).max() < 6 * locality.ROUTER_BIAS_STD


def test_locality_statistics_on_traces_with_known_answers():
    """A layer routing every step to the same 8 experts: all hot, LRU misses only the first 8.
    One sweeping through the 288 without repeats: nothing hot, no LRU hit."""
    from step_gguf.synth import locality

    same = [list(range(8))] * 100
    sweep = [[8 * i + j for j in range(8)] for i in range(36)]
    assert locality.statistics([same]) == (1.0, pytest.approx(792 / 800))
    assert locality.statistics([sweep]) == (0.0, 0.0)
    assert locality.statistics([same, sweep]) == (0.5, pytest.approx(792 / 1600))
    assert locality.lru(same, 4) == (0, 800)   # 8 experts cycling through 4 slots: LRU's worst case


def test_routing_locality_has_recency_and_no_hot_set(tmp_path):
    """Traced by the transformers oracle over the calibration text's first 256 words (~1700
    tokens), with the real expert count: LRU over 64 of 288 experts hits 50-80% (#27861: 67%;
    uniform routing: 22%) and the first half's 32 most used experts serve under 25% of the
    second half (#27861: 10%; uniform: 11%)."""
    from oracle import Oracle
    from transformers import PreTrainedTokenizerFast

    from step_gguf.native.tools import default_text
    from step_gguf.synth import locality

    src = synth(tmp_path / "local", "small", seed=0, routing_locality=True, n_expert=288, top_k=8)
    oracle, picks = Oracle(src), []
    for layer in oracle.model.layers:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.register_forward_hook(lambda m, a, r: picks.append(r[2].tolist()))
    text = " ".join(default_text().read_text().split()[:256])
    oracle.logits(PreTrainedTokenizerFast(tokenizer_file=str(src / "tokenizer.json"))(text)["input_ids"])
    hot, recent = locality.statistics(picks)
    assert hot < 0.25 and 0.5 < recent < 0.8, (hot, recent)
