"""One runtime for every x86 CPU: the levels it carries, the refusal of a CPU without AVX2 or of
a pin this CPU cannot run, the level ggml loads and the one GGML_CPU_VARIANT pins; and the
shader cache that lets stock's Vulkan build reuse ours."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from step_gguf.core.errors import RuntimeMissingError
from step_gguf.native import build as b
from step_gguf.native import cpu, glslc_cache

TAGS = [v.tag for v in cpu.CPU_VARIANTS]
AVX2_ONLY = set(cpu.BY_TAG["haswell"].flags)


def test_a_cpu_without_avx2_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: {"sse4_2", "avx", "fma", "f16c"})
    with pytest.raises(RuntimeMissingError) as e:
        cpu.check_here(TAGS)
    msg = str(e.value)
    assert "lacks avx2 bmi2" in msg and "AVX2 (haswell)" in msg and "\n" not in msg


def test_a_pin_must_name_a_level_of_the_runtime_that_this_cpu_runs(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: AVX2_ONLY)
    cpu.check_here(TAGS)  # unpinned: haswell runs
    monkeypatch.setenv(cpu.PIN, "zen4")
    with pytest.raises(RuntimeMissingError, match="GGML_CPU_VARIANT=zen4 needs AVX-512 VBMI.*choose one of haswell or"):
        cpu.check_here(TAGS)
    monkeypatch.setenv(cpu.PIN, "sapphirerapids")
    with pytest.raises(RuntimeMissingError, match="names no CPU variant of this runtime"):
        cpu.check_here(TAGS)
    monkeypatch.setenv(cpu.PIN, "haswell")
    cpu.check_here(TAGS)
    cpu.check_here([])  # a native build (arm64) has no levels to pin


def test_levels_are_ordered_as_ggml_scores_them():
    """ggml loads the runnable variant of the highest score; each level here adds features to
    the one before or outranks it, so the best a CPU runs is the last of `runnable`."""
    for lower, higher in zip(cpu.CPU_VARIANTS, cpu.CPU_VARIANTS[1:]):
        assert set(cpu._AVX2) <= set(lower.flags) and len(higher.flags) > len(lower.flags)
    assert [v.isa for v in cpu.CPU_VARIANTS][:3] == ["AVX2", "AVX2 + AVX-VNNI", "AVX-512"]


def test_an_x86_build_carries_every_level_as_a_module(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu, "is_x86", lambda: True)
    args = b.cmake_configure_args(b.BuildSpec(), tmp_path / "src", tmp_path / "build")
    assert {"-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON", "-DGGML_NATIVE=OFF",
            f"-DGGML_CPU_VARIANTS={';'.join(TAGS)}"} <= set(args)
    x86 = b.BuildSpec().key
    monkeypatch.setattr(cpu, "is_x86", lambda: False)
    assert not any("VARIANT" in a or "BACKEND_DL" in a for a in
                   b.cmake_configure_args(b.BuildSpec(), tmp_path / "src", tmp_path / "build"))
    assert b.BuildSpec().key != x86  # the layout of the CPU backend is in the cache key


def test_stock_builds_its_levels_the_same_way(tmp_path):
    src = b.extract_sdist(b.fetch_sdist(), tmp_path / "src")
    b.apply_patches(src, 0)
    ggml = src / "vendor/llama.cpp/ggml/src"
    assert "GGML_CPU_VARIANTS" in (ggml / "CMakeLists.txt").read_text()
    assert "GGML_CPU_VARIANT" in (ggml / "ggml-backend-reg.cpp").read_text()


def _status(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "step_gguf.cli", "runtime", "status"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **env})


@pytest.mark.skipif(not cpu.is_x86(), reason="the CPU levels are x86's")
def test_status_names_the_level_loaded_and_a_pin_moves_it(runtime):
    runs = [v.tag for v in cpu.runnable(list(runtime.cpu_variants))]
    assert runtime.cpu_variants == tuple(TAGS) and runs
    best = _status({})
    assert best.returncode == 0, best.stderr
    assert f"CPU backend: {runs[-1]} ({cpu.BY_TAG[runs[-1]].isa}), the best this CPU runs" in best.stdout
    pinned = _status({cpu.PIN: runs[0]})
    assert f"CPU backend: {runs[0]} (AVX2), pinned by GGML_CPU_VARIANT" in pinned.stdout
    for v in cpu.CPU_VARIANTS:  # every level is in the installed package, loadable or not
        assert (runtime.bin_dir / f"libggml-cpu-{v.tag}.so").is_file()
    if len(runs) < len(TAGS):
        refused = _status({cpu.PIN: next(t for t in TAGS if t not in runs)})
        assert refused.returncode != 0 and "which this CPU lacks" in refused.stderr


def test_shaders_compiled_once_serve_every_tree(tmp_path, monkeypatch):
    """Two builds in different folders (ours and stock) compile the same shader with the same
    options: glslc runs once, the second gets the same bytes, and the dependency file names
    the second tree's own files."""
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "glslc"
    fake.parent.mkdir()
    fake.write_text(f"""#!/usr/bin/env bash
[[ $1 == --version ]] && {{ echo fake 1; exit; }}
echo "$@" >> {calls}
while [[ $# -gt 0 ]]; do case $1 in -o) out=$2; shift ;; -MF) dep=$2; shift ;; -*) ;; *) src=$1 ;; esac; shift; done
echo spirv > "$out"; [[ -z $dep ]] || echo "$out: $src" > "$dep"
""")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    cache = tmp_path / "cache"
    for tree in ("ours", "stock"):
        work = tmp_path / tree
        (work / "src" / glslc_cache.SHADERS).mkdir(parents=True)
        (work / "src" / glslc_cache.SHADERS / "a.comp").write_text("void main() {}\n")
        (arg,) = glslc_cache.cmake_args(work / "src", work, cache)
        wrapper = arg.split("=", 1)[1]
        (work / "build").mkdir()
        subprocess.run([wrapper, "-fshader-stage=compute", str(work / "src" / glslc_cache.SHADERS / "a.comp"),
                        "-o", str(work / "build" / "a.spv"), "-MD", "-MF", str(work / "build" / "a.d")],
                       check=True, capture_output=True)
    assert len(calls.read_text().splitlines()) == 1
    assert (tmp_path / "stock" / "build" / "a.spv").read_text() == "spirv\n"
    dep = (tmp_path / "stock" / "build" / "a.d").read_text()
    assert str(tmp_path / "stock") in dep and str(tmp_path / "ours") not in dep
    # a change to any shader source is a new key: compiled again
    (tmp_path / "stock" / "src" / glslc_cache.SHADERS / "b.glsl").write_text("// new\n")
    (arg,) = glslc_cache.cmake_args(tmp_path / "stock" / "src", tmp_path / "stock", cache)
    subprocess.run([arg.split("=", 1)[1], "-fshader-stage=compute", "x.comp", "-o", str(tmp_path / "x.spv")],
                   check=True, capture_output=True)
    assert len(calls.read_text().splitlines()) == 2
