"""The machines a plan is made for: named profiles (consumer GPUs, DGX Spark, Apple, CPU only)
or a custom one, the RPC hosts that may lend memory, and what a plan leaves free on each."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..core.errors import StepGGUFError
from ..core.model_facts import MadeFor
from ..core.units import GiB



GB = 1e9


@dataclass(frozen=True)
class Profile:
    name: str
    what: str
    ram: int                # bytes of system memory (unified: the whole pool)
    mem_bw: float           # bytes/s the CPU reads system memory at
    vram: int = 0           # bytes the GPU may use (0: no GPU)
    gpu_bw: float = 0.0     # bytes/s the GPU reads its memory at
    unified: bool = False   # GPU memory is part of `ram` (DGX Spark, Apple)
    link_bw: float = 25 * GB    # host->GPU copies (PCIe 4.0 x16); prompt batches stream CPU experts
    gpu_flops: float = 0.0      # dense f16 matmul rate llama.cpp reaches, FLOP/s
    gpu_efficiency: float = 0.65  # share of gpu_bw a decode step reaches (DGX Spark: ~20 tok/s reported)
    cpu_flops: float = 0.5e12   # quantized matmul rate of the CPU, FLOP/s
    # the ggml GPU backend the runtime is built with for this machine (`runtime build --backend`)
    backend: str = "cpu"

    @property
    def has_gpu(self) -> bool:
        return self.vram > 0


PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("gpu-12gb", "12 GB GPU (RTX 4070 class), 64 GB dual-channel DDR5",
            ram=64 * GiB, mem_bw=70 * GB, vram=12 * GiB, gpu_bw=504 * GB, gpu_flops=30e12,
            backend="cuda"),
    Profile("gpu-16gb", "16 GB GPU (RTX 4070 Ti Super class), 96 GB dual-channel DDR5",
            ram=96 * GiB, mem_bw=70 * GB, vram=16 * GiB, gpu_bw=672 * GB, gpu_flops=45e12,
            backend="cuda"),
    Profile("gpu-24gb", "24 GB GPU (RTX 4090 class), 128 GB dual-channel DDR5",
            ram=128 * GiB, mem_bw=75 * GB, vram=24 * GiB, gpu_bw=1008 * GB, gpu_flops=80e12,
            backend="cuda"),
    Profile("gpu-32gb", "32 GB GPU (RTX 5090 class), 128 GB dual-channel DDR5",
            ram=128 * GiB, mem_bw=80 * GB, vram=32 * GiB, gpu_bw=1792 * GB, gpu_flops=105e12,
            link_bw=50 * GB, backend="cuda"),
    Profile("dgx-spark", "NVIDIA DGX Spark: 128 GB unified LPDDR5x",
            ram=128 * GiB, mem_bw=273 * GB, vram=128 * GiB, gpu_bw=273 * GB, unified=True,
            gpu_flops=50e12, cpu_flops=1e12, backend="cuda"),
    # Ryzen AI Max+ 395: the Radeon 8060S may take up to 96 GB of the pool (BIOS/GTT setting);
    # Vulkan (RADV) is the backend its users run llama.cpp on, ROCm the alternative
    Profile("strix-halo", "AMD Strix Halo (Ryzen AI Max+ 395): 128 GB unified LPDDR5x-8000",
            ram=128 * GiB, mem_bw=256 * GB, vram=96 * GiB, gpu_bw=256 * GB, unified=True,
            gpu_flops=30e12, cpu_flops=1e12, backend="vulkan"),
    Profile("apple-128gb", "Apple silicon Ultra, 128 GB unified memory (GPU may wire 75%)",
            ram=128 * GiB, mem_bw=400 * GB, vram=96 * GiB, gpu_bw=800 * GB, unified=True,
            gpu_flops=20e12, cpu_flops=1e12, gpu_efficiency=0.35,  # M1 Ultra: ~36 tok/s reported
            backend="metal"),
    Profile("cpu", "CPU only, 128 GB DDR5 (no GPU)", ram=128 * GiB, mem_bw=75 * GB),
)}


CUSTOM = "custom"


# what the plan keeps free: the CUDA context and allocator slack on a GPU, the OS and page
# cache for the running program in system memory
GPU_RESERVE = 512 << 20


GPU_MARGIN = 0.05


RAM_RESERVE = 4 * GiB


RAM_MARGIN = 0.05


@dataclass(frozen=True)
class RpcHost:
    """A ggml-rpc-server the plan may give whole layers to (`--rpc`)."""

    endpoint: str               # host:port
    memory: int                 # bytes its device reports free
    bandwidth: float            # bytes/s its backend reads memory at
    link_bw: float = 117e6      # bytes/s of the network to it (gigabit Ethernet)

    @property
    def capacity(self) -> int:
        """Bytes the plan may fill there, kept as system memory is."""
        return _usable_memory(self.memory, RAM_MARGIN, RAM_RESERVE)


def machine(profile: str = CUSTOM, *, vram_gb: float | None = None, ram_gb: float | None = None,
            mem_bw_gbs: float | None = None, gpu_bw_gbs: float | None = None,
            unified: bool | None = None, link_bw_gbs: float | None = None) -> Profile:
    """A named profile, with any of its figures replaced (GB and GB/s are 10^9 units;
    capacities are taken as GiB, as vendors sell them). `unified`: the GPU's memory is part of
    the system memory (one pool, as on DGX Spark)."""
    if profile == CUSTOM:
        if ram_gb is None or mem_bw_gbs is None:
            raise StepGGUFError("the custom profile needs --ram and --mem-bw (and --vram and "
                                "--gpu-bw for a GPU)")
        if bool(vram_gb) != bool(gpu_bw_gbs):
            raise StepGGUFError("give --vram and --gpu-bw together for a GPU")
        if unified and not vram_gb:
            raise StepGGUFError("--unified describes a GPU's memory: give --vram and --gpu-bw too")
        base = Profile(CUSTOM, "custom machine", ram=0, mem_bw=0)
    elif profile in PROFILES:
        base = PROFILES[profile]
    else:
        raise StepGGUFError(f"unknown profile {profile!r}; choose one of "
                            f"{', '.join([*PROFILES, CUSTOM])}")
    changes: dict = {}
    for key, value, unit in (("vram", vram_gb, GiB), ("ram", ram_gb, GiB),
                             ("mem_bw", mem_bw_gbs, GB), ("gpu_bw", gpu_bw_gbs, GB),
                             ("link_bw", link_bw_gbs, GB)):
        if value is not None:
            if not (value >= 0 and math.isfinite(value)):
                raise StepGGUFError(f"--{key.replace('_', '-')} must be a non-negative number")
            changes[key] = int(value * unit) if unit == GiB else value * unit
    if unified is not None:
        changes["unified"] = unified
    if profile == CUSTOM and vram_gb:
        changes["backend"] = ""  # any GPU backend: the figures do not say which card
    out = replace(base, **changes)
    if out.vram and not out.gpu_flops:
        out = replace(out, gpu_flops=out.gpu_bw * 60)  # typical FLOP:byte balance of consumer GPUs
    if out.ram <= 0 or out.mem_bw <= 0:
        raise StepGGUFError("the machine needs positive --ram and --mem-bw")
    return out


THIS = "this"


def this_machine(ram: int, vram: int = 0, unified: bool = False, gpu: str = "") -> Profile:
    """The machine step-gguf runs on, as the runtime sees it: `ram` bytes of system memory
    and, where llama.cpp sees a GPU (`gpu` describes it), its `vram` free bytes. Bandwidths are
    not measured: the cpu profile's and a mid-range card's stand in; they move only the
    predicted speeds."""
    cpu = PROFILES["cpu"]
    what = f"this machine: {ram / GiB:.0f} GiB" + (f", {gpu} with {vram / GiB:.1f} GiB free" if vram else "")
    if not vram:
        return replace(cpu, name=THIS, what=what, ram=ram)
    gpu_profile = machine(CUSTOM, ram_gb=ram / GiB, mem_bw_gbs=cpu.mem_bw / GB, vram_gb=vram / GiB,
                          gpu_bw_gbs=500, unified=unified)
    return replace(gpu_profile, name=THIS, what=what)


def usable(profile: Profile) -> tuple[int, int]:
    """(GPU bytes, system bytes) the plan may fill; small machines keep proportionally less."""
    return (_usable_memory(profile.vram, GPU_MARGIN, GPU_RESERVE),
            _usable_memory(profile.ram, RAM_MARGIN, RAM_RESERVE))


def _usable_memory(total: int, margin: float, reserve: int) -> int:
    return max(int(total * (1 - margin)) - min(reserve, total // 8), 0)


def sized_for(made: MadeFor | None, profile: Profile) -> MadeFor | None:
    """`made` when `profile` is the machine a file was sized for (`quantize --for`): the same
    name and, for a custom machine, the same memory; this machine by its system memory (its
    free GPU memory moves)."""
    if made is None or made.profile != profile.name:
        return None
    if profile.name == THIS:
        return made if made.ram == profile.ram else None
    return made if profile.name != CUSTOM or (made.ram, made.vram) == (profile.ram, profile.vram) else None
