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

from cli_checks import cli, cli_process, one_line_error, run_killed, uninterrupted

TOKENS = 3 * 16 + 7   # past the tiny preset's sliding window, so both attention types matter


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_src):
    """(the folder transformers saved, the model it saved): the tiny preset's text decoder with
    a two-layer vision tower; a tokenizer with the image's special tokens beside it, as a
    fine-tune's folder has one."""
    import torch
    from transformers.models.step3p7.configuration_step3p7 import Step3p7Config
    from transformers.models.step3p7.modeling_step3p7 import Step3p7ForConditionalGeneration

    from step_gguf.synth.tokenizer import tokenizer_files
    from step_gguf.synth.vision import IMAGE_PLACEHOLDER, VISION_TOKENS

    hub = json.loads((tiny_src / "config.json").read_text())
    text = {k: v for k, v in hub.items() if k not in ("architectures", "model_type", "step_gguf_synthetic_seed")}
    tokenizer = tokenizer_files(hub["vocab_size"], specials=VISION_TOKENS)
    ids = {t["content"]: t["id"] for t in tokenizer["tokenizer.json"]["added_tokens"]}
    cfg = Step3p7Config(text_config=text, vision_config=dict(width=64, layers=2, heads=4, image_size=112,
                                                              patch_size=14),
                        image_token_id=ids[IMAGE_PLACEHOLDER])
    torch.manual_seed(0)
    model = Step3p7ForConditionalGeneration(cfg).eval()
    out = tmp_path_factory.mktemp("step3p7") / "saved"
    model.save_pretrained(out)
    for name, content in tokenizer.items():
        (out / name).write_text(json.dumps(content))
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
    assert "no weights for the 3 MTP heads" in notes[0]
    assert "vision_model." in notes[1] and "--mmproj" in notes[1]
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


def _fields(path) -> tuple[dict, dict]:
    """(metadata, {tensor name: (type name, ggml shape)}) of a GGUF."""
    import gguf

    r = gguf.GGUFReader(path)
    meta = {f.name: f.contents() for f in r.fields.values() if not f.name.startswith("GGUF.")}
    return meta, {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape)) for t in r.tensors}


def test_mmproj_carries_what_mtmd_reads_typed_as_its_graph_runs(saved, tiny_src, tmp_path):
    """`convert --mmproj` writes OUT-mmproj.gguf beside OUT: every vision tensor under mtmd's
    names, with the keys its step3vl loader reads from vision_config; `quantize` types it by the
    recipe's vision rule (Q8_0) except what mtmd's graph pins: the position table F32, the
    convolution kernels F16, 1-D tensors F32."""
    from step_gguf.core.vision import TENSOR_MAP
    from step_gguf.files.checkpoint import Checkpoint

    folder, model = saved
    v = model.config.vision_config
    result = cli("convert", folder, "-o", tmp_path / "s.gguf", "--mmproj")
    assert result.exit_code == 0, result.output
    assert [line for line in result.output.splitlines() if line.startswith("note:")] == [result.output.splitlines()[0]]
    meta, tensors = _fields(tmp_path / "s-mmproj.gguf")
    assert meta["general.architecture"] == "clip" and meta["general.type"] == "mmproj"
    assert meta["clip.projector_type"] == "step3vl" and meta["clip.has_vision_encoder"] is True
    assert (meta["clip.vision.embedding_length"], meta["clip.vision.block_count"], meta["clip.vision.attention.head_count"],
            meta["clip.vision.feed_forward_length"], meta["clip.vision.image_size"], meta["clip.vision.patch_size"]) == \
        (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size, v.image_size, v.patch_size)
    assert meta["clip.vision.projection_dim"] == model.config.text_config.hidden_size
    assert np.allclose(meta["clip.vision.image_mean"], [0.48145466, 0.4578275, 0.40821073])
    n_vision = sum(1 for k in TENSOR_MAP if "{bid}" not in k) + v.num_hidden_layers * sum(1 for k in TENSOR_MAP if "{bid}" in k)
    assert len(tensors) == n_vision == len(Checkpoint(folder).outside)  # every tensor of the saved tower
    assert tensors["v.patch_embd.weight"] == ("F16", (14, 14, 3, 64))
    assert tensors["v.position_embd.weight"] == ("F32", (64, 64))
    assert tensors["mm.1.weight"][0] == "F16" and tensors["v.blk.1.attn_qkv.weight"] == ("BF16", (64, 192))
    assert tensors["mm.model.fc.weight"] == ("BF16", (256, model.config.text_config.hidden_size))

    q = cli("quantize", folder, "-o", tmp_path / "q.gguf", "--scheme", "int4-mixed", "--mmproj", tmp_path / "v.gguf")
    assert q.exit_code == 0, q.output
    _, typed = _fields(tmp_path / "v.gguf")
    for name, (kind, shape) in typed.items():  # rows of 373 (the tiny tower's FFN) fall back, as llama.cpp's do
        if len(shape) == 2 and name != "v.position_embd.weight":
            assert kind == ("Q8_0" if shape[0] % 32 == 0 else "F16"), (name, kind, shape)
    assert (typed["v.position_embd.weight"][0], typed["mm.0.weight"][0], typed["v.blk.0.ls1.weight"][0]) == ("F32", "F16", "F32")


def test_mmproj_refusals_leave_nothing(saved, tiny_src, tmp_path):
    folder, _ = saved
    one_line_error(cli("convert", tiny_src, "-o", tmp_path / "a.gguf", "--mmproj"), "no vision tower", "--mmproj")
    assert cli("convert", folder, "-o", tmp_path / "b.gguf").exit_code == 0
    one_line_error(cli("quantize", tmp_path / "b.gguf", "-o", tmp_path / "c.gguf", "--mmproj"),
                   "no vision tower", "checkpoint folder")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    raw = json.loads((broken / "config.json").read_text())
    raw["vision_config"]["num_hidden_layers"] = 3
    (broken / "config.json").write_text(json.dumps(raw))
    one_line_error(cli("convert", broken, "-o", tmp_path / "d.gguf", "--mmproj"), "resblocks.2", "missing")
    raw["vision_config"] |= {"num_hidden_layers": 2, "hidden_act": "relu"}
    (broken / "config.json").write_text(json.dumps(raw))
    one_line_error(cli("convert", broken, "-o", tmp_path / "d.gguf", "--mmproj"), "hidden_act", "relu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.gguf", "broken"]


def test_a_killed_mmproj_write_resumes_to_the_same_bytes(saved, tmp_path):
    import random

    folder, _ = saved
    want = uninterrupted(tmp_path / "whole", "convert", folder, "--mmproj")
    assert [p.name for p in want] == ["m-mmproj.gguf", "m.gguf"]
    out = tmp_path / "resumed"
    out.mkdir()
    args = ["convert", str(folder), "-o", str(out / "m.gguf"), "--mmproj"]
    run_killed(args, out / ".m-mmproj.gguf.partial.json", 10, random.Random(3))
    assert not (out / "m-mmproj.gguf").exists() and not (out / "m.gguf").exists()
    assert cli_process(*args).returncode == 0
    for ref in want:
        assert (out / ref.name).read_bytes() == ref.read_bytes(), ref.name


def test_the_plan_counts_the_projector_where_mtmd_encodes(saved, tmp_path):
    """The mmproj beside the model is found and loaded by the plan's command, its weights and one
    image's graph counted on the device mtmd encodes on: the GPU when there is one, else the CPU
    (--no-mmproj-offload). The image's tokens take context positions, which the KV already
    counts. --no-mmproj plans text only."""
    import gguf

    folder, _ = saved
    out = tmp_path / "s.gguf"
    assert cli("convert", folder, "-o", out, "--mmproj").exit_code == 0
    weights = sum(int(t.n_bytes) for t in gguf.GGUFReader(tmp_path / "s-mmproj.gguf").tensors)

    def plan(*args) -> dict:
        r = cli("plan", out, "-c", "256", "--json", *args)
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)

    gpu_figures = ("--profile", "custom", "--ram", "1", "--mem-bw", "10", "--vram", "0.5", "--gpu-bw", "100")
    for figures, device, flags in ((("--profile", "cpu"), "CPU", ["--no-mmproj-offload"]), (gpu_figures, "GPU", [])):
        seeing, text = plan(*figures), plan(*figures, "--no-mmproj")
        assert seeing["mmproj"] == str(tmp_path / "s-mmproj.gguf") and text["mmproj"] is None
        at = seeing["server_args"].index("--mmproj")
        assert seeing["server_args"][at:at + 2 + len(flags)] == ["--mmproj", seeing["mmproj"], *flags]
        assert "--mmproj" not in text["server_args"]
        vision = {d["name"]: d["buffers"].get("vision", 0) for d in seeing["devices"]}
        assert vision.pop(device) > weights and not any(vision.values()), vision
        assert sum(d["bytes"] for d in seeing["devices"]) - sum(d["bytes"] for d in text["devices"]) \
            == sum(d["buffers"].get("vision", 0) for d in seeing["devices"])


def _image(side: int) -> np.ndarray:
    """An RGB image with a gradient, noise and saturated corners (0 and 255 after normalising)."""
    rng = np.random.default_rng(1)
    img = np.linspace(0, 127, side)[None, :, None] + rng.integers(0, 128, (side, side, 3))
    img[:8, :8], img[-8:, -8:] = 255, 0
    return img.clip(0, 255).astype(np.uint8)


@pytest.mark.runtime
def test_image_features_and_first_token_match_the_model_transformers_saved(saved, tmp_path, runtime):
    """One image of vision_config.image_size square, through mtmd (our build, our F32 mmproj) and
    through transformers' Step3p7 (pixels normalised as its image processor does, which resizes
    nothing at that size): features within 1e-3 of the largest, and the same first token after
    "look: <image> done"."""
    import torch

    from mtmd_embed import embed_and_decode

    folder, model = saved
    assert cli("convert", folder, "-o", tmp_path / "s.gguf", "--outtype", "f32", "--mmproj").exit_code == 0
    side = model.config.vision_config.image_size
    img = _image(side)
    got, tokens, logits = embed_and_decode(tmp_path / "s.gguf", tmp_path / "s-mmproj.gguf", img, "look: ", " done")
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None] * 255
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None] * 255
    pixels = ((torch.from_numpy(img).permute(2, 0, 1).float() - mean) / std)[None]
    ids = [model.config.image_token_id if t is None else t for t in tokens]
    with torch.no_grad():
        want = model.get_image_features(pixel_values=pixels).pooler_output[0].double().numpy()
        last, other = (model(input_ids=torch.tensor([ids]), pixel_values=p).logits[0, -1].double().numpy()
                       for p in (pixels, -pixels))  # the other: the image's negative, whose answer differs
    rel = np.abs(got - want).max() / np.abs(want).max()
    off, seen = np.abs(logits - last).max(), np.abs(other - last).max()
    print(f"features {want.shape}: max rel err {rel:.2e}; first token {logits.argmax()} vs {last.argmax()}; "
          f"logits off by {off:.2e}, {seen:.2e} for another image")
    assert got.shape == want.shape and rel <= 1e-3, rel
    assert logits.argmax() == last.argmax() and off * 20 < seen


@pytest.fixture(scope="module")
def vision_served(saved, tmp_path_factory, runtime):
    """`serve` on the transformers-saved model converted with --mmproj: it finds the mmproj
    beside the model. (the process, its base URL, the model, its GGUF)"""
    import signal

    from scripted import start_serve

    folder, model = saved
    out = tmp_path_factory.mktemp("served") / "s.gguf"
    assert cli("convert", folder, "-o", out, "--mmproj").exit_code == 0
    proc, api, said = start_serve(out, "-c", "256", "--parallel", "1")
    assert any(line.startswith("images: with") and "s-mmproj.gguf" in line for line in said), said
    try:
        yield proc, api.removesuffix("/v1"), model, out
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


ASK_IMAGE = "What is in this picture?"


def _openai_turn(api: str, image: bytes | None):
    import base64

    import openai

    client = openai.OpenAI(base_url=f"{api}/v1", api_key="none", max_retries=0, timeout=120)
    parts = [{"type": "text", "text": ASK_IMAGE}]
    if image is not None:
        url = "data:image/png;base64," + base64.b64encode(image).decode()
        parts.insert(0, {"type": "image_url", "image_url": {"url": url}})
    return client.chat.completions.create(model="step", messages=[{"role": "user", "content": parts}],
                                          max_tokens=8, temperature=0)


def test_official_clients_send_images_that_reach_the_decoder(vision_served):
    """OpenAI image_url parts (data URLs) and Anthropic base64 image blocks: the prompt grows by
    the image's tokens (4 features between <im_start> and <im_end>), two images get two answers,
    and both clients get the same answer for the same image."""
    import base64

    import anthropic

    from mtmd_embed import png

    _, api, model, _ = vision_served
    side = model.config.vision_config.image_size
    img = _image(side)
    a, b = png(img), png(255 - img)
    text_only, seen_a, seen_b = _openai_turn(api, None), _openai_turn(api, a), _openai_turn(api, b)
    n_features = (side // 14 // 4) ** 2
    assert seen_a.usage.prompt_tokens == text_only.usage.prompt_tokens + n_features + 2
    assert seen_a.choices[0].message.content != seen_b.choices[0].message.content
    client = anthropic.Anthropic(base_url=api, api_key="none", max_retries=0, timeout=120)
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": base64.b64encode(a).decode()}}
    reply = client.messages.create(model="step", max_tokens=8, extra_body={"temperature": 0}, messages=[
        {"role": "user", "content": [image, {"type": "text", "text": ASK_IMAGE}]}])
    assert reply.content[0].text == seen_a.choices[0].message.content


def test_bad_images_are_refused_in_one_line_and_the_server_stays(vision_served):
    """Not an image, a truncated one, 1x1 pixels, 20000x20000 (a 1 MB PNG that decodes to 1.2 GB):
    each a 400 whose message says what is wrong; llama-server is the same process after."""
    import openai

    from mtmd_embed import blank_png, png
    from scripted import children

    proc, api, _, _ = vision_served
    pid = children(proc.pid)
    whole = png(_image(112))
    for what, data, says in (("not an image", b"GIF89a? no, a text file" * 4, "could not be decoded"),
                             ("truncated", whole[: len(whole) // 2], "truncated"),
                             ("1x1", png(np.zeros((1, 1, 3), np.uint8)), "1x1 pixels"),
                             ("20000x20000", blank_png(20000, 20000), "too large")):
        with pytest.raises(openai.BadRequestError) as err:
            _openai_turn(api, data)
        message = err.value.body["message"] if isinstance(err.value.body, dict) else str(err.value)
        assert says in message and "\n" not in message, (what, message)
    assert children(proc.pid) == pid and _openai_turn(api, whole).choices[0].message.content


def test_run_sends_an_image_file(vision_served, tmp_path):
    """run --image FILE: the image's tokens are in the prompt, as through serve; a missing file,
    or a model without its mmproj, is one line before anything loads."""
    from mtmd_embed import png

    _, _, model, gguf_path = vision_served
    side = model.config.vision_config.image_size
    image = tmp_path / "a.png"
    image.write_bytes(png(_image(side)))
    seen, text = (json.loads(cli("run", gguf_path, "-p", ASK_IMAGE, "-n", "4", "-c", "256", "--json", *more).stdout)
                  for more in (("--image", image), ()))
    assert seen["prompt_tokens"] == text["prompt_tokens"] + (side // 14 // 4) ** 2 + 2
    one_line_error(cli("run", gguf_path, "-p", "x", "--image", tmp_path / "none.png"), "none.png", "does not exist")
    one_line_error(cli("run", gguf_path, "-c", "256", "-p", "x", "--no-mmproj", "--image", image), "--image needs",
                   "--mmproj")
