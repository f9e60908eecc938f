"""Our small C++ programs (tests/native/) built against a build of llama.cpp: the installed
runtime or stock llama.cpp from the same sdist. They reach the CPU backend through ggml's
registry, so GGML_CPU_VARIANT pins the x86 level they run."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from step_gguf.native import build as b

NATIVE = Path(__file__).parent / "native"


def compile_native(name: str, build: b.RuntimeBuild, sources: tuple[str, ...] = ()) -> Path:
    """tests/native/NAME.cpp built against the llama.cpp tree and the libraries of `build`, with
    the tree's `sources` (paths in it, their folders on the include path) compiled in. Kept in
    the build's cache entry under a digest of the program's source and the headers beside it,
    so a later run (or test) with the same build and source reuses it."""
    tree, lib = build.src, build.bin_dir
    program = NATIVE / f"{name}.cpp"
    text = program.read_bytes() + b"".join(h.read_bytes() for h in sorted(NATIVE.glob("*.h")))
    digest = hashlib.sha256(text + "\0".join(sources).encode()).hexdigest()[:12]
    exe = build.root / "tests-native" / f"{name}-{digest}"
    if not exe.exists():
        exe.parent.mkdir(exist_ok=True)
        extra = [str(tree / s) for s in sources] + [f"-I{(tree / s).parent}" for s in sources]
        partial = exe.with_name(f"{exe.name}.{os.getpid()}.tmp")  # a concurrent run never sees half a file
        subprocess.run(["g++", "-O2", "-std=c++17", str(program), *extra, "-o", str(partial),
                        f"-I{tree / 'include'}", f"-I{tree / 'ggml' / 'include'}", f"-L{lib}",
                        "-lllama", "-lggml", "-lggml-base", "-ldl", f"-Wl,-rpath,{lib}"],
                       check=True, capture_output=True)
        os.replace(partial, exe)
    return exe


def stock_build() -> b.RuntimeBuild:
    """Stock llama.cpp from the same sdist and for the same backend as the installed runtime
    (so the two share their unpatched objects in ccache), built once into the cache (minutes
    the first time). Where no GPU is visible it runs on the CPU, as the runtime does."""
    from step_gguf.native import installed

    return b.build(b.BuildSpec(installed.check().backend, series=0))
