"""Split GGUFs in llama.cpp's gguf-split layout: read from any shard as the unsplit file,
written by convert/quantize (--split-max-size, --split-max-tensors) atomically and resumably,
broken sets refused in one line, and both directions checked against llama.cpp's own tool."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as Q
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from step_gguf.cli import main
from step_gguf.convert import convert
from step_gguf.output import SplitLimits
from step_gguf.errors import SourceError
from step_gguf.gguf_source import first_shard, open_gguf, parse_shard_name, shard_path
from step_gguf.quantize import quantize
from step_gguf.recipe import Recipe
from step_gguf.synth import synth

SPLIT_KEYS = {"split.no", "split.count", "split.tensors.count"}
PLAN_ARGS = ["--profile", "custom", "--ram", "1", "--mem-bw", "10", "--vram", "0.5", "--gpu-bw",
             "100", "-c", "256", "--json"]


def _cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _fields(path: Path) -> dict:
    """Every key of a GGUF but the reader's own, with its value and types."""
    return {f.name: (f.contents(), tuple(f.types)) for f in gguf.GGUFReader(path).fields.values()
            if not f.name.startswith("GGUF.")}


def _same_model(source, whole: Path) -> None:
    """`source` (an opened split set) holds exactly the tensors and metadata of `whole`."""
    ref = open_gguf(whole)
    assert [(t.name, t.tensor_type, t.shape) for t in source.tensors] == \
           [(t.name, t.tensor_type, t.shape) for t in ref.tensors]
    for a, b in zip(source.tensors, ref.tensors):
        assert np.asarray(a.data).tobytes() == np.asarray(b.data).tobytes(), a.name
        assert a.ref().read() == b.ref().read(), a.name  # the offsets point into the right shard
    assert {k: f.contents() for k, f in source.fields.items() if not k.startswith("GGUF.")} == \
           {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return synth(tmp_path_factory.mktemp("split") / "tiny", "tiny", seed=5)


@pytest.fixture(scope="module")
def whole(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "m.gguf"
    convert(tiny, out, outtype="f32")
    return out


@pytest.fixture(scope="module")
def shards(tiny, tmp_path_factory) -> list[Path]:
    """The tiny model converted by the CLI into 4 shards of at most 50 tensors."""
    out = tmp_path_factory.mktemp("shards") / "m.gguf"
    result = _cli("convert", tiny, "-o", out, "--outtype", "f32", "--split-max-tensors", "50")
    assert result.exit_code == 0, result.output
    paths = sorted(out.parent.glob("m-*-of-*.gguf"))
    assert [p.name for p in paths] == [f"m-{i:05d}-of-00004.gguf" for i in range(1, 5)]
    assert sorted(p.name for p in out.parent.iterdir()) == [p.name for p in paths]  # nothing else
    assert all(f"wrote {p}" in result.output for p in paths)
    return paths


def _broken_copy(shards: list[Path], folder: Path) -> list[Path]:
    folder.mkdir()
    copies = []
    for p in shards:
        copies.append(folder / p.name)
        copies[-1].write_bytes(p.read_bytes())
    return copies


def _one_line_error(result, *words: str) -> str:
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- names and sizes

def test_shard_names_are_llama_cpps():
    assert shard_path(Path("/x/m.gguf"), 0, 3) == Path("/x/m-00001-of-00003.gguf")
    assert shard_path(Path("m"), 11, 12).name == "m-00012-of-00012.gguf"
    assert parse_shard_name("/x/m-00002-of-00003.gguf") == (Path("/x/m.gguf"), 1, 3)
    assert parse_shard_name("m.gguf") is None and parse_shard_name("m-00004-of-00003.gguf") is None


@pytest.mark.parametrize("text", ["0", "50X", "-3G", "G"])
def test_a_bad_split_size_is_one_line(text, tiny, tmp_path):
    _one_line_error(_cli("convert", tiny, "-o", tmp_path / "o.gguf", "--split-max-size", text),
                    "--split-max-size '" + text + "' is not a size")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- reading a split set

def test_any_shard_reads_as_the_unsplit_file(shards, whole):
    for p in shards:
        source = open_gguf(p)
        assert source.path == shards[0] and source.shards == tuple(shards) and source.split
        _same_model(source, whole)
        assert first_shard(p) == shards[0]
    assert first_shard(whole) == whole and open_gguf(whole).shards == (whole,)


def test_shards_carry_llama_cpps_split_keys(shards, whole):
    u16, i32 = (gguf.GGUFValueType.UINT16,), (gguf.GGUFValueType.INT32,)
    n = len(gguf.GGUFReader(whole).tensors)
    first = _fields(shards[0])
    # the first shard: every key of the unsplit file, then the split keys
    assert {k: v for k, v in first.items() if k not in SPLIT_KEYS} == _fields(whole)
    assert list(first)[-3:] == ["split.no", "split.tensors.count", "split.count"]  # gguf-split's order
    for i, p in enumerate(shards):
        keys = _fields(p)
        assert keys["split.no"] == (i, u16) and keys["split.count"] == (4, u16)
        assert keys["split.tensors.count"] == (n, i32)
        if i:  # later shards: the split keys alone, as llama.cpp's gguf-split writes them
            assert set(keys) == SPLIT_KEYS
    counts = [len(gguf.GGUFReader(p).tensors) for p in shards]
    assert counts[:3] == [50, 50, 50] and sum(counts) == n


def test_split_max_size_bounds_every_file(tiny, whole, tmp_path):
    sizes = sorted(t.n_bytes for t in open_gguf(whole).tensors)
    limit = sizes[-1] // 2  # the largest tensors exceed it: each gets a shard of its own
    out = tmp_path / "m.gguf"
    result = convert(tiny, out, outtype="f32", split=SplitLimits(max_bytes=limit))
    assert len(result.outputs) > 3
    for p in result.outputs:
        tensors = gguf.GGUFReader(p).tensors
        assert p.stat().st_size <= limit or len(tensors) == 1, p
    _same_model(open_gguf(result.outputs[-1]), whole)
    # deterministic: the same limits give the same files
    again = convert(tiny, tmp_path / "again" / "m.gguf", outtype="f32", split=SplitLimits(max_bytes=limit))
    assert [p.read_bytes() for p in again.outputs] == [p.read_bytes() for p in result.outputs]


def test_limits_that_fit_one_file_write_a_plain_gguf(tiny, whole, tmp_path):
    out = tmp_path / "m.gguf"
    result = convert(tiny, out, outtype="f32", split=SplitLimits(max_bytes=10**12))
    assert result.outputs == (out,) and out.read_bytes() == whole.read_bytes()


def test_quantize_from_a_split_source_equals_from_the_unsplit(shards, whole, tmp_path):
    """Same bytes: the source's split keys are not copied, the tensors come from every shard."""
    recipe = Recipe.single(Q.F16)
    quantize(whole, tmp_path / "ref" / "q.gguf", recipe)
    ref = (tmp_path / "ref" / "q.gguf").read_bytes()
    for i, p in enumerate((shards[0], shards[2])):
        out = tmp_path / f"from-{i}" / "q.gguf"
        quantize(p, out, recipe)
        assert out.read_bytes() == ref
    assert not SPLIT_KEYS & set(_fields(tmp_path / "ref" / "q.gguf"))
    # and split again on the way out: the shards read as the single file
    result = _cli("quantize", shards[1], "-o", tmp_path / "split" / "q.gguf", "--scheme", "F16",
                  "--split-max-size", "1M")
    assert result.exit_code == 0, result.output
    outs = sorted((tmp_path / "split").glob("q-*-of-*.gguf"))
    assert len(outs) > 1 and all(p.stat().st_size <= 10**6 for p in outs)
    _same_model(open_gguf(outs[-1]), tmp_path / "ref" / "q.gguf")


def test_plan_of_a_split_file_is_the_unsplit_plan(shards, whole):
    want = json.loads(_cli("plan", whole, *PLAN_ARGS).output)
    for p in (shards[0], shards[3]):
        r = _cli("plan", p, *PLAN_ARGS)
        assert r.exit_code == 0, r.output
        got = json.loads(r.stdout)
        # llama-server is given the first shard, whichever was named
        assert got["server_args"][:2] == ["-m", str(shards[0])] and got["model"] == shards[0].name
        got["server_args"][1], got["model"] = want["server_args"][1], want["model"]
        assert got == want


# ---------------------------------------------------------------- broken sets

def test_a_missing_shard_is_one_line(shards, tmp_path):
    copies = _broken_copy(shards, tmp_path / "set")
    copies[2].unlink()
    for named in (copies[0], copies[3]):
        _one_line_error(_cli("plan", named, *PLAN_ARGS), "m-00003-of-00004.gguf", "is missing",
                        "download all 4 shards")
    copies[0].unlink()
    _one_line_error(_cli("quantize", copies[1], "--dry-run", "--scheme", "F16"),
                    "m-00001-of-00004.gguf", "is missing")
    with pytest.raises(SourceError, match="first shard m-00001-of-00004.gguf is missing"):
        first_shard(copies[1])


def test_a_shard_of_another_model_is_one_line(shards, tmp_path):
    """Another model split into as many shards, its second shard among ours."""
    other_src = synth(tmp_path / "other", "tiny", seed=6, n_layer=3, n_dense=1)
    other = tmp_path / "other-out" / "m.gguf"
    r = convert(other_src, other, outtype="f32", split=SplitLimits(max_tensors=30))
    assert len(r.outputs) == 4
    copies = _broken_copy(shards, tmp_path / "set")
    copies[1].write_bytes(r.outputs[1].read_bytes())
    for named in (copies[0], copies[1]):
        _one_line_error(_cli("quantize", named, "-o", tmp_path / "q.gguf", "--scheme", "F16"),
                        "m-00002-of-00004.gguf", "two different models")
    assert not (tmp_path / "q.gguf").exists()


def test_a_wrong_count_is_one_line(shards, tmp_path):
    copies = _broken_copy(shards, tmp_path / "set")
    reader = gguf.GGUFReader(copies[2], "r+")
    reader.fields["split.count"].parts[-1][0] = 5   # it says 5 shards; the set has 4
    reader.data.flush()
    del reader
    _one_line_error(_cli("plan", copies[0], *PLAN_ARGS), "m-00003-of-00004.gguf", "shard 3 of 5",
                    "not part of this set")
    _one_line_error(_cli("plan", copies[2], *PLAN_ARGS), "shard 3 of 5", "must be named",
                    "NAME-00003-of-00005.gguf")
    # every shard agreeing on a tensor count the set does not have
    copies = _broken_copy(shards, tmp_path / "recounted")
    for p in copies:
        reader = gguf.GGUFReader(p, "r+")
        reader.fields["split.tensors.count"].parts[-1][0] -= 1
        reader.data.flush()
        del reader
    _one_line_error(_cli("plan", copies[1], *PLAN_ARGS), "hold 181 tensors", "says 180")
    # a shard renamed into another place of the set
    copies = _broken_copy(shards, tmp_path / "renamed")
    copies[1].write_bytes(shards[2].read_bytes())
    _one_line_error(_cli("plan", copies[0], *PLAN_ARGS), "m-00002-of-00004.gguf", "shard 3 of 4",
                    "not part of this set")


def test_a_truncated_shard_is_one_line(shards, tmp_path):
    copies = _broken_copy(shards, tmp_path / "set")
    data = copies[2].read_bytes()
    copies[2].write_bytes(data[: len(data) - 5000])
    for named in (copies[0], copies[2]):
        _one_line_error(_cli("plan", named, *PLAN_ARGS), "m-00003-of-00004.gguf", "is truncated",
                        "ends past the end of the file")


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_shards_are_read_or_refused_in_one_line(shards, tmp_path_factory, data):
    """Bytes flipped in the header of any shard, or a shard cut anywhere."""
    copies = _broken_copy(shards, tmp_path_factory.mktemp("fuzz") / "set")
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
        result = _cli(*args)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        if result.exit_code:
            assert len(result.output.strip().splitlines()) == 1, result.output


# ---------------------------------------------------------------- SIGKILL while writing shards

def _run_killed(args: list[str], journal: Path, after_tensors: int, rng: random.Random) -> None:
    """Start the command, wait until `journal` shows `after_tensors` complete tensors, then
    SIGKILL it a random moment later (mostly mid-tensor)."""
    proc = subprocess.Popen([sys.executable, "-m", "step_gguf.cli", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if json.loads(journal.read_text())["written"][0] >= after_tensors:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.002)
    time.sleep(rng.uniform(0, 0.03))
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """Tensors of up to 1 MiB (F16), 46 MiB in all: a kill lands mid-tensor."""
    return synth(tmp_path_factory.mktemp("split-resume") / "small", "small", seed=4)


def test_killed_split_writes_resume_to_identical_shards(big, tmp_path):
    flags = ["--outtype", "f16", "--split-max-size", "16M"]
    (tmp_path / "whole").mkdir()
    subprocess.run([sys.executable, "-m", "step_gguf.cli", "convert", str(big), "-o",
                    str(tmp_path / "whole" / "m.gguf"), *flags], check=True, capture_output=True)
    want = sorted((tmp_path / "whole").iterdir())
    assert len(want) >= 3 and all(p.stat().st_size <= 16 * 10**6 for p in want)
    folder = tmp_path / "resumed"
    folder.mkdir()
    args = ["convert", str(big), "-o", str(folder / "m.gguf"), *flags]
    rng = random.Random(7)
    outputs = [folder / p.name for p in want]
    counts = [len(gguf.GGUFReader(p).tensors) for p in want]
    # killed in the first shard, then twice in the second, each run continuing the last
    for shard, after in ((0, counts[0] // 4), (1, 2), (1, counts[1] // 2)):
        journal = folder / f".{outputs[shard].name}.partial.json"
        _run_killed(args, journal, after, rng)
        assert not any(p.exists() for p in outputs)  # nothing at the output paths before the end
        assert json.loads(journal.read_text())["written"][0] >= after
    # every shard written so far is kept: the last run resumed where the kills left off
    assert json.loads((folder / f".{outputs[0].name}.partial.json").read_text())["written"][0] == \
        len(gguf.GGUFReader(want[0]).tensors)
    result = subprocess.run([sys.executable, "-m", "step_gguf.cli", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in folder.iterdir()) == [p.name for p in want]  # nothing stale beside
    for got, ref in zip(outputs, want):
        assert got.read_bytes() == ref.read_bytes(), got.name


def test_partials_of_other_split_limits_are_removed(big, tmp_path):
    """A run killed while writing 3 shards, then a run with other limits: the 3-shard partials
    (and any unsplit one) are gone, only its 2 shards are left."""
    out = tmp_path / "m.gguf"
    _run_killed(["convert", str(big), "-o", str(out), "--outtype", "f16", "--split-max-tensors", "100"],
                tmp_path / ".m-00002-of-00003.gguf.partial.json", 3, random.Random(1))
    assert len(list(tmp_path.glob(".m-0000*-of-00003.gguf.partial"))) == 2
    # and a journal a kill caught between its write and its rename
    (tmp_path / ".m-00003-of-00003.gguf.partial.json.tmp").write_text("{")
    result = _cli("convert", big, "-o", out, "--outtype", "f16", "--split-max-tensors", "150")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf"]


def test_free_space_covers_every_shard(tiny, tmp_path, monkeypatch):
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    result = _cli("convert", tiny, "-o", tmp_path / "m.gguf", "--split-max-tensors", "50")
    _one_line_error(result, "m-00001-of-00004.gguf", "and 2 more files", "1000 bytes) free")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- with llama.cpp

def _gguf_split(runtime, src: Path, prefix: Path, *flags: str) -> list[Path]:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(runtime.tool("llama-gguf-split")), "--split", *flags, str(src), str(prefix)],
                   check=True, capture_output=True)
    return sorted(prefix.parent.glob(prefix.name + "-*-of-*.gguf"))


@pytest.mark.runtime
def test_shards_from_llama_cpps_gguf_split_read_as_the_unsplit_file(runtime, whole, tmp_path):
    made = _gguf_split(runtime, whole, tmp_path / "m", "--split-max-tensors", "40")
    assert len(made) == 5
    for p in (made[0], made[3]):
        _same_model(open_gguf(p), whole)
    recipe = Recipe.single(Q.F16)
    quantize(whole, tmp_path / "ref" / "q.gguf", recipe)
    quantize(made[2], tmp_path / "split" / "q.gguf", recipe)
    assert (tmp_path / "split" / "q.gguf").read_bytes() == (tmp_path / "ref" / "q.gguf").read_bytes()
    want = json.loads(_cli("plan", whole, *PLAN_ARGS).output)
    got = json.loads(_cli("plan", made[4], *PLAN_ARGS).output)
    assert got["server_args"][1] == str(made[0])
    got["server_args"][1], got["model"] = want["server_args"][1], want["model"]
    assert got == want


@pytest.mark.runtime
def test_our_shards_are_the_bytes_llama_cpps_gguf_split_writes(runtime, tiny, whole, tmp_path):
    made = _gguf_split(runtime, whole, tmp_path / "stock" / "m", "--split-max-tensors", "50")
    ours = convert(tiny, tmp_path / "ours" / "m.gguf", outtype="f32",
                   split=SplitLimits(max_tensors=50)).outputs
    assert [p.name for p in ours] == [p.name for p in made]
    for a, b in zip(ours, made):
        assert a.read_bytes() == b.read_bytes(), a.name


@pytest.mark.runtime
def test_our_split_output_loads_in_llama_cpp_with_the_unsplit_logits(runtime, shards, whole, tmp_path):
    from step_gguf.runtime import llama, server

    tokens = list(range(5, 200, 3))
    with llama.load(whole, n_ctx=256, logits_all=True, exact=True) as m:
        want = m.logits(tokens)
    for p in (shards[0], shards[2]):  # any shard: llama.cpp is given the first
        with llama.load(p, n_ctx=256, logits_all=True, exact=True) as m:
            assert np.array_equal(m.logits(tokens), want)
    # and through llama-server, as run/chat/serve use it
    with server.serve(shards[3], n_ctx=256) as url:
        reply = server.chat(url, [{"role": "user", "content": "Hi"}], max_tokens=4, seed=0)
    assert reply.completion_tokens == 4


@pytest.mark.runtime
def test_eval_and_imatrix_take_any_shard(runtime, shards, whole, tmp_path):
    from step_gguf.runtime import tools

    text = tmp_path / "text.txt"
    text.write_text(tools.default_text().read_text()[:20000])
    stats = tools.kld(shards[2], whole, text, ctx=64)
    assert abs(stats["kld_mean"]) <= 1e-5
    out = tools.imatrix(shards[1], tmp_path / "imatrix.gguf", text, ctx=64, chunks=2)
    assert out.is_file()


@pytest.mark.runtime
def test_quantized_split_output_resumes_and_loads_in_stock_llama_cpp(runtime, big, tmp_path):
    """`quantize --split-max-size` as a user publishes a model: killed mid-shard and run again
    it gives the bytes of an uninterrupted run, and stock llama.cpp (not our build) loads the
    set from its first shard with the unsplit file's logits."""
    from native_build import compile_native, stock_build

    flags = ["--scheme", "int4-mixed", "--split-max-size", "4M"]
    subprocess.run([sys.executable, "-m", "step_gguf.cli", "quantize", str(big), "-o", str(tmp_path / "one.gguf"),
                    "--scheme", "int4-mixed"], check=True, capture_output=True)
    (tmp_path / "whole").mkdir()
    subprocess.run([sys.executable, "-m", "step_gguf.cli", "quantize", str(big), "-o",
                    str(tmp_path / "whole" / "m.gguf"), *flags], check=True, capture_output=True)
    want = sorted((tmp_path / "whole").iterdir())
    assert len(want) >= 3 and all(p.stat().st_size <= 4 * 10**6 for p in want)
    folder = tmp_path / "resumed"
    folder.mkdir()
    args = ["quantize", str(big), "-o", str(folder / "m.gguf"), *flags]
    journal = folder / f".{want[1].name}.partial.json"
    _run_killed(args, journal, 2, random.Random(3))  # killed in the second shard
    assert not any((folder / p.name).exists() for p in want)
    result = subprocess.run([sys.executable, "-m", "step_gguf.cli", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for ref in want:
        assert (folder / ref.name).read_bytes() == ref.read_bytes(), ref.name

    exe = compile_native("step_greedy", stock_build())
    logits = {}
    for name, path in (("one", tmp_path / "one.gguf"), ("split", want[0])):
        out = tmp_path / f"{name}.f32"
        run = subprocess.run([str(exe), str(path), "Shards load as one model.", "4", str(out), "512", "2"],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        logits[name] = (run.stdout, np.fromfile(out, dtype=np.float32))
    assert logits["split"][0] == logits["one"][0]
    assert np.array_equal(logits["split"][1], logits["one"][1])
