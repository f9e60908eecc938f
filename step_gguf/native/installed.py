"""The installed runtime: llama-cpp-python built from our patch series, and its tools. Every
other module reaches the runtime through `check()`, which refuses any other build and says
how to fix it."""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..core.errors import RuntimeMissingError
from . import cpu
from .build import MANIFEST, series_id


BUILD_HINT = "run `step-gguf runtime build` to build and install the patched runtime"


@dataclass(frozen=True)
class RuntimeInfo:
    series_id: str
    backend: str
    bin_dir: Path
    cpu_variants: tuple[str, ...]  # ggml's CPU backends it carries, lowest first (none: native)

    def tool(self, name: str) -> Path:
        path = self.bin_dir / name
        if not path.is_file():
            raise RuntimeMissingError(f"{name} is missing from {self.bin_dir}; {BUILD_HINT}")
        return path


def check() -> RuntimeInfo:
    """The installed runtime, if it is ours and current and this CPU runs it (and the CPU variant
    GGML_CPU_VARIANT pins); otherwise a RuntimeMissingError."""
    try:
        import llama_cpp.llama_cpp as lib  # noqa: PLC0415 (import cost only when needed)
    except ImportError as exc:
        raise RuntimeMissingError(f"llama-cpp-python is not installed ({exc}); {BUILD_HINT}") from exc
    except (OSError, RuntimeError) as exc:  # installed, but its shared library is absent or broken
        raise RuntimeMissingError(f"llama-cpp-python cannot load its library ({exc}); {BUILD_HINT}") from exc
    try:
        probe = lib._lib.step_gguf_build_id
    except AttributeError:
        raise RuntimeMissingError(
            f"the installed llama-cpp-python is not built from step-gguf's patches; {BUILD_HINT}"
        ) from None
    probe.restype = ctypes.c_char_p
    built = probe().decode()
    if built != series_id():
        raise RuntimeMissingError(
            f"the installed runtime was built from patch series {built}, this step-gguf needs "
            f"{series_id()}; {BUILD_HINT}"
        )
    manifest = json.loads(resources.files("llama_cpp").joinpath(MANIFEST).read_text())
    variants = tuple(manifest.get("cpu_variants", ()))
    cpu.check_here(variants)
    return RuntimeInfo(built, manifest["backend"], Path(manifest["bin_dir"]), variants)
