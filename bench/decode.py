"""Decode and prompt speed on this machine's CPU: the planner's prediction against what runs,
the wrapper against llama-bench from the same build, and MTP drafting on against off.

    python bench/decode.py [--work DIR] [--preset wide] [--threads N] [--tokens 64]

One process measures everything in turn, on the `wide` checkpoint quantized with int4-mixed
(made once under --work and reused):
  - read bandwidth: all threads summing a 1 GiB array, fastest of 5 (the planner's --mem-bw);
  - llama-bench: decode (-n --tokens) and prompt (-p 512) tok/s, mean of its 3 repetitions;
  - the wrapper: the same GGUF loaded through llama-cpp-python with the plan applied, greedy
    decode of --tokens tokens one at a time, fastest of 3;
  - llama-server via `step-gguf run`'s path, MTP drafting off and on (acceptance printed);
    random weights make drafts wrong, so on this model MTP can only cost;
  - the planner: a custom profile with this machine's RAM and the bandwidth just measured;
  - MTP where the heads predict right: a `wide`-shaped scripted checkpoint (3 heads, greedy
    decoding and every head emit a fixed script), int4-mixed, decoded by our runtime (the
    plan's llama-server) and by plain llama-server with and without `--spec-type draft-mtp`:
    acceptance, and each speedup over its own MTP-off run.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

# run as a script, bench/ is on sys.path
from _common import checkpoint, machine_parser, work_dir

from step_gguf import plan as planner
from step_gguf.core.recipe import load_recipe
from step_gguf.native import installed
from step_gguf.native.machine_probe import ram_bytes, read_bandwidth
from step_gguf.pipeline.quantize import quantize
from step_gguf.pipeline.source_facts import read_facts
from step_gguf.runtime import llama, server
from step_gguf.synth.writer import synth


def llama_bench(gguf: Path, threads: int, tokens: int) -> tuple[float, float]:
    """(decode, prompt-512) tok/s from llama-bench."""
    tool = installed.check().tool("llama-bench")
    out = subprocess.run([str(tool), "-m", str(gguf), "-t", str(threads), "-p", "512", "-n",
                          str(tokens), "-r", "3", "-o", "json"], capture_output=True, text=True,
                         check=True)
    rows = json.loads(out.stdout)
    tg = next(r["avg_ts"] for r in rows if r["n_gen"] > 0)
    pp = next(r["avg_ts"] for r in rows if r["n_prompt"] > 0)
    return tg, pp


def wrapper_decode(gguf: Path, plan: planner.Plan, threads: int, tokens: int) -> float:
    """Greedy decode tok/s through the wrapper, one token per step, fastest of 3."""
    best = float("inf")
    with llama.load(gguf, plan=plan, n_threads=threads) as model:
        for _ in range(3):
            best = min(best, model.time_greedy(list(range(16, 48)), tokens)[1])
    return tokens / best


def server_decode(gguf: Path, tokens: int, **serve_kw) -> server.Reply:
    with server.serve(gguf, **serve_kw) as url:
        server.chat(url, [{"role": "user", "content": "warm up"}], max_tokens=4)
        return server.chat(url, [{"role": "user", "content": "Tell me a story."}],
                          max_tokens=tokens)


SCRIPT = [f" word{i}" for i in range(200)]  # distinct pieces: one added token each


def scripted(work: Path, preset: str, head_accuracy: float = 1.0) -> Path:
    """The scripted `preset`-shaped GGUF whose MTP heads are right on `head_accuracy` of their
    inputs (made once under `work`; the checkpoint is removed once quantized)."""
    tag = "" if head_accuracy == 1.0 else f"-heads{head_accuracy:g}"
    gguf = work / f"{preset}-scripted{tag}-int4-mixed.gguf"
    if not gguf.exists():
        src = work / f"{preset}-scripted{tag}-ckpt"
        print(f"synthesising the scripted {preset} checkpoint at {src} ...", flush=True)
        if not src.exists():
            synth(src, preset, script=SCRIPT, chat_template="step35", head_accuracy=head_accuracy)
        quantize(src, gguf, load_recipe("int4-mixed"))
        shutil.rmtree(src)
    return gguf


class MtpResult(NamedTuple):
    label: str
    ratio: float  # median of the per-round MTP-on / MTP-off decode
    off_tps: float  # medians over the rounds
    on_tps: float
    accepted: float  # the lowest acceptance of the rounds


def mtp_rounds(gguf: Path, tokens: int, contenders: list[tuple[str, dict, dict]],
               rounds: int) -> list[MtpResult]:
    """Each contender (label, serve kwargs with MTP off, with MTP on) decodes off then on, all of
    them in turn for `rounds` rounds: the machine's speed drifts, a round's pair shares it."""
    runs: dict[str, list[tuple[server.Reply, server.Reply]]] = {label: [] for label, _, _ in contenders}
    for _ in range(rounds):
        for label, off_kw, on_kw in contenders:
            runs[label].append((server_decode(gguf, tokens, **off_kw), server_decode(gguf, tokens, **on_kw)))
    return [MtpResult(label, statistics.median(on.decode_tps / off.decode_tps for off, on in pairs),
                      statistics.median(off.decode_tps for off, _ in pairs),
                      statistics.median(on.decode_tps for _, on in pairs),
                      min(on.acceptance or 0.0 for _, on in pairs))
            for label, pairs in runs.items()]


def this_machine(bandwidth: float) -> planner.Profile:
    """This machine for the planner: its RAM, and `bandwidth` bytes/s."""
    return planner.machine("custom", ram_gb=ram_bytes() / planner.GiB, mem_bw_gbs=bandwidth / 1e9)


def mtp_plans(gguf: Path, machine: planner.Profile) -> tuple[planner.Plan, planner.Plan]:
    """The plans `step-gguf serve` would make for `gguf` at 4096 tokens: MTP off, MTP on."""
    facts = read_facts(gguf)
    return planner.plan(facts, machine, 4096, mtp=False), planner.plan(facts, machine, 4096)


def mtp_speedups(gguf: Path, machine: planner.Profile, tokens: int, rounds: int = 3) -> list[MtpResult]:
    """MTP on over off for our runtime (the plan) and plain llama-server with its own flags."""
    off, on = mtp_plans(gguf, machine)
    plain = ["-c", "4096", "--jinja"]
    draft = ["--spec-type", "draft-mtp", "--spec-draft-n-max", str(read_facts(gguf).n_nextn)]
    return mtp_rounds(gguf, tokens, [
        ("step-gguf run/serve (the plan)", {"plan": off}, {"plan": on}),
        ("plain llama-server", {"extra_args": plain}, {"extra_args": plain + draft})], rounds)


def main() -> None:
    ap = machine_parser(__doc__, "the checkpoint and GGUF")
    ap.add_argument("--tokens", type=int, default=64, help="tokens decoded per measurement")
    a = ap.parse_args()
    work = work_dir(a.work, "step-gguf-dbench-")
    gguf = work / f"{a.preset}-int4-mixed.gguf"
    if not gguf.exists():
        src, _ = checkpoint(work, a.preset)
        print(f"quantizing {src} to {gguf} ...", flush=True)
        quantize(src, gguf, load_recipe("int4-mixed"))

    bw = read_bandwidth(a.threads)
    machine = this_machine(bw)
    plan_off, plan_on = mtp_plans(gguf, machine)
    tg, pp = llama_bench(gguf, a.threads, a.tokens)
    wrapped = wrapper_decode(gguf, plan_off, a.threads, a.tokens)
    off, on = server_decode(gguf, a.tokens, plan=plan_off), server_decode(gguf, a.tokens, plan=plan_on)
    speedups = mtp_speedups(scripted(work, a.preset), machine, 2 * a.tokens)

    print(f"\n{gguf.name}: {gguf.stat().st_size / 2**30:.2f} GiB, {a.threads} threads, "
          f"read bandwidth {bw / 1e9:.1f} GB/s")
    print(f"{'':<34}{'tok/s':>10}{'ratio':>10}")
    rows = [("llama-bench decode", tg, 1.0),
            ("wrapper decode (llama-cpp-python)", wrapped, wrapped / tg),
            ("llama-server decode, MTP off", off.decode_tps, off.decode_tps / tg),
            ("llama-server decode, MTP on", on.decode_tps, on.decode_tps / tg),
            ("planner's predicted decode", plan_off.predicted_decode_tps,
             plan_off.predicted_decode_tps / tg),
            ("llama-bench prompt (512)", pp, 1.0),
            ("planner's predicted prompt", plan_off.predicted_prompt_tps,
             plan_off.predicted_prompt_tps / pp)]
    for label, value, ratio in rows:
        print(f"{label:<34}{value:>10.1f}{ratio:>10.3f}")
    if on.acceptance is not None:
        print(f"MTP: {on.draft_accepted}/{on.draft_tokens} drafts accepted "
              f"({on.acceptance:.0%}); MTP on / off = {on.decode_tps / off.decode_tps:.3f}")
    print(f"\nMTP on a scripted {a.preset} model whose 3 heads predict right "
          f"({len(SCRIPT)}-token script, {2 * a.tokens} tokens decoded, median of 3 rounds):")
    print(f"{'':<34}{'on/off':>10}{'accepted':>10}")
    for s in speedups:
        print(f"{s.label:<34}{s.ratio:>10.3f}{s.accepted:>10.0%}")
    print(f"our MTP speedup / llama-server's: {speedups[0].ratio / speedups[1].ratio:.3f} "
          "(target: at least 1; acceptance at least 90%)")
    error = plan_off.predicted_decode_tps / tg - 1
    print(f"predicted vs measured decode: {error:+.1%} (target: within 30%)")
    sys.exit(0)


if __name__ == "__main__":
    main()
