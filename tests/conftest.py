"""Shared fixtures: synthetic checkpoints and their conversions, made once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from step_gguf.pipeline.convert import convert
from step_gguf.synth.writer import synth

# (preset, seed, fp8, step3p7, shape overrides): three different shapes for parity
SHAPES = {
    "tiny": ("tiny", 0, False, False, {}),
    "tiny-fp8-3p7": ("tiny", 1, True, True, dict(hidden=96, n_layer=6, n_dense=1, n_expert=6,
                                                 top_k=3, window=8, n_head_swa=8)),
    "small": ("small", 2, False, False, {}),
}


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("step-gguf")


@pytest.fixture(scope="session")
def checkpoint(workdir):
    """checkpoint(shape_name) -> folder of that synthetic checkpoint (made on first use)."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            preset, seed, fp8, step3p7, overrides = SHAPES[name]
            made[name] = synth(workdir / name, preset, seed=seed, fp8=fp8, step3p7=step3p7, **overrides)
        return made[name]
    return get


@pytest.fixture(scope="session")
def gguf_file(workdir, checkpoint):
    """gguf_file(shape_name, outtype) -> converted GGUF (made on first use)."""
    made: dict[tuple[str, str], Path] = {}

    def get(name: str, outtype: str = "f32") -> Path:
        if (name, outtype) not in made:
            out = workdir / f"{name}-{outtype}.gguf"
            convert(checkpoint(name), out, outtype=outtype)
            made[name, outtype] = out
        return made[name, outtype]
    return get


@pytest.fixture(scope="session")
def tiny_src(checkpoint) -> Path:
    return checkpoint("tiny")


@pytest.fixture(scope="session")
def tiny_f32(gguf_file) -> Path:
    return gguf_file("tiny", "f32")


@pytest.fixture(scope="session")
def tiny_shards(tiny_src, workdir) -> list[Path]:
    """`tiny_src` converted by the CLI (F32) into 4 shards of at most 50 tensors: `tiny_f32` split."""
    from cli_checks import cli

    out = workdir / "tiny-shards" / "m.gguf"
    result = cli("convert", tiny_src, "-o", out, "--outtype", "f32", "--split-max-tensors", "50")
    assert result.exit_code == 0, result.output
    paths = sorted(out.parent.glob("m-*-of-*.gguf"))
    assert [p.name for p in paths] == [f"m-{i:05d}-of-00004.gguf" for i in range(1, 5)]
    assert sorted(p.name for p in out.parent.iterdir()) == [p.name for p in paths]  # nothing else
    assert all(f"wrote {p}" in result.output for p in paths)
    return paths


@pytest.fixture(scope="session")
def small_src(checkpoint) -> Path:
    """Tensors of up to 1 MiB (F16), 46 MiB in all: a SIGKILL lands mid-tensor."""
    return checkpoint("small")


@pytest.fixture(scope="session")
def real_config() -> Path:
    """Step 3.5 Flash's published config.json (196B): priced and planned from shapes alone."""
    return Path(__file__).parent / "data" / "step3p5-flash-config.json"


MINI = dict(n_layer=3, n_dense=1, n_expert=8, top_k=2, vocab=1024)  # the quant preset, shrunk


@pytest.fixture(scope="session")
def mini(workdir):
    """The quant preset shrunk (3 layers, 8 experts): its checkpoint and BF16 GGUF."""
    src = synth(workdir / "quant-mini", "quant", seed=5, **MINI)
    bf16 = workdir / "quant-mini-bf16.gguf"
    convert(src, bf16, outtype="bf16")
    return src, bf16


@pytest.fixture(scope="session")
def mini_imatrix(mini, workdir, runtime):
    """llama-imatrix's importance matrix of `mini`, 4 chunks of 128 tokens."""
    from step_gguf.native import tools

    return tools.imatrix(mini[1], workdir / "quant-mini-imatrix.gguf", ctx=128, chunks=4)


@pytest.fixture(scope="session")
def runtime():
    """The patched runtime; a missing one fails the test (CI must build it, not skip)."""
    from step_gguf.native import installed
    return installed.check()


def pytest_collection_modifyitems(items):
    """A test that takes the runtime fixture, directly or through another fixture, needs the
    runtime: it carries the marker, so `-m "not runtime"` runs where none is built."""
    for item in items:
        if "runtime" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.runtime)
