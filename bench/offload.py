"""GPU offload: what the plan predicts each device holds, beside what llama.cpp allocated, per
placement (everything on the GPU, routed experts partly in system memory, one unified pool),
and what a token moves between host and device.

Where no real GPU is at hand it runs on llama.cpp's Vulkan backend over Mesa's llvmpipe (a
Vulkan device on the CPU, named with GGML_VK_VISIBLE_DEVICES=0), where speed means nothing:
it prints bytes. With `nvidia-smi` working and a CUDA runtime installed it also times decode
and prompt tok/s of the plan's placement against llama.cpp's own `--fit` and `--n-cpu-moe N`
at the same VRAM (not run yet: no GPU has been lent to this project).

Traffic is measured by the scheduler (patch 0018, GGML_SCHED_COPY_STATS=1): a second run of
each placement without MTP drafting (whose draft graphs would mix in) answers a prompt of
PROMPT_TOKENS-odd tokens; its largest graph is a prompt micro-batch, the median of its last
DECODE_STEPS graphs a decode step.

    python bench/offload.py [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from dataclasses import replace
from pathlib import Path

from _common import description, vulkan_device, work_dir

from step_gguf import plan as P
from step_gguf.core.errors import StepGGUFError
from step_gguf.native import installed
from step_gguf.native.build import STEP35_TEMPLATE, sdist_text
from step_gguf.pipeline.source_facts import read_facts
from step_gguf.runtime import server
from step_gguf.runtime.loadlog import COPY_STATS, MiB, LoadLog

CTX, UBATCH = 4096, 64
DECODE_STEPS = 6
SCRIPT = ["The user", " wants", " the weather", " in Paris.", "\n</think>\n", "It is sunny."]


def scripted_model(work: Path) -> Path:
    from step_gguf.pipeline.quantize import quantize
    from step_gguf.core.recipe import load_recipe
    from step_gguf.synth.writer import synth

    out = work / "scripted-int4.gguf"
    if not out.exists():
        src = synth(work / "scripted", "tiny", script=SCRIPT, chat_template=sdist_text(STEP35_TEMPLATE),
                    rope_orig_ctx=1024)
        quantize(src, out, load_recipe("int4-mixed"))
    return out


def custom(vram_bytes: float, ram_gb: float = 8.0, unified: bool = False) -> P.Profile:
    # the plan keeps a margin and a reserve: give the machine what leaves `vram_bytes` usable
    return P.machine("custom", ram_gb=ram_gb, mem_bw_gbs=20, vram_gb=vram_bytes / P.GiB / 0.95 / (7 / 8),
                     gpu_bw_gbs=50, unified=unified)


def placements(m: P.ModelFacts) -> dict[str, P.Plan]:
    # an f16 cache: a quantized one needs flash attention, off here with experts in system memory
    experts = sum(t.bytes for t in m.tensors if m.kind(t) == "experts")
    kw = dict(n_ubatch=UBATCH, checkpoints=0, kv_type="f16")
    out = {"everything": P.plan(m, custom(1 << 30), CTX, **kw),
           "unified": P.plan(m, custom(1 << 30, ram_gb=1.5, unified=True), CTX, **kw)}
    for vram in range(1 << 20, 1 << 30, 1 << 16):  # the GPU holds ~10% of the experts, as a 12 GB card
        try:
            p = P.plan(m, custom(vram), CTX, **kw)
        except StepGGUFError:
            continue
        on_gpu = sum(t.bytes for t in p.devices[0].tensors if m.kind(t) == "experts")
        if p.devices[0].name == "GPU" and on_gpu >= 0.1 * experts:
            out["experts-in-ram"] = p
            break
    return out


def moved(m: P.ModelFacts, p: P.Plan) -> tuple[int, int]:
    """Predicted host<->device bytes of one decode step and of one prompt micro-batch: each
    layer with experts in system memory sends its hidden state over and its output back (f32),
    and a prompt batch streams those experts' weights to the device (op offload)."""
    kept = set(p.cpu_tensors)
    per_token = 2 * 4 * m.n_embd * len({int(n.split(".")[1]) for n in kept})
    streamed = sum(t.bytes for t in m.tensors if t.name in kept)
    return per_token, per_token * p.n_ubatch + streamed


def row(what: str, planned: float, measured: float | None) -> str:
    got = "-" if measured is None else f"{measured / MiB:9.3f}"
    ratio = "" if not measured or not planned else f"{measured / planned:6.3f}"
    return f"  {what:<34}{planned / MiB:9.3f}{got:>10}{ratio:>8}"


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--work", type=Path, default=None, help="folder for the model and logs [a temporary one]")
    a = ap.parse_args()
    if installed.check().backend == "cpu":
        sys.exit("the installed runtime has no GPU backend: step-gguf runtime build --backend vulkan")
    work = work_dir(a.work, "step-gguf-offload-")
    model = scripted_model(work)
    m = read_facts(model)
    gpu_name = "Vulkan0"
    if vulkan_device():
        print("(bytes only: llvmpipe's speed means nothing)")
    print(f"{model.name}, ctx {CTX}, micro-batch {UBATCH}; MiB planned, measured, ratio")
    for name, p in placements(m).items():
        log = work / f"{name}.log"
        print(f"\n{name}: {len(p.cpu_tensors)} tensors kept in system memory")
        if not answered(model, p, log, "Weather?", 8):
            continue
        got = LoadLog.parse(log.read_text())
        gpu, cpu = p.devices
        print(row("GPU weights", gpu.weights, got.model.get(gpu_name)))
        print(row("system-memory weights" + (" (mapped span)" if "CPU_Mapped" in got.model else ""),
                  cpu.weights, got.weights_in_system_memory))
        for i, (kv, compute, host) in enumerate((("kv", "compute", "compute_host"),
                                                 ("kv_mtp", "compute_mtp", "compute_host_mtp"))):
            if kv not in gpu.extra or i >= len(got.kv):
                continue
            ctx = "model" if i == 0 else "MTP heads"
            print(row(f"GPU KV ({ctx})", gpu.extra[kv], got.kv[i].get(gpu_name)))
            print(row(f"GPU compute ({ctx}, bound)", gpu.extra[compute], got.compute[i].get(gpu_name)))
            print(row(f"host compute ({ctx})", cpu.extra.get(host, 0), got.compute[i].get(f"{gpu_name[:-1]}_Host")))
        step, batch = moved(m, p)
        measured_step, measured_batch = traffic(model, p, work / f"{name}-traffic.log")
        print(f"  host<->device a decode step:     {step:>12} B planned, {measured_step:>12} B measured")
        print(f"  host<->device a prompt batch:    {batch:>12} B planned, {measured_batch:>12} B measured")


def answered(model: Path, p: P.Plan, log: Path, ask: str, tokens: int) -> bool:
    """One chat through the plan's llama-server, logged at debug level to `log`; a failed start
    is tried again, twice."""
    # flash attention with tensors in system memory corrupts the heap on llvmpipe, stock too
    # (tests/test_device.py FA_CRASH)
    extra = ["-v", "-fa", "off"] if p.cpu_tensors and not shutil.which("nvidia-smi") else ["-v"]
    for attempt in range(3):
        try:
            with server.serve(model, plan=p, log_path=log, extra_args=extra) as url:
                server.chat(url, [{"role": "user", "content": ask}], max_tokens=tokens, ignore_eos=True)
            return True
        except StepGGUFError as exc:
            print(f"  llama-server failed (try {attempt + 1} of 3): {exc}")
    return False


def traffic(model: Path, p: P.Plan, log: Path) -> tuple[int | None, int | None]:
    """Bytes the scheduler copied between backends in a decode step and in a prompt micro-batch
    (None where the run failed)."""
    os.environ[COPY_STATS] = "1"
    try:
        if not answered(model, replace(p, mtp=False), log, "Weather? " * 60, DECODE_STEPS + 2):
            return None, None
    finally:
        del os.environ[COPY_STATS]
    graphs = [sum(c.values()) for c in LoadLog.parse(log.read_text()).copies]
    return int(statistics.median(graphs[-DECODE_STEPS:])), max(graphs)


if __name__ == "__main__":
    main()
