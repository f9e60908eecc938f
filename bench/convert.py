"""Conversion speed and memory: step-gguf vs a plain copy of the same bytes vs llama.cpp's
own converter (from the same llama-cpp-python sdist), on the `wide` synthetic checkpoint.

Each contender runs in its own process; wall time is measured around it and peak RSS comes
from that process's rusage. The source is read once beforehand so every contender starts
with it in the page cache. Ratios are printed against the plain copy measured in this run.

    python bench/convert.py [--work DIR] [--preset wide] [--repeat 2] [--skip-llama-cpp]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from _common import best, checkpoint, description, llama_cpp_convert_cmd, measure, remove


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "step-gguf-bench")
    ap.add_argument("--preset", default="wide")
    ap.add_argument("--repeat", type=int, default=2, help="runs of the copy and of ours (best kept)")
    ap.add_argument("--skip-llama-cpp", action="store_true", help="skip llama.cpp's converter (slow)")
    a = ap.parse_args()

    src, size = checkpoint(a.work, a.preset)

    copy_out = a.work / "copy"
    copy_cmd = [sys.executable, "-c", "import shutil, sys; shutil.copytree(sys.argv[1], sys.argv[2])",
                str(src), str(copy_out)]
    ours_out = a.work / "ours.gguf"
    ours_cmd = [sys.executable, "-m", "step_gguf.cli", "convert", str(src), "-o", str(ours_out),
                "--outtype", "bf16"]
    results = {}
    for _ in range(a.repeat):
        for label, cmd, out in (("plain copy", copy_cmd, copy_out), ("step-gguf", ours_cmd, ours_out)):
            results[label] = best(results.get(label), measure(label, cmd))
            remove(out)
    if not a.skip_llama_cpp:
        theirs_out = a.work / "theirs.gguf"
        theirs_cmd = llama_cpp_convert_cmd(a.work, src, theirs_out)
        results["llama.cpp convert_hf_to_gguf"] = measure("llama.cpp", theirs_cmd)
        remove(theirs_out)

    copy_wall = results["plain copy"][0]
    print(f"\n{'contender':32} {'wall s':>8} {'GB/s':>6} {'vs copy':>8} {'peak RSS MiB':>13}")
    for label, (wall, rss) in results.items():
        print(f"{label:32} {wall:8.2f} {size / wall / 1e9:6.2f} {wall / copy_wall:7.2f}x {rss / 2**20:13.0f}")
    if "llama.cpp convert_hf_to_gguf" in results:
        ratio = results["llama.cpp convert_hf_to_gguf"][0] / results["step-gguf"][0]
        print(f"\nstep-gguf is {ratio:.1f}x faster than llama.cpp's converter")


if __name__ == "__main__":
    main()
