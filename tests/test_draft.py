"""Separate MTP draft GGUFs (`--mtp split`): found beside the trunk by the converter's own name,
checked against it in one line, planned as the embedded heads are, and drafting on real
runtime output as the embedded heads do."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import gguf
import pytest

from cli_checks import PLAN_ARGS, cli, one_line_error
from scripted import REASONING, scripted_checkpoint
from step_gguf import plan as P
from step_gguf.core.errors import StepGGUFError
from step_gguf.core.model import Step35Config
from step_gguf.files.draft import beside, draft_path, resolve
from step_gguf.pipeline.convert import convert
from step_gguf.pipeline.output import SplitLimits
from step_gguf.pipeline.source_facts import _with_draft, read_facts

SHARED = {"token_embd.weight", "output_norm.weight", "output.weight", "rope_freqs.weight"}


def _names(path: Path) -> set[str]:
    return {t.name for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def pair(workdir, checkpoint):
    """(embedded model, trunk, draft) of the tiny checkpoint; the draft by convert's default name."""
    src = checkpoint("tiny")
    whole, trunk = workdir / "draft-whole.gguf", workdir / "draft-pair" / "trunk.gguf"
    if not whole.exists():
        convert(src, whole, outtype="bf16")
    r = cli("convert", src, "-o", trunk, "--outtype", "bf16", "--mtp", "split")
    assert r.exit_code == 0, r.output
    return whole, trunk, trunk.with_name("trunk-mtp.gguf")


def test_the_draft_is_found_by_the_name_convert_gives_it(pair, checkpoint, tmp_path):
    whole, trunk, draft = pair
    assert draft.is_file() and draft_path(trunk) == draft
    assert resolve(trunk, None) == draft
    assert resolve(trunk, None, mtp=False) is None
    assert resolve(whole, None) is None   # its own heads draft
    # a split trunk: every shard names its set's draft, as convert wrote it
    out = tmp_path / "m.gguf"
    shards = convert(checkpoint("tiny"), out, outtype="bf16", mtp="split", draft_out=draft_path(out),
                     split=SplitLimits(max_tensors=40)).outputs
    assert shards[-1] == tmp_path / "m-mtp.gguf" and len(shards) > 2
    assert beside(shards[1]) == tmp_path / "m-mtp.gguf" == resolve(shards[1], None)
    got = json.loads(cli("plan", shards[1], *PLAN_ARGS).output)
    assert got["draft"] == str(tmp_path / "m-mtp.gguf")
    assert got["server_args"][1] == str(shards[0])


def _heads(out: dict, n_layer: int) -> list:
    """Per device: the MTP heads' bytes and tensors, and the buffers (KV, compute)."""
    return [(d["name"], d["classes"].get("mtp"), d["buffers"],
             sorted(n for n in d["tensors"] + d["draft_tensors"] if n.startswith("blk.") and
                    int(n.split(".")[1]) >= n_layer))
            for d in out["devices"]]


def test_plan_places_and_counts_a_separate_draft_as_the_embedded_heads(pair, checkpoint):
    whole, trunk, draft = pair
    n_layer = Step35Config.from_dir(checkpoint("tiny")).n_layer
    embedded = json.loads(cli("plan", whole, *PLAN_ARGS).output)
    given = cli("plan", trunk, "--draft", draft, *PLAN_ARGS)
    assert given.exit_code == 0, given.output
    got = json.loads(given.output)
    assert got == json.loads(cli("plan", trunk, *PLAN_ARGS).output)   # found beside it
    assert got["mtp"] and got["draft"] == str(draft)
    heads = _heads(got, n_layer)
    assert heads == _heads(embedded, n_layer) and any(h[1] for h in heads)
    assert {n for h in heads for n in h[3]} == {n for n in _names(draft) if n.startswith("blk.")}
    assert got["predicted_decode_tps"] == embedded["predicted_decode_tps"]
    # llama.cpp loads the draft file whole: its copies of the embeddings and head come on top,
    # the embeddings and the output matrix no head reads in system memory, the norms with the heads
    gpu, cpu = got["devices"]
    assert sorted(gpu["draft_tensors"] + cpu["draft_tensors"]) == sorted(_names(draft))
    assert _names(draft) - {n for n in _names(draft) if n.startswith("blk.")} == SHARED
    assert set(cpu["draft_tensors"]) == {"token_embd.weight", "output.weight"}
    for d, e in zip(got["devices"], embedded["devices"]):
        assert {k: v for k, v in d["classes"].items() if k != "draft_shared"} == e["classes"]
        assert d["bytes"] == e["bytes"] + d["classes"]["draft_shared"]
    args = got["server_args"]
    assert args[args.index("--spec-draft-model") + 1] == str(draft)
    assert args[args.index("-ngld") + 1] == args[args.index("-ngl") + 1]
    assert args[args.index("-otd") + 1] == r"^output\.weight$=CPU"
    assert args[args.index("--spec-type") + 1] == "draft-mtp"
    # --no-mtp loads no draft
    off = json.loads(cli("plan", trunk, "--draft", draft, "--no-mtp", *PLAN_ARGS).output)
    assert not off["mtp"] and off["draft"] is None and "--spec-draft-model" not in off["server_args"]
    assert not any(d["draft_tensors"] for d in off["devices"])


def test_a_separate_draft_of_the_real_model_is_planned_as_its_embedded_heads(real_config):
    real = read_facts(real_config)
    heads = [t for t in real.tensors if (t.layer or 0) >= real.n_layer]
    trunk = replace(real, tensors=tuple(t for t in real.tensors if t not in heads))
    draft = replace(real, tensors=tuple(heads) + tuple(t for t in real.tensors if t.name in SHARED))
    pair = _with_draft(trunk, draft, "d.gguf")
    a, b = (P.plan(m, P.machine("gpu-24gb"), 65536) for m in (real, pair))
    for da, db in zip(a.devices, b.devices):
        assert da.extra == db.extra
        assert {t.name for t in da.tensors if a.model.kind(t) == "mtp"} == \
            {t.name for t in db.tensors if b.model.kind(t) == "mtp"}
    assert b.predicted_decode_tps == a.predicted_decode_tps
    # the draft's embeddings and unread output matrix are mapped in system memory, not on the card
    copies = {t.name: t.bytes for t in real.tensors if t.name in ("token_embd.weight", "output.weight")}
    assert b.classes()["CPU"]["draft_shared"] == sum(copies.values())
    assert b.classes()["GPU"]["draft_shared"] < 1 << 20    # output norm, RoPE factors
    assert b.cpu_tensors == a.cpu_tensors   # the copies cost the card no expert
    args = b.server_args("m.gguf")
    assert [args[i + 1] for i, x in enumerate(args) if x == "-otd"] == [r"^output\.weight$=CPU"]


def test_a_wrong_draft_is_one_line(pair, checkpoint, tmp_path, real_config):
    whole, trunk, draft = pair
    one_line_error(cli("plan", trunk, "--draft", trunk, *PLAN_ARGS), "trunk, not a draft")
    one_line_error(cli("plan", trunk, "--draft", whole, *PLAN_ARGS), "holds a whole model")
    one_line_error(cli("plan", whole, "--draft", draft, *PLAN_ARGS), "already holds its MTP heads")
    one_line_error(cli("plan", trunk, "--draft", tmp_path / "none.gguf", *PLAN_ARGS), "does not exist")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    one_line_error(cli("plan", trunk, "--draft", tmp_path / "junk.gguf", *PLAN_ARGS), "junk.gguf")
    one_line_error(cli("plan", real_config, "--draft", draft, *PLAN_ARGS), "--draft goes with a GGUF")
    # the draft of a model of another shape (hidden 96, 6 layers)
    other = tmp_path / "other.gguf"
    convert(checkpoint("tiny-fp8-3p7"), other, outtype="bf16", mtp="split", draft_out=draft_path(other))
    one_line_error(cli("plan", trunk, "--draft", draft_path(other), *PLAN_ARGS),
                    "draft of another model", "6/96/")
    # a stale file found beside the model names itself; --no-mtp runs without it
    stray = tmp_path / "stray.gguf"
    stray.write_bytes(trunk.read_bytes())
    draft_path(stray).write_bytes(draft_path(other).read_bytes())
    one_line_error(cli("plan", stray, *PLAN_ARGS), "found beside stray.gguf", "--no-mtp")
    assert cli("plan", stray, "--no-mtp", *PLAN_ARGS).exit_code == 0
    with pytest.raises(StepGGUFError, match="another model"):
        read_facts(trunk, draft=draft_path(other))


# ---------------------------------------------------------------- on the runtime

@pytest.fixture(scope="module")
def scripted_pair(workdir, runtime):
    """(embedded, trunk, draft) of a scripted model whose heads predict its greedy text."""
    whole, trunk = workdir / "draft-scripted.gguf", workdir / "draft-scripted-pair" / "trunk.gguf"
    if not whole.exists():
        ckpt = scripted_checkpoint(workdir / "draft-scripted")
        convert(ckpt, whole, outtype="bf16")
        convert(ckpt, trunk, outtype="bf16", mtp="split", draft_out=draft_path(trunk))
    return whole, trunk, draft_path(trunk)


def _run(*args) -> dict:
    r = cli("run", *args, "-p", "weather?", "-n", "32", "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.mark.runtime
def test_run_drafts_with_a_separate_draft_as_with_embedded_heads(scripted_pair):
    whole, trunk, draft = scripted_pair
    fixed = ("--draft-max", "3")  # the same drafts every run: acceptance is compared below
    embedded, given, found, plain = (_run(whole, *fixed), _run(trunk, "--draft", draft, *fixed),
                                     _run(trunk, *fixed), _run(trunk, "--no-mtp"))
    assert embedded["reasoning"].strip() == "".join(REASONING)
    for out in (given, found, plain):
        assert (out["text"], out["reasoning"]) == (embedded["text"], embedded["reasoning"])
    assert given["mtp_draft"] == found["mtp_draft"] == str(draft) and embedded["mtp_draft"] is None
    assert embedded["mtp"]["drafted"] > 0 and embedded["mtp"]["acceptance"] >= 0.9
    for out in (given, found):
        assert out["mtp"]["drafted"] > 0
        assert out["mtp"]["acceptance"] == pytest.approx(embedded["mtp"]["acceptance"], abs=0.05)
    assert plain["mtp"]["drafted"] == 0 and plain["mtp_draft"] is None


@pytest.mark.runtime
@pytest.mark.parametrize("given", [True, False], ids=["given", "found"])
def test_serve_drafts_with_a_separate_draft(scripted_pair, given):
    from step_gguf.native import process
    from step_gguf.runtime import server

    _, trunk, draft = scripted_pair
    port = process.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "step_gguf.cli", "serve", str(trunk),
                             *(["--draft", str(draft)] if given else []),
                             "--port", str(port), "-c", "2048", "--draft-max", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url == f"http://127.0.0.1:{port}/v1", proc.stderr.read() if not url else url
        reply = server.chat(url.removesuffix("/v1"), [{"role": "user", "content": "weather?"}],
                           max_tokens=32)
        assert reply.reasoning.strip() == "".join(REASONING)
        assert reply.draft_tokens > 0 and reply.acceptance >= 0.9
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    said = proc.stderr.read()
    assert (f"drafting with {draft}, found beside trunk.gguf" in said) == (not given)
