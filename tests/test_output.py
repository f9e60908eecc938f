"""Writing split GGUFs (convert/quantize --split-max-size, --split-max-tensors): every file within
its limit, deterministic, a plain GGUF when one file fits, free space checked for every shard
first, and a run killed mid-shard resumed to the bytes of an uninterrupted one."""

from __future__ import annotations

import collections
import json
import random
import shutil

import gguf
import pytest

from cli_checks import cli, cli_process, one_line_error, run_killed, uninterrupted
from gguf_checks import same_model
from step_gguf.files.gguf_source import open_gguf
from step_gguf.pipeline.convert import convert
from step_gguf.pipeline.output import SplitLimits


@pytest.mark.parametrize("text", ["0", "50X", "-3G", "G"])
def test_a_bad_split_size_is_one_line(text, tiny_src, tmp_path):
    one_line_error(cli("convert", tiny_src, "-o", tmp_path / "o.gguf", "--split-max-size", text),
                    "--split-max-size '" + text + "' is not a size")
    assert not list(tmp_path.iterdir())


def test_split_max_size_bounds_every_file(tiny_src, tiny_f32, tmp_path):
    sizes = sorted(t.n_bytes for t in open_gguf(tiny_f32).tensors)
    limit = sizes[-1] // 2  # the largest tensors exceed it: each gets a shard of its own
    out = tmp_path / "m.gguf"
    result = convert(tiny_src, out, outtype="f32", split=SplitLimits(max_bytes=limit))
    assert len(result.outputs) > 3
    for p in result.outputs:
        tensors = gguf.GGUFReader(p).tensors
        assert p.stat().st_size <= limit or len(tensors) == 1, p
    same_model(open_gguf(result.outputs[-1]), tiny_f32)
    # deterministic: the same limits give the same files
    again = convert(tiny_src, tmp_path / "again" / "m.gguf", outtype="f32", split=SplitLimits(max_bytes=limit))
    assert [p.read_bytes() for p in again.outputs] == [p.read_bytes() for p in result.outputs]


def test_limits_that_fit_one_file_write_a_plain_gguf(tiny_src, tiny_f32, tmp_path):
    out = tmp_path / "m.gguf"
    result = convert(tiny_src, out, outtype="f32", split=SplitLimits(max_bytes=10**12))
    assert result.outputs == (out,) and out.read_bytes() == tiny_f32.read_bytes()


def test_free_space_covers_every_shard(tiny_src, tmp_path, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    result = cli("convert", tiny_src, "-o", tmp_path / "m.gguf", "--split-max-tensors", "50")
    one_line_error(result, "m-00001-of-00004.gguf", "and 2 more files", "1000 bytes) free")
    assert not list(tmp_path.iterdir())


def test_killed_split_writes_resume_to_identical_shards(small_src, tmp_path):
    flags = ["--outtype", "f16", "--split-max-size", "16M"]
    want = uninterrupted(tmp_path / "whole", "convert", small_src, *flags)
    assert len(want) >= 3 and all(p.stat().st_size <= 16 * 10**6 for p in want)
    folder = tmp_path / "resumed"
    folder.mkdir()
    args = ["convert", str(small_src), "-o", str(folder / "m.gguf"), *flags]
    rng = random.Random(7)
    outputs = [folder / p.name for p in want]
    counts = [len(gguf.GGUFReader(p).tensors) for p in want]
    # killed in the first shard, then twice in the second, each run continuing the last
    for shard, after in ((0, counts[0] // 4), (1, 2), (1, counts[1] // 2)):
        journal = folder / f".{outputs[shard].name}.partial.json"
        run_killed(args, journal, after, rng)
        assert not any(p.exists() for p in outputs)  # nothing at the output paths before the end
        assert json.loads(journal.read_text())["written"][0] >= after
    # every shard written so far is kept: the last run resumed where the kills left off
    assert json.loads((folder / f".{outputs[0].name}.partial.json").read_text())["written"][0] == \
        len(gguf.GGUFReader(want[0]).tensors)
    result = cli_process(*args)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in folder.iterdir()) == [p.name for p in want]  # nothing stale beside
    for got, ref in zip(outputs, want):
        assert got.read_bytes() == ref.read_bytes(), got.name


def test_partials_of_other_split_limits_are_removed(small_src, tmp_path):
    """A run killed while writing 3 shards, then a run with other limits: the 3-shard partials
    (and any unsplit one) are gone, only its 2 shards are left."""
    out = tmp_path / "m.gguf"
    run_killed(["convert", str(small_src), "-o", str(out), "--outtype", "f16", "--split-max-tensors", "100"],
                tmp_path / ".m-00002-of-00003.gguf.partial.json", 3, random.Random(1))
    assert len(list(tmp_path.glob(".m-0000*-of-00003.gguf.partial"))) == 2
    # and a journal a kill caught between its write and its rename
    (tmp_path / ".m-00003-of-00003.gguf.partial.json.tmp").write_text("{")
    result = cli("convert", small_src, "-o", out, "--outtype", "f16", "--split-max-tensors", "150")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf"]
