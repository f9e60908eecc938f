"""The x86 levels one runtime carries: ggml's dynamic CPU backends, one `libggml-cpu-TAG` per
level, each with our kernels; ggml loads the best this CPU runs, and GGML_CPU_VARIANT=TAG pins
one (patches/cpu-variants.patch), for tests and benches that check every level on one machine."""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import RuntimeMissingError

PIN = "GGML_CPU_VARIANT"  # read by ggml's backend loader


@dataclass(frozen=True)
class CpuVariant:
    tag: str                # ggml's variant tag (ggml/src/CMakeLists.txt), the library's suffix
    isa: str                # what it compiles for, in words
    flags: tuple[str, ...]  # the /proc/cpuinfo flags a CPU needs to run it (ggml's score checks)

    def runs_here(self) -> bool:
        return set(self.flags) <= cpu_flags()


_AVX2 = ("sse4_2", "avx", "avx2", "fma", "f16c", "bmi2")
_AVX512 = (*_AVX2, "avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")
# lowest first. Plain AVX2 (Zen 2/3, older Intel) and AVX2 with AVX-VNNI (Intel 12th-14th gen
# P-cores) take the 256-bit kernels; Skylake-X the 512-bit ones without VNNI; Ice Lake and Zen 4
# (and Sapphire Rapids) the VNNI ones, Zen 4's with BF16's dot products too
CPU_VARIANTS: tuple[CpuVariant, ...] = (
    CpuVariant("haswell", "AVX2", _AVX2),
    CpuVariant("alderlake", "AVX2 + AVX-VNNI", (*_AVX2, "avx_vnni")),
    CpuVariant("skylakex", "AVX-512", _AVX512),
    CpuVariant("icelake", "AVX-512 VBMI + VNNI", (*_AVX512, "avx512vbmi", "avx512_vnni")),
    CpuVariant("zen4", "AVX-512 VBMI + VNNI + BF16", (*_AVX512, "avx512vbmi", "avx512_vnni", "avx512_bf16")),
)
BY_TAG = {v.tag: v for v in CPU_VARIANTS}


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def built_tags() -> tuple[str, ...]:
    """The variants a build made here carries: all of them on x86-64; none elsewhere (arm64:
    DGX Spark, Apple), where the one CPU backend is built for the building CPU, as llama.cpp's
    default."""
    return tuple(v.tag for v in CPU_VARIANTS) if is_x86() else ()


def cmake_args() -> tuple[str, ...]:
    """The CPU backend's CMake options: the variants of built_tags() as loadable modules."""
    if not built_tags():
        return ()
    return ("-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON", "-DGGML_NATIVE=OFF",
            f"-DGGML_CPU_VARIANTS={';'.join(built_tags())}")


def pinned() -> str | None:
    """The variant GGML_CPU_VARIANT pins, if any."""
    return os.environ.get(PIN) or None


def loaded(backend_file: Path) -> CpuVariant | None:
    """The variant of the file ggml loaded its CPU backend from (libggml-cpu-TAG.so); None for
    a build with one CPU backend."""
    return BY_TAG.get(backend_file.name.removeprefix("libggml-cpu-").split(".")[0])


@functools.cache  # read once: check_here runs on every installed.check()
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as /proc/cpuinfo names them (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def runnable(tags: Sequence[str]) -> list[CpuVariant]:
    """The variants among `tags` that this CPU runs, lowest first."""
    return [v for v in CPU_VARIANTS if v.tag in tags and v.runs_here()]


def check_here(tags: Sequence[str]) -> None:
    """Refuse, in one line, a build whose CPU variants (`tags`, empty for a native build) this
    CPU cannot run, or a pin (GGML_CPU_VARIANT) it cannot honour."""
    if not tags or not cpu_flags():  # a native build, or a CPU that does not list its flags
        return
    if not runnable(tags):
        lowest = BY_TAG[tags[0]]
        missing = " ".join(f for f in lowest.flags if f not in cpu_flags())
        raise RuntimeMissingError(f"this CPU lacks {missing}: the runtime needs at least {lowest.isa} "
                                  f"({lowest.tag}); run step-gguf on an x86-64 CPU with AVX2")
    pin = pinned()
    if pin and pin not in tags:
        raise RuntimeMissingError(f"{PIN}={pin} names no CPU variant of this runtime; choose one of "
                                  f"{', '.join(tags)} or unset it")
    if pin and not BY_TAG[pin].runs_here():
        raise RuntimeMissingError(f"{PIN}={pin} needs {BY_TAG[pin].isa}, which this CPU lacks; choose one "
                                  f"of {', '.join(v.tag for v in runnable(tags))} or unset it")
