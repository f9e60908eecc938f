"""End-to-end conversion on tiny checkpoints: tensor contents, MTP modes, and bad input."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from step_gguf.cli import main
from step_gguf.core.errors import CheckpointError
from step_gguf.core.model import Step35Config, gguf_name
from step_gguf.files.checkpoint import Checkpoint
from step_gguf.pipeline.convert import convert
from step_gguf.synth.writer import synth


def _tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _hub_f32(ref) -> np.ndarray:
    """A hub tensor as float32, decoded here independently of step_gguf.files.checkpoint."""
    raw = ref.read()
    if ref.dtype == "BF16":
        return (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(ref.shape)
    assert ref.dtype == "F32"
    return np.frombuffer(raw, np.float32).reshape(ref.shape)


def test_bf16_output_is_bit_exact_and_norms_get_plus_one(checkpoint, gguf_file):
    src = checkpoint("tiny")
    out = _tensors(gguf_file("tiny", "bf16"))
    ckpt = Checkpoint(src)
    for name, ref in ckpt.tensors.items():
        t = out[gguf_name(name)]
        assert tuple(reversed([int(d) for d in t.shape])) == ref.shape or len(ref.shape) == 1
        if name.endswith("norm.weight"):
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(np.asarray(t.data), _hub_f32(ref) + 1.0)
        elif ".moe.gate.weight" in name or ref.dtype == "F32":
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(np.asarray(t.data).reshape(ref.shape), _hub_f32(ref))
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.BF16
            assert np.asarray(t.data).tobytes() == ref.read(), name
    cfg = Step35Config.from_dir(src)
    assert len(out) == len(cfg.expected_shapes()) + 1  # + rope_freqs
    assert out["rope_freqs.weight"].data.shape == (cfg.head_dim // 2,)


def test_q8_0_dequantises_close_to_source(checkpoint, gguf_file, runtime):  # ggml encodes q8_0
    ckpt = Checkpoint(checkpoint("tiny"))
    out = _tensors(gguf_file("tiny", "q8_0"))
    t = out["blk.3.ffn_up_exps.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    ref = _hub_f32(ckpt.tensors["model.layers.3.moe.up_proj.weight"])
    deq = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(ref.shape)
    # Q8_0: per-32-block steps of absmax/127, the step stored as f16 (relative error 2^-11,
    # times up to 127 steps): the error is at most half a step plus 127 * 2^-11 of one
    step = np.abs(ref.reshape(-1, 32)).max(1, keepdims=True) / 127
    err = np.abs(deq.reshape(-1, 32) - ref.reshape(-1, 32))
    assert (err <= step * (0.5 + 127 * 2.0**-11)).all()
    assert err.mean() > 0.1 * step.mean()  # it is really quantised


def test_mtp_modes(checkpoint, workdir):
    src = checkpoint("tiny")
    cfg = Step35Config.from_dir(src)
    drop = workdir / "drop.gguf"
    convert(src, drop, mtp="drop")
    r = gguf.GGUFReader(drop)
    assert r.fields["step35.block_count"].contents() == cfg.n_layer
    assert "step35.nextn_predict_layers" not in r.fields
    assert not any(".nextn." in t.name or t.name.startswith(f"blk.{cfg.n_layer}.") for t in r.tensors)

    trunk, draft = workdir / "trunk.gguf", workdir / "draft.gguf"
    convert(src, trunk, mtp="split", draft_out=draft)
    t_names, d_names = set(_tensors(trunk)), set(_tensors(draft))
    for path in (trunk, draft):  # both declare the MTP blocks so llama.cpp can pair them
        fields = gguf.GGUFReader(path).fields
        assert fields["step35.nextn_predict_layers"].contents() == cfg.n_nextn
        assert fields["step35.block_count"].contents() == cfg.n_layer_all
    assert not any(n.startswith("blk.") and int(n.split(".")[1]) >= cfg.n_layer for n in t_names)
    assert all(int(n.split(".")[1]) >= cfg.n_layer for n in d_names if n.startswith("blk."))
    assert {"token_embd.weight", "output.weight", "output_norm.weight"} <= d_names
    assert t_names | d_names == set(_tensors(convert(src, workdir / "all.gguf").outputs[0]))


def test_fp8_and_step3p7_dequantise_to_the_block_scaled_weights(checkpoint, gguf_file):
    import torch
    from safetensors.torch import load_file

    src = checkpoint("tiny-fp8-3p7")
    out = _tensors(gguf_file("tiny-fp8-3p7", "f32"))
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.2.moe.down_proj.weight"
    w = load_file(src / index[name])[name]
    s = load_file(src / index[name + "_scale_inv"])[name + "_scale_inv"]
    assert w.dtype == torch.float8_e4m3fn
    block = json.loads((src / "config.json").read_text())["quantization_config"]["weight_block_size"]
    R, C = w.shape[-2:]
    full = w.float() * s.repeat_interleave(block[0], -2)[..., :R, :].repeat_interleave(block[1], -1)[..., :C]
    got = np.asarray(out["blk.2.ffn_down_exps.weight"].data).reshape(full.shape)
    np.testing.assert_allclose(got, full.numpy(), rtol=1e-6, atol=0)
    assert not any("vision" in n for n in out)


def test_cli_convert_reports_and_writes(checkpoint, workdir):
    out = workdir / "cli.gguf"
    result = CliRunner().invoke(main, ["convert", str(checkpoint("tiny")), "-o", str(out), "--outtype", "f16"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output and "tensors" in result.output
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == 1


# ------------------------------------------------------------------ bad input

def _break_missing_shard(src: Path) -> None:
    next(src.glob("model-00002-*.safetensors")).unlink()


def _break_truncated_shard(src: Path) -> None:
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])


def _break_shape(src: Path) -> None:
    cfg = json.loads((src / "config.json").read_text())
    cfg["moe_intermediate_size"] += 16
    (src / "config.json").write_text(json.dumps(cfg))


def _break_architecture(src: Path) -> None:
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["MixtralForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))


def _break_tokenizer(src: Path) -> None:
    tok = json.loads((src / "tokenizer.json").read_text())
    tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{N}{1,5}"
    (src / "tokenizer.json").write_text(json.dumps(tok))


def _poison(src: Path, name: str) -> None:
    """Write a NaN into the first element of tensor `name`."""
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    shard = src / index[name]
    blob = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", blob[:8])
    info = json.loads(blob[8:8 + n])[name]
    at = 8 + n + info["data_offsets"][0]
    nan = {"BF16": b"\xc0\x7f", "F32": struct.pack("<f", math.nan)}[info["dtype"]]
    blob[at:at + len(nan)] = nan
    shard.write_bytes(bytes(blob))


BREAKAGES = {
    "missing shard": (_break_missing_shard, "shard model-00002-of-00003.safetensors is missing"),
    "truncated shard": (_break_truncated_shard, "is truncated"),
    "shape mismatch": (_break_shape, "tensor model.layers.2.moe.down_proj.weight has shape [8, 64, 48], config.json implies [8, 64, 64]"),
    "unknown architecture": (_break_architecture, "unknown architecture ['MixtralForCausalLM']"),
    "unknown tokenizer": (_break_tokenizer, "unknown pre-tokenizer"),
    "NaN in a copied expert tensor": (lambda s: _poison(s, "model.layers.5.moe.down_proj.weight"), "NaN"),
    "NaN in a norm": (lambda s: _poison(s, "model.layers.1.input_layernorm.weight"), "NaN"),
    "NaN in the router bias": (lambda s: _poison(s, "model.layers.4.moe.router_bias"), "NaN"),
}


@pytest.mark.parametrize("case", list(BREAKAGES))
def test_bad_input_gives_one_line_error_and_no_output(case, tmp_path):
    src = synth(tmp_path / "ckpt", "tiny", seed=3)
    breakage, message = BREAKAGES[case]
    breakage(src)
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    result = CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--outtype", "bf16"])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert message in lines[0]
    assert list(out.parent.iterdir()) == []  # neither the output nor a temporary


def test_tokenizer_override_accepts_unknown_structure(tmp_path):
    src = synth(tmp_path / "ckpt", "tiny", seed=4)
    _break_tokenizer(src)
    out = tmp_path / "m.gguf"
    result = CliRunner().invoke(main, ["convert", str(src), "-o", str(out), "--tokenizer-pre", "deepseek-v3"])
    assert result.exit_code == 0, result.output
    assert gguf.GGUFReader(out).fields["tokenizer.ggml.pre"].contents() == "deepseek-v3"


def test_existing_output_survives_a_failed_conversion(tmp_path):
    src = synth(tmp_path / "ckpt", "tiny", seed=5)
    _break_truncated_shard(src)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous model")
    assert CliRunner().invoke(main, ["convert", str(src), "-o", str(out)]).exit_code != 0
    assert out.read_bytes() == b"previous model"


def test_progress_counts_every_source_byte(checkpoint, tmp_path, runtime):  # q8_0: ggml
    seen, totals = [], []
    result = convert(checkpoint("tiny"), tmp_path / "m.gguf", outtype="q8_0",
                     on_start=totals.append, on_bytes=seen.append)
    assert totals == [result.source_bytes] and sum(seen) == result.source_bytes
    ckpt = Checkpoint(checkpoint("tiny"))
    rope = Step35Config.from_dir(checkpoint("tiny")).head_dim // 2 * 4  # generated rope_freqs
    assert result.source_bytes == sum(r.nbytes for r in ckpt.tensors.values()) + rope


def test_buffered_copy_fallback_is_bit_exact(checkpoint, gguf_file, tmp_path, monkeypatch):
    import os

    def no_kernel_copy(*args):
        raise OSError(18, "Invalid cross-device link")
    monkeypatch.setattr(os, "copy_file_range", no_kernel_copy)
    out = tmp_path / "fallback.gguf"
    convert(checkpoint("tiny"), out, outtype="bf16")
    got, want = _tensors(out), _tensors(gguf_file("tiny", "bf16"))
    assert got.keys() == want.keys()
    for name in want:
        assert np.asarray(got[name].data).tobytes() == np.asarray(want[name].data).tobytes(), name


def test_declared_heads_without_weights_convert_without_heads(tmp_path):
    """A config naming MTP heads whose weights are all absent (transformers' save_pretrained
    writes such checkpoints) converts without heads, as --mtp drop does, and says so; split has
    nothing to split off."""
    src = synth(tmp_path / "ckpt", "tiny", seed=6, n_nextn=0)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 3  # declared, but the weights were left out
    (src / "config.json").write_text(json.dumps(cfg))
    kept = convert(src, tmp_path / "keep.gguf", mtp="keep")
    assert len(kept.notes) == 1 and "no weights for the 3 MTP heads" in kept.notes[0]
    convert(src, tmp_path / "drop.gguf", mtp="drop")
    for name in ("keep", "drop"):
        fields = gguf.GGUFReader(tmp_path / f"{name}.gguf").fields
        assert fields["step35.block_count"].contents() == 8
        assert "step35.nextn_predict_layers" not in fields or fields["step35.nextn_predict_layers"].contents() == 0
    with pytest.raises(CheckpointError, match="no draft to split off"):
        convert(src, tmp_path / "split.gguf", mtp="split", draft_out=tmp_path / "split-mtp.gguf")


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_f16_and_f32_sources_convert_exactly(dtype, checkpoint, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    src = tmp_path / dtype
    shutil.copytree(checkpoint("tiny"), src)
    source = {}
    for shard in src.glob("*.safetensors"):
        tensors = {k: v.to(getattr(torch, dtype)) if v.dtype == torch.bfloat16 else v
                   for k, v in load_file(shard).items()}
        save_file(tensors, shard)
        source |= tensors
    assert Checkpoint(src).tensors["model.layers.3.moe.up_proj.weight"].dtype == {"float16": "F16", "float32": "F32"}[dtype]
    out = tmp_path / "m.gguf"
    convert(src, out, outtype="f32")
    got = _tensors(out)
    for name, t in source.items():
        want = t.float().numpy() + (1.0 if name.endswith("norm.weight") else 0.0)
        np.testing.assert_array_equal(np.asarray(got[gguf_name(name)].data).reshape(want.shape), want, name)


def test_step3p7_wrapper_without_prefixes(checkpoint, gguf_file, tmp_path):
    import shutil

    src = tmp_path / "wrapped"
    shutil.copytree(checkpoint("tiny"), src)
    text = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({
        "architectures": ["Step3p7ForConditionalGeneration"], "model_type": "step3p7",
        "text_config": {k: v for k, v in text.items() if k != "architectures"}}))
    out = tmp_path / "m.gguf"
    convert(src, out, outtype="f32")
    got, want = _tensors(out), _tensors(gguf_file("tiny", "f32"))
    assert got.keys() == want.keys()
    assert all(np.asarray(got[n].data).tobytes() == np.asarray(want[n].data).tobytes() for n in want)
