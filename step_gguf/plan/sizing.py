"""Sizing a file for a machine (`quantize --for`): the largest file the placement fits on a
profile at a context, with the MTP heads and every slot's cache, or the largest whose
predicted decode speed still reaches a floor. Pure arithmetic over a function that gives the
facts of the file made at a tensor budget (budget mode's allocation, or an even spread of bits
for a dry run)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Literal

from ..core.errors import StepGGUFError
from ..core.units import human_size
from ..core.model_facts import MadeFor, ModelFacts
from .machines import Profile
from .placement import plan
from .result import Plan

# what stops a larger file: the GPU (it must keep the attention, shared experts, KV cache and
# buffers), system memory, one pool of unified memory, the decode speed asked for, or nothing
Bound = Literal["GPU", "system memory", "unified memory", "speed", "nothing"]

FactsAt = Callable[[int], ModelFacts]   # tensor budget in bytes -> the facts of that file

# the search stops when the budget is known to this share of the largest file
PRECISION = 1 / 2000


@dataclass(frozen=True)
class Demand:
    """A machine and what the file must give on it."""

    profile: Profile
    ctx: int
    parallel: int = 1
    min_decode: float | None = None     # tok/s the plan must predict

    def __post_init__(self) -> None:
        if self.ctx < 1 or self.parallel < 1:
            raise StepGGUFError("--ctx and --parallel must be at least 1")
        if self.min_decode is not None and not self.min_decode > 0:
            raise StepGGUFError("--min-decode must be a positive speed in tokens/s")


@dataclass(frozen=True)
class Sizing:
    budget: int         # bytes of tensor data
    plan: Plan          # the file's plan on the machine
    bound: Bound        # what a larger file breaks
    why: str            # one line

    def made_for(self) -> MadeFor:
        """What the file records of its machine (the context as planned: at most the model's)."""
        p = self.plan
        return MadeFor(p.profile.name, p.profile.ram, p.profile.vram, p.ctx, p.parallel)


def verdict(m: ModelFacts, d: Demand) -> Plan | Bound:
    """The plan of file `m` on `d`'s machine, or the bound it breaks there."""
    try:
        p = plan(m, d.profile, d.ctx, parallel=d.parallel)
    except StepGGUFError:
        return "unified memory" if d.profile.unified else "system memory"
    if d.profile.has_gpu and not any(dev.name == "GPU" for dev in p.devices):
        return "GPU"
    if d.min_decode is not None and p.predicted_decode_tps < d.min_decode:
        return "speed"
    return p


def accepted(m: ModelFacts, d: Demand) -> Plan:
    """The plan of file `m` on `d`'s machine; a one-line error naming what would fit where `d`
    does not accept it."""
    v = verdict(m, d)
    if not isinstance(v, Plan):
        raise StepGGUFError(_refusal(m, d, v))
    return v


def largest(facts_at: FactsAt, d: Demand, lo: int, hi: int) -> Sizing:
    """The largest tensor budget in [lo, hi] whose file `d` accepts (larger files are taken to
    need more memory and decode slower); a one-line error naming what would fit when not even
    `lo` is accepted."""
    first = accepted(facts_at(lo), d)
    top = verdict(facts_at(hi), d)
    if isinstance(top, Plan):
        return Sizing(hi, top, "nothing", "nothing binds: every tensor at its best candidate type fits")
    good, best, bad, broken = lo, first, hi, top
    while bad - good > max(1, int(hi * PRECISION)):
        mid = (good + bad) // 2
        v = verdict(facts_at(mid), d)
        if isinstance(v, Plan):
            good, best = mid, v
        else:
            bad, broken = mid, v
    return Sizing(good, best, broken, _why(broken, best, d))


def _why(bound: Bound, p: Plan, d: Demand) -> str:
    at = f"at {d.parallel} x {p.ctx} tokens" if d.parallel > 1 else f"at {p.ctx} tokens"
    larger = {"GPU": "would leave the GPU too little room for the attention, shared experts, KV "
                     "cache and buffers",
              "system memory": "would not fit system memory" + (" beside what the GPU holds" if d.profile.has_gpu else ""),
              "unified memory": "would not fit the unified memory",
              "speed": f"would decode under {d.min_decode:g} tok/s (this one: "
                       f"{p.predicted_decode_tps:.1f} predicted)" if d.min_decode else ""}[bound]
    return f"{bound} binds {at}: a larger file {larger}"


def _refusal(m: ModelFacts, d: Demand, bound: Bound) -> str:
    what = f"{m.name} does not fit {d.profile.name} at {d.ctx} tokens"
    if bound == "speed":
        p = plan(m, d.profile, d.ctx, parallel=d.parallel)
        return (f"even the smallest file of {m.name} decodes at {p.predicted_decode_tps:.1f} tok/s "
                f"predicted on {d.profile.name}, under --min-decode {d.min_decode:g}; lower it or "
                "choose a faster machine")
    options = []
    shorter = _longest_ctx(m, d)
    if shorter:
        options.append(f"--ctx {shorter}")
    ram = _ram_needed(m, d) if bound != "GPU" else None
    if ram:
        options.append(f"a machine with {human_size(ram)} of {'unified' if d.profile.unified else 'system'} memory")
    if bound == "GPU":
        options.append("a GPU with more memory")
    why = {"GPU": "its GPU cannot hold the attention, shared experts and KV cache",
           "system memory": "system memory cannot hold the experts the GPU leaves" if d.profile.has_gpu
           else "system memory cannot hold it",
           "unified memory": "its memory cannot hold the model"}[bound]
    return f"{what} even with every tensor at its cheapest type ({why}); it would fit with " + \
        " or ".join(options)


def _longest_ctx(m: ModelFacts, d: Demand, step: int = 256) -> int | None:
    """The longest context under d.ctx, in steps of `step` (llama.cpp's cache padding), at
    which `m` passes, if any."""
    def passes(n: int) -> bool:
        return isinstance(verdict(m, replace(d, ctx=n * step)), Plan)

    lo, hi = 1, -(-d.ctx // step)
    if hi <= lo or not passes(lo):
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if passes(mid) else (lo, mid)
    return lo * step


def _ram_needed(m: ModelFacts, d: Demand) -> int | None:
    """System memory (the pool, when unified) with which `m` passes, to 1%."""
    def passes(ram: int) -> bool:
        return isinstance(verdict(m, replace(d, profile=replace(d.profile, ram=ram))), Plan)

    lo, hi = d.profile.ram, 2 * d.profile.ram
    while not passes(hi):
        if hi > 1 << 50:
            return None
        lo, hi = hi, hi * 2
    while hi - lo > hi // 100:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if passes(mid) else (mid, hi)
    return hi
