"""The routed-expert cache (patch 0021): hit rate and bytes copied per token against cache size
for LRU, LFU and the patch's own policy replaying one routing trace; the trace's locality (the
share a fixed hot set serves, LRU's hit rate), so that it is measured, not assumed; and the
planner's predicted decode speed-up for a profile on the real config at the hit rate measured.

The trace is the routing of a synthetic model with the real expert count (the `small` preset
with 288 experts, 8 a token, and routing locality: `synth --routing-locality`) reading
calibration text one token a step on llama.cpp's Vulkan
backend over Mesa's llvmpipe, its experts in system memory and the cache on
(LLAMA_EXPERT_CACHE_TRACE). The patch's counters at that size stand beside the replay of its
policy, which must agree. llvmpipe's speed means nothing: bytes and hit rates only; decode
tok/s with the cache off, on and at fixed sizes wait for a lent GPU.

    python bench/expert_cache.py [--work DIR] [--tokens 256] [--profile gpu-24gb]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from _common import description, work_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from native_build import compile_native  # noqa: E402

from step_gguf import plan as P  # noqa: E402
from step_gguf.core.recipe import load_recipe  # noqa: E402
from step_gguf.native import build as b  # noqa: E402
from step_gguf.native import installed, tools  # noqa: E402
from step_gguf.pipeline.quantize import quantize  # noqa: E402
from step_gguf.pipeline.source_facts import read_facts  # noqa: E402
from step_gguf.synth.locality import lru, statistics  # noqa: E402
from step_gguf.synth.writer import synth  # noqa: E402

REAL_CONFIG = Path(__file__).resolve().parents[1] / "tests" / "data" / "step3p5-flash-config.json"
N_EXPERT, TOP_K = 288, 8
SHARES = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)   # cache slots over a layer's experts
TRACE_SHARE = 1 / 8                               # the size the traced run caches at
DECAY = 0.9                                       # patch 0021's score decay a step


def trace(work: Path, tokens: int, profile: P.Profile, local: bool) -> tuple[list[list[list[int]]], dict, int]:
    """(per layer, per step, the routed experts), the patch's counters, one expert's bytes."""
    name = "locality" if local else "random-routing"
    src = work / f"{name}-ckpt"
    if not src.exists():
        synth(src, "small", seed=0, routing_locality=local, n_expert=N_EXPERT, top_k=TOP_K)
    model = work / f"{name}-int8.gguf"
    if not model.exists():
        quantize(src, model, load_recipe("int8"))
    facts = read_facts(model)
    per_layer = [t for t in facts.tensors if "_exps" in t.name and t.layer is not None and t.layer < facts.n_layer]
    layers = sorted({t.layer for t in per_layer})
    expert_bytes = sum(t.bytes for t in per_layer) // len(layers) // N_EXPERT
    budget = (int(N_EXPERT * TRACE_SHARE) + 1) * expert_bytes * len(layers)
    out = work / "trace.bin"
    out.unlink(missing_ok=True)
    exe = compile_native("expert_cache", b.RuntimeBuild(installed.check().bin_dir.parent.parent))
    text = " ".join(tools.default_text().read_text().split()[: tokens])
    cpu = profile.mem_bw * P.CPU_EFFICIENCY
    env = dict(os.environ, GGML_VK_VISIBLE_DEVICES="0", LLAMA_EXPERT_CACHE_MIB=f"{budget / 2**20:.6f}",
               LLAMA_EXPERT_CACHE_TRACE=str(out), LLAMA_EXPERT_CACHE_CPU_BW=f"{cpu:.0f}",
               LLAMA_EXPERT_CACHE_LINK_BW=f"{profile.link_bw:.0f}")
    done = subprocess.run([str(exe), str(model), text, "1", "1", str(work / "logits.f32")],
                          capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode:
        sys.exit(f"the traced run failed: {done.stderr[-2000:]}")
    counters = dict(zip(("rows", "hits", "misses", "copies", "bytes", "n_layers", "n_slots"),
                        map(int, done.stdout.split("\n")[1].split())))
    raw = np.fromfile(out, dtype=np.int32)
    steps: dict[int, list[list[int]]] = {}
    i = 0
    while i < len(raw):
        il, n_tok, k = raw[i:i + 3]
        ids = raw[i + 3:i + 3 + n_tok * k].reshape(n_tok, k)
        steps.setdefault(int(il), []).extend(row.tolist() for row in ids)
        i += 3 + n_tok * k
    return [steps[il] for il in sorted(steps)], counters, expert_bytes


def lfu(seq: list[list[int]], slots: int) -> tuple[int, int]:
    """(hits, copies): every miss copied in, the least used so far evicted."""
    cache: set[int] = set()
    uses: Counter[int] = Counter()
    hits = copies = 0
    for step in seq:
        for e in step:
            uses[e] += 1
            if e in cache:
                hits += 1
                continue
            copies += 1
            if len(cache) >= slots:
                cache.remove(min(cache, key=lambda x: uses[x]))
            cache.add(e)
    return hits, copies


def ours(seq: list[list[int]], slots: int, worth: float) -> tuple[int, int]:
    """(hits, copies) of patch 0021, in its float32 arithmetic: a step's misses computed on the
    CPU, then copied in when their decayed use count beats `worth` (cpu_bw / link_bw) and the
    weakest slot's expert (the least recently hit among equals)."""
    slot_of: dict[int, int] = {}
    expert_in = [-1] * slots
    used = [0] * slots
    score = np.zeros(N_EXPERT, np.float32)
    worth32 = np.float32(worth)
    hits = copies = 0
    for n, step in enumerate(seq, start=1):
        missed = []
        for e in step:
            score[e] += np.float32(1)
            if e in slot_of:
                hits += 1
                used[slot_of[e]] = n - 1
            else:
                missed.append(e)
        for e in sorted(missed, key=lambda x: -score[x]):
            if e in slot_of or score[e] <= worth32:
                continue
            free = [s for s in range(slots) if expert_in[s] < 0]
            slot = free[0] if free else min(range(slots), key=lambda s: (score[expert_in[s]], used[s]))
            victim = expert_in[slot]
            if victim >= 0 and score[victim] >= score[e]:
                continue
            copies += 1
            slot_of.pop(victim, None)
            expert_in[slot], slot_of[e], used[slot] = e, slot, n
        score *= np.float32(DECAY)
    return hits, copies


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=256, help="calibration words read, one token a step")
    ap.add_argument("--profile", default="gpu-24gb", help="the machine the policy and the prediction are for")
    ap.add_argument("--random-routing", action="store_true",
                    help="trace a model routed by random weights (a fixed hot set) instead of one with locality")
    args = ap.parse_args()
    work = work_dir(args.work, "expert-cache")
    profile = P.machine(args.profile)
    worth = profile.mem_bw * P.CPU_EFFICIENCY / profile.link_bw
    seqs, counters, expert_bytes = trace(work, args.tokens, profile, not args.random_routing)
    n_tokens, routed = len(seqs[0]), sum(len(step) for seq in seqs for step in seq)
    hot, recent = statistics(seqs)
    print(f"trace: {n_tokens} tokens x {len(seqs)} layers, {N_EXPERT} experts, {TOP_K} a token")
    print(f"locality: the first half's 32 most used experts serve {hot:.0%} of the second half "
          f"(#27861: 10%); LRU over 64 experts hits {recent:.0%} (#27861: 67%); "
          f"uniform routing would give {32 / N_EXPERT:.0%} and {64 / N_EXPERT:.0%}")
    print(f"\n{'slots':>6} {'share':>6}" + "".join(f"{p + ' hit':>10}{p + ' MB/tok':>12}" for p in ("LRU", "LFU", "ours")))
    for share in SHARES:
        slots = int(N_EXPERT * share)
        row = [lru(s, slots) for s in seqs], [lfu(s, slots) for s in seqs], [ours(s, slots, worth) for s in seqs]
        cells = "".join(f"{sum(h for h, _ in r) / routed:>10.1%}{sum(c for _, c in r) * expert_bytes / n_tokens / 1e6:>12.2f}"
                        for r in row)
        print(f"{slots:>6} {share:>6.1%}{cells}")
    slots = int(N_EXPERT * TRACE_SHARE)
    replay = [ours(s, slots, worth) for s in seqs]
    print(f"\npatch 0021 at {slots} slots: {counters['hits']}/{counters['rows']} hits "
          f"({counters['hits'] / counters['rows']:.1%}), {counters['copies']} copies; its replay: "
          f"{sum(h for h, _ in replay)} hits, {sum(c for _, c in replay)} copies")
    measured = counters["hits"] / counters["rows"]
    real = read_facts(REAL_CONFIG)
    for name, loc in (("published curve", P.Locality()), ("curve through this trace", P.Locality.fitted([(TRACE_SHARE, measured)]))):
        p = P.plan(real, profile, 32768, locality=loc)
        c = p.expert_cache
        said = (f"{c.bytes / 2**30:.1f} GiB cache, {c.share:.0%} of the experts in RAM, hit rate "
                f"{c.hit_rate:.0%}, decode {c.speedup:.2f}x" if c else "no cache: none predicts a gain")
        print(f"plan for {profile.name}, real config, 32K, {name}: {said}")


if __name__ == "__main__":
    main()
