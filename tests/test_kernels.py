"""The CPU patch set (patches 0006-0008) on the installed runtime: every SIMD kernel against the
portable C kernel of its layout, every repacked op against ggml's unpatched op, our build
against stock llama.cpp from the same sdist on whole models, and the profile against the GGUF.

Tolerances: kernels and ops compute the same integer dot products on the same quantized
activations and differ only in the order of float sums, so they agree to 1e-5 of the output's
largest magnitude (seen: below 2e-6). Whole models, run with exact attention (f32 cache, no
flash attention): the same 64 greedy tokens, and a mean KL divergence of the prompt's
next-token distributions of at most 1e-4.
"""

from __future__ import annotations

import csv
import os
import platform
import subprocess
from pathlib import Path

import numpy as np
import pytest

from step_gguf.runtime import build as b

NATIVE = Path(__file__).parent / "native"
PROMPT = ("The patch set must not change what the model says: it only changes how fast the "
          "experts are read. Step 3.5 Flash routes each token to eight of its experts.")


def _has_avx2() -> bool:
    try:
        return " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


pytestmark = [
    pytest.mark.runtime,
    pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not _has_avx2(),
                       reason="the kernels of patch 0007 are for x86 with AVX2"),
]


def compile_native(name: str, build: b.RuntimeBuild, out_dir: Path) -> Path:
    """tests/native/NAME.cpp built against the llama.cpp tree and the libraries of `build` (the
    installed runtime, or a build of part of the series)."""
    tree, lib = build.src, build.bin_dir
    exe = out_dir / f"{name}-{build.root.name}"
    if not exe.exists():
        subprocess.run(["g++", "-O2", "-std=c++17", str(NATIVE / f"{name}.cpp"), "-o", str(exe),
                        f"-I{tree / 'include'}", f"-I{tree / 'ggml' / 'include'}", f"-L{lib}",
                        "-lllama", "-lggml", "-lggml-base", "-lggml-cpu", "-ldl", f"-Wl,-rpath,{lib}"],
                       check=True, capture_output=True)
    return exe


@pytest.fixture(scope="module")
def ours(runtime) -> b.RuntimeBuild:
    return b.RuntimeBuild(runtime.bin_dir.parent.parent)  # the cache entry it was installed from


@pytest.fixture(scope="module")
def stock() -> b.RuntimeBuild:
    """Stock llama.cpp from the same sdist, built once into the cache (minutes the first time)."""
    return b.build(b.BuildSpec(series=0))


@pytest.fixture(scope="module")
def kernel_cases(ours, tmp_path_factory) -> list[tuple[str, str, float]]:
    exe = compile_native("kernel_check", ours, tmp_path_factory.mktemp("native"))
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    cases = []
    for line in out.stdout.splitlines():
        level, *what, value = line.split()
        cases.append((level, " ".join(what), float(value)))
    return cases


def test_every_simd_kernel_matches_the_portable_c_kernel(kernel_cases):
    kernels = [(what, v) for level, what, v in kernel_cases if level == "kernel"]
    types = {what.split()[0] for what, _ in kernels}
    assert types == {"q4_K", "q5_K", "q6_K", "q8_0"}
    # every row count from a lone row to partial packs beyond two
    assert {int(w.split("rows=")[1]) for w, _ in kernels} >= {1, 2, 3, 4, 5, 8, 9, 17}
    bad = [(w, v) for w, v in kernels if not v <= 1e-5]
    assert not bad, bad


def test_repacked_ops_match_ggmls_unpatched_ops(kernel_cases):
    ops = [(what, v) for level, what, v in kernel_cases if level == "op"]
    assert {w.split()[1] for w, _ in ops} == {"mul_mat", "mul_mat_id", "mul_mat_id_bcast"}
    assert len(ops) == 4 * (8 + 2 * 6)
    bad = [(w, v) for w, v in ops if not v <= 1e-5]
    assert not bad, bad


@pytest.fixture(scope="module")
def models(workdir, runtime) -> dict[str, Path]:
    """A model with K-quant widths, in int4-mixed (Q4_K, Q5_K, Q6_K, Q8_0) and stock Q4_K_M.
    Every token takes all 8 experts: with a choice of experts, a near-tie in the router flips
    on a last-bit difference and moves the logits far more than the kernels differ (seen
    between two stock paths as much as between stock and ours)."""
    from step_gguf.convert import convert
    from step_gguf.quantize import quantize
    from step_gguf.recipe import load_recipe
    from step_gguf.synth import synth

    src = synth(workdir / "kernels", "quant", seed=3, n_layer=4, n_dense=1, n_nextn=1, n_expert=8,
                top_k=8, outliers=0, outlier_gain=1.0)
    int4, bf16, q4km = (workdir / f"kernels-{n}.gguf" for n in ("int4-mixed", "bf16", "q4_k_m"))
    quantize(src, int4, load_recipe("int4-mixed"))
    convert(src, bf16, outtype="bf16")
    subprocess.run([str(runtime.tool("llama-quantize")), str(bf16), str(q4km), "Q4_K_M"],
                   check=True, capture_output=True)
    return {"int4-mixed": int4, "Q4_K_M": q4km}


N_PREDICT = 64
N_VOCAB = 2048  # the `quant` preset's


def greedy(exe: Path, model: Path, tmp: Path, ubatch: int, env: dict | None = None) -> tuple[list[int], np.ndarray]:
    """(the greedy tokens, the prompt's logits) from step_greedy."""
    logits = tmp / f"logits-{exe.name}-{model.stem}-{ubatch}.f32"
    out = subprocess.run([str(exe), str(model), PROMPT, str(N_PREDICT), str(logits), str(ubatch), "2"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr[-2000:]
    return [int(t) for t in out.stdout.split()], np.fromfile(logits, dtype=np.float32).reshape(-1, N_VOCAB)



def mean_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum(axis=1).mean())


@pytest.mark.parametrize("recipe", ["int4-mixed", "Q4_K_M"])
def test_our_build_says_what_stock_says(models, ours, stock, recipe, tmp_path):
    """Token by token, as decoding runs: the same 64 greedy tokens, and the prompt's
    next-token distributions within a mean KL of 1e-4."""
    mine, my_logits = greedy(compile_native("step_greedy", ours, tmp_path), models[recipe], tmp_path, 1)
    theirs, their_logits = greedy(compile_native("step_greedy", stock, tmp_path), models[recipe], tmp_path, 1)
    assert len(my_logits) > 16 and len(mine) == N_PREDICT
    assert mine == theirs
    kl = mean_kl(their_logits, my_logits)
    print(f"{recipe}: mean KL vs stock {kl:.2e}")
    assert kl <= 1e-4
    assert not np.array_equal(my_logits, their_logits)  # our kernels did run


@pytest.mark.parametrize("ubatch", [5, 512])
def test_batched_prompt_gives_the_token_by_token_logits(models, ours, ubatch, tmp_path):
    """The batched paths (packs of 4 rows, the last partial, experts read once for all their
    tokens) compute what one token at a time computes: only float sums are ordered otherwise."""
    exe = compile_native("step_greedy", ours, tmp_path)
    one, one_logits = greedy(exe, models["int4-mixed"], tmp_path, 1)
    batched, logits = greedy(exe, models["int4-mixed"], tmp_path, ubatch)
    assert batched == one
    assert np.abs(logits - one_logits).max() <= 1e-4 * np.abs(one_logits).max()


def test_kernel_switch_restores_the_stock_paths(models, ours, stock, tmp_path):
    """GGML_CPU_STEP_KERNELS=0 gives stock llama.cpp's numbers exactly: it is how the profile
    of `bench/kernels.py` shows the stock kernels."""
    ours_exe = compile_native("step_greedy", ours, tmp_path)
    stock_exe = compile_native("step_greedy", stock, tmp_path)
    mine, my_logits = greedy(ours_exe, models["int4-mixed"], tmp_path, 5, {"GGML_CPU_STEP_KERNELS": "0"})
    theirs, their_logits = greedy(stock_exe, models["int4-mixed"], tmp_path, 5)
    assert mine == theirs and np.array_equal(my_logits, their_logits)


def test_profile_counts_nodes_and_the_bytes_they_read(models, ours, tmp_path):
    from gguf import GGUFReader

    exe = compile_native("step_greedy", ours, tmp_path)
    prof = tmp_path / "profile.tsv"
    tokens, _ = greedy(exe, models["int4-mixed"], tmp_path, 512, {"GGML_CPU_PROFILE": str(prof)})
    lines = prof.read_text().splitlines()
    head = lines[0].split("\t")
    graphs = int(head[1])
    assert head[0] == "# graphs" and graphs == 1 + len(tokens)  # the prompt, then one per token
    rows = list(csv.DictReader(lines[1:], delimiter="\t"))
    sizes = {t.name: int(t.n_bytes) for t in GGUFReader(models["int4-mixed"]).tensors}
    # every call of the LM head reads the whole output matrix, repacked to the same size
    out = [r for r in rows if r["name"] == "result_output" and r["op"] == "MUL_MAT"]
    assert len(out) == 1 and int(out[0]["calls"]) == graphs
    assert int(out[0]["bytes"]) == graphs * sizes["output.weight"]
    # MUL_MAT_ID reads the experts some token chose: here all 8, in every graph
    moe = [r for r in rows if r["op"] == "MUL_MAT_ID" and r["name"] == "ffn_moe_up"]
    assert len(moe) == 3 and all(int(r["calls"]) == graphs for r in moe)
    for r in moe:
        assert int(r["bytes"]) == graphs * sizes[f"blk.{r['layer']}.ffn_up_exps.weight"]
    for r in rows:  # time is spent, and waits are never negative
        assert int(r["wall_ns"]) >= 0 and int(r["wait_ns"]) >= 0 and int(r["compute_ns"]) > 0
