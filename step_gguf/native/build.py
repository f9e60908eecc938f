"""Build the patched runtime: llama-cpp-python from its PyPI sdist plus llama.cpp's servers.

One CMake build of the sdist tree (which vendors llama.cpp) yields both the shared libraries
the Python package loads and the `llama-server`, `llama-bench` and `ggml-rpc-server` binaries,
so the wrapper and the servers always run the same patched code. Results are cached under a
key of (llama-cpp-python version, patch-series id, backend, extra CMake args); a repeated
build is a lookup.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

from ..core.errors import StepGGUFError
from . import cpu, glslc_cache, page
from .process import run

log = logging.getLogger(__name__)

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # its vendor/llama.cpp knows `step35`, MTP and buft overrides
# servers and llama.cpp's own quantization tools, which step-gguf wraps rather than rewrites
TOOL_TARGETS = ("llama-server", "llama-bench", "ggml-rpc-server", "llama-quantize", "llama-imatrix",
                "llama-perplexity", "llama-gguf-split")
LIB_TARGETS = ("llama", "ggml")
MANIFEST = "step_gguf_runtime.json"  # written into the llama_cpp package and the cache entry

# Every build carries the CPU backend; a GPU backend is compiled in beside it. A Vulkan build
# runs CPU-only where the Vulkan loader finds no GPU, and llama.cpp skips a Vulkan device that
# is a CPU (Mesa's llvmpipe) unless GGML_VK_VISIBLE_DEVICES names it (runtime/devices.py).
BACKEND_FLAGS: dict[str, tuple[str, ...]] = {
    "cpu": (),
    "vulkan": ("-DGGML_VULKAN=ON",),
    "cuda": ("-DGGML_CUDA=ON",),
    "metal": ("-DGGML_METAL=ON", "-DGGML_METAL_EMBED_LIBRARY=ON"),
}

_NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\]")   # ninja: [12/222]
_MAKE_STEP = re.compile(r"^\[\s*(\d+)%\]")        # make:  [ 45%]


def _patch_list(listing: str) -> list[tuple[str, bytes]]:
    root = resources.files("step_gguf.patches")
    names = [
        line.strip()
        for line in (root / listing).read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    return [(name, (root / name).read_bytes()) for name in names]


def patch_series() -> list[tuple[str, bytes]]:
    """The patches in `patches/series` order, as (file name, content)."""
    return _patch_list("series")


def build_fixes() -> list[tuple[str, bytes]]:
    """The build fixes (`patches/fixes`): applied before the series to every tree, stock
    included, so that it compiles here; they change no behaviour."""
    return _patch_list("fixes")


def series_id(n: int | None = None) -> str:
    """Identity of the patch series (its first `n` patches; all by default; the build fixes
    always): compiled into libllama, checked by the wrapper."""
    h = hashlib.sha256(LLAMA_CPP_PYTHON_VERSION.encode())
    for name, content in [*build_fixes(), *patch_series()[:n]]:
        h.update(b"\0" + name.encode() + b"\0" + content)
    return h.hexdigest()[:16]


# what a build of part of the series makes: enough to compare it with the runtime (llama-bench,
# llama-server, and libllama for programs of our own), never installed
PARTIAL_TARGETS = ("llama", "ggml", "llama-bench", "llama-server", "llama-perplexity")


@dataclass(frozen=True)
class BuildSpec:
    backend: str = "cpu"
    cmake_args: tuple[str, ...] = field(default_factory=tuple)
    # the first `series` patches only (0: stock llama.cpp from the same sdist), for comparisons;
    # None: the whole series, the runtime step-gguf installs
    series: int | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKEND_FLAGS:
            raise StepGGUFError(
                f"unknown backend {self.backend!r}; choose one of {', '.join(BACKEND_FLAGS)}"
            )
        if self.series is not None and not 0 <= self.series <= len(patch_series()):
            raise StepGGUFError(f"the patch series has {len(patch_series())} patches, not {self.series}")

    @property
    def partial(self) -> bool:
        return self.series is not None

    @property
    def targets(self) -> tuple[str, ...]:
        return PARTIAL_TARGETS if self.partial else (*LIB_TARGETS, *TOOL_TARGETS)

    @property
    def key(self) -> str:
        blob = json.dumps([LLAMA_CPP_PYTHON_VERSION, series_id(self.series), self.backend,
                           list(cpu.cmake_args()), list(self.cmake_args), list(self.targets)])
        if not self.partial:  # the installed runtime embeds the chat page where npm can build it
            blob += "|page" if page.available() else ""
        part = "" if self.series is None else "-stock" if self.series == 0 else f"-p{self.series}"
        return f"{self.backend}{part}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class RuntimeBuild:
    root: Path

    @property
    def bin_dir(self) -> Path:
        return self.root / "build" / "bin"

    @property
    def manifest(self) -> dict:
        return json.loads((self.root / MANIFEST).read_text())

    @property
    def wheel(self) -> Path:
        if "wheel" not in self.manifest:
            raise StepGGUFError(f"{self.root} is a build of part of the patch series; it has no "
                                "llama-cpp-python to install")
        return self.root / self.manifest["wheel"]

    @property
    def src(self) -> Path:
        """The patched llama.cpp tree it was built from (headers for our own programs)."""
        return self.root / "src" / "vendor" / "llama.cpp"

    def tool(self, name: str) -> Path:
        return self.bin_dir / name


def cache_dir() -> Path:
    if env := os.environ.get("STEP_GGUF_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "step-gguf"


def cached_build(spec: BuildSpec) -> RuntimeBuild | None:
    root = cache_dir() / "runtime" / spec.key
    return RuntimeBuild(root) if (root / MANIFEST).is_file() else None


def fetch_sdist() -> Path:
    """The llama-cpp-python sdist from PyPI, downloaded once into the cache."""
    dest = cache_dir() / "sdist"
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if (dest / name).is_file():
        return dest / name
    dest.mkdir(parents=True, exist_ok=True)
    log.info("downloading llama-cpp-python %s source from PyPI", LLAMA_CPP_PYTHON_VERSION)
    run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(dest)],
        what="downloading the llama-cpp-python sdist (needs access to PyPI)",
    )
    return dest / name


STEP35_TEMPLATE = "vendor/llama.cpp/models/templates/StepFun3.5-Flash.jinja"


def sdist_text(member: str) -> str:
    """A text file of the llama-cpp-python sdist (path below its top folder), e.g. the Step 3.5
    Flash chat template llama.cpp carries (STEP35_TEMPLATE)."""
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/{member}"
    with tarfile.open(fetch_sdist()) as tar:
        try:
            f = tar.extractfile(name)
        except KeyError:
            f = None
        if f is None:
            raise StepGGUFError(f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}'s sdist has no {member}")
        return f.read().decode()


def extract_sdist(sdist: Path, dest: Path) -> Path:
    """Unpack the sdist into `dest` (its top folder stripped) and return `dest`."""
    dest.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts[1:]
            if not parts:
                continue
            member.name = str(Path(*parts))
            tar.extract(member, dest, filter="data")
    return dest


def apply_patches(src: Path, n: int | None = None) -> None:
    """Apply the build fixes, then the series (its first `n` patches) in order; the first patch
    that does not apply cleanly stops it."""
    for name, content in [*build_fixes(), *patch_series()[:n]]:
        proc = subprocess.run(["patch", "-p1", "--forward", "--batch", "--silent", "-d", str(src)],
                              input=content, capture_output=True)
        if proc.returncode != 0:
            detail = (proc.stdout + proc.stderr).decode(errors="replace").strip().splitlines()
            raise StepGGUFError(
                f"patch {name} does not apply to llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}: "
                f"{detail[-1] if detail else 'no output'}; rebase it on that tree"
            )


def build(spec: BuildSpec, jobs: int | None = None,
          on_step: Callable[[int, int], None] | None = None,
          on_stage: Callable[[str], None] = lambda what: None) -> RuntimeBuild:
    """Build (or find in the cache) the runtime for `spec`; nothing is left half-written.
    `on_stage` names each stage as it starts; `on_step(done, total)` counts compile steps."""
    if hit := cached_build(spec):
        log.info("runtime %s found in cache at %s", spec.key, hit.root)
        return hit
    for tool in ("cmake", "patch"):
        if shutil.which(tool) is None:
            raise StepGGUFError(f"`{tool}` is not installed; install it (e.g. apt-get install {tool})")
    final = cache_dir() / "runtime" / spec.key
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.with_name(final.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent build of the same key waits, then hits
        if hit := cached_build(spec):
            return hit
        work = final.with_name(final.name + ".partial")
        shutil.rmtree(work, ignore_errors=True)
        on_stage("fetching the llama-cpp-python source")
        src = extract_sdist(fetch_sdist(), work / "src")
        applied = len(build_fixes()) + len(patch_series()[:spec.series])
        on_stage(f"applying {applied} patch(es) ({len(build_fixes())} build fix(es))")
        apply_patches(src, spec.series)
        log.info("applied %d patch(es), series %s", applied, series_id(spec.series))
        if not spec.partial and (built := page.chat_page(src / page.UI_DIR, cache_dir() / "ui" /
                                                         LLAMA_CPP_PYTHON_VERSION, on_stage)):
            shutil.copytree(built, src / page.UI_DIR / "dist")  # llama.cpp embeds a dist found there
        _cmake_build(spec, work, jobs or os.cpu_count() or 2, on_step, on_stage)
        manifest = _manifest(spec, final)
        if not spec.partial:
            on_stage("packaging the llama_cpp wheel")
            manifest["wheel"] = _package(spec, work).name
        (work / MANIFEST).write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(work, final)
    log.info("runtime %s built at %s", spec.key, final)
    return RuntimeBuild(final)


def _manifest(spec: BuildSpec, root: Path) -> dict:
    return {"series_id": series_id(spec.series), "series": spec.series,
            "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION, "backend": spec.backend,
            "cmake_args": list(spec.cmake_args), "bin_dir": str(root / "build" / "bin"),
            "cpu_variants": list(cpu.built_tags())}


def cmake_configure_args(spec: BuildSpec, src: Path, build_dir: Path) -> list[str]:
    args = ["cmake", "-S", str(src), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
            "-DLLAVA_BUILD=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
            "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF",
            "-DGGML_RPC=ON", f"-DSTEP_GGUF_BUILD_ID={series_id(spec.series)}",
            # binaries find the libraries beside them, so the cache entry can be moved
            "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON"]
    if shutil.which("ninja"):
        args += ["-G", "Ninja"]
    if shutil.which("ccache"):
        args += ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
        if spec.backend == "cuda":
            args += ["-DCMAKE_CUDA_COMPILER_LAUNCHER=ccache"]
    if spec.backend == "cuda" and (toolkit := wheel_cuda_toolkit()) is not None:
        # no libcuda stub in the wheels (the plain memory pool); their lib/ is on no loader path
        rpath = f"-Wl,-rpath,{toolkit / 'lib'}"
        args += [f"-DCUDAToolkit_ROOT={toolkit}", f"-DCMAKE_CUDA_COMPILER={toolkit / 'bin' / 'nvcc'}",
                 "-DGGML_CUDA_NO_VMM=ON", f"-DCMAKE_EXE_LINKER_FLAGS={rpath}", f"-DCMAKE_SHARED_LINKER_FLAGS={rpath}"]
    return args + list(cpu.cmake_args()) + list(BACKEND_FLAGS[spec.backend]) + list(spec.cmake_args)


def wheel_cuda_toolkit() -> Path | None:
    """The CUDA 13 toolkit of PyPI's nvidia-cuda-* wheels installed in this environment
    (nvidia/cu13; the CUDA 12 nvcc wheels carry no nvcc), taken before a system one."""
    for site in map(Path, sys.path):
        root = site / "nvidia" / "cu13"
        if (root / "bin" / "nvcc").is_file():
            return root
    return None


def _cmake_build(spec: BuildSpec, work: Path, jobs: int,
                 on_step: Callable[[int, int], None] | None, on_stage: Callable[[str], None]) -> None:
    # ccache keys on paths; relative to `work` they are the same for every cache entry
    env = os.environ | {"CCACHE_BASEDIR": str(work), "CCACHE_NOHASHDIR": "1"}
    build_dir = work / "build"
    on_stage("configuring")
    args = cmake_configure_args(spec, work / "src", build_dir)
    if spec.backend == "vulkan":  # its shaders, like ccache's objects, are shared between builds
        args += glslc_cache.cmake_args(work / "src", work, cache_dir() / "glslc")
    run(args, what="configuring llama.cpp", env=env, log_file=work / "configure.log")
    on_stage("compiling")
    run(["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", *spec.targets],
        what="compiling llama.cpp", env=env, log_file=work / "build.log", on_line=_steps(on_step))


def _package(spec: BuildSpec, work: Path) -> Path:
    """Wheel of the patched llama_cpp package carrying the libraries built above."""
    src, bin_dir = work / "src", work / "build" / "bin"
    lib_dir = src / "llama_cpp" / "lib"
    lib_dir.mkdir(exist_ok=True)
    for lib in bin_dir.iterdir():
        if ".so" in lib.name or lib.suffix in (".dylib", ".dll"):
            shutil.copy2(lib, lib_dir / lib.name, follow_symlinks=True)
    final_root = work.with_name(work.name.removesuffix(".partial"))
    (src / "llama_cpp" / MANIFEST).write_text(json.dumps(_manifest(spec, final_root), indent=1))
    # the libraries exist already: scikit-build-core only packages them, but it skips what
    # .gitignore lists (`lib/` among it)
    (src / ".gitignore").unlink(missing_ok=True)
    env = os.environ | {"CMAKE_ARGS": "-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF"}
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(work), str(src)],
        what="packaging the llama_cpp wheel", env=env, log_file=work / "wheel.log")
    wheels = sorted(work.glob("llama_cpp_python-*.whl"))
    if not wheels:
        raise StepGGUFError(f"packaging produced no wheel; see {work / 'wheel.log'}")
    return wheels[0]


def install(runtime: RuntimeBuild) -> None:
    """Install the patched llama_cpp wheel into this interpreter's environment."""
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"]
    # replace any llama_cpp already there, but leave its (already satisfied) dependencies be
    run(pip + ["--no-deps", "--force-reinstall", str(runtime.wheel)],
        what="installing the patched llama-cpp-python")
    run(pip + [str(runtime.wheel)], what="installing llama-cpp-python's dependencies")


def _steps(on_step: Callable[[int, int], None] | None) -> Callable[[str], None] | None:
    """Turns ninja's `[12/222]` and make's `[ 45%]` lines into on_step(done, total)."""
    if on_step is None:
        return None

    def on_line(line: str) -> None:
        if m := _NINJA_STEP.match(line):
            on_step(int(m.group(1)), int(m.group(2)))
        elif m := _MAKE_STEP.match(line):
            on_step(int(m.group(1)), 100)
    return on_line
