"""Importance matrices (llama-imatrix on converted models, read exactly as llama-quantize reads
them) and quantization error measured by llama-perplexity's KL divergence."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from step_gguf.cli import main
from step_gguf.core.errors import StepGGUFError
from step_gguf.core.model import Step35Config
from step_gguf.files.imatrix import (PROPAGATION_GAINS, PROPAGATION_POINTS, ImatrixError, load_imatrix, model_shapes)
from step_gguf.native import build as b

CTX, CHUNKS = 64, 4


def _write(path: Path, entries: dict[str, tuple[np.ndarray, np.ndarray]], *,
           meta: bool = True, chunk_size: int = 512, gains: tuple | None = None) -> Path:
    """An imatrix GGUF laid out as llama-imatrix writes it (with `gains`: (points, values) as
    `step-gguf imatrix` adds them)."""
    w = gguf.GGUFWriter(path, arch="")
    if meta:
        w.add_string("general.type", "imatrix")
        w.add_array("imatrix.datasets", ["calibration.txt"])
        w.add_uint32("imatrix.chunk_count", 3)
        w.add_uint32("imatrix.chunk_size", chunk_size)
    if gains is not None:
        w.add_array(PROPAGATION_POINTS, list(gains[0]))
        w.add_array(PROPAGATION_GAINS, list(gains[1]))
    for name, (sums, counts) in entries.items():
        if sums is not None:
            w.add_tensor(name + ".in_sum2", np.asarray(sums, np.float32))
        if counts is not None:
            w.add_tensor(name + ".counts", np.asarray(counts, np.float32).reshape(-1, 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _valid(rng) -> dict:
    return {
        "blk.0.attn_q.weight": (rng.random((1, 64)) * 900, np.array([1536])),
        "blk.3.ffn_up_exps.weight": (rng.random((4, 64)) * 500, np.array([0, 7, 1533, 16777217])),
    }


def test_importance_is_llama_quantizes_normalisation(tmp_path):
    rng = np.random.default_rng(0)
    entries = _valid(rng)
    im = load_imatrix(_write(tmp_path / "im.gguf", entries))
    assert im.datasets == ("calibration.txt",) and im.chunk_count == 3 and im.chunk_size == 512
    assert set(im) == set(entries)
    for name, (sums, counts) in entries.items():
        got = im[name]
        assert got.dtype == np.float32 and got.shape == sums.shape
        # llama-quantize: float32 sum / (float)count, 1 for a matrix that saw no token; float32
        # division of float32 operands equals float64 division rounded once to float32
        s32, c32 = np.float32(sums), np.float32(counts)
        want = np.array([[np.float32(float(s) / float(c)) if c > 0 else np.float32(1.0) for s in row]
                         for row, c in zip(s32, c32)], dtype=np.float32)
        assert got.tobytes() == want.tobytes(), name
        np.testing.assert_array_equal(im.entries[name].sums, s32)
        np.testing.assert_array_equal(im.entries[name].counts, c32.astype(np.int64))
    assert (im["blk.3.ffn_up_exps.weight"][0] == 1.0).all()  # an expert no token was routed to


BREAKAGES = {
    "not-gguf": ("not a GGUF file", lambda p, rng: p.write_bytes(b"imatrix?" * 64)),
    "truncated": ("is truncated or corrupt",
                  lambda p, rng: p.write_bytes(_write(p, _valid(rng)).read_bytes()[:300])),
    "data-cut": ("is truncated or corrupt",
                 lambda p, rng: p.write_bytes(_write(p, _valid(rng)).read_bytes()[:-64])),
    "no-counts": ("blk.0.attn_q.weight.in_sum2 has no blk.0.attn_q.weight.counts partner",
                  lambda p, rng: _write(p, {"blk.0.attn_q.weight": (np.ones((1, 8)), None)})),
    "no-sums": ("blk.0.attn_q.weight.counts has no blk.0.attn_q.weight.in_sum2 partner",
                lambda p, rng: _write(p, {"blk.0.attn_q.weight": (None, np.ones(1))})),
    "sizes": ("has 10 sums for 3 counts",
              lambda p, rng: _write(p, {"blk.0.attn_q.weight": (np.ones((1, 10)), np.ones(3))})),
    "nan": ("non-finite or negative sums",
            lambda p, rng: _write(p, {"blk.0.attn_q.weight": (np.full((1, 8), np.nan), np.ones(1))})),
    "count": ("counts that are not whole non-negative numbers",
              lambda p, rng: _write(p, {"blk.0.attn_q.weight": (np.ones((1, 8)), np.array([-2.0]))})),
    "no-meta": ("no imatrix.datasets, imatrix.chunk_count, imatrix.chunk_size metadata",
                lambda p, rng: _write(p, _valid(rng), meta=False)),
    "gains-unpaired": ("must pair names with non-negative gains",
                       lambda p, rng: _write(p, _valid(rng), gains=(["embd", "output"], [1.0]))),
    "gains-negative": ("must pair names with non-negative gains",
                       lambda p, rng: _write(p, _valid(rng), gains=(["embd"], [-1.0]))),
}


@pytest.mark.parametrize("case", list(BREAKAGES))
def test_malformed_imatrix_is_a_one_line_error(tmp_path, case):
    message, make = BREAKAGES[case]
    path = tmp_path / f"{case}.gguf"
    make(path, np.random.default_rng(1))
    with pytest.raises(ImatrixError) as err:
        load_imatrix(path)
    text = str(err.value)
    assert "\n" not in text and str(path) in text and message in text, text


def test_a_model_is_not_an_imatrix(gguf_file):
    path = gguf_file("tiny", "f32")
    with pytest.raises(ImatrixError, match="not an importance matrix"):
        load_imatrix(path)


def test_check_against_takes_gguf_order_shapes(tmp_path, gguf_file, checkpoint):
    shapes = model_shapes(gguf_file("tiny", "f32"))
    cfg = Step35Config.from_dir(checkpoint("tiny"))
    ne0, n_expert = cfg.hidden_size, cfg.n_expert
    assert shapes["blk.3.ffn_up_exps.weight"] == (ne0, cfg.expert_ff, n_expert)
    rng = np.random.default_rng(2)
    fits = {"blk.3.ffn_up_exps.weight": (rng.random((n_expert, ne0)), np.arange(n_expert)),
            "blk.0.attn_q.weight": (rng.random((1, ne0)), np.array([64])),
            "blk.99.attn_q.weight": (rng.random((1, 7)), np.array([64]))}  # a tensor the model lacks
    missing = load_imatrix(_write(tmp_path / "fits.gguf", fits)).check_against(shapes)
    assert "blk.3.ffn_up_exps.weight" not in missing and "blk.0.attn_k.weight" in missing
    assert "token_embd.weight" not in missing  # looked up, never multiplied

    transposed = {"blk.3.ffn_up_exps.weight": (rng.random((ne0, n_expert)), np.arange(ne0))}
    with pytest.raises(ImatrixError) as err:
        load_imatrix(_write(tmp_path / "t.gguf", transposed)).check_against(shapes)
    assert str(err.value).endswith(
        f"blk.3.ffn_up_exps.weight has importance values for {ne0} matrices of {n_expert} inputs, "
        f"the model's tensor is {n_expert} of {ne0}; this imatrix was made for another model, "
        "recompute it with `step-gguf imatrix`")
    elsewhere = {"blk.0.ffn_up.weight.other": (rng.random((1, ne0)), np.array([3]))}
    with pytest.raises(ImatrixError, match="no entry for any of the model's"):
        load_imatrix(_write(tmp_path / "e.gguf", elsewhere)).check_against(shapes)


# --- llama-imatrix on a converted model ------------------------------------------------------

@pytest.fixture(scope="module")
def short_text(tmp_path_factory) -> Path:
    """The head of the bundled calibration text: enough for CHUNKS chunks of CTX tokens."""
    from step_gguf.native.tools import default_text

    path = tmp_path_factory.mktemp("text") / "head.txt"
    path.write_text(default_text().read_text(encoding="utf-8")[:3000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_imatrix(runtime, gguf_file, tmp_path_factory, short_text):
    from step_gguf.native import tools

    out = tmp_path_factory.mktemp("imatrix") / "tiny-imatrix.gguf"
    progress: list[tuple[int, int]] = []
    tools.imatrix(gguf_file("tiny", "f32"), out, short_text, ctx=CTX, chunks=CHUNKS,
                  on_progress=lambda done, total: progress.append((done, total)))
    return out, progress


@pytest.mark.runtime
def test_imatrix_covers_every_matrix_with_per_expert_counts(tiny_imatrix, gguf_file, checkpoint):
    out, progress = tiny_imatrix
    assert progress == [(i, CHUNKS) for i in range(1, len(progress) + 1)] and progress
    cfg = Step35Config.from_dir(checkpoint("tiny"))
    shapes = model_shapes(gguf_file("tiny", "f32"))
    im = load_imatrix(out)
    assert im.chunk_count == CHUNKS and im.chunk_size == CTX
    missing = im.check_against(shapes)
    # stock llama-imatrix never runs the MTP blocks (layers n_layer..); patch 0002 makes it
    mtp_collected = any(name.startswith("0002-imatrix-mtp") for name, _ in b.patch_series())
    is_mtp = [int(n.split(".")[1]) >= cfg.n_layer for n in missing]
    assert all(is_mtp) and (not missing if mtp_collected else len(missing) > 0)

    tokens = CHUNKS * CTX
    dense = im.entries["blk.0.ffn_down.weight"]
    assert dense.sums.shape == (1, cfg.intermediate_size) and dense.counts.tolist() == [tokens]
    experts = im.entries["blk.3.ffn_up_exps.weight"]
    assert experts.sums.shape == (cfg.n_expert, cfg.hidden_size)
    assert experts.counts.sum() == tokens * cfg.n_expert_used and len(set(experts.counts.tolist())) > 1
    assert im.entries["output.weight"].counts.tolist() == [tokens]
    for name, entry in im.entries.items():
        seen = entry.counts > 0
        assert (entry.sums[seen] > 0).all(), name
        mean_square = entry.sums[seen] / entry.counts[seen, None].astype(np.float32)
        np.testing.assert_array_equal(im[name][seen], mean_square)


@pytest.mark.runtime
def test_llama_quantize_reads_the_same_importance(tiny_imatrix, gguf_file, tmp_path, runtime):
    """llama-quantize with this imatrix writes the bytes ggml makes from our importance rows."""
    import subprocess

    from step_gguf.native import ggml

    out, _ = tiny_imatrix
    model = gguf_file("tiny", "f32")
    quant = tmp_path / "q.gguf"
    done = subprocess.run([str(runtime.tool("llama-quantize")), "--imatrix", str(out), "--pure",
                           str(model), str(quant), "IQ4_NL"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    name = "blk.3.ffn_up_exps.weight"
    theirs = next(t for t in gguf.GGUFReader(quant).tensors if t.name == name)
    weights = next(t for t in gguf.GGUFReader(model).tensors if t.name == name)
    rows = np.asarray(weights.data)  # (experts, rows, ne0)
    importance = load_imatrix(out)[name]
    assert (importance == 1.0).all(axis=1).any()  # an expert never routed to: the 1.0 fallback
    ours = b"".join(ggml.quantize(rows[e], theirs.tensor_type, importance[e]) for e in range(len(rows)))
    assert np.asarray(theirs.data).tobytes() == ours


@pytest.mark.runtime
def test_imatrix_of_another_model_is_refused(tiny_imatrix, gguf_file):
    other = model_shapes(gguf_file("tiny-fp8-3p7", "f32"))
    with pytest.raises(ImatrixError, match="for another model, recompute it with `step-gguf imatrix`"):
        load_imatrix(tiny_imatrix[0]).check_against(other)


@pytest.mark.runtime
def test_failed_imatrix_keeps_the_old_file(runtime, gguf_file, tmp_path):
    from step_gguf.native import tools

    out = tmp_path / "im.gguf"
    out.write_bytes(b"previous")
    text = tmp_path / "short.txt"
    text.write_text("far too short to fill two chunks")
    with pytest.raises(StepGGUFError) as err:
        tools.imatrix(gguf_file("tiny", "f32"), out, text, ctx=CTX)
    message = str(err.value)
    assert "\n" not in message, message
    assert message.startswith(f"computing the importance matrix of {gguf_file('tiny', 'f32')} failed: ")
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["im.gguf", "im.gguf.log", "short.txt"]


@pytest.mark.runtime
def test_cli_imatrix(runtime, gguf_file, tmp_path, short_text):
    out = tmp_path / "cli-imatrix.gguf"
    result = CliRunner().invoke(main, ["imatrix", str(gguf_file("tiny", "f32")), "-o", str(out),
                                       "--text", str(short_text), "--ctx", str(CTX), "--chunks", "2"])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output and "2 chunks of 64 tokens" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli-imatrix.gguf"]


@pytest.mark.parametrize("command", ["imatrix", "eval"])
def test_commands_explain_themselves(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0 and "Example:" in result.output
    assert f"step-gguf {command} " in result.output


# --- llama-perplexity: KL divergence from a reference ----------------------------------------

@pytest.mark.runtime
def test_a_model_does_not_diverge_from_itself(runtime, gguf_file, short_text):
    from step_gguf.native import tools

    f32 = gguf_file("tiny", "f32")
    stats = tools.kld(f32, f32, short_text, ctx=CTX)
    assert stats["chunks"] > 10 and stats["ctx"] == CTX
    assert abs(stats["kld_mean"]) <= 1e-5 and stats["kld_p99"] <= 1e-3
    # the reference's log-probabilities are stored as 16-bit steps, so a near-tie can flip
    assert stats["top1_pct"] >= 99.5
    assert stats["ppl"] == pytest.approx(stats["ppl_reference"], rel=0.1)


@pytest.mark.runtime
def test_q8_0_diverges_a_little_from_f32(runtime, gguf_file, short_text, workdir):
    from step_gguf.native import tools

    stats = tools.kld(gguf_file("tiny", "q8_0"), gguf_file("tiny", "f32"), short_text, ctx=CTX)
    assert 0 < stats["kld_mean"] < 0.05 and stats["kld_p99"] > stats["kld_mean"]
    assert 80 < stats["top1_pct"] < 100 and stats["ppl"] > 1 and stats["ppl_reference"] > 1
    assert not list(workdir.glob("*.kld-base"))  # the reference's logits are removed


@pytest.mark.runtime
def test_a_reference_scored_once_compares_as_each_time(runtime, gguf_file, short_text):
    """reference_scores + kld_against (many quantizations against one reference, scored once)
    give kld's figures, and the scores are gone after."""
    from step_gguf.native import tools

    f32, q8, bf16 = gguf_file("tiny", "f32"), gguf_file("tiny", "q8_0"), gguf_file("tiny", "bf16")
    with tools.reference_scores(f32, short_text, ctx=CTX) as scores:
        once = [tools.kld_against(q, scores) for q in (q8, bf16)]
        assert scores.logits.is_file()
    assert not scores.logits.exists()
    for q, got in zip((q8, bf16), once):
        assert got == tools.kld(q, f32, short_text, ctx=CTX)


@pytest.mark.runtime
def test_eval_on_too_little_text_says_why(runtime, gguf_file, tmp_path):
    from step_gguf.native import tools

    text = tmp_path / "short.txt"
    text.write_text("far too short to fill two chunks")
    f32 = gguf_file("tiny", "f32")
    with pytest.raises(StepGGUFError) as err:
        tools.kld(f32, f32, text, ctx=CTX)
    message = str(err.value)
    assert message.endswith("failed: the text is too short: at ctx 64 it needs at least 128 tokens")


@pytest.mark.runtime
def test_cli_eval_json(runtime, gguf_file, short_text):
    import json

    args = ["eval", str(gguf_file("tiny", "q8_0")), "--reference", str(gguf_file("tiny", "f32")),
            "--text", str(short_text), "--ctx", str(CTX)]
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output)
    assert set(stats) == {"kld_mean", "kld_p99", "top1_pct", "ppl", "ppl_reference", "chunks", "ctx"}
    text = CliRunner().invoke(main, args).output
    assert f"mean KLD        {stats['kld_mean']:.6f}" in text and "same top token" in text


@pytest.mark.runtime
def test_imatrix_measures_how_each_depth_moves_the_output(tiny_imatrix, gguf_file, short_text):
    """`step-gguf imatrix` stores, for every point of the residual stream (embeddings, each
    layer after attention and after its FFN, the final norm), the KL divergence per unit of
    relative noise added there: measured on the model, reproducible (seeded noise), finite and
    different from point to point, and llama-quantize still reads the file (test above)."""
    from step_gguf.native import propagation

    model = gguf_file("tiny", "f32")
    stored = load_imatrix(tiny_imatrix[0]).propagation
    n_layer = len([k for k in stored if k.startswith("ffn-")])
    assert list(stored) == list(propagation.points(n_layer)) and n_layer == 8
    assert all(np.isfinite(g) and g > 0 for g in stored.values())
    assert len({round(g, 6) for g in stored.values()}) > n_layer  # depths differ
    again = propagation.measure_file(model, short_text, ctx=CTX)
    assert again == pytest.approx(stored, rel=1e-6)
    # twice the noise, twice the divergence: the gain is a slope, not one noise level's reading
    double = propagation.measure_file(model, short_text, ctx=CTX, eps=2 * propagation.EPS)
    ratios = [double[p] / stored[p] for p in stored]
    assert 0.7 < float(np.median(ratios)) < 1.4, ratios
