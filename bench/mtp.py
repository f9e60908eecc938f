"""MTP drafting where the heads are right on a chosen share of inputs: the adaptive default
against each fixed draft length and against no drafting, through our runtime.

    python bench/mtp.py [--work DIR] [--threads N] [--tokens 256] [--rounds 3]
                        [--accuracy 0,0.3,0.6,0.9,1] [--server PATH]

For each head accuracy a `wide`-shaped scripted checkpoint (3 MTP heads; greedy decoding emits a
fixed script, and each head predicts a wrong token on that share of its inputs: `step-gguf
synth --head-accuracy`) is quantized with int4-mixed, once, under --work. Each is decoded by the
plan's llama-server (`step-gguf run/serve`'s flags) with no drafting, with the adaptive default
(patch 0013) and with each fixed draft length (`--draft-max N`), --tokens tokens after a warm-up
request of 32 tokens (the policy learns this machine's costs as a server that has answered
before has), in interleaved rounds: every contender of a round shares the machine's speed
of the moment. Printed: decode tok/s without drafting, each contender's median ratio to it over
the rounds, the adaptive default against the best fixed length, and what the default chose
(rounds by draft length, acceptance by draft position). --server runs another llama-server
binary (a development build) in place of the installed one.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import replace
from pathlib import Path

# run as a script, bench/ is on sys.path
from _common import machine_parser, work_dir
from decode import scripted, this_machine

from step_gguf import plan as planner
from step_gguf.facts import read_facts
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


def decode(gguf: Path, plan: planner.Plan, tokens: int, threads: int, binary: Path | None) -> server.Reply:
    with server.serve(gguf, plan=plan, server=binary, extra_args=["-t", str(threads)]) as url:
        server.chat(url, [{"role": "user", "content": "warm up"}], max_tokens=WARM_UP)
        return server.chat(url, [{"role": "user", "content": "Tell me a story."}], max_tokens=tokens,
                           ignore_eos=True)


def main() -> None:
    ap = machine_parser(__doc__, "the scripted checkpoints' GGUFs")
    ap.add_argument("--tokens", type=int, default=256, help="tokens decoded per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--accuracy", default=",".join(map(str, ACCURACIES)),
                    help="head accuracies, comma-separated")
    ap.add_argument("--server", type=Path, default=None, help="llama-server binary [the installed runtime's]")
    a = ap.parse_args()
    work = work_dir(a.work, "step-gguf-mtp-")
    accuracies = [float(x) for x in a.accuracy.split(",")]
    ggufs = {acc: scripted(work, a.preset, acc) for acc in accuracies}
    plans = {acc: contenders(g) for acc, g in ggufs.items()}
    replies: dict[tuple[float, str], list[server.Reply]] = {}
    for r in range(a.rounds):
        print(f"round {r + 1}/{a.rounds}", flush=True)
        for acc, gguf in ggufs.items():
            for name, p in plans[acc].items():
                replies.setdefault((acc, name), []).append(decode(gguf, p, a.tokens, a.threads, a.server))

    names = list(next(iter(plans.values())))
    fixed = [n for n in names if n not in (NONE, ADAPTIVE)]
    print(f"\n{a.preset} int4-mixed, scripted, 3 MTP heads; {a.threads} threads, {a.tokens} tokens, "
          f"median of {a.rounds} rounds; decode tok/s without drafting, the rest as ratios to it")
    print(f"  {'accuracy':<9}{'none':>8}{'adaptive':>9}" + "".join(f"{'fixed ' + n:>9}" for n in fixed)
          + f"{'adaptive/best':>14}")
    worst = 1.0
    for acc in accuracies:
        base = replies[acc, NONE]
        ratio = {n: statistics.median(o.decode_tps / b.decode_tps for o, b in zip(replies[acc, n], base))
                 for n in names if n != NONE}
        best = max(ratio[n] for n in fixed)
        worst = min(worst, ratio[ADAPTIVE] / best)
        print(f"  {acc:<9.2f}{statistics.median(b.decode_tps for b in base):8.1f}{ratio[ADAPTIVE]:9.2f}"
              + "".join(f"{ratio[n]:9.2f}" for n in fixed) + f"{ratio[ADAPTIVE] / best:14.2f}")
    print("\nwhat the adaptive default chose (last round): decode rounds by draft length; acceptance by "
          "draft position, given the earlier ones were accepted")
    for acc in accuracies:
        last = replies[acc, ADAPTIVE][-1]
        rounds = " ".join(f"{k}:{n}" for k, n in enumerate(last.draft_rounds) if n)
        accepted = " ".join(f"{x:.2f}" for x in last.draft_acceptance) or "-"
        print(f"  {acc:<9.2f}rounds {rounds:<28} acceptance {accepted}")
    print(f"\nadaptive against the best fixed length, worst case: {worst:.2f}")
    print("\nGPU (experts on the CPU, the rest on a GPU): not measured here; run this script where "
          "`nvidia-smi` works with a CUDA runtime (step-gguf runtime build --backend cuda).")
    sys.exit(0)


if __name__ == "__main__":
    main()
