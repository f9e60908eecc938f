"""Numeric parity: logits of converted GGUFs run by our llama.cpp vs transformers' Step 3.5.

Prompts are longer than the sliding window, so sliding and full layers both matter.
Tolerances: F32 max |Δlogit| / max |logit| ≤ 1e-3 with 100% top-1 agreement; BF16 and F16
mean KL(oracle ‖ GGUF) ≤ 1e-3.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from oracle import Oracle, kl_mean

from conftest import SHAPES

F32_MAX_REL = 1e-3
KL_MAX = 1e-3


def _prompt(ckpt, seed: int) -> list[int]:
    cfg = json.loads((ckpt / "config.json").read_text())
    window = cfg.get("text_config", cfg)["sliding_window"]
    n_tokens = len(json.loads((ckpt / "tokenizer.json").read_text())["model"]["vocab"])
    return np.random.default_rng(seed).integers(0, n_tokens, 3 * window + 7).tolist()


@pytest.fixture(scope="module")
def oracle_logits(checkpoint):
    cache = {}

    def get(name: str):
        if name not in cache:
            ckpt = checkpoint(name)
            tokens = _prompt(ckpt, seed=len(cache))
            cache[name] = (tokens, Oracle(ckpt).logits(tokens).numpy())
        return cache[name]
    return get


def _gguf_logits(path, tokens):
    from step_gguf.runtime import llama
    with llama.load(path, n_ctx=len(tokens) + 16, logits_all=True, exact=True) as m:
        return m.logits(tokens).astype(np.float64)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_f32_logits_match_oracle(shape, runtime, oracle_logits, gguf_file):
    tokens, want = oracle_logits(shape)
    got = _gguf_logits(gguf_file(shape, "f32"), tokens)
    rel = np.abs(got - want).max() / np.abs(want).max()
    top1 = (got.argmax(-1) == want.argmax(-1)).mean()
    print(f"{shape}: {len(tokens)} tokens, max rel err {rel:.2e}, top-1 {top1:.0%}")
    assert rel <= F32_MAX_REL
    assert top1 == 1.0


@pytest.mark.parametrize("shape, outtype", [("tiny", "bf16"), ("tiny", "f16"), ("small", "bf16"),
                                            ("tiny-fp8-3p7", "f16")])
def test_half_precision_kl_to_oracle(shape, outtype, runtime, oracle_logits, gguf_file):
    tokens, want = oracle_logits(shape)
    got = _gguf_logits(gguf_file(shape, outtype), tokens)
    kl = kl_mean(want, got)
    print(f"{shape} {outtype}: mean KL {kl:.2e}")
    assert kl <= KL_MAX


@pytest.mark.parametrize("change", ["sliding_window", "swiglu_limits", "rope_scaling",
                                    "moe_router_scaling_factor"])
def test_every_feature_moves_the_oracle(change, checkpoint, oracle_logits, tmp_path):
    """The parity prompts exercise each feature: switching one off moves the oracle's logits
    far beyond the parity tolerance, so a converter that mishandled it would fail above."""
    import shutil

    src = checkpoint("tiny")
    tokens, want = oracle_logits("tiny")
    alt = tmp_path / "alt"
    shutil.copytree(src, alt)
    cfg = json.loads((alt / "config.json").read_text())
    cfg[change] = {"sliding_window": 4096, "swiglu_limits": None, "rope_scaling": None,
                   "moe_router_scaling_factor": 1.0}[change]
    if change == "swiglu_limits":
        cfg["swiglu_limits_shared"] = None
    (alt / "config.json").write_text(json.dumps(cfg))
    moved = Oracle(alt).logits(tokens).numpy()
    assert np.abs(moved - want).max() / np.abs(want).max() > 10 * F32_MAX_REL
