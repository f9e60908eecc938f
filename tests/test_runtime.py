"""The runtime build mechanism: patch series, build identity, cache keys, refusal of
unpatched or stale runtimes."""

from __future__ import annotations

import subprocess
import time

import pytest

from step_gguf.core.errors import RuntimeMissingError, StepGGUFError
from step_gguf.native import build as b
from step_gguf.native import installed


def test_every_patch_in_the_series_applies_cleanly(tmp_path):
    src = b.extract_sdist(b.fetch_sdist(), tmp_path / "src")
    b.apply_patches(src)  # raises, naming the patch, on the first that does not apply
    assert (src / "vendor/llama.cpp/src/step-gguf-build-id.cpp").is_file()
    first = b.build_fixes()[0][0]  # the build fixes come first
    with pytest.raises(StepGGUFError, match=f"{first} does not apply"):
        b.apply_patches(src)  # already applied: a second application must be refused


def test_stock_gets_the_build_fixes_and_none_of_the_series(tmp_path):
    """Stock llama.cpp must compile where ours does (the Vulkan backend against Debian 12's
    headers): the build fixes are applied to it, and counted in its cache key."""
    src = b.extract_sdist(b.fetch_sdist(), tmp_path / "src")
    b.apply_patches(src, 0)
    vulkan = (src / "vendor/llama.cpp/ggml/src/ggml-vulkan/ggml-vulkan.cpp").read_text()
    assert "#if VK_HEADER_VERSION >= 261" in vulkan
    assert not (src / "vendor/llama.cpp/src/step-gguf-build-id.cpp").exists()
    keys = {b.BuildSpec("vulkan", series=0).key, b.BuildSpec("vulkan").key, b.BuildSpec(series=0).key}
    assert len(keys) == 3 and b.BuildSpec("vulkan", series=0).key.startswith("vulkan-stock-")


def test_series_id_covers_every_patch(monkeypatch):
    base = b.series_id()
    series = b.patch_series()
    monkeypatch.setattr(b, "patch_series", lambda: series[:-1] + [(series[-1][0], series[-1][1] + b"\n")])
    assert b.series_id() != base


def test_cache_key_depends_on_backend_and_flags():
    keys = {b.BuildSpec().key, b.BuildSpec("cuda").key, b.BuildSpec("cpu", ("-DGGML_AVX512=OFF",)).key}
    assert len(keys) == 3 and b.BuildSpec().key == b.BuildSpec("cpu", ()).key
    with pytest.raises(StepGGUFError, match="unknown backend 'rocm'"):
        b.BuildSpec("rocm")


def test_a_cuda_build_from_the_wheels_finds_their_libraries(monkeypatch, tmp_path):
    """The CUDA 13 wheels' libraries (cuBLAS, cudart) are on no loader path: without an rpath the
    tools failed to link against libggml-cuda ("libcublas.so.13 ... not found"), after 70
    minutes of kernels (ci/cuda-compile.sh)."""
    monkeypatch.setattr(b, "wheel_cuda_toolkit", lambda: tmp_path / "cu13")
    args = b.cmake_configure_args(b.BuildSpec("cuda"), tmp_path / "src", tmp_path / "build")
    rpath = f"-Wl,-rpath,{tmp_path / 'cu13' / 'lib'}"
    assert f"-DCMAKE_EXE_LINKER_FLAGS={rpath}" in args and f"-DCMAKE_SHARED_LINKER_FLAGS={rpath}" in args
    assert f"-DCMAKE_CUDA_COMPILER={tmp_path / 'cu13' / 'bin' / 'nvcc'}" in args


def test_partial_series_builds_are_kept_apart():
    """Stock llama.cpp (no patches) and prefixes of the series, for comparisons: their own
    cache entries and build ids, and only the tools a comparison needs."""
    n = len(b.patch_series())
    specs = [b.BuildSpec(series=k) for k in range(n + 1)] + [b.BuildSpec()]
    assert len({s.key for s in specs}) == n + 2
    assert specs[0].key.startswith("cpu-stock-") and b.BuildSpec(series=3).key.startswith("cpu-p3-")
    assert b.series_id(n) == b.series_id() != b.series_id(0)
    assert b.BuildSpec(series=0).targets == b.PARTIAL_TARGETS and "llama-server" in b.BuildSpec().targets
    with pytest.raises(StepGGUFError, match=f"has {n} patches, not {n + 1}"):
        b.BuildSpec(series=n + 1)


def test_second_build_is_a_cache_lookup(runtime):
    spec = b.BuildSpec()
    if b.cached_build(spec) is None or b.cached_build(spec).bin_dir != runtime.bin_dir:
        pytest.skip("the installed runtime was built with non-default options")
    start = time.perf_counter()
    result = b.build(spec)
    assert time.perf_counter() - start < 1.0
    assert result.bin_dir == runtime.bin_dir
    for tool in b.TOOL_TARGETS:
        assert (result.bin_dir / tool).is_file()


def test_built_tools_run_and_carry_the_identity(runtime):
    out = subprocess.run([str(runtime.tool("llama-bench")), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage" in out.stdout.lower()
    lib = next(runtime.bin_dir.glob("libllama.so*"))
    assert b.series_id().encode() in lib.read_bytes()


def test_stale_runtime_is_refused_with_the_fix(runtime, monkeypatch):
    monkeypatch.setattr(installed, "series_id", lambda: "0123456789abcdef")
    with pytest.raises(RuntimeMissingError, match="needs 0123456789abcdef.*step-gguf runtime build"):
        installed.check()


def test_unpatched_runtime_is_refused(runtime, monkeypatch):
    import llama_cpp.llama_cpp as lib

    class Unpatched:  # a libllama without our exported identity
        pass

    monkeypatch.setattr(lib, "_lib", Unpatched())
    with pytest.raises(RuntimeMissingError, match="not built from step-gguf's patches"):
        installed.check()


def test_cli_reports_missing_runtime_in_one_line(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from step_gguf.cli import main
    # imported now, not under the patch: they bind `check` when first imported, and a later
    # test in this process must get the real one
    from step_gguf.runtime import llama, server  # noqa: F401

    def missing():
        raise RuntimeMissingError("llama-cpp-python is not installed; run `step-gguf runtime build`")
    monkeypatch.setattr(installed, "check", missing)
    result = CliRunner().invoke(main, ["run", str(tmp_path / "m.gguf")])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: llama-cpp-python is not installed; run `step-gguf runtime build`"
