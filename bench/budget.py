"""Budget mode against static type mixes of the same size: KL divergence from the F32 model of
`step-gguf quantize --target-size` and of the usual hand-written mixes llama.cpp's own quantizer
makes (`llama-quantize --tensor-type`), with and without an importance matrix, at or under one
target: stock Q4_K_M's file size.

    python bench/quantize.py --budget [--work DIR] [--preset quant] [--seed 11 --seed 23] [--threads N]

The mixes put the every-token tensors (attention, shared and dense FFN, embeddings, output) at
Q8_0 or Q6_K and the routed experts at IQ4_XS, Q4_K or Q5_K (gate/up and down apart), as the
field does. Each file's size, KLD and top-1 agreement are printed; then budget mode's KLD over
the best static mix's at or under the target, with and without the imatrix, on each seed's
checkpoint. Each side uses its own kind of importance data from the same text: llama-imatrix's
file for llama-quantize, the same file for budget mode, which (as `step-gguf quantize --imatrix`
does) also equalizes with it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

# run as a script, bench/ is on sys.path
from _common import QUALITY_CTX as CTX
from _common import quality_files, work_dir

from step_gguf.core.recipe import load_recipe
from step_gguf.native import installed, tools
from step_gguf.pipeline.quantize import QuantizeOptions, Target, quantize

EVERY_TOKEN = r"attn|shexp|ffn_(gate|up|down)\.|token_embd|output"
# (name, every-token type, gate/up experts, down experts)
MIXES = [(f"{dense}+{gu}/{down}", dense, gu, down)
         for dense in ("q8_0", "q6_k") for gu, down in (("iq4_xs", "iq4_xs"), ("iq4_xs", "q4_k"),
                                                       ("q4_k", "q4_k"), ("q4_k", "q5_k"), ("iq4_xs", "q5_k"))]


def static_mix(bf16: Path, out: Path, dense: str, gate_up: str, down: str, imatrix: Path | None) -> Path:
    if not out.exists():
        args = [str(installed.check().tool("llama-quantize"))]
        if imatrix is not None:
            args += ["--imatrix", str(imatrix)]
        args += ["--tensor-type", f"ffn_(gate|up)_exps={gate_up}", "--tensor-type", f"ffn_down_exps={down}",
                 "--tensor-type", f"{EVERY_TOKEN}={dense}", "--output-tensor-type", dense,
                 "--token-embedding-type", dense, str(bf16), str(out), "Q4_K"]
        subprocess.run(args, check=True, capture_output=True)
    return out


def compare(work: Path, preset: str, seed: int, threads: int) -> dict[str, float]:
    """Budget mode against the mixes on `preset` at `seed` (files under `work`), printed; budget
    mode's KLD over the best mix's at or under the target, without and with the imatrix."""
    q = quality_files(work, preset, seed, threads)
    src, f32, bf16, imatrix, held_out = q.src, q.f32, q.bf16, q.imatrix, q.held_out
    stock = work / "stock-q4_k_m.gguf"
    if not stock.exists():
        subprocess.run([str(installed.check().tool("llama-quantize")), str(bf16), str(stock), "Q4_K_M"],
                       check=True, capture_output=True)
    target = stock.stat().st_size
    rows = []
    for imat in (None, imatrix):
        tag = "imatrix" if imat else "plain"
        budget = work / f"budget-{tag}.gguf"
        if not budget.exists():  # as `step-gguf quantize --target-size` does it: --imatrix equalizes
            quantize(src, budget, load_recipe("int4-mixed"),
                     QuantizeOptions(imatrix=imat, equalization=imat is not None, target=Target(bytes=target)))
        rows.append((tag, "budget mode", budget))
        for name, dense, gu, down in MIXES:
            rows.append((tag, name, static_mix(bf16, work / f"mix-{tag}-{name.replace('/', '_')}.gguf",
                                               dense, gu, down, imat)))
    print(f"\n{preset} seed {seed}: target {target} bytes (stock Q4_K_M's file); KLD from F32, ctx {CTX}")
    print(f"  {'imatrix':<8} {'mix':<22} {'bytes':>10} {'x target':>8} {'KLD':>8} {'top-1':>6}")
    kld = {}
    with tools.reference_scores(f32, held_out, ctx=CTX, threads=threads) as scores:
        for tag, name, path in rows:
            stats = tools.kld_against(path, scores, threads=threads)
            kld[tag, name] = (path.stat().st_size, stats["kld_mean"])
            print(f"  {tag:<8} {name:<22} {path.stat().st_size:>10} {path.stat().st_size / target:8.4f} "
                  f"{stats['kld_mean']:8.5f} {stats['top1_pct']:5.1f}%")
    ratios = {}
    for tag in ("plain", "imatrix"):
        name, (_, best) = min(((k, v) for (t, k), v in kld.items() if t == tag and k != "budget mode"
                               and v[0] <= target), key=lambda kv: kv[1][1])
        ratios[tag] = kld[tag, "budget mode"][1] / best
        print(f"{tag}: budget mode KLD {kld[tag, 'budget mode'][1]:.5f} vs the best static mix at or "
              f"under the target ({name}) {best:.5f}: {ratios[tag]:.2f}x")
    return ratios


def run(work: Path | None, preset: str, seeds: list[int], threads: int) -> None:
    """compare() on each seed's checkpoint, then the ratios side by side."""
    work = work_dir(work, "step-gguf-budget-")
    ratios = {seed: compare(work / f"{preset}-{seed}", preset, seed, threads) for seed in seeds}
    print(f"\nbudget mode's KLD over the best static mix's ({preset}):")
    for seed, r in ratios.items():
        print(f"  seed {seed}: without imatrix {r['plain']:.2f}x, with imatrix {r['imatrix']:.2f}x")
