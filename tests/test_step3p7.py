"""Step 3.7 as transformers writes it: a tiny `Step3p7ForConditionalGeneration` built and saved
by transformers itself (random init, `save_pretrained`: its normalised config schema, the text
tensors at `model.layers.*`, a vision tower at `vision_model.*`, no MTP weights) is the fixture,
not a layout of ours. It converts, says what it left out, reads to the same config as the hub's
schema of the same model, and its F32 GGUF's logits match that same transformers model's."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from cli_checks import cli

TOKENS = 3 * 16 + 7   # past the tiny preset's sliding window, so both attention types matter


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_src):
    """(the folder transformers saved, the model it saved): the tiny preset's text decoder with
    a two-layer vision tower; the tokenizer copied in, as a fine-tune's folder has it."""
    import torch
    from transformers.models.step3p7.configuration_step3p7 import Step3p7Config
    from transformers.models.step3p7.modeling_step3p7 import Step3p7ForConditionalGeneration

    hub = json.loads((tiny_src / "config.json").read_text())
    text = {k: v for k, v in hub.items() if k not in ("architectures", "model_type", "step_gguf_synthetic_seed")}
    cfg = Step3p7Config(text_config=text, vision_config=dict(width=64, layers=2, heads=4, image_size=56,
                                                              patch_size=14))
    torch.manual_seed(0)
    model = Step3p7ForConditionalGeneration(cfg).eval()
    out = tmp_path_factory.mktemp("step3p7") / "saved"
    model.save_pretrained(out)
    for f in tiny_src.glob("tokenizer*"):
        shutil.copy(f, out / f.name)
    return out, model


def test_the_saved_config_reads_as_the_hub_schema_of_the_same_model(saved, tiny_src):
    """transformers' schema (mlp_layer_types, mtp_layer_types, rope_parameters per attention
    type, per_layer_config) gives every field the hub's config.json gives."""
    from step_gguf.core.model import Step35Config

    folder, _ = saved
    raw = json.loads((folder / "config.json").read_text())["text_config"]
    assert {"mlp_layer_types", "mtp_layer_types", "rope_parameters", "per_layer_config"} <= set(raw)
    assert not {"moe_layers_enum", "rope_theta", "attention_other_setting"} & set(raw)
    ours, hub = Step35Config.from_dir(folder), Step35Config.from_dir(tiny_src)
    assert dataclasses.asdict(ours) == dataclasses.asdict(hub)


def test_it_converts_without_heads_and_says_what_it_left_out(saved, tmp_path):
    from step_gguf.pipeline.source_facts import read_facts

    folder, _ = saved
    out = tmp_path / "s.gguf"
    result = cli("convert", folder, "-o", out, "--outtype", "bf16")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 2, result.output
    assert "no weights for the 3 MTP heads" in notes[0] and "vision_model." in notes[1]
    facts = read_facts(out)
    assert facts.n_nextn == 0 and not any(facts.kind(t) == "mtp" for t in facts.tensors)
    split = cli("convert", folder, "-o", tmp_path / "x.gguf", "--mtp", "split")
    assert split.exit_code == 1 and "no draft to split off" in split.output
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.runtime
def test_f32_text_logits_match_the_model_transformers_saved(saved, tmp_path, runtime):
    """Max |logit difference| / max |logit| <= 1e-3 and the same top-1 everywhere, as the
    Step 3.5 parity tests hold."""
    import torch

    from step_gguf.runtime import llama

    folder, model = saved
    out = tmp_path / "s-f32.gguf"
    assert cli("convert", folder, "-o", out, "--outtype", "f32").exit_code == 0
    tokens = np.random.default_rng(7).integers(0, 1000, TOKENS).tolist()
    with torch.no_grad():
        want = model(input_ids=torch.tensor([tokens])).logits[0].to(torch.float64).numpy()
    with llama.load(out, n_ctx=len(tokens) + 16, logits_all=True, exact=True) as m:
        got = m.logits(tokens).astype(np.float64)
    rel = np.abs(got - want).max() / np.abs(want).max()
    print(f"max rel err {rel:.2e}, logit spread {want.std():.3g}, distinct top-1 {len(set(want.argmax(-1)))}")
    assert rel <= 1e-3, rel
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_synth_writes_step3p7_as_transformers_saves_it(saved, tmp_path):
    """`synth --step3p7`: every tensor transformers' own save_pretrained writes, by name and
    shape (its MTP blocks on top, which transformers leaves out), the same vision config and
    projector keys; transformers' from_pretrained loads it with nothing missing."""
    from safetensors import safe_open
    from transformers.models.step3p7.modeling_step3p7 import Step3p7ForConditionalGeneration

    from step_gguf.synth.writer import synth

    def tensors(folder) -> dict[str, tuple[int, ...]]:
        shapes = {}
        for f in folder.glob("*.safetensors"):
            with safe_open(f, "pt") as st:
                shapes |= {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}
        return shapes

    folder, _ = saved
    ours = synth(tmp_path / "syn", "tiny", step3p7=True)
    theirs, mine = tensors(folder), tensors(ours)
    heads = {k for k in mine if k.startswith("model.layers.") and int(k.split(".")[2]) >= 8}
    assert heads and set(mine) - heads == set(theirs)
    assert {k: mine[k] for k in theirs} == theirs
    raw, ref = (json.loads((f / "config.json").read_text()) for f in (ours, folder))
    assert raw["vision_config"] == ref["vision_config"]
    assert {k: raw[k] for k in ("projector_bias", "image_token_id")} == {k: ref[k] for k in ("projector_bias", "image_token_id")}
    loaded, info = Step3p7ForConditionalGeneration.from_pretrained(ours, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert all(".layers." in k and int(k.split(".layers.")[1].split(".")[0]) >= 8 for k in info["unexpected_keys"])
    assert loaded.config.vision_config.num_hidden_layers == raw["vision_config"]["num_hidden_layers"]
