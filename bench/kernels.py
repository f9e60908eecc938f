"""CPU speed of our patched llama.cpp against stock llama.cpp built from the same sdist, on the
`wide` checkpoint (real per-expert shapes) as int4-mixed and as stock Q4_K_M.

    python bench/kernels.py [--work DIR] [--threads N] [--rounds 3] [--shares] [--skip-mtp] [--recipe FILE]
                            [--variant haswell|alderlake|skylakex|icelake|zen4]

What it prints, every figure measured in this run:
  - step time at batch 1, 2, 4 and 8 and prompt tok/s at 512: llama-bench (-p N -n 0), stock and
    ours taking turns, a few seconds each, for --rounds rounds; each figure is the median, the
    ratio to stock the median of the per-round ratios (the machine's speed drifts; a round's
    pair shares its state);
  - read bandwidth: the planner's probe (all threads summing a 1 GiB array) at the start of each
    round; a step's read limit is the bytes it reads over that round's bandwidth;
  - the fraction of the read limit: bytes read per step come from our build's profile of the
    same step (GGML_CPU_PROFILE: weights and caches each node reads, only the chosen experts);
  - where the time goes, per op and weight type, and per layer, at batch 1, 4 and 512: our build
    with GGML_CPU_STEP_KERNELS=0 (stock's code paths, bit for bit: tests/test_kernels.py) and
    with its kernels; barrier wait and activation quantization shown apart;
  - MTP on the scripted wide model whose 3 heads predict right: decode tok/s with drafting on
    over off, through our runtime (the plan's llama-server) and through stock llama-server;
  - with --variant: stock and ours both on that x86 level's CPU backend (GGML_CPU_VARIANT; each
    build carries one per level), to measure the path a CPU without this machine's wider
    instructions takes (on a CPU of that level it is that CPU's figure only for the code: the
    memory and the cores are this machine's);
  - with --shares: each patch's share, from builds of the series up to it (0006 profile only,
    0007 kernels, 0008 expert reads, 0009/0010 MTP, 0011 row-scalar MULs), batch 1/4/512 and MTP.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

# run as a script, bench/ is on sys.path
from _common import checkpoint, machine_parser, pin_variant, work_dir
from decode import SCRIPT, mtp_plans, mtp_rounds, scripted, this_machine

from step_gguf.core.recipe import load_recipe
from step_gguf.native import build as b
from step_gguf.native import installed
from step_gguf.native.machine_probe import read_bandwidth
from step_gguf.pipeline.convert import convert
from step_gguf.pipeline.quantize import quantize

BATCHES = (1, 2, 4, 8)
PROMPT = 512
PROFILED = (1, 4, PROMPT)


def models(work: Path, preset: str, recipes: list[Path]) -> dict[str, Path]:
    """`preset` as int4-mixed (our recipe), Q4_K_M (llama-quantize on a BF16 conversion) and each
    recipe file of `recipes`, made once under `work`."""
    ours = {"int4-mixed": load_recipe("int4-mixed")} | {r.stem: load_recipe(path=r) for r in recipes}
    out = {name: work / f"{preset}-{name}.gguf" for name in ours} | {"Q4_K_M": work / f"{preset}-q4_k_m.gguf"}
    if all(p.exists() for p in out.values()):
        return out
    src, _ = checkpoint(work, preset)
    for name, recipe in ours.items():
        if not out[name].exists():
            print(f"quantizing {src} to {out[name]} ...", flush=True)
            quantize(src, out[name], recipe)
    if not out["Q4_K_M"].exists():
        bf16 = work / f"{preset}-bf16.gguf"
        print(f"converting and quantizing {src} to {out['Q4_K_M']} ...", flush=True)
        convert(src, bf16, outtype="bf16")
        subprocess.run([str(installed.check().tool("llama-quantize")), str(bf16), str(out["Q4_K_M"]), "Q4_K_M"],
                       check=True, capture_output=True)
        bf16.unlink()
    return out


def bench(tool: Path, gguf: Path, threads: int, sizes: tuple[int, ...], reps: int) -> dict[int, float]:
    """Seconds per step at each batch size of `sizes`, from one llama-bench run."""
    out = subprocess.run([str(tool), "-m", str(gguf), "-t", str(threads), "-p", ",".join(map(str, sizes)),
                          "-n", "0", "-r", str(reps), "-o", "json"], capture_output=True, text=True, check=True)
    return {row["n_prompt"]: row["n_prompt"] / row["avg_ts"] for row in json.loads(out.stdout)}


def profile(tool: Path, gguf: Path, threads: int, batch: int, work: Path, env: dict | None = None) -> dict:
    """Our build's per-node profile of one batch size: {"graphs", "rows": [...]}, per step."""
    path = work / f"profile-{gguf.stem}-{batch}-{len(env or {})}.tsv"
    subprocess.run([str(tool), "-m", str(gguf), "-t", str(threads), "-p", str(batch), "-n", "0", "-r", "3"],
                   capture_output=True, check=True, env={**os.environ, **(env or {}), "GGML_CPU_PROFILE": str(path)})
    lines = path.read_text().splitlines()
    graphs = int(lines[0].split("\t")[1])
    return {"graphs": graphs, "threads": int(lines[0].split("\t")[5]),
            "rows": list(csv.DictReader(lines[1:], delimiter="\t"))}


def per_step(prof: dict, key) -> dict:
    """ms (wall), wait and quantization ms per thread, MB read, per step, summed by key(row)."""
    out: dict = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    g, t = prof["graphs"], prof["threads"]
    for r in prof["rows"]:
        acc = out[key(r)]
        acc[0] += int(r["wall_ns"]) / g / 1e6
        acc[1] += int(r["wait_ns"]) / g / t / 1e6
        acc[2] += int(r["quant_ns"]) / g / t / 1e6
        acc[3] += int(r["bytes"]) / g / 1e6
    return out


def step_bytes(prof: dict) -> float:
    return sum(v[3] for v in per_step(prof, lambda r: 0).values()) * 1e6


def print_profile(name: str, batch: int, stock: dict, ours: dict) -> None:
    by = lambda r: (r["op"], r["type"].replace("+repack", ""))
    a, o = per_step(stock, by), per_step(ours, by)
    ta, to = sum(v[0] for v in a.values()), sum(v[0] for v in o.values())
    print(f"\n{name}, batch {batch}: where a step's time goes (ms per step; stock kernels | ours)")
    print(f"  {'op':<16}{'type':<8}{'stock':>9}{'%':>6}{'GB/s':>7}{'ours':>9}{'%':>6}{'GB/s':>7}")
    for k in sorted(set(a) | set(o), key=lambda k: -a.get(k, [0])[0])[:12]:
        sa, so = a.get(k, [0, 0, 0, 0]), o.get(k, [0, 0, 0, 0])
        gbs = lambda v: f"{v[3] / v[0]:7.1f}" if v[0] and v[3] else f"{'':>7}"
        print(f"  {k[0]:<16}{k[1]:<8}{sa[0]:9.2f}{100 * sa[0] / ta:6.1f}{gbs(sa)}{so[0]:9.2f}{100 * so[0] / to:6.1f}{gbs(so)}")
    for label, i in (("barrier wait (per thread)", 1), ("activation quantization (per thread)", 2)):
        print(f"  {label:<38}{sum(v[i] for v in a.values()):8.2f}{'':>13}{sum(v[i] for v in o.values()):9.2f}")
    print(f"  {'step (sum of node walls)':<38}{ta:8.2f}{'':>13}{to:9.2f}   ratio {ta / to:.2f}")
    layers_a, layers_o = per_step(stock, lambda r: int(r["layer"])), per_step(ours, lambda r: int(r["layer"]))
    cells = [f"{'out' if k < 0 else k}: {layers_a[k][0]:.1f}|{layers_o[k][0]:.1f}" for k in sorted(layers_a)]
    print("  per layer (ms, stock|ours): " + ", ".join(cells))


def timings(builds: dict[str, Path], gguf: Path, threads: int, rounds: int) -> tuple[dict, list[float]]:
    """({build: {batch: [seconds per step, per round]}}, [read bandwidth per round]). The builds
    take turns, in alternating order, a few seconds each: the shared machine's speed drifts
    over minutes, so each round's figures are paired and each round has its own bandwidth."""
    out = {name: defaultdict(list) for name in builds}
    bandwidth = []
    for r in range(rounds):
        print(f"  round {r + 1}/{rounds}", flush=True)
        bandwidth.append(read_bandwidth(threads))
        order = list(builds) if r % 2 == 0 else list(reversed(builds))
        for sizes, reps in ((BATCHES, 5), ((PROMPT,), 1)):
            for name in order:
                for n, s in bench(builds[name], gguf, threads, sizes, reps).items():
                    out[name][n].append(s)
    return out, bandwidth


def print_speed(name: str, t: dict, bw: list[float], base: str, bytes_at: dict[int, float]) -> None:
    print(f"\n{name}: step time (ms, median of {len(bw)} rounds), ratio to {base} and fraction of "
          "the read limit (medians of the per-round figures, each round with its own bandwidth)")
    builds = list(t)
    head = "".join(f"{b_:>12}{'x ' + base:>10}{'limit':>7}" if b_ != base else f"{b_:>12}{'limit':>7}" for b_ in builds)
    print(f"  {'batch':<8}{head}{'read MB':>9}{'limit ms':>9}")
    for n in (*BATCHES, PROMPT):
        row = f"  {n:<8}"
        limits = [bytes_at[n] / w for w in bw]
        for b_ in builds:
            frac = statistics.median(lim / x for lim, x in zip(limits, t[b_][n]))
            row += f"{statistics.median(t[b_][n]) * 1e3:12.1f}"
            if b_ != base:
                row += f"{statistics.median(x / y for x, y in zip(t[base][n], t[b_][n])):10.2f}"
            row += f"{frac:7.0%}" if n != PROMPT else f"{'':>7}"
        print(row + f"{bytes_at[n] / 1e6:9.0f}{statistics.median(limits) * 1e3:9.1f}")
    print(f"  prompt tok/s at {PROMPT}: " + ", ".join(f"{b_} {PROMPT / statistics.median(t[b_][PROMPT]):.1f}" for b_ in builds))


def mtp(servers: dict[str, Path | None], gguf: Path, tokens: int, rounds: int) -> None:
    """Decode with MTP drafting on over off, the plan's flags, each llama-server in turn."""
    off, on = mtp_plans(gguf, this_machine(30e9))  # the bandwidth moves predictions, not flags
    results = mtp_rounds(gguf, tokens, [(name, {"plan": off, "server": server}, {"plan": on, "server": server})
                                        for name, server in servers.items()], rounds)
    print(f"\nMTP on the scripted {gguf.stem} ({len(SCRIPT)}-piece script, 3 heads, {tokens} tokens, "
          f"median of {rounds} rounds)")
    print(f"  {'':<28}{'off tok/s':>10}{'on tok/s':>10}{'on/off':>8}{'accepted':>10}")
    for r in results:
        print(f"  {r.label:<28}{r.off_tps:10.1f}{r.on_tps:10.1f}{r.ratio:8.2f}{r.accepted:10.0%}")


def main() -> None:
    ap = machine_parser(__doc__, "the checkpoints and GGUFs")
    ap.add_argument("--rounds", type=int, default=5, help="stock/ours turns per model")
    ap.add_argument("--tokens", type=int, default=128, help="tokens decoded per MTP measurement")
    ap.add_argument("--shares", action="store_true", help="also measure builds of the series up "
                    "to each CPU patch (builds them once)")
    ap.add_argument("--skip-mtp", action="store_true")
    ap.add_argument("--recipe", type=Path, action="append", default=[], help="also time `preset` "
                    "quantized with this recipe file, e.g. a variant of `step-gguf recipes "
                    "int4-mixed --toml` (repeatable)")
    ap.add_argument("--only", choices=["int4-mixed", "Q4_K_M"], action="append", default=[],
                    help="time only this model (repeatable) [both, and each --recipe]")
    a = ap.parse_args()
    work = work_dir(a.work, "step-gguf-kbench-")
    print(f"running on {pin_variant(a.variant)}")

    print("building (or finding) stock llama.cpp from the same sdist ...", flush=True)
    stock = b.build(b.BuildSpec(installed.check().backend, series=0))
    builds = {"stock": stock.tool("llama-bench")}
    series = [name for name, _ in b.patch_series()]
    if a.shares:  # the series up to 0006 (stock kernels, profile only), 0007 and 0008 (0009/0010: MTP only)
        for k in range(series.index("0006-cpu-op-profile.patch") + 1, series.index("0008-repack-mul-mat-id.patch") + 2):
            builds[f"to {series[k - 1][:4]}"] = b.build(b.BuildSpec(installed.check().backend, series=k)).tool("llama-bench")
    builds["ours"] = installed.check().tool("llama-bench")
    ggufs = models(work, a.preset, a.recipe)

    for name, gguf in ggufs.items():
        if a.only and name not in a.only:
            continue
        print(f"\ntiming {gguf.name} ...", flush=True)
        t, bw = timings(builds, gguf, a.threads, a.rounds)
        profs = {n: (profile(builds["ours"], gguf, a.threads, n, work, {"GGML_CPU_STEP_KERNELS": "0"}),
                     profile(builds["ours"], gguf, a.threads, n, work)) for n in PROFILED}
        read = {n: step_bytes(profile(builds["ours"], gguf, a.threads, n, work)) for n in (2, 8)}
        read |= {n: step_bytes(p[1]) for n, p in profs.items()}
        print(f"\n{a.threads} threads; read bandwidth per round (GB/s): "
              + ", ".join(f"{w / 1e9:.1f}" for w in bw))
        print_speed(f"{gguf.name} ({gguf.stat().st_size / 2**30:.2f} GiB)", t, bw, "stock", read)
        for n, (stock_prof, ours_prof) in profs.items():
            print_profile(gguf.name, n, stock_prof, ours_prof)

    if not a.skip_mtp:
        servers = {"ours (step-gguf run/serve)": None, "stock llama-server": stock.tool("llama-server")}
        if a.shares:
            for k in (series.index("0009-mtp-head-output-rows.patch"), series.index("0010-mtp-deferred-catchup.patch"),
                      series.index("0011-binary-op-row-scalar.patch")):
                servers[f"series to {series[k - 1][:4]}"] = b.build(b.BuildSpec(installed.check().backend, series=k)).tool("llama-server")
        mtp(servers, scripted(work, a.preset), a.tokens, a.rounds)
    print("\nGPU (--cpu-moe with the rest on a GPU): not measured here; run this script where "
          "`nvidia-smi` works with a CUDA runtime (step-gguf runtime build --backend cuda).")
    sys.exit(0)


if __name__ == "__main__":
    main()
