"""The GGUFs of Step 3.5 Flash people download (STEP35.md §8, AesSedai's measurements): their
sizes and KLD from BF16, the scale a file of ours is placed on by bits per weight."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .units import GiB

REAL_PARAMS = 199.28e9   # Step 3.5 Flash's weights, its 3 MTP heads included


@dataclass(frozen=True)
class Published:
    name: str
    bytes: int
    kld: float

    @property
    def bpw(self) -> float:
        return self.bytes * 8 / REAL_PARAMS


# largest first
PUBLISHED = tuple(Published(n, int(g * GiB), k) for n, g, k in (
    ("Q8_0", 197.4, 0.0056), ("Q5_K_M-style", 138.8, 0.0152), ("Q4_K_M-style", 116.2, 0.0403),
    ("IQ4_XS-style", 91.3, 0.128), ("IQ3_S", 70.9, 0.355), ("IQ2_S", 64.4, 0.489)))


def landing(bpw: float) -> str:
    """Where a file of `bpw` bits per weight falls among PUBLISHED, with the KLD the real model
    would have there, interpolated between its neighbours (log KLD linear in bits: KLD falls
    about exponentially with them)."""
    above = [p for p in PUBLISHED if p.bpw >= bpw]
    below = [p for p in PUBLISHED if p.bpw < bpw]
    if not below:
        low = PUBLISHED[-1]
        return f"under {low.name} ({low.bytes / GiB:.1f} GiB, KLD {low.kld:g})"
    if not above:
        return f"over {PUBLISHED[0].name}"
    hi, lo = above[-1], below[0]
    t = (bpw - lo.bpw) / (hi.bpw - lo.bpw)
    kld = math.exp(math.log(lo.kld) + t * (math.log(hi.kld) - math.log(lo.kld)))
    return f"between {lo.name} and {hi.name}: KLD ~{kld:.3f}"
