"""What the benchmarks share: a measured child process, a warm page cache, the synthetic
checkpoint, the files quality is measured with, and llama.cpp's own converter run the way a
Step 3.5 user would have to."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from step_gguf.native import cpu
from step_gguf.native.build import extract_sdist, fetch_sdist
from step_gguf.synth.writer import synth

QUALITY_CTX = 256  # tokens a chunk, for the imatrix and KLD of the quality benches

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

Timing = tuple[float, int]  # (wall seconds, peak RSS bytes)


def description(doc: str) -> str:
    """A script docstring's first paragraph on one line: its --help description."""
    return " ".join(doc.split("\n\n")[0].split())


def machine_parser(doc: str, holds: str) -> argparse.ArgumentParser:
    """The options of the benches that time this machine: --work (a folder that `holds`),
    --preset and --threads."""
    ap = argparse.ArgumentParser(description=description(doc))
    ap.add_argument("--work", type=Path, default=None, help=f"folder for {holds} (reused if there) "
                    "[a temporary one]")
    ap.add_argument("--preset", default="wide")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--variant", choices=[v.tag for v in cpu.CPU_VARIANTS], default=None,
                    help="run stock and ours on this x86 level's CPU backend (GGML_CPU_VARIANT), "
                         "e.g. haswell for plain AVX2 [the best this CPU runs]")
    return ap


def pin_variant(tag: str | None) -> str:
    """Pin the CPU level every build this process starts runs (GGML_CPU_VARIANT, inherited by
    the tools), exiting where this CPU cannot run it; what to print about it."""
    if tag is None:
        return "the best CPU level each build has for this CPU"
    if not cpu.BY_TAG[tag].runs_here():
        sys.exit(f"this CPU cannot run {tag} ({cpu.BY_TAG[tag].isa}) code")
    os.environ[cpu.PIN] = tag
    return f"CPU level {tag} ({cpu.BY_TAG[tag].isa})"


def vulkan_device() -> bool:
    """Where no NVIDIA GPU answers (`nvidia-smi`), name Mesa's llvmpipe as the Vulkan device the
    children use (GGML_VK_VISIBLE_DEVICES=0: llama.cpp skips a CPU-type device unless named)
    and say so; True when it did."""
    if shutil.which("nvidia-smi"):
        return False
    os.environ["GGML_VK_VISIBLE_DEVICES"] = "0"
    print("no NVIDIA GPU here: Vulkan on Mesa's llvmpipe")
    return True


def work_dir(work: Path | None, prefix: str) -> Path:
    """`work`, or a new temporary folder named `prefix`..., made if missing."""
    work = work or Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    return work


def measure(label: str, args: list[str]) -> Timing:
    """Wall time and peak RSS of one contender process; exits with its stderr if it fails."""
    os.sync()  # start each contender without the previous one's dirty pages still flushing
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *args], capture_output=True, text=True)
    result = json.loads(proc.stdout)
    if result["code"] != 0:
        sys.exit(f"{label} failed:\n{proc.stderr}")
    return result["wall"], result["rss"]


def best(prev: Timing | None, new: Timing) -> Timing:
    """Over repeats: the fastest wall time, and the highest peak RSS."""
    return new if prev is None else (min(prev[0], new[0]), max(prev[1], new[1]))


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def read_through(path: Path) -> int:
    """Read a file, or every file of a folder, so that it is in the page cache; its bytes."""
    total = 0
    for f in sorted(path.iterdir()) if path.is_dir() else [path]:
        with open(f, "rb") as fh:
            while chunk := fh.read(64 * 2**20):
                total += len(chunk)
    return total


def checkpoint(work: Path, preset: str) -> tuple[Path, int]:
    """The synthetic checkpoint under `work` (made once, reused after), read into the page
    cache; its folder and size."""
    src = work / f"{preset}-ckpt"
    if not src.exists():
        print(f"synthesising {preset} checkpoint at {src} ...", flush=True)
        synth(src, preset, seed=0)
    size = read_through(src)
    print(f"checkpoint {src}: {size / 2**30:.2f} GiB")
    return src, size


@dataclasses.dataclass(frozen=True)
class Quality:
    """A synthetic checkpoint and what its quantizations are measured against: its F32 (the
    reference) and BF16 (llama-quantize's source) conversions, an imatrix over the start of
    the calibration text and the text's held-out end to score on."""

    src: Path
    f32: Path
    bf16: Path
    imatrix: Path
    held_out: Path


def quality_files(work: Path, preset: str, seed: int, threads: int) -> Quality:
    """`preset` at `seed` under `work` with its reference files, each made once."""
    from step_gguf.pipeline.convert import convert  # noqa: PLC0415
    from step_gguf.native import tools  # noqa: PLC0415

    q = Quality(work / f"{preset}-{seed}", work / "f32.gguf", work / "bf16.gguf", work / "imatrix.gguf",
                work / "held-out.txt")
    if not q.src.exists():
        synth(q.src, preset, seed=seed)
    for path, outtype in ((q.f32, "f32"), (q.bf16, "bf16")):
        if not path.exists():
            convert(q.src, path, outtype=outtype)
    text = tools.default_text().read_bytes()
    q.held_out.write_bytes(text[-6000:])  # the imatrix reads the start of the same text
    if not q.imatrix.exists():
        tools.imatrix(q.bf16, q.imatrix, ctx=QUALITY_CTX, chunks=24, threads=threads)
    return q


def llama_cpp_convert_cmd(work: Path, src: Path, out: Path, outtype: str = "bf16") -> list[str]:
    """The command running llama.cpp's convert_hf_to_gguf.py, from the llama-cpp-python sdist
    our runtime is built from (unpacked under `work` once), on `src`."""
    tree = work / "llama-cpp-python"
    if not tree.exists():
        extract_sdist(fetch_sdist(), tree)
    return [sys.executable, "-c", LLAMA_CPP_RUNNER, str(tree / "vendor" / "llama.cpp"),
            str(src), "--outfile", str(out), "--outtype", outtype]
