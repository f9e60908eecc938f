"""`step-gguf runtime build|status`: the patched llama.cpp runtime."""

from __future__ import annotations

from pathlib import Path

import click

from ..core.errors import StepGGUFError
from ..native.build import BACKEND_FLAGS
from ..core.units import human_size
from .progress import StepProgress


@click.group()
def runtime() -> None:
    """Build and inspect the patched llama.cpp runtime."""


@runtime.command("build")
@click.option("--backend", type=click.Choice(list(BACKEND_FLAGS)), default="cpu",
              show_default=True, help="ggml GPU backend to compile beside the CPU one: vulkan "
              "(any Vulkan GPU; runs on the CPU where none is found), cuda (NVIDIA), metal (Apple).")
@click.option("--cuda-arch", default=None, metavar="SM[,SM...]",
              help="CUDA architectures to compile for, e.g. 89 (RTX 4090), 120 (RTX 5090), 121 "
                   "(DGX Spark's GB10) [CMake's default]. The CUDA 13 toolkit from PyPI's "
                   "nvidia-cuda-nvcc wheels is used when installed in this environment, else "
                   "the system's.")
@click.option("--cmake-arg", "cmake_args", multiple=True, metavar="-DNAME=VALUE",
              help="Extra CMake option (repeatable), e.g. -DCMAKE_CUDA_ARCHITECTURES=89.")
@click.option("-j", "--jobs", type=int, default=None, help="Parallel compile jobs [all cores].")
@click.option("--no-install", is_flag=True, help="Build into the cache only; do not install "
              "llama-cpp-python into this environment.")
@click.option("--stock", is_flag=True, help="Build stock llama.cpp from the same source, none of "
              "our patches (libllama and llama-bench, for comparisons); never installed.")
def runtime_build(backend: str, cuda_arch: str | None, cmake_args: tuple[str, ...], jobs: int | None,
                  no_install: bool, stock: bool) -> None:
    """Build llama-cpp-python with step-gguf's patch series and install it.

    Downloads the pinned llama-cpp-python source from PyPI, applies patches/ in series order,
    compiles the library plus llama-server, llama-bench and ggml-rpc-server (ccache is used
    when installed), and caches the result: a second call with the same options is instant.
    A cold Vulkan build took 11.6 to 13.5 minutes on 2 cores. Each backend's build is cached apart:
    switching the installed runtime back to a build made before is a lookup and a reinstall.
    On x86-64 it carries a CPU backend for each level from AVX2 to AVX-512 VNNI/BF16 (`runtime
    status` lists them) and loads the best this CPU runs, so the cache serves any x86-64
    machine with AVX2; GGML_CPU_VARIANT=TAG pins one. The Vulkan shaders, like the objects in
    ccache, are compiled once for every build that shares them. `--stock` builds the same tree
    without the patches, to measure against: `bench/kernels.py` does.
    """
    from ..native import build as b
    from ..native import installed

    if cuda_arch and backend != "cuda":
        raise StepGGUFError("--cuda-arch applies to --backend cuda")
    extra = (f"-DCMAKE_CUDA_ARCHITECTURES={cuda_arch.replace(',', ';')}",) if cuda_arch else ()
    spec = b.BuildSpec(backend, (*extra, *cmake_args), series=0 if stock else None)
    no_install = no_install or stock
    cached = b.cached_build(spec)
    if cached:
        click.echo(f"runtime {spec.key} is cached at {cached.root}")
        result = cached
    else:
        click.echo(f"building runtime {spec.key} (llama-cpp-python {b.LLAMA_CPP_PYTHON_VERSION}, "
                   f"{'no patches' if stock else f'patch series {b.series_id()}'}, {backend})")
        progress = StepProgress()
        result = b.build(spec, jobs=jobs, on_step=progress.step, on_stage=progress.stage)
        progress.close()
    if no_install:
        click.echo(f"tools in {result.bin_dir}")
        return
    try:
        if installed.check().bin_dir == result.bin_dir:
            click.echo("patched llama-cpp-python already installed")
            return
    except StepGGUFError:
        pass
    b.install(result)
    click.echo(f"installed patched llama-cpp-python; tools in {result.bin_dir}")


@runtime.command("status")
def runtime_status() -> None:
    """Say whether the installed runtime is ours and current, which ggml backends it carries,
    which CPU level it loads here (and how to pin another), the GPUs it sees, and where its
    tools are."""
    from ..runtime import devices
    from ..native import installed

    info = installed.check()
    backends = ["cpu"] if info.backend == "cpu" else ["cpu", info.backend]
    click.echo(f"patch series {info.series_id}; backends: {', '.join(backends)}; tools in {info.bin_dir}")
    click.echo(_cpu_line(info.cpu_variants, devices.cpu_backend_file()))
    if info.backend == "cpu":
        return
    gpus = devices.gpus()
    for gpu in gpus:
        click.echo(f"{gpu.name}: {gpu.description}, {human_size(gpu.free)} free of {human_size(gpu.total)}"
                   + (" (shares system memory)" if gpu.integrated else ""))
    if not gpus:
        click.echo(f"no {info.backend} GPU visible: models run on the CPU"
                   + (" (a software Vulkan device such as Mesa's llvmpipe is used only when "
                      "GGML_VK_VISIBLE_DEVICES names it, e.g. GGML_VK_VISIBLE_DEVICES=0)"
                      if info.backend == "vulkan" else ""))


def _cpu_line(variants: tuple[str, ...], backend_file: Path) -> str:
    from ..native import cpu

    level = cpu.loaded(backend_file)
    if level is None:
        return f"CPU backend: {backend_file.name}, built for the CPU that built it"
    how = (f"pinned by {cpu.PIN}" if cpu.pinned() else
           f"the best this CPU runs of {', '.join(variants)}; {cpu.PIN}=TAG pins one of "
           f"{', '.join(v.tag for v in cpu.runnable(variants))}")
    return f"CPU backend: {level.tag} ({level.isa}), {how}"
