"""The CPU patch set (patches 0006-0012) on every x86 instruction set it has kernels for: every
SIMD kernel against the portable C kernel of its layout, every repacked op against ggml's
unpatched op, our build against stock llama.cpp from the same sdist on whole models, and the
profile against the GGUF.

Which builds: the installed runtime carries a CPU backend per x86 level (native/cpu.py); each
test runs on every level this CPU can run, pinned with GGML_CPU_VARIANT, and stock's build is
pinned to the same level, so that a machine with AVX-512 cannot hide a fault of the AVX2 path.
A level this CPU cannot run is skipped with a reason (its code is compiled all the same).

Tolerances. Kernels and ops compute the same integer dot products on the same quantized
activations and differ only in the order of float sums: within 1e-5 of the output's largest
magnitude on random inputs (seen: below 2e-6), within 1e-4 on the adversarial ones (weights at
their largest codes, activations of one sign: the float sums of Q4_K/Q5_K's scale and min terms
cancel, seen up to 2e-5), where a wrapped or saturated integer sum is off by 1e-2 to 1e1.

Whole models are compared through an unquantized reference (the BF16 conversion run by stock),
because 8-bit activations make two correct builds disagree: a last-bit difference anywhere
upstream (stock's own attention is not the same bits at batch 1 and 5, nor on AVX2 and AVX-512)
moves a value across a rounding boundary of its activation quantization now and then, and one
code off by one shifts every output of that matrix product by ~1e-3. Measured, 4 prompts, a
layer of real width: stock against stock on the other instruction set, and stock batched against
stock token by token, mean KL up to 1.2e-4 per prompt, largest logit difference up to 0.9%; the
same for ours against stock. So the bound of 1e-4 applies to the error our kernels add: the
mean KL of our logits from the reference's may exceed stock's by at most 1e-4 (seen: 1e-5), by
instruction set, model, recipe and batch size.
"""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from native_build import compile_native, stock_build
from step_gguf.native import build as b
from step_gguf.native import cpu

PROMPTS = (
    "The patch set must not change what the model says: it only changes how fast the experts are read.",
    "Quantized weights are read once for every row of the batch, so a step of four tokens costs little more.",
    "def route(tokens, experts):\n    return sorted(experts, key=lambda e: -e.score)[:8]",
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich, und niemand hält sie auf.",
)

pytestmark = pytest.mark.runtime
# the SIMD kernels of patch 0007; the profile (0006) and the kernel switch run everywhere
x86_kernels = pytest.mark.skipif(not cpu.is_x86() or "avx2" not in cpu.cpu_flags(),
                                 reason="the kernels of patch 0007 are for x86 with AVX2")


@pytest.fixture(scope="module")
def ours(runtime) -> b.RuntimeBuild:
    """The installed runtime's cache entry (its tree and libraries)."""
    return b.RuntimeBuild(runtime.bin_dir.parent.parent)  # the cache entry it was installed from


def _pin(tag: str, runtime) -> dict[str, str]:
    """The environment that pins one x86 level of the runtime's CPU backends (and stock's)."""
    if tag not in runtime.cpu_variants:
        pytest.skip(f"the runtime has no {tag} CPU backend (it was built for its CPU alone)")
    if not cpu.BY_TAG[tag].runs_here():
        pytest.skip(f"this CPU cannot run {tag} ({cpu.BY_TAG[tag].isa}) code")
    return {cpu.PIN: tag}


def _kernel_path(v: cpu.CpuVariant) -> tuple[bool, bool]:
    """The kernels a level compiles (0007): 512- or 256-bit vectors, VNNI or maddubs sums."""
    return "avx512f" in v.flags, bool({"avx_vnni", "avx512_vnni"} & set(v.flags))


@pytest.fixture(scope="module", params=[v.tag for v in cpu.CPU_VARIANTS])
def variant(request, runtime) -> dict[str, str]:
    """Every level: each kernel is checked in every build of it."""
    return _pin(request.param, runtime)


@pytest.fixture(scope="module", params=[v.tag for v in cpu.CPU_VARIANTS])
def model_variant(request, runtime) -> dict[str, str]:
    """One level per kernel path for the whole models (minutes each): the best this CPU runs
    (icelake's kernels are zen4's, which differs in BF16 ops the models do not run)."""
    env = _pin(request.param, runtime)
    this = cpu.BY_TAG[request.param]
    above = [v.tag for v in cpu.CPU_VARIANTS[cpu.CPU_VARIANTS.index(this) + 1:]
             if _kernel_path(v) == _kernel_path(this) and v.runs_here() and v.tag in runtime.cpu_variants]
    if above:
        pytest.skip(f"{this.tag} runs the kernels of {above[-1]}, which runs the whole models here")
    return env


@pytest.fixture(scope="module")
def stock() -> b.RuntimeBuild:
    return stock_build()


@pytest.fixture(scope="module")
def kernel_cases(ours, variant) -> list[tuple[str, str, float]]:
    exe = compile_native("kernel_check", ours)
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=1200, env={**os.environ, **variant})
    assert out.returncode == 0, out.stdout + out.stderr
    cases = []
    for line in out.stdout.splitlines():
        level, *what, value = line.split()
        cases.append((level, " ".join(what), float(value)))
    return cases


def _bound(what: str) -> float:
    return 1e-5 if "w=random x=randn" in what else 1e-4


@x86_kernels
def test_every_simd_kernel_matches_the_portable_c_kernel(kernel_cases, variant):
    kernels = [(what, v) for level, what, v in kernel_cases if level == "kernel"]
    types = {what.split()[0] for what, _ in kernels}
    # every level repacks all four types (0020: plain AVX2 too)
    assert not [what for level, what, _ in kernel_cases if level == "layout"]
    assert types == {"q4_K", "q5_K", "q6_K", "q8_0"}
    # every row count from a lone row to partial packs beyond two
    assert {int(w.split("rows=")[1]) for w, _ in kernels} >= {1, 2, 3, 4, 5, 8, 9, 17}
    # the adversarial inputs and the real expert shapes are among them
    assert {w.split(" w=")[1].split()[0] for w, _ in kernels} == {"random", "codes", "max", "min", "q8max", "low"}
    assert {w.split(" x=")[1].split()[0] for w, _ in kernels} == {"randn", "outliers", "pos", "neg", "alt"}
    assert any("k=4096 n=1280" in w for w, _ in kernels) and any("k=1280 n=4096" in w for w, _ in kernels)
    bad = [(w, v) for w, v in kernels if not v <= _bound(w)]
    assert not bad, bad


@x86_kernels
def test_repacked_ops_match_ggmls_unpatched_ops(kernel_cases):
    ops = [(what, v) for level, what, v in kernel_cases if level == "op"]
    assert {w.split()[3] for w, _ in ops} == {"mul_mat", "mul_mat_id", "mul_mat_id_bcast"}
    assert len(ops) == 4 * 3 * (8 + 2 * 6)  # the four types x (random, two adversarial) x cases
    bad = [(w, v) for w, v in ops if not v <= _bound(w)]
    assert not bad, bad


@x86_kernels
def test_plain_q6_K_rows_match_stocks_vec_dot(kernel_cases):
    """Plain Q6_K at several activation rows (0012), on every build: the kernel against stock's
    vec_dot at 1 to 4 rows, and MUL_MAT on unrepacked weights against stock's loop."""
    cases = [(what, v) for level, what, v in kernel_cases if level == "rows"]
    kernels = [(w, v) for w, v in cases if w.split()[1] == "kernel"]
    ops = [(w, v) for w, v in cases if w.split()[1] == "op"]
    assert {int(w.split("rows=")[1]) for w, _ in kernels} == {1, 2, 3, 4}
    assert {w.split(" w=")[1].split()[0] for w, _ in kernels} == {"random", "codes", "max", "min", "q8max", "low"}
    assert {w.split(" x=")[1].split()[0] for w, _ in kernels} == {"randn", "outliers", "pos", "neg", "alt"}
    assert len(ops) == 3 * 8
    bad = [(w, v) for w, v in cases if not v <= _bound(w)]
    assert not bad, bad


def _reference_and_quants(src: Path, stem: Path, runtime) -> dict[str, Path]:
    from step_gguf.pipeline.convert import convert
    from step_gguf.pipeline.quantize import quantize
    from step_gguf.core.recipe import load_recipe

    out = {n: stem.with_name(f"{stem.name}-{n}.gguf") for n in ("bf16", "int4-mixed", "Q4_K_M")}
    quantize(src, out["int4-mixed"], load_recipe("int4-mixed"))
    convert(src, out["bf16"], outtype="bf16")
    subprocess.run([str(runtime.tool("llama-quantize")), str(out["bf16"]), str(out["Q4_K_M"]), "Q4_K_M"],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def models(workdir, runtime) -> dict[str, dict[str, Path]]:
    """Two models, each as a BF16 reference, int4-mixed (Q4_K, Q5_K, Q6_K, Q8_0) and stock
    Q4_K_M: "small" (K-quant widths) and "wide" (one MoE layer of the real width, 4096 x 1280
    experts). Every token takes all 8 experts: with a choice of experts, a near-tie in the router
    flips on a last-bit difference and moves the logits by far more than activation rounding."""
    from step_gguf.synth.writer import synth

    small = synth(workdir / "kernels", "quant", seed=3, n_layer=4, n_dense=1, n_nextn=1, n_expert=8,
                  top_k=8, outliers=0, outlier_gain=1.0)
    wide = synth(workdir / "kernels-wide", "wide", seed=5, n_layer=2, n_dense=1, n_nextn=0, n_expert=8,
                 top_k=8, ff=2048, vocab=2048, n_head=32, n_head_swa=32, shard_bytes=2**30)
    return {"small": _reference_and_quants(small, workdir / "kernels", runtime),
            "wide": _reference_and_quants(wide, workdir / "kernels-wide", runtime)}


N_VOCAB = 2048  # both models'
_logits: dict[tuple, np.ndarray] = {}


def prompt_logits(exe: Path, model: Path, prompt: int, ubatch: int, tmp: Path,
                  env: dict | None = None) -> np.ndarray:
    """The logits of every position of PROMPTS[prompt] (n_prompt x n_vocab), run by `exe`."""
    key = (exe, model, prompt, ubatch, tuple(sorted((env or {}).items())))
    if key not in _logits:
        path = tmp / "logits.f32"
        out = subprocess.run([str(exe), str(model), PROMPTS[prompt], "1", str(path), str(ubatch), "2"],
                             capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
        assert out.returncode == 0, out.stderr[-2000:]
        _logits[key] = np.fromfile(path, dtype=np.float32).reshape(-1, N_VOCAB)
    return _logits[key]


def mean_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum(axis=1).mean())


def errors(exe: Path, stock_exe: Path, files: dict[str, Path], recipe: str, ubatch: int, tmp: Path,
           env: dict[str, str]) -> list[float]:
    """Mean KL from the reference's logits, per prompt, of `exe` running the `recipe` file; both
    on the CPU level `env` pins."""
    return [mean_kl(prompt_logits(stock_exe, files["bf16"], p, 512, tmp, env),
                    prompt_logits(exe, files[recipe], p, ubatch, tmp, env)) for p in range(len(PROMPTS))]


@x86_kernels
@pytest.mark.parametrize("model", ["small", "wide"])
@pytest.mark.parametrize("recipe", ["int4-mixed", "Q4_K_M"])
def test_our_kernels_add_no_error_to_stocks(models, ours, stock, model_variant, model, recipe, tmp_path):
    """Token by token, as decoding runs: our logits are as close to the unquantized model's as
    stock's (mean KL, 4 prompts: ours at most 1e-4 above stock's)."""
    files = models[model]
    exe, stock_exe = compile_native("step_greedy", ours), compile_native("step_greedy", stock)
    mine = errors(exe, stock_exe, files, recipe, 1, tmp_path, model_variant)
    theirs = errors(stock_exe, stock_exe, files, recipe, 1, tmp_path, model_variant)
    print(f"{model} {recipe} {model_variant[cpu.PIN]}: mean KL from BF16, ours {np.mean(mine):.4e}, stock "
          f"{np.mean(theirs):.4e}")
    assert 0 < np.mean(theirs) < 0.1  # the recipe quantizes, and the model still works
    assert np.mean(mine) - np.mean(theirs) <= 1e-4
    # our kernels did run, a lone row too: a product summed in another order somewhere
    assert any(not np.array_equal(prompt_logits(exe, files[recipe], p, 1, tmp_path, model_variant),
                                  prompt_logits(stock_exe, files[recipe], p, 1, tmp_path, model_variant))
               for p in range(len(PROMPTS)))


@x86_kernels
@pytest.mark.parametrize("model,ubatch", [("small", 5), ("small", 512), ("wide", 5)])
def test_batched_prompt_adds_no_error(models, ours, stock, model_variant, model, ubatch, tmp_path):
    """The batched paths (packs of 4 rows, the last partial, experts read once for all their
    tokens) are as close to the reference as one token at a time, and agree with it as closely
    as stock's batched paths agree with stock's token by token (mean KL, 4 prompts, 1e-4)."""
    files = models[model]
    exe, stock_exe = compile_native("step_greedy", ours), compile_native("step_greedy", stock)
    one, batched = (errors(exe, stock_exe, files, "int4-mixed", u, tmp_path, model_variant) for u in (1, ubatch))
    assert np.mean(batched) - np.mean(one) <= 1e-4

    def apart(e: Path) -> float:
        return float(np.mean([mean_kl(prompt_logits(e, files["int4-mixed"], p, 1, tmp_path, model_variant),
                                      prompt_logits(e, files["int4-mixed"], p, ubatch, tmp_path, model_variant))
                              for p in range(len(PROMPTS))]))
    ours_apart, stock_apart = apart(exe), apart(stock_exe)
    print(f"{model} ubatch {ubatch}: mean KL batched vs one token, ours {ours_apart:.2e}, stock {stock_apart:.2e}")
    assert ours_apart <= stock_apart + 1e-4


def test_kernel_switch_restores_the_stock_paths(models, ours, stock, tmp_path):
    """GGML_CPU_STEP_KERNELS=0 gives stock llama.cpp's numbers exactly: it is how the profile
    of `bench/kernels.py` shows the stock kernels."""
    ours_exe = compile_native("step_greedy", ours)
    stock_exe = compile_native("step_greedy", stock)
    for model in ("small", "wide"):
        mine = prompt_logits(ours_exe, models[model]["int4-mixed"], 0, 5, tmp_path, {"GGML_CPU_STEP_KERNELS": "0"})
        theirs = prompt_logits(stock_exe, models[model]["int4-mixed"], 0, 5, tmp_path)
        assert np.array_equal(mine, theirs)


def test_profile_counts_nodes_and_the_bytes_they_read(models, ours, tmp_path):
    from gguf import GGUFReader

    model = models["small"]["int4-mixed"]
    exe = compile_native("step_greedy", ours)
    prof = tmp_path / "profile.tsv"
    n_predict = 16
    out = subprocess.run([str(exe), str(model), PROMPTS[0], str(n_predict), str(tmp_path / "l.f32"), "512", "2"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "GGML_CPU_PROFILE": str(prof)})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = prof.read_text().splitlines()
    head = lines[0].split("\t")
    graphs = int(head[1])
    assert head[0] == "# graphs" and graphs == 1 + n_predict  # the prompt, then one per token
    rows = list(csv.DictReader(lines[1:], delimiter="\t"))
    sizes = {t.name: int(t.n_bytes) for t in GGUFReader(model).tensors}
    # every call of the LM head reads the whole output matrix, repacked to the same size
    head_rows = [r for r in rows if r["name"] == "result_output" and r["op"] == "MUL_MAT"]
    assert len(head_rows) == 1 and int(head_rows[0]["calls"]) == graphs
    assert int(head_rows[0]["bytes"]) == graphs * sizes["output.weight"]
    # MUL_MAT_ID reads the experts some token chose: here all 8, in every graph
    moe = [r for r in rows if r["op"] == "MUL_MAT_ID" and r["name"] == "ffn_moe_up"]
    assert len(moe) == 3 and all(int(r["calls"]) == graphs for r in moe)
    for r in moe:
        assert int(r["bytes"]) == graphs * sizes[f"blk.{r['layer']}.ffn_up_exps.weight"]
    for r in rows:  # time is spent, and waits are never negative
        assert int(r["wall_ns"]) >= 0 and int(r["wait_ns"]) >= 0 and int(r["compute_ns"]) > 0
