"""Quantization speed, memory and quality: step-gguf's one-pass quantizer vs the two-step
route through a BF16 GGUF and llama.cpp's own llama-quantize, on the `wide` synthetic checkpoint.

    one-pass  step-gguf quantize SRC --scheme int4-mixed              (checkpoint -> quantized GGUF)
    (a)       llama.cpp convert_hf_to_gguf.py --outtype bf16, then llama-quantize Q4_K_M
    (b)       step-gguf convert --outtype bf16,                  then llama-quantize Q4_K_M

Both converters and llama-quantize come from the llama-cpp-python sdist our runtime is built
from (its llama-quantize is our build). Every step runs in its own process, started by a fresh
small launcher: wall time is measured around it and peak RSS comes from its rusage. Before each
step its input (the checkpoint, or the BF16 GGUF) is read once so that it starts from the page
cache, and os.sync() flushes the previous step's writes. A path's time is the sum of its two
steps, its peak RSS the larger. With --repeat N each step keeps its fastest wall time (and its
highest peak RSS) of N runs.

Quality is llama-perplexity's KL divergence of each quantized model's next-token distributions
from the BF16 GGUF of path (b), over a short text (--kld-text cut to --kld-chars characters, in
chunks of --kld-ctx tokens; the second half of each chunk is scored). int4-mixed and Q4_K_M
are different type mixes, so output size and KLD are printed beside the times.

    python bench/quantize.py [--work DIR] [--keep] [--preset wide] [--repeat 1] [--threads N]
                             [--skip-llama-cpp] [--skip-kld] [--kld-text F] [--kld-ctx 256]
    python bench/quantize.py --budget [--work DIR] [--seed 11 --seed 23]   (bench/budget.py)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# run as a script, bench/ is on sys.path
from _common import Timing, best, checkpoint, description, llama_cpp_convert_cmd, measure, read_through, remove

from step_gguf.native import installed, tools

SCHEME = "int4-mixed"
FTYPE = "Q4_K_M"
TARGET_VS_A = 0.75  # one-pass must take at most this share of path (a)'s time
TARGET_VS_B = 1.0   # ... and no longer than path (b)


@dataclass
class Step:
    label: str
    cmd: list[str]
    src: Path    # read into the page cache before each run
    out: Path
    timing: Timing | None = None


@dataclass
class Contender:
    title: str
    steps: list[Step]

    @property
    def wall(self) -> float:
        return sum(s.timing[0] for s in self.steps)

    @property
    def rss(self) -> int:
        return max(s.timing[1] for s in self.steps)

    @property
    def out(self) -> Path:
        return self.steps[-1].out


def contenders(work: Path, src: Path, threads: int | None, with_llama_cpp: bool) -> dict[str, Contender]:
    """Each contender's steps, in the order they run; a step's input is an earlier one's output."""
    step_gguf = [sys.executable, "-m", "step_gguf.cli"]

    def stock_quantize(bf16: Path, out: Path) -> Step:
        cmd = [str(installed.check().tool("llama-quantize")), str(bf16), str(out), FTYPE,
               *([str(threads)] if threads else [])]
        return Step(f"llama-quantize {FTYPE}", cmd, bf16, out)

    one_pass = work / f"one-pass-{SCHEME}.gguf"
    ours_bf16, theirs_bf16 = work / "ours-bf16.gguf", work / "theirs-bf16.gguf"
    out = {
        "one-pass": Contender(f"one-pass: step-gguf quantize {SCHEME}", [
            Step(f"step-gguf quantize {SCHEME}",
                 [*step_gguf, "quantize", str(src), "-o", str(one_pass), "--scheme", SCHEME,
                  *(["-t", str(threads)] if threads else [])], src, one_pass)]),
        "(b)": Contender("(b) step-gguf convert + llama-quantize", [
            Step("step-gguf convert --outtype bf16",
                 [*step_gguf, "convert", str(src), "-o", str(ours_bf16), "--outtype", "bf16"],
                 src, ours_bf16),
            stock_quantize(ours_bf16, work / f"b-{FTYPE}.gguf")]),
    }
    if with_llama_cpp:
        out["(a)"] = Contender("(a) convert_hf_to_gguf + llama-quantize", [
            Step("convert_hf_to_gguf --outtype bf16", llama_cpp_convert_cmd(work, src, theirs_bf16),
                 src, theirs_bf16),
            stock_quantize(theirs_bf16, work / f"a-{FTYPE}.gguf")])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--work", type=Path, default=None,
                    help="folder for the checkpoint (reused if there) and outputs [a temporary one]")
    ap.add_argument("--keep", action="store_true", help="keep the GGUFs (and a temporary --work)")
    ap.add_argument("--preset", default=None, help="synthetic checkpoint preset [wide; quant with --budget]")
    ap.add_argument("--repeat", type=int, default=1, help="runs of every step (fastest kept)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for the quantizers and llama-perplexity [all cores]")
    ap.add_argument("--skip-llama-cpp", action="store_true", help="skip path (a), llama.cpp's converter")
    ap.add_argument("--skip-kld", action="store_true", help="skip the quality measurement")
    ap.add_argument("--kld-text", type=Path, default=tools.default_text(),
                    help="text the KLD is measured on [the bundled calibration text]")
    ap.add_argument("--kld-chars", type=int, default=2500, help="characters of --kld-text used")
    ap.add_argument("--kld-ctx", type=int, default=256, help="tokens per KLD chunk")
    ap.add_argument("--budget", action="store_true", help="instead: budget mode (--target-size) "
                    "against static llama-quantize --tensor-type mixes at stock Q4_K_M's size, by KLD, "
                    "with and without an imatrix (bench/budget.py; --preset quant by default)")
    ap.add_argument("--seed", type=int, action="append", default=None,
                    help="with --budget: a checkpoint seed (repeatable) [11 and 23]")
    a = ap.parse_args()
    if a.budget:
        from budget import run  # noqa: PLC0415

        run(a.work, a.preset or "quant", a.seed or [11, 23], a.threads or os.cpu_count() or 1)
        return
    a.preset = a.preset or "wide"

    temporary = a.work is None
    work = Path(tempfile.mkdtemp(prefix="step-gguf-qbench-")) if temporary else a.work
    work.mkdir(parents=True, exist_ok=True)
    made = [work / "kld-text.txt"]  # besides the checkpoint, everything this run writes
    try:
        src, _ = checkpoint(work, a.preset)
        runs = contenders(work, src, a.threads, not a.skip_llama_cpp)
        made += [s.out for c in runs.values() for s in c.steps]
        for _ in range(a.repeat):
            for c in runs.values():
                for step in c.steps:
                    remove(step.out)
                    read_through(step.src)
                    step.timing = best(step.timing, measure(step.label, step.cmd))
        quality = {}
        if not a.skip_kld:
            made[0].write_text(a.kld_text.read_text()[:a.kld_chars])
            quality = kld(runs, made[0], a)
        report(runs, quality, a.repeat)
    finally:
        if a.keep:
            print(f"\noutputs kept in {work}")
        elif temporary:
            shutil.rmtree(work)
        else:
            for path in made:
                remove(path)


def kld(runs: dict[str, Contender], text: Path, a: argparse.Namespace) -> dict[str, dict]:
    """Each contender's KLD statistics against path (b)'s BF16 GGUF."""
    reference = runs["(b)"].steps[0].out
    print(f"\nKLD vs {reference.name} on the first {a.kld_chars} characters of {a.kld_text}, "
          f"ctx {a.kld_ctx} ...", flush=True)
    with tools.reference_scores(reference, text, ctx=a.kld_ctx, threads=a.threads) as scores:
        quality = {name: tools.kld_against(c.out, scores, threads=a.threads) for name, c in runs.items()}
    print(f"scored the second halves of {quality['(b)']['chunks']} chunks of {a.kld_ctx} tokens")
    return quality


def report(runs: dict[str, Contender], quality: dict[str, dict], repeat: int) -> None:
    wall_a = runs["(a)"].wall if "(a)" in runs else None
    wall_b = runs["(b)"].wall

    def ratio(wall: float, base: float | None) -> str:
        return f"{wall / base:6.2f}" if base else f"{'-':>6}"

    print(f"\nwall time: fastest of {repeat} run(s) per step; a path is the sum of its steps\n")
    print(f"{'contender':42} {'wall s':>8} {'/ (a)':>6} {'/ (b)':>6} {'peak RSS MiB':>13} "
          f"{'output bytes':>14} {'GiB':>6} {'mean KLD':>10} {'top-1 %':>8}")
    for name, c in runs.items():
        size = c.out.stat().st_size
        q = quality.get(name)
        kld_cols = f"{q['kld_mean']:10.6f} {q['top1_pct']:8.2f}" if q else f"{'-':>10} {'-':>8}"
        print(f"{c.title:42} {c.wall:8.2f} {ratio(c.wall, wall_a)} {ratio(c.wall, wall_b)} "
              f"{c.rss / 2**20:13.0f} {size:14d} {size / 2**30:6.3f} {kld_cols}")
        if len(c.steps) > 1:
            for s in c.steps:
                print(f"  {s.label:40} {s.timing[0]:8.2f} {'':13} {s.timing[1] / 2**20:13.0f}")

    print()
    for name, base, target in (("(a)", wall_a, TARGET_VS_A), ("(b)", wall_b, TARGET_VS_B)):
        if base:
            r = runs["one-pass"].wall / base
            print(f"one-pass / {name} = {r:.3f}  (target <= {target}): {'met' if r <= target else 'NOT met'}")


if __name__ == "__main__":
    main()
