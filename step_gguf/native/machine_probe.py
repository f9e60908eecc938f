"""Figures of the machine this runs on, for the planner: memory size and read bandwidth."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def read_bandwidth(threads: int | None = None, size: int = 1 << 30, repeat: int = 5) -> float:
    """Bytes/s that `threads` threads (all cores by default) read memory at, each summing its
    slice of one array larger than any cache; the fastest of `repeat` passes. The reduction is
    a max over int32, whose SIMD loop outruns memory (a float sum is compute-bound on one core)."""
    threads = threads or os.cpu_count() or 1
    parts = np.array_split(np.ones(size // 4, dtype=np.int32), threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeat):
            start = time.perf_counter()
            list(pool.map(np.max, parts))   # numpy releases the GIL while it reduces
            best = min(best, time.perf_counter() - start)
    return size / best
