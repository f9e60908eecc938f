"""MTP drafting where the heads are right on a chosen share of inputs: the adaptive default
against each fixed draft length and against no drafting, through our runtime.

    python bench/mtp.py [--work DIR] [--threads N] [--tokens 256] [--rounds 6]
                        [--accuracy 0,0.3,0.6,0.9,1] [--server PATH]

For each head accuracy a `wide`-shaped scripted checkpoint (3 MTP heads; greedy decoding emits a
fixed script, and each head predicts a wrong token on that share of its inputs: `step-gguf
synth --head-accuracy`) is quantized with int4-mixed, once, under --work. The plan's
llama-server (`step-gguf run/serve`'s flags) is started once per contender: no drafting, the
adaptive default (patch 0013) and each fixed draft length (`--draft-max N`). Each answers a
warm-up request of 32 tokens (the policy learns this machine's costs as a server that has
answered before has), then in every round each contender decodes --tokens tokens, one request
after another in an order that rotates between rounds: this machine's speed drifts by 10-20%
within minutes, and a round's requests share the speed of the moment. The servers stay up
between rounds, as a server does between a user's requests. Printed: decode tok/s without
drafting, each contender's median ratio to it over the rounds, the adaptive default against
the best fixed length (the median of the per-round ratios), and what the default chose
(rounds by draft length, acceptance by draft position, over its requests). --server runs
another llama-server binary (a development build) in place of the installed one.
"""

from __future__ import annotations

import statistics
import sys
from contextlib import ExitStack
from dataclasses import replace
from itertools import zip_longest
from pathlib import Path

# run as a script, bench/ is on sys.path
from _common import machine_parser, work_dir
from decode import scripted, this_machine

from step_gguf import plan as planner
from step_gguf.pipeline.source_facts import read_facts
from step_gguf.runtime import server

ACCURACIES = (0.0, 0.3, 0.6, 0.9, 1.0)
NONE, ADAPTIVE = "none", "adaptive"
WARM_UP = 32  # tokens of a first request: a server that has served before knows its costs


def contenders(gguf: Path) -> dict[str, planner.Plan]:
    """The plans `step-gguf serve` makes for `gguf`: no drafting, the adaptive default and
    each fixed draft length."""
    facts = read_facts(gguf)
    machine = this_machine(30e9)  # the bandwidth moves predictions, not flags
    on = planner.plan(facts, machine, 4096)
    return {NONE: planner.plan(facts, machine, 4096, mtp=False), ADAPTIVE: on,
            **{str(k): replace(on, draft_max=k) for k in range(1, facts.n_nextn + 1)}}


def measure(gguf: Path, plans: dict[str, planner.Plan], tokens: int, rounds: int, threads: int,
            binary: Path | None) -> dict[str, list[server.Reply]]:
    """Every contender's replies to `rounds` requests of `tokens` tokens, its server kept up
    and the contenders taking turns within each round."""
    replies: dict[str, list[server.Reply]] = {name: [] for name in plans}
    with ExitStack() as stack:
        urls = {name: stack.enter_context(server.serve(gguf, plan=p, server=binary,
                                                       extra_args=["-t", str(threads)]))
                for name, p in plans.items()}
        for url in urls.values():
            server.chat(url, [{"role": "user", "content": "warm up"}], max_tokens=WARM_UP)
        names = list(urls)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                replies[name].append(server.chat(urls[name], [{"role": "user", "content": "Tell me a story."}],
                                                 max_tokens=tokens, ignore_eos=True))
    return replies


def main() -> None:
    ap = machine_parser(__doc__, "the scripted checkpoints' GGUFs")
    ap.add_argument("--tokens", type=int, default=256, help="tokens decoded per measurement")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--accuracy", default=",".join(map(str, ACCURACIES)),
                    help="head accuracies, comma-separated")
    ap.add_argument("--server", type=Path, default=None, help="llama-server binary [the installed runtime's]")
    a = ap.parse_args()
    work = work_dir(a.work, "step-gguf-mtp-")
    accuracies = [float(x) for x in a.accuracy.split(",")]
    ggufs = {acc: scripted(work, a.preset, acc) for acc in accuracies}
    plans = {acc: contenders(g) for acc, g in ggufs.items()}
    replies: dict[float, dict[str, list[server.Reply]]] = {}
    for acc, gguf in ggufs.items():
        print(f"head accuracy {acc}: {a.rounds} rounds", flush=True)
        replies[acc] = measure(gguf, plans[acc], a.tokens, a.rounds, a.threads, a.server)

    names = list(next(iter(plans.values())))
    fixed = [n for n in names if n not in (NONE, ADAPTIVE)]
    print(f"\n{a.preset} int4-mixed, scripted, 3 MTP heads; {a.threads} threads, {a.tokens} tokens, "
          f"median of {a.rounds} rounds; decode tok/s without drafting, the rest as ratios to it")
    print(f"  {'accuracy':<9}{'none':>8}{'adaptive':>9}" + "".join(f"{'fixed ' + n:>9}" for n in fixed)
          + f"{'adaptive/best':>14}")
    worst = 1.0
    for acc in accuracies:
        tps = {n: [r.decode_tps for r in replies[acc][n]] for n in names}
        ratio = {n: statistics.median(o / b for o, b in zip(tps[n], tps[NONE])) for n in names if n != NONE}
        best = max(fixed, key=ratio.get)
        against_best = statistics.median(o / b for o, b in zip(tps[ADAPTIVE], tps[best]))
        worst = min(worst, against_best)
        print(f"  {acc:<9.2f}{statistics.median(tps[NONE]):8.1f}{ratio[ADAPTIVE]:9.2f}"
              + "".join(f"{ratio[n]:9.2f}" for n in fixed) + f"{against_best:14.2f}")
    print("\nwhat the adaptive default chose over its requests: decode rounds by draft length; acceptance "
          "by draft position, given the earlier ones were accepted (the last request's)")
    for acc in accuracies:
        adaptive = replies[acc][ADAPTIVE]
        by_length = [sum(n) for n in zip_longest(*(r.draft_rounds for r in adaptive), fillvalue=0)]
        rounds = " ".join(f"{k}:{n}" for k, n in enumerate(by_length) if n)
        accepted = " ".join(f"{x:.2f}" for x in adaptive[-1].draft_acceptance) or "-"
        print(f"  {acc:<9.2f}rounds {rounds:<28} acceptance {accepted}")
    print(f"\nadaptive against the best fixed length, worst case: {worst:.2f}")
    print("\nGPU (experts on the CPU, the rest on a GPU): not measured here; run this script where "
          "`nvidia-smi` works with a CUDA runtime (step-gguf runtime build --backend cuda).")
    sys.exit(0)


if __name__ == "__main__":
    main()
