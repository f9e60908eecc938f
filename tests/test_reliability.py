"""Reliability: readers that turn any malformed input into one line, containment of shard
paths, resumable outputs after SIGKILL, and a free-space check before writing.

The fuzz tests use hypothesis with a fixed budget (FUZZ_EXAMPLES per reader, no deadline,
derandomized so CI runs the same cases every time): about 20 s in all on 2 cores.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import gguf
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli_checks import cli_process, run_killed, uninterrupted
from step_gguf.cli import main
from step_gguf.synth.writer import synth

FUZZ_EXAMPLES = 60
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _assert_clean_failure(result, out: Path | None = None) -> None:
    """A non-zero exit with at most 3 lines and no traceback, and nothing at `out`."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # an uncaught exception: the bug the fuzzer looks for
    if result.exit_code != 0:
        assert len(result.output.strip().splitlines()) <= 3, result.output
        assert "Traceback" not in result.output
    if out is not None and result.exit_code != 0:
        assert not out.exists()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return synth(tmp_path_factory.mktemp("fuzz") / "tiny", "tiny", seed=3, n_layer=4, n_dense=1)


def _mutate(data: bytes, draw) -> bytes:
    """Byte flips, a truncation, or a huge length written over the first 8 bytes."""
    kind = draw(st.sampled_from(["flip", "truncate", "length", "splice"]))
    if kind == "truncate" or not data:
        return data[: draw(st.integers(0, max(len(data) - 1, 0)))]
    if kind == "length":
        return draw(st.sampled_from([2**64 - 1, 2**40, 2**31, 7])).to_bytes(8, "little") + data[8:]
    buf = bytearray(data)
    window = min(len(buf), 4096)  # headers live at the front
    for _ in range(draw(st.integers(1, 8))):
        i = draw(st.integers(0, window - 1))
        buf[i] = draw(st.integers(0, 255)) if kind == "flip" else buf[draw(st.integers(0, window - 1))]
    return bytes(buf)


@FUZZ
@given(data=st.data())
def test_fuzzed_shard_header(pristine, tmp_path_factory, data):
    src = tmp_path_factory.mktemp("case") / "ckpt"
    shutil.copytree(pristine, src)
    shard = sorted(src.glob("*.safetensors"))[0]
    shard.write_bytes(_mutate(shard.read_bytes(), data.draw))
    out = src.parent / "out.gguf"
    _assert_clean_failure(CliRunner().invoke(main, ["convert", str(src), "-o", str(out)]), out)


JSON_FILES = ["config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"]


def _json_values(depth: int = 3):
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                     st.text(max_size=8))
    return st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                        max_leaves=depth * 3)


@FUZZ
@given(data=st.data())
def test_fuzzed_json_files(pristine, tmp_path_factory, data):
    """Wrong JSON types anywhere in the config, index and tokenizer files, invalid UTF-8, and
    deep nesting."""
    src = tmp_path_factory.mktemp("case") / "ckpt"
    shutil.copytree(pristine, src)
    name = data.draw(st.sampled_from(JSON_FILES))
    path = src / name
    doc = json.loads(path.read_text())
    kind = data.draw(st.sampled_from(["replace", "whole", "nest", "bytes"]))
    if kind == "bytes":
        path.write_bytes(_mutate(path.read_bytes(), data.draw) + b"\xff\xfe")
    elif kind == "nest":
        path.write_text("[" * 100000 + "]" * 100000)
    elif kind == "whole":
        path.write_text(json.dumps(data.draw(_json_values())))
    else:  # one field, at the top or one level down, gets a value of any type
        target = doc
        keys = list(target)
        key = data.draw(st.sampled_from(keys))
        if isinstance(target[key], dict) and target[key] and data.draw(st.booleans()):
            target, key = target[key], data.draw(st.sampled_from(list(target[key])))
        target[key] = data.draw(_json_values())
        path.write_text(json.dumps(doc))
    out = src.parent / "out.gguf"
    _assert_clean_failure(CliRunner().invoke(main, ["convert", str(src), "-o", str(out)]), out)


@pytest.fixture(scope="module")
def pristine_gguf(pristine, tmp_path_factory) -> Path:
    from step_gguf.pipeline.convert import convert

    out = tmp_path_factory.mktemp("fuzz-gguf") / "tiny.gguf"
    convert(pristine, out, outtype="f32")
    return out


@FUZZ
@given(data=st.data())
def test_fuzzed_gguf_input(pristine_gguf, tmp_path_factory, data):
    """quantize (dry run and real) reads a GGUF from anywhere: a broken one is one line."""
    case = tmp_path_factory.mktemp("case")
    src = case / "in.gguf"
    src.write_bytes(_mutate(pristine_gguf.read_bytes(), data.draw))
    out = case / "out.gguf"
    _assert_clean_failure(CliRunner().invoke(main, ["quantize", str(src), "--dry-run", "--scheme", "F16"]))
    _assert_clean_failure(CliRunner().invoke(main, ["quantize", str(src), "-o", str(out), "--scheme", "F16"]), out)


@FUZZ
@given(text=st.text(max_size=300))
def test_fuzzed_recipe_files(tmp_path_factory, real_config, text):
    path = tmp_path_factory.mktemp("recipe") / "r.toml"
    path.write_text('[[rule]]\nmatch = "."\ntype = "Q8_0"\n' if not text else text)
    _assert_clean_failure(CliRunner().invoke(main, ["quantize", str(real_config), "--dry-run", "--recipe",
                                                    str(path)]))


@FUZZ
@given(data=st.data())
def test_fuzzed_imatrix_files(pristine, tmp_path_factory, data, runtime):
    """An imatrix file given to quantize: mutated bytes of a real one are one line or accepted."""
    from step_gguf.files.imatrix import ImatrixError, load_imatrix

    real = _real_imatrix(pristine, tmp_path_factory)
    path = tmp_path_factory.mktemp("imatrix") / "m.gguf"
    path.write_bytes(_mutate(real.read_bytes(), data.draw))
    try:
        load_imatrix(path)
    except ImatrixError as exc:
        assert "\n" not in str(exc)


_IMATRIX: dict[str, Path] = {}


def _real_imatrix(pristine: Path, factory) -> Path:
    if "m" not in _IMATRIX:
        from step_gguf.pipeline.convert import convert
        from step_gguf.native import tools

        work = factory.mktemp("imatrix-src")
        convert(pristine, work / "m.gguf", outtype="f32")
        _IMATRIX["m"] = tools.imatrix(work / "m.gguf", work / "imatrix.gguf", ctx=64, chunks=2)
    return _IMATRIX["m"]


# ---------------------------------------------------------------- containment

@pytest.mark.parametrize("shard", ["../../../etc/passwd", "/etc/passwd", "sub/model.safetensors",
                                   "..", "a\\b.safetensors", 5])
def test_index_cannot_name_files_outside_the_folder(pristine, tmp_path, shard):
    src = tmp_path / "ckpt"
    shutil.copytree(pristine, src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    result = CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "o.gguf")])
    assert result.exit_code != 0 and "plain file names inside the checkpoint folder" in result.output
    _assert_clean_failure(result, tmp_path / "o.gguf")


def test_a_symlinked_shard_leaving_the_folder_is_refused(pristine, tmp_path):
    src = tmp_path / "ckpt"
    shutil.copytree(pristine, src)
    shard = sorted(src.glob("*.safetensors"))[0]
    outside = tmp_path / "elsewhere.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    result = CliRunner().invoke(main, ["convert", str(src), "-o", str(tmp_path / "o.gguf")])
    assert result.exit_code != 0 and "outside" in result.output
    _assert_clean_failure(result, tmp_path / "o.gguf")


# ---------------------------------------------------------------- resume after SIGKILL

@pytest.mark.parametrize("command", [["convert", "--outtype", "f16"], ["quantize", "--scheme", "Q8_0"]],
                         ids=["convert", "quantize"])
def test_killed_runs_resume_to_identical_bytes(small_src, tmp_path, command, runtime):
    name = command[0]
    [whole] = uninterrupted(tmp_path / "whole", name, small_src, *command[1:])
    (tmp_path / "resumed").mkdir()
    out = tmp_path / "resumed" / "m.gguf"
    args = [name, str(small_src), "-o", str(out), *command[1:]]
    journal = tmp_path / "resumed" / ".m.gguf.partial.json"
    rng = random.Random(name)
    n_tensors = len(gguf.GGUFReader(whole).tensors)
    points = sorted(rng.sample(range(1, n_tensors - 1), 3))
    seen = []
    for point in points:  # each run continues the last one's partial, and is killed further on
        run_killed(args, journal, point, rng)
        seen.append(json.loads(journal.read_text())["written"][0])
    assert seen == sorted(seen) and seen[0] >= points[0]  # every run resumed, none started over
    result = cli_process(*args)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == whole.read_bytes()
    assert [p.name for p in out.parent.iterdir()] == ["m.gguf"]  # nothing stale beside it


def test_a_partial_from_another_plan_is_replaced(small_src, tmp_path):
    out = tmp_path / "m.gguf"
    run_killed(["convert", str(small_src), "-o", str(out), "--outtype", "f16"],
                tmp_path / ".m.gguf.partial.json", 5, random.Random(0))
    assert (tmp_path / ".m.gguf.partial").exists()
    result = CliRunner().invoke(main, ["convert", str(small_src), "-o", str(out), "--outtype", "bf16"])
    assert result.exit_code == 0, result.output
    from step_gguf.pipeline.convert import convert

    ref = tmp_path / "ref.gguf"
    convert(small_src, ref, outtype="bf16")
    assert {t.name: bytes(t.data) for t in gguf.GGUFReader(out).tensors} == \
           {t.name: bytes(t.data) for t in gguf.GGUFReader(ref).tensors}
    assert not list(tmp_path.glob(".m.gguf*"))


def test_a_second_run_cannot_write_the_same_partial(small_src, tmp_path):
    from step_gguf.files.resume import Partial

    out = tmp_path / "m.gguf"
    holder = Partial(out)
    holder.lock()
    try:
        result = CliRunner().invoke(main, ["convert", str(small_src), "-o", str(out)])
        assert result.exit_code != 0 and "another step-gguf run is writing" in result.output
    finally:
        holder.unlock()


# ---------------------------------------------------------------- disk space

def test_too_little_space_fails_before_writing(pristine, tmp_path, monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "o.gguf"
    result = CliRunner().invoke(main, ["convert", str(pristine), "-o", str(out)])
    assert result.exit_code != 0
    assert "1000 bytes) free" in result.output and "GiB" in result.output
    assert not out.exists() and not list(tmp_path.glob(".o.gguf*"))
