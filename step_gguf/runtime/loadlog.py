"""What llama.cpp says it allocated, read from a llama-server log written with `-v`: the model's
buffers by buffer type, each context's KV and compute buffers, the tensors an override placed
and the device of each layer, and (run with GGML_SCHED_COPY_STATS=1, patch 0018) the bytes each
graph copied into each backend. The placement tests and bench/offload.py hold it against the
plan."""

from __future__ import annotations

import re
from dataclasses import dataclass

MiB = 1 << 20
# llama.cpp logs buffer sizes in MiB with two decimals: a size is read to +-0.005 MiB
READ_ERROR = 0.005 * MiB

_MODEL = re.compile(r"load_tensors: +(\S+) model buffer size = +([\d.]+) MiB")
_KV = re.compile(r"llama_kv_cache: +(\S+) KV buffer size = +([\d.]+) MiB")
_COMPUTE = re.compile(r"sched_reserve: +(\S+) compute buffer size = +([\d.]+) MiB")
_OVERRIDE = re.compile(r"tensor (\S+) \(.*\) buffer type overridden to (\S+)")
_LAYER = re.compile(r"layer +(\d+) assigned to device (\S+),")
_COPIES = re.compile(r"(\d+) splits, bytes copied into (.*)$")
_EXPERT_CACHE = re.compile(r"expert cache = (\d+) hits, (\d+) misses of (\d+) routed; (\d+) copies, "
                           r"(\d+) bytes in ([\d.]+) s")
COPY_STATS = "GGML_SCHED_COPY_STATS"  # the environment variable that has the scheduler log them
# llama.cpp's buffer types in system memory: mapped from the file, read in, a GPU backend's
# pinned host buffer, our repacked layouts
SYSTEM_MEMORY = frozenset({"CPU_Mapped", "CPU", "Vulkan_Host", "CUDA_Host", "CPU_REPACK"})


@dataclass
class LoadLog:
    model: dict[str, float]           # bytes by buffer type (empty ones left out)
    kv: list[dict[str, float]]        # per context (the model's, then a draft's): bytes by buffer type
    compute: list[dict[str, float]]   # per context: the last reservation's bytes by buffer type
    overridden: dict[str, str]        # tensor -> the buffer type an override gave it
    layers: dict[int, str]            # layer -> device
    copies: list[dict[str, int]]      # per graph computed, in order: bytes copied into each backend

    @property
    def weights_in_system_memory(self) -> float:
        """Bytes of model buffers in system memory; a mapped file's buffer spans it from the
        first tensor kept there to the last (address space, not all of it resident)."""
        return sum(v for k, v in self.model.items() if k in SYSTEM_MEMORY)

    @classmethod
    def parse(cls, text: str) -> LoadLog:
        model: dict[str, float] = {}
        for buft, size in _MODEL.findall(text):
            if float(size):  # an empty buffer of a type nothing went to
                model[buft] = model.get(buft, 0.0) + float(size) * MiB
        kv: list[dict[str, float]] = []
        compute: list[dict[str, float]] = []
        for line in text.splitlines():
            if "output buffer size" in line:  # a context starts
                kv.append({})
                compute.append({})
            elif not kv:  # sizing before any context is created
                continue
            elif m := _KV.search(line):
                kv[-1][m.group(1)] = kv[-1].get(m.group(1), 0.0) + float(m.group(2)) * MiB
            elif m := _COMPUTE.search(line):
                compute[-1][m.group(1)] = float(m.group(2)) * MiB  # the last reservation stands
        # contexts llama.cpp only sizes (--fit; nothing allocated) report empty caches
        real = [i for i, c in enumerate(kv) if any(c.values())]
        copies = [{name: int(n) for name, n in (item.rsplit(" ", 1) for item in m.group(2).split(", "))}
                  for m in map(_COPIES.search, text.splitlines()) if m]
        return cls(model, [kv[i] for i in real], [compute[i] for i in real],
                   dict(_OVERRIDE.findall(text)), {int(i): d for i, d in _LAYER.findall(text)}, copies)


def expert_cache_counters(text: str) -> dict[str, float] | None:
    """The expert cache's counters since the model loaded (patch 0021 logs them with each
    request's timings), as of the last request in `text`; None without a cache."""
    found = _EXPERT_CACHE.findall(text)
    if not found:
        return None
    hits, misses, routed, copies, nbytes, seconds = found[-1]
    return {"hits": int(hits), "misses": int(misses), "routed": int(routed), "copies": int(copies),
            "bytes_copied": int(nbytes), "copy_seconds": float(seconds)}
