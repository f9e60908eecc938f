"""Split GGUFs and llama.cpp: its gguf-split's shards read as ours, ours are its bytes, and our
split outputs load in our runtime, llama-server, its tools and stock llama.cpp with the unsplit
file's logits."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q

from cli_checks import PLAN_ARGS, cli, cli_process, run_killed, uninterrupted
from gguf_checks import same_model
from step_gguf.core.recipe import Recipe
from step_gguf.files.gguf_source import open_gguf
from step_gguf.pipeline.convert import convert
from step_gguf.pipeline.output import SplitLimits
from step_gguf.pipeline.quantize import quantize


def _gguf_split(runtime, src: Path, prefix: Path, *flags: str) -> list[Path]:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(runtime.tool("llama-gguf-split")), "--split", *flags, str(src), str(prefix)],
                   check=True, capture_output=True)
    return sorted(prefix.parent.glob(prefix.name + "-*-of-*.gguf"))


def test_shards_from_llama_cpps_gguf_split_read_as_the_unsplit_file(runtime, tiny_f32, tmp_path):
    made = _gguf_split(runtime, tiny_f32, tmp_path / "m", "--split-max-tensors", "40")
    assert len(made) == 5
    for p in (made[0], made[3]):
        same_model(open_gguf(p), tiny_f32)
    recipe = Recipe.single(Q.F16)
    quantize(tiny_f32, tmp_path / "ref" / "q.gguf", recipe)
    quantize(made[2], tmp_path / "split" / "q.gguf", recipe)
    assert (tmp_path / "split" / "q.gguf").read_bytes() == (tmp_path / "ref" / "q.gguf").read_bytes()
    want = json.loads(cli("plan", tiny_f32, *PLAN_ARGS).output)
    got = json.loads(cli("plan", made[4], *PLAN_ARGS).output)
    assert got["server_args"][1] == str(made[0])
    got["server_args"][1], got["model"] = want["server_args"][1], want["model"]
    assert got == want


def test_our_shards_are_the_bytes_llama_cpps_gguf_split_writes(runtime, tiny_src, tiny_f32, tmp_path):
    made = _gguf_split(runtime, tiny_f32, tmp_path / "stock" / "m", "--split-max-tensors", "50")
    ours = convert(tiny_src, tmp_path / "ours" / "m.gguf", outtype="f32",
                   split=SplitLimits(max_tensors=50)).outputs
    assert [p.name for p in ours] == [p.name for p in made]
    for a, b in zip(ours, made):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_our_split_output_loads_in_llama_cpp_with_the_unsplit_logits(runtime, tiny_shards, tiny_f32, tmp_path):
    from step_gguf.runtime import llama, server

    tokens = list(range(5, 200, 3))
    with llama.load(tiny_f32, n_ctx=256, logits_all=True, exact=True) as m:
        want = m.logits(tokens)
    for p in (tiny_shards[0], tiny_shards[2]):  # any shard: llama.cpp is given the first
        with llama.load(p, n_ctx=256, logits_all=True, exact=True) as m:
            assert np.array_equal(m.logits(tokens), want)
    # and through llama-server, as run/chat/serve use it
    with server.serve(tiny_shards[3], n_ctx=256) as url:
        reply = server.chat(url, [{"role": "user", "content": "Hi"}], max_tokens=4, seed=0)
    assert reply.completion_tokens == 4


def test_eval_and_imatrix_take_any_shard(runtime, tiny_shards, tiny_f32, tmp_path):
    from step_gguf.native import tools

    text = tmp_path / "text.txt"
    text.write_text(tools.default_text().read_text()[:20000])
    stats = tools.kld(tiny_shards[2], tiny_f32, text, ctx=64)
    assert abs(stats["kld_mean"]) <= 1e-5
    out = tools.imatrix(tiny_shards[1], tmp_path / "imatrix.gguf", text, ctx=64, chunks=2)
    assert out.is_file()


def test_quantized_split_output_resumes_and_loads_in_stock_llama_cpp(runtime, small_src, tmp_path):
    """`quantize --split-max-size` as a user publishes a model: killed mid-shard and run again
    it gives the bytes of an uninterrupted run, and stock llama.cpp (not our build) loads the
    set from its first shard with the unsplit file's logits."""
    from native_build import compile_native, stock_build

    flags = ["--scheme", "int4-mixed", "--split-max-size", "4M"]
    one = uninterrupted(tmp_path / "one", "quantize", small_src, "--scheme", "int4-mixed")[0]
    want = uninterrupted(tmp_path / "whole", "quantize", small_src, *flags)
    assert len(want) >= 3 and all(p.stat().st_size <= 4 * 10**6 for p in want)
    folder = tmp_path / "resumed"
    folder.mkdir()
    args = ["quantize", str(small_src), "-o", str(folder / "m.gguf"), *flags]
    journal = folder / f".{want[1].name}.partial.json"
    run_killed(args, journal, 2, random.Random(3))  # killed in the second shard
    assert not any((folder / p.name).exists() for p in want)
    result = cli_process(*args)
    assert result.returncode == 0, result.stderr
    for ref in want:
        assert (folder / ref.name).read_bytes() == ref.read_bytes(), ref.name

    exe = compile_native("step_greedy", stock_build())
    logits = {}
    for name, path in (("one", one), ("split", want[0])):
        out = tmp_path / f"{name}.f32"
        run = subprocess.run([str(exe), str(path), "Shards load as one model.", "4", str(out), "512", "2"],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        logits[name] = (run.stdout, np.fromfile(out, dtype=np.float32))
    assert logits["split"][0] == logits["one"][0]
    assert np.array_equal(logits["split"][1], logits["one"][1])
