"""Several users on one server: aggregate decode tok/s of 1, 2, 4 and 8 concurrent clients on the
`wide` checkpoint as int4-mixed, our llama-server against stock llama-server from the same sdist
with the same flags (the plan's, with that many slots, MTP off: random heads only slow it).

    python bench/serve.py [--work DIR] [--threads N] [--rounds 2] [--tokens 64] [--variant haswell]

Each figure is the median over rounds (ours and stock take turns). Decode: the sum of the clients'
decode rates (generated tokens over generation time, from the `timings` each reply carries: the
rate of all clients generating together, prompts left out). Wall: all generated tokens over the
wall time from the first request to the last reply, prompts included. Ratios are to one client on
the same build, and ours against stock at the same number of clients.
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

# run as a script, bench/ is on sys.path
from _common import machine_parser, pin_variant, work_dir
from decode import this_machine
from kernels import models

from step_gguf import plan as planner
from step_gguf.native import build as b
from step_gguf.native import installed
from step_gguf.native.machine_probe import read_bandwidth
from step_gguf.pipeline.source_facts import read_facts
from step_gguf.runtime import server

CLIENTS = (1, 2, 4, 8)


def _generate(url: str, i: int, tokens: int) -> tuple[int, float]:
    """One client's request, `tokens` generated whatever the model would end on: the tokens it
    generated and its decode rate."""
    reply = server.chat(url, [{"role": "user", "content": f"Tell story number {i}."}], max_tokens=tokens,
                        ignore_eos=True)
    return reply.completion_tokens, reply.decode_tps


def aggregate(gguf, plan: planner.Plan, llama_server, tokens: int, threads: int) -> tuple[float, float]:
    """Decode and wall tok/s of all `plan.parallel` clients at once."""
    n = plan.parallel
    with server.serve(gguf, plan=plan, server=llama_server, extra_args=["-t", str(threads)]) as url:
        _generate(url, -1, 4)  # warm up
        start = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            replies = list(pool.map(lambda i: _generate(url, i, tokens), range(n)))
        wall = time.perf_counter() - start
    return sum(rate for _, rate in replies), sum(done for done, _ in replies) / wall


def main() -> None:
    ap = machine_parser(__doc__, "the wide checkpoint and its GGUFs")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="tokens each client generates")
    a = ap.parse_args()
    level = pin_variant(a.variant)
    work = work_dir(a.work, "step-gguf-sbench-")
    builds = {"ours": installed.check().tool("llama-server"),
              "stock": b.build(b.BuildSpec(installed.check().backend, series=0)).tool("llama-server")}
    gguf = models(work, a.preset, [])["int4-mixed"]
    facts = read_facts(gguf)
    machine = this_machine(read_bandwidth())
    rates: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for r in range(a.rounds):
        print(f"round {r + 1}/{a.rounds}", flush=True)
        for n in CLIENTS:
            p = planner.plan(facts, machine, 1024, mtp=False, parallel=n)
            for name, tool in builds.items():
                rates.setdefault((name, n), []).append(aggregate(gguf, p, tool, a.tokens, a.threads))
    print(f"\n{gguf.name}, {a.threads} threads, {a.tokens} tokens a client, median of {a.rounds} rounds"
          f", {level}: aggregate tok/s")
    for col, what in enumerate(("decode", "wall (prompts included)")):
        med = {k: statistics.median(r[col] for r in v) for k, v in rates.items()}
        print(f"  {what}\n  {'clients':<8} {'stock':>8} {'x one':>6} {'ours':>8} {'x one':>6} {'ours/stock':>10}")
        for n in CLIENTS:
            s, o = med["stock", n], med["ours", n]
            print(f"  {n:<8} {s:8.1f} {s / med['stock', 1]:6.2f} {o:8.1f} {o / med['ours', 1]:6.2f} {o / s:10.2f}")


if __name__ == "__main__":
    main()
