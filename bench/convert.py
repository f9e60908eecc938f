"""Conversion speed and memory: step-gguf vs a plain copy of the same bytes vs llama.cpp's
own converter (from the same llama-cpp-python sdist), on the `wide` synthetic checkpoint.

Each contender runs in its own process; wall time is measured around it and peak RSS comes
from that process's rusage. The source is read once beforehand so every contender starts
with it in the page cache. Ratios are printed against the plain copy measured in this run.

    python bench/convert.py [--work DIR] [--preset wide] [--repeat 2] [--skip-llama-cpp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from step_gguf.runtime.build import extract_sdist, fetch_sdist
from step_gguf.synth import synth

# llama.cpp's converter, run as a user would, with the two blockers a Step 3.5 user hits
# bypassed: it reads config.json through transformers (which drops partial_rotary_factors and
# crashes), and it refuses tokenizers whose hash it has not registered.
LLAMA_CPP_RUNNER = textwrap.dedent("""
    import json, sys
    sys.path[:0] = [sys.argv[1], sys.argv[1] + "/gguf-py"]
    sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[2:]
    from conversion import base
    def load_hparams(dir_model, is_mistral_format):
        return json.loads((dir_model / "config.json").read_text())
    base.ModelBase.load_hparams = staticmethod(load_hparams)
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "deepseek-v3"
    import convert_hf_to_gguf
    convert_hf_to_gguf.main()
""")


# ru_maxrss survives fork+exec, so a child of this (large) process would report our peak;
# a fresh, small launcher starts each contender and reports that child's own rusage.
LAUNCHER = textwrap.dedent("""
    import json, os, subprocess, sys, time
    start = time.perf_counter()
    proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    sys.stderr.write(err.decode(errors="replace")[-2000:])
    print(json.dumps({"wall": wall, "rss": usage.ru_maxrss * 1024,
                      "code": os.waitstatus_to_exitcode(status)}))
""")


def measure(label: str, args: list[str], out: Path) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one contender process; its output is removed after."""
    os.sync()  # start each contender without the previous one's dirty pages still flushing
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *args], capture_output=True, text=True)
    result = json.loads(proc.stdout)
    if result["code"] != 0:
        sys.exit(f"{label} failed:\n{proc.stderr}")
    if out.is_dir():
        shutil.rmtree(out)
    else:
        out.unlink(missing_ok=True)
    return result["wall"], result["rss"]


def read_through(src: Path) -> int:
    total = 0
    for f in sorted(src.iterdir()):
        with open(f, "rb") as fh:
            while chunk := fh.read(64 * 2**20):
                total += len(chunk)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "step-gguf-bench")
    ap.add_argument("--preset", default="wide")
    ap.add_argument("--repeat", type=int, default=2, help="runs of the copy and of ours (best kept)")
    ap.add_argument("--skip-llama-cpp", action="store_true", help="skip llama.cpp's converter (slow)")
    a = ap.parse_args()

    src = a.work / f"{a.preset}-ckpt"
    if not src.exists():
        print(f"synthesising {a.preset} checkpoint at {src} ...", flush=True)
        synth(src, a.preset, seed=0)
    size = read_through(src)
    print(f"checkpoint {src}: {size / 2**30:.2f} GiB")

    copy_out = a.work / "copy"
    copy_cmd = [sys.executable, "-c", "import shutil, sys; shutil.copytree(sys.argv[1], sys.argv[2])",
                str(src), str(copy_out)]
    ours_out = a.work / "ours.gguf"
    ours_cmd = [sys.executable, "-m", "step_gguf.cli", "convert", str(src), "-o", str(ours_out),
                "--outtype", "bf16"]
    results = {}
    for _ in range(a.repeat):
        for label, cmd, out in (("plain copy", copy_cmd, copy_out), ("step-gguf", ours_cmd, ours_out)):
            wall, rss = measure(label, cmd, out)
            best = results.get(label)
            results[label] = (min(wall, best[0]) if best else wall, max(rss, best[1]) if best else rss)
    if not a.skip_llama_cpp:
        tree = a.work / "llama-cpp-python"
        if not tree.exists():
            extract_sdist(fetch_sdist(), tree)
        theirs_out = a.work / "theirs.gguf"
        theirs_cmd = [sys.executable, "-c", LLAMA_CPP_RUNNER, str(tree / "vendor" / "llama.cpp"),
                      str(src), "--outfile", str(theirs_out), "--outtype", "bf16"]
        results["llama.cpp convert_hf_to_gguf"] = measure("llama.cpp", theirs_cmd, theirs_out)

    copy_wall = results["plain copy"][0]
    print(f"\n{'contender':32} {'wall s':>8} {'GB/s':>6} {'vs copy':>8} {'peak RSS MiB':>13}")
    for label, (wall, rss) in results.items():
        print(f"{label:32} {wall:8.2f} {size / wall / 1e9:6.2f} {wall / copy_wall:7.2f}x {rss / 2**20:13.0f}")
    if "llama.cpp convert_hf_to_gguf" in results:
        ratio = results["llama.cpp convert_hf_to_gguf"][0] / results["step-gguf"][0]
        print(f"\nstep-gguf is {ratio:.1f}x faster than llama.cpp's converter")


if __name__ == "__main__":
    main()
