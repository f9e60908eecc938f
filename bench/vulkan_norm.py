"""The Vulkan backend's RMS norm of short rows (patch 0023): llama-bench's prompt and decode
tok/s of the scripted tiny model (head_dim 32, so every per-head query and key norm takes the
32-wide build) with every layer on the device, ours against stock llama.cpp's Vulkan build
from the same sdist, in the same run.

Where no NVIDIA GPU is at hand it runs on Mesa's llvmpipe (GGML_VK_VISIBLE_DEVICES=0), which
switches a workgroup's invocations at every barrier, so the 512-wide workgroup of a 32-column
row is what it pays most for; on a real GPU the change only idles fewer lanes.

    python bench/vulkan_norm.py [--work DIR] [--repetitions N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from _common import description, vulkan_device, work_dir
from offload import scripted_model

from step_gguf.native import build as b
from step_gguf.native import installed

PROMPT, DECODE = 64, 16


def speeds(llama_bench: Path, model: Path, repetitions: int) -> dict[str, float]:
    """Mean tok/s of the prompt (ppPROMPT) and of decoding (tgDECODE), every layer on the device."""
    out = subprocess.run([str(llama_bench), "-m", str(model), "-p", str(PROMPT), "-n", str(DECODE), "-ngl", "99",
                          "-r", str(repetitions), "-o", "json"], capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        sys.exit(f"{llama_bench} failed: {out.stderr.strip().splitlines()[-1:]}")
    return {("prompt" if r["n_prompt"] else "decode"): r["avg_ts"] for r in json.loads(out.stdout)}


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--work", type=Path, default=None, help="folder for the model [a temporary one]")
    ap.add_argument("--repetitions", type=int, default=3, help="llama-bench runs of each test [3]")
    a = ap.parse_args()
    runtime = installed.check()
    if runtime.backend != "vulkan":
        sys.exit("needs the Vulkan runtime: step-gguf runtime build --backend vulkan")
    vulkan_device()
    model = scripted_model(work_dir(a.work, "step-gguf-vulkan-norm-"))
    stock = b.build(b.BuildSpec(runtime.backend, series=0))  # minutes the first time
    theirs = speeds(stock.tool("llama-bench"), model, a.repetitions)
    ours = speeds(runtime.tool("llama-bench"), model, a.repetitions)
    print(f"{model.name}, every layer on the device; tok/s, {a.repetitions} runs each")
    print(f"{'':>8} {'stock':>9} {'ours':>9} {'ratio':>7}")
    for test, n in (("prompt", PROMPT), ("decode", DECODE)):
        print(f"{test:>8} {theirs[test]:>9.1f} {ours[test]:>9.1f} {ours[test] / theirs[test]:>6.2f}x   ({n} tokens)")


if __name__ == "__main__":
    main()
