"""Split GGUFs as sources: any shard of a set in llama.cpp's gguf-split layout reads as the
unsplit file, for quantize and plan alike, and a broken set (a shard missing, foreign,
miscounted, renamed, truncated or fuzzed) is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
from gguf import GGMLQuantizationType as Q
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli_checks import PLAN_ARGS, cli, one_line_error
from gguf_checks import SPLIT_KEYS, gguf_fields, same_model
from step_gguf.core.errors import SourceError
from step_gguf.core.recipe import Recipe
from step_gguf.files.gguf_source import first_shard, open_gguf, parse_shard_name, shard_path
from step_gguf.pipeline.convert import convert
from step_gguf.pipeline.output import SplitLimits
from step_gguf.pipeline.quantize import quantize
from step_gguf.synth.writer import synth


def test_shard_names_are_llama_cpps():
    assert shard_path(Path("/x/m.gguf"), 0, 3) == Path("/x/m-00001-of-00003.gguf")
    assert shard_path(Path("m"), 11, 12).name == "m-00012-of-00012.gguf"
    assert parse_shard_name("/x/m-00002-of-00003.gguf") == (Path("/x/m.gguf"), 1, 3)
    assert parse_shard_name("m.gguf") is None and parse_shard_name("m-00004-of-00003.gguf") is None


def test_any_shard_reads_as_the_unsplit_file(tiny_shards, tiny_f32):
    for p in tiny_shards:
        source = open_gguf(p)
        assert source.path == tiny_shards[0] and source.shards == tuple(tiny_shards) and source.split
        same_model(source, tiny_f32)
        assert first_shard(p) == tiny_shards[0]
    assert first_shard(tiny_f32) == tiny_f32 and open_gguf(tiny_f32).shards == (tiny_f32,)


def test_shards_carry_llama_cpps_split_keys(tiny_shards, tiny_f32):
    u16, i32 = (gguf.GGUFValueType.UINT16,), (gguf.GGUFValueType.INT32,)
    n = len(gguf.GGUFReader(tiny_f32).tensors)
    first = gguf_fields(tiny_shards[0])
    # the first shard: every key of the unsplit file, then the split keys
    assert {k: v for k, v in first.items() if k not in SPLIT_KEYS} == gguf_fields(tiny_f32)
    assert list(first)[-3:] == ["split.no", "split.tensors.count", "split.count"]  # gguf-split's order
    for i, p in enumerate(tiny_shards):
        keys = gguf_fields(p)
        assert keys["split.no"] == (i, u16) and keys["split.count"] == (4, u16)
        assert keys["split.tensors.count"] == (n, i32)
        if i:  # later shards: the split keys alone, as llama.cpp's gguf-split writes them
            assert set(keys) == SPLIT_KEYS
    counts = [len(gguf.GGUFReader(p).tensors) for p in tiny_shards]
    assert counts[:3] == [50, 50, 50] and sum(counts) == n


def test_quantize_from_a_split_source_equals_from_the_unsplit(tiny_shards, tiny_f32, tmp_path):
    """Same bytes: the source's split keys are not copied, the tensors come from every shard."""
    recipe = Recipe.single(Q.F16)
    quantize(tiny_f32, tmp_path / "ref" / "q.gguf", recipe)
    ref = (tmp_path / "ref" / "q.gguf").read_bytes()
    for i, p in enumerate((tiny_shards[0], tiny_shards[2])):
        out = tmp_path / f"from-{i}" / "q.gguf"
        quantize(p, out, recipe)
        assert out.read_bytes() == ref
    assert not SPLIT_KEYS & set(gguf_fields(tmp_path / "ref" / "q.gguf"))
    # and split again on the way out: the shards read as the single file
    result = cli("quantize", tiny_shards[1], "-o", tmp_path / "split" / "q.gguf", "--scheme", "F16",
                  "--split-max-size", "1M")
    assert result.exit_code == 0, result.output
    outs = sorted((tmp_path / "split").glob("q-*-of-*.gguf"))
    assert len(outs) > 1 and all(p.stat().st_size <= 10**6 for p in outs)
    same_model(open_gguf(outs[-1]), tmp_path / "ref" / "q.gguf")


def test_plan_of_a_split_file_is_the_unsplit_plan(tiny_shards, tiny_f32):
    want = json.loads(cli("plan", tiny_f32, *PLAN_ARGS).output)
    for p in (tiny_shards[0], tiny_shards[3]):
        r = cli("plan", p, *PLAN_ARGS)
        assert r.exit_code == 0, r.output
        got = json.loads(r.stdout)
        # llama-server is given the first shard, whichever was named
        assert got["server_args"][:2] == ["-m", str(tiny_shards[0])] and got["model"] == tiny_shards[0].name
        got["server_args"][1], got["model"] = want["server_args"][1], want["model"]
        assert got == want


def _broken_copy(tiny_shards: list[Path], folder: Path) -> list[Path]:
    folder.mkdir()
    copies = []
    for p in tiny_shards:
        copies.append(folder / p.name)
        copies[-1].write_bytes(p.read_bytes())
    return copies


def test_a_missing_shard_is_one_line(tiny_shards, tmp_path):
    copies = _broken_copy(tiny_shards, tmp_path / "set")
    copies[2].unlink()
    for named in (copies[0], copies[3]):
        one_line_error(cli("plan", named, *PLAN_ARGS), "m-00003-of-00004.gguf", "is missing",
                        "download all 4 shards")
    copies[0].unlink()
    one_line_error(cli("quantize", copies[1], "--dry-run", "--scheme", "F16"),
                    "m-00001-of-00004.gguf", "is missing")
    with pytest.raises(SourceError, match="first shard m-00001-of-00004.gguf is missing"):
        first_shard(copies[1])


def test_a_shard_of_another_model_is_one_line(tiny_shards, tmp_path):
    """Another model split into as many shards, its second shard among ours."""
    other_src = synth(tmp_path / "other", "tiny", seed=6, n_layer=3, n_dense=1)
    other = tmp_path / "other-out" / "m.gguf"
    r = convert(other_src, other, outtype="f32", split=SplitLimits(max_tensors=30))
    assert len(r.outputs) == 4
    copies = _broken_copy(tiny_shards, tmp_path / "set")
    copies[1].write_bytes(r.outputs[1].read_bytes())
    for named in (copies[0], copies[1]):
        one_line_error(cli("quantize", named, "-o", tmp_path / "q.gguf", "--scheme", "F16"),
                        "m-00002-of-00004.gguf", "two different models")
    assert not (tmp_path / "q.gguf").exists()


def test_a_wrong_count_is_one_line(tiny_shards, tmp_path):
    copies = _broken_copy(tiny_shards, tmp_path / "set")
    reader = gguf.GGUFReader(copies[2], "r+")
    reader.fields["split.count"].parts[-1][0] = 5   # it says 5 shards; the set has 4
    reader.data.flush()
    del reader
    one_line_error(cli("plan", copies[0], *PLAN_ARGS), "m-00003-of-00004.gguf", "shard 3 of 5",
                    "not part of this set")
    one_line_error(cli("plan", copies[2], *PLAN_ARGS), "shard 3 of 5", "must be named",
                    "NAME-00003-of-00005.gguf")
    # every shard agreeing on a tensor count the set does not have
    copies = _broken_copy(tiny_shards, tmp_path / "recounted")
    for p in copies:
        reader = gguf.GGUFReader(p, "r+")
        reader.fields["split.tensors.count"].parts[-1][0] -= 1
        reader.data.flush()
        del reader
    one_line_error(cli("plan", copies[1], *PLAN_ARGS), "hold 181 tensors", "says 180")
    # a shard renamed into another place of the set
    copies = _broken_copy(tiny_shards, tmp_path / "renamed")
    copies[1].write_bytes(tiny_shards[2].read_bytes())
    one_line_error(cli("plan", copies[0], *PLAN_ARGS), "m-00002-of-00004.gguf", "shard 3 of 4",
                    "not part of this set")


def test_a_truncated_shard_is_one_line(tiny_shards, tmp_path):
    copies = _broken_copy(tiny_shards, tmp_path / "set")
    data = copies[2].read_bytes()
    copies[2].write_bytes(data[: len(data) - 5000])
    for named in (copies[0], copies[2]):
        one_line_error(cli("plan", named, *PLAN_ARGS), "m-00003-of-00004.gguf", "is truncated",
                        "ends past the end of the file")


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_shards_are_read_or_refused_in_one_line(tiny_shards, tmp_path_factory, data):
    """Bytes flipped in the header of any shard, or a shard cut anywhere."""
    copies = _broken_copy(tiny_shards, tmp_path_factory.mktemp("fuzz") / "set")
    victim = copies[data.draw(st.integers(0, len(copies) - 1))]
    raw = bytearray(victim.read_bytes())
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 6))):
            raw[data.draw(st.integers(0, min(len(raw), 2048) - 1))] = data.draw(st.integers(0, 255))
    victim.write_bytes(bytes(raw))
    named = copies[data.draw(st.integers(0, len(copies) - 1))]
    for args in (["plan", named, *PLAN_ARGS], ["quantize", named, "--dry-run", "--scheme", "F16"]):
        result = cli(*args)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        if result.exit_code:
            assert len(result.output.strip().splitlines()) == 1, result.output
