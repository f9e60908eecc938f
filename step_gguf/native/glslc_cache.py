"""A glslc that keeps what it compiles: the Vulkan backend's ~1,500 shader compiles are the one
part of a build that ccache cannot see (ggml's vulkan-shaders-gen runs glslc itself), and they
are the same in every tree we build, stock included, since no patch touches a shader. Each
build gets a small wrapper script that answers a compile it has seen from the cache."""

from __future__ import annotations

import hashlib
import shlex
import shutil
import subprocess
from pathlib import Path

SHADERS = "vendor/llama.cpp/ggml/src/ggml-vulkan/vulkan-shaders"

# The key: the shader sources and glslc (the salt), and the arguments with this build's folder
# written as @ (stock's tree and ours sit in different folders). The dependency file glslc
# writes names files in that folder, so it is stored the same way and written back in place.
_SCRIPT = """#!/usr/bin/env bash
# step-gguf: {glslc} with a cache in {cache} (native/glslc_cache.py)
out= dep= prev=
for a in "$@"; do
    case $prev in -o) out=$a ;; -MF) dep=$a ;; esac
    prev=$a
done
if [[ -z $out || $out == - ]]; then exec {glslc} "$@"; fi
key=$({{ echo {salt}; printf '%s\\n' "$@"; }} | sed 's|{root}|@|g' | sha256sum | cut -c1-40)
hit={cache}/$key
if [[ -f $hit.spv ]]; then
    cp "$hit.spv" "$out" && {{ [[ -z $dep ]] || sed 's|@|{root}|g' "$hit.d" > "$dep"; }} && exit 0
fi
{glslc} "$@" || exit
mkdir -p {cache}
if [[ -n $dep ]]; then sed 's|{root}|@|g' "$dep" > "$hit.d.$$" && mv "$hit.d.$$" "$hit.d"; fi
cp "$out" "$hit.spv.$$" && mv "$hit.spv.$$" "$hit.spv"
"""


def cmake_args(src: Path, work: Path, cache: Path) -> list[str]:
    """The CMake option that makes the build at `work` (sources in `src`) compile its shaders
    through a caching glslc; none where glslc or bash is missing (CMake then finds glslc)."""
    glslc, bash = shutil.which("glslc"), shutil.which("bash")
    if glslc is None or bash is None or not (src / SHADERS).is_dir():
        return []
    h = hashlib.sha256(subprocess.run([glslc, "--version"], capture_output=True).stdout)
    for f in sorted((src / SHADERS).rglob("*")):
        if f.is_file():
            h.update(f.relative_to(src).as_posix().encode() + b"\0" + f.read_bytes())
    script = work / "glslc-cached"
    script.write_text(_SCRIPT.format(glslc=shlex.quote(glslc), cache=shlex.quote(str(cache)),
                                     salt=h.hexdigest()[:32], root=str(work)))
    script.chmod(0o755)
    return [f"-DVulkan_GLSLC_EXECUTABLE={script}"]
