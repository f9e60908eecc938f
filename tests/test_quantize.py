"""Quantization: pricing, byte equality with llama.cpp's quantizer, bad input (recipes:
test_recipe.py; budget mode: test_budget.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as Q

from step_gguf.cli import main
from step_gguf.core.recipe import Recipe, load_recipe
from step_gguf.pipeline.output import OutputJob
from step_gguf.pipeline.quantize import (KV_RECIPE, KV_RECIPE_TOML, QuantizeOptions, dry_run, price_stock, quantize)

def _tensors(path: Path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


# ---------------------------------------------------------------- pricing (no weights)


def test_real_model_dry_run_is_the_sum_of_its_shapes(real_config):
    """int4-mixed on the real 196B config, priced from config.json alone, against bytes worked
    out here from the published shapes and the recipe's intent."""
    p = dry_run(real_config, load_recipe("int4-mixed"))
    H, V, E, Ie, I, hd = 4096, 128896, 288, 1280, 11264, 128
    bpw = {"Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625, "Q8_0": 8.5, "F32": 32}

    def b(n_params: int, qtype: str) -> float:
        return n_params * bpw[qtype] / 8

    full = [i for i in range(45) if i % 4 == 0]
    heads = {i: (64 if i in full or i >= 45 else 96) for i in range(48)}
    moe = range(3, 45)
    down_q5 = [i for i in moe if i < 0.25 * 45 or i >= 0.70 * 45]  # "0%-25%, 70%-100%"
    want = b(V * H, "Q8_0") + b(V * H, "Q6_K") + b(H, "F32")             # token_embd, output, norm
    for i in range(45):
        q = heads[i] * hd * H
        want += b(2 * q, "Q6_K") + b(2 * 8 * hd * H + heads[i] * H, "Q8_0")  # q, o | k, v, gate
        want += b(2 * H + 2 * hd, "F32")                                    # norms
        if i in moe:
            want += b(E * H, "F32") + b(E, "F32")                            # router, bias
            want += b(2 * E * Ie * H, "Q4_K")                                 # gate/up experts
            want += b(E * Ie * H, "Q5_K" if i in down_q5 else "Q4_K")         # down experts
            want += b(3 * Ie * H, "Q8_0")                                     # shared expert
        else:
            want += b(3 * I * H, "Q6_K")                                      # dense FFN
    for i in range(45, 48):  # MTP blocks: every matrix Q4_K (they only draft)
        q = heads[i] * hd * H
        want += b(2 * q + 2 * 8 * hd * H + heads[i] * H + 3 * I * H, "Q4_K")  # attention, dense FFN
        want += b(2 * H * H + V * H, "Q4_K")                                 # eh_proj, head
        want += b(5 * H + 2 * hd, "F32")                                     # norms
    want += b(hd // 2, "F32")                                                # rope_freqs
    assert len(down_q5) == 22
    assert p.total_bytes == want
    assert p.bpw == pytest.approx(8 * want / p.n_params)


@pytest.mark.runtime
def test_real_model_int4_mixed_is_no_larger_than_stock_q4_k_m(runtime, real_config):
    ours = dry_run(real_config, load_recipe("int4-mixed"))
    stock = price_stock(real_config, "Q4_K_M")
    print(f"int4-mixed {ours.total_bytes / 2**30:.2f} GiB, stock Q4_K_M {stock.total_bytes / 2**30:.2f} GiB")
    assert ours.total_bytes <= stock.total_bytes
    # llama.cpp's own choice, not ours: gate/up experts Q4_K, down Q6_K on some layers
    assert stock.types["blk.20.ffn_up_exps.weight"] == "Q4_K"
    assert {stock.types[f"blk.{i}.ffn_down_exps.weight"] for i in range(3, 45)} == {"Q4_K", "Q6_K"}
    assert set(stock.types) == {r.name for r in ours.rows}


def test_dry_run_cli_json_reads_no_weight(checkpoint, tmp_path):
    """A checkpoint with every shard emptied prices exactly like the intact one."""
    import shutil

    src = checkpoint("tiny")
    hollow = tmp_path / "hollow"
    shutil.copytree(src, hollow)
    for shard in hollow.glob("*.safetensors"):
        head = shard.read_bytes()[:8]
        n = int.from_bytes(head, "little")
        shard.write_bytes(shard.read_bytes()[: 8 + n])  # header only: no weight bytes left
    result = CliRunner().invoke(main, ["quantize", str(hollow), "--dry-run", "--json", "--scheme", "int8"])
    assert result.exit_code != 0 and "truncated" in result.output  # validation reads headers
    result = CliRunner().invoke(main, ["quantize", str(src / "config.json"), "--dry-run", "--json",
                                       "--scheme", "int8"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["total_bytes"] == sum(t["bytes"] for t in doc["tensors"])
    assert doc["bpw"] == pytest.approx(8 * doc["total_bytes"] / doc["n_params"], abs=1e-3)
    assert doc == dry_run(src, load_recipe("int8")).to_json()


# ---------------------------------------------------------------- byte equality with llama.cpp

def _llama_quantize(runtime, src: Path, out: Path, qtype: str, imatrix: Path | None) -> None:
    args = [str(runtime.tool("llama-quantize")), "--pure"]
    if imatrix is not None:
        args += ["--imatrix", str(imatrix)]
    subprocess.run(args + [str(src), str(out), qtype], check=True, capture_output=True)


@pytest.mark.runtime
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"])
def test_bytes_equal_llama_quantize(qtype, with_imatrix, mini, mini_imatrix, runtime, tmp_path):
    src, bf16 = mini
    imatrix = mini_imatrix if with_imatrix else None
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    quantize(src, ours, load_recipe(qtype), QuantizeOptions(imatrix=imatrix))
    _llama_quantize(runtime, bf16, theirs, qtype, imatrix)
    a, b = _tensors(ours), _tensors(theirs)
    assert set(a) == set(b)
    quantized = 0
    for name, t in a.items():
        assert t.tensor_type == b[name].tensor_type, name
        assert np.asarray(t.data).tobytes() == np.asarray(b[name].data).tobytes(), name
        quantized += t.tensor_type == Q[qtype]
    assert quantized >= 20  # experts, attention, embeddings: not just a couple


@pytest.mark.runtime
def test_imatrix_changes_the_bytes(mini, mini_imatrix, tmp_path):
    """The equality above with importance data is not vacuous: the data changes the result."""
    src, _ = mini
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "weighted.gguf"
    quantize(src, plain, load_recipe("Q4_K"))
    quantize(src, weighted, load_recipe("Q4_K"), QuantizeOptions(imatrix=mini_imatrix))
    name = "blk.1.ffn_up_exps.weight"
    assert np.asarray(_tensors(plain)[name].data).tobytes() != np.asarray(_tensors(weighted)[name].data).tobytes()


@pytest.mark.runtime
def test_gguf_source_gives_the_same_file_and_records_the_recipe(mini, tmp_path):
    src, bf16 = mini
    from_ckpt, from_gguf = tmp_path / "a.gguf", tmp_path / "b.gguf"
    quantize(src, from_ckpt, load_recipe("int4-mixed"), QuantizeOptions(threads=1))
    quantize(bf16, from_gguf, load_recipe("int4-mixed"), QuantizeOptions(threads=2))
    a, b = _tensors(from_ckpt), _tensors(from_gguf)
    assert {n: np.asarray(t.data).tobytes() for n, t in a.items()} == \
           {n: np.asarray(t.data).tobytes() for n, t in b.items()}
    reader = gguf.GGUFReader(from_gguf)
    assert reader.get_field(KV_RECIPE).contents() == "int4-mixed"
    assert Recipe.from_toml(reader.get_field(KV_RECIPE_TOML).contents(), "kv") == load_recipe("int4-mixed")
    assert reader.get_field("step35.expert_count").contents() == gguf.GGUFReader(bf16).get_field(
        "step35.expert_count").contents()


@pytest.mark.runtime
def test_equalization_leaves_the_f32_function_unchanged(mini, mini_imatrix, tmp_path, runtime):
    """Scales folded into every norm and its consumers (alpha 0.5, F32 storage): the logits stay
    those of the plain F32 file, while the stored tensors really changed."""
    from step_gguf.pipeline.output import write_outputs
    from step_gguf.pipeline.equalize import fold
    from step_gguf.files.imatrix import load_imatrix
    from step_gguf.pipeline.quantize import open_source
    from step_gguf.runtime import llama

    src, _ = mini
    f32 = Recipe.single(Q.F32)
    plain, folded = tmp_path / "plain.gguf", tmp_path / "folded.gguf"
    source = open_source(src, f32)
    write_outputs([OutputJob(plain, source.plans, source.write_kv)], lambda n: None, lambda n: None)
    plans = fold(source.plans, load_imatrix(mini_imatrix), alpha=0.5)
    write_outputs([OutputJob(folded, plans, source.write_kv)], lambda n: None, lambda n: None)
    a, b = _tensors(plain), _tensors(folded)
    changed = [n for n in a if np.asarray(a[n].data).tobytes() != np.asarray(b[n].data).tobytes()]
    assert "blk.1.attn_norm.weight" in changed and "blk.1.ffn_up_exps.weight" in changed
    assert "blk.1.ffn_gate_inp.weight" in changed  # the router reads the same norm
    tokens = list(range(5, 200, 3))
    with llama.load(plain, n_ctx=256, logits_all=True, exact=True) as m:
        want = m.logits(tokens).astype(np.float64)
    with llama.load(folded, n_ctx=256, logits_all=True, exact=True) as m:
        got = m.logits(tokens).astype(np.float64)
    rel = np.abs(got - want).max() / np.abs(want).max()
    print(f"equalized F32 vs plain F32: max rel err {rel:.2e}")
    assert rel <= 1e-4


@pytest.mark.runtime
def test_requantizing_needs_consent(mini, tmp_path):
    src, _ = mini
    q8 = tmp_path / "q8.gguf"
    quantize(src, q8, load_recipe("int8"))
    out = tmp_path / "q4.gguf"
    result = CliRunner().invoke(main, ["quantize", str(q8), "-o", str(out), "--scheme", "Q4_K"])
    assert result.exit_code != 0 and "--allow-requantize" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()
    result = CliRunner().invoke(main, ["quantize", str(q8), "-o", str(out), "--scheme", "Q4_K",
                                       "--allow-requantize"])
    assert result.exit_code == 0, result.output
    assert _tensors(out)["blk.1.ffn_up_exps.weight"].tensor_type == Q.Q4_K


@pytest.mark.runtime
def test_quantized_gguf_runs_in_our_runtime_and_server(mini, tmp_path, runtime):
    import urllib.request

    from step_gguf.runtime import llama, server

    src, _ = mini
    out = tmp_path / "int4.gguf"
    quantize(src, out, load_recipe("int4-mixed"))
    with llama.load(out, n_ctx=256, logits_all=True) as m:
        logits = m.logits(m.tokenize("Step three point five"))
        assert logits.shape[1] == m.n_vocab and np.isfinite(logits).all()
    with server.serve(out, n_ctx=256) as url:
        req = urllib.request.Request(f"{url}/completion", data=json.dumps(
            {"prompt": "Step three", "n_predict": 4}).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert json.loads(resp.read())["tokens_predicted"] == 4


# ---------------------------------------------------------------- bad input

def _fails_cleanly(args: list[str], out: Path, message: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))  # no partial left beside it


@pytest.mark.runtime
def test_bad_input_gives_one_line_and_no_output(mini, workdir, tmp_path):
    src, _ = mini
    out = tmp_path / "out.gguf"
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\nmatch = "."\ntype = "Q4_KM"\n')
    _fails_cleanly(["quantize", str(src), "-o", str(out), "--recipe", str(bad)], out, "unknown type 'Q4_KM'")
    _fails_cleanly(["quantize", str(src), "-o", str(out), "--scheme", "int5-magic"], out, "unknown scheme")
    _fails_cleanly(["quantize", str(src), "-o", str(out), "--scheme", "IQ2_XS"], out,
                   "cannot quantize without importance data")
    _fails_cleanly(["quantize", str(src), "-o", str(out), "--scheme", "int3-mixed"], out,
                   "needs an importance matrix")
    # an importance matrix of another model (other widths)
    from step_gguf.pipeline.convert import convert
    from step_gguf.native import tools
    from step_gguf.synth.writer import synth

    other = synth(tmp_path / "other", "tiny", seed=9)
    other_gguf = tmp_path / "other.gguf"
    convert(other, other_gguf, outtype="f32")
    other_imatrix = tools.imatrix(other_gguf, tmp_path / "other-imatrix.gguf", ctx=64, chunks=2)
    _fails_cleanly(["quantize", str(src), "-o", str(out), "--imatrix", str(other_imatrix)], out,
                   "made for another model")
    _fails_cleanly(["quantize", str(src / "config.json"), "-o", str(out)], out, "can be priced")


def test_a_failure_mid_write_leaves_the_existing_output(checkpoint, tmp_path, runtime):
    """A NaN deep in the last tensor fails the run after most of the file is written."""
    import shutil

    from step_gguf.files.checkpoint import Checkpoint

    src = tmp_path / "nan"
    shutil.copytree(checkpoint("tiny"), src)
    ckpt = Checkpoint(src)
    ref = ckpt.tensors[max(ckpt.tensors, key=lambda n: (ckpt.tensors[n].shard.name, ckpt.tensors[n].offset))]
    with open(ref.shard, "r+b") as f:
        f.seek(ref.offset + ref.nbytes - 4)
        f.write(b"\xc0\x7f\xc0\x7f")  # BF16 NaNs
    out = tmp_path / "keep.gguf"
    out.write_bytes(b"precious")
    result = CliRunner().invoke(main, ["quantize", str(src), "-o", str(out), "--scheme", "Q8_0"])
    assert result.exit_code != 0 and "NaN" in result.output
    assert out.read_bytes() == b"precious"
    assert not list(tmp_path.glob(".keep.gguf*"))
