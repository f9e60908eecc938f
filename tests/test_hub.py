"""Hub layouts (cache snapshot, --local-dir download, plain folder) and the model card.

The same files give the same GGUF bytes in every layout; links may resolve inside a snapshot's
repo cache folder and nowhere else; general.* keys come from README.md's front matter,
config.json and the folder name, under the user's --name/--basename/--license.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import gguf
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as Q

from step_gguf.cli import main
from step_gguf.core.hub_layout import hub_repo
from step_gguf.core.model import Step35Config
from step_gguf.core.recipe import Recipe
from step_gguf.files.model_card import QUANTIZED_BY, param_counts, size_label
from step_gguf.pipeline.convert import convert
from step_gguf.pipeline.output import write_shape_only
from step_gguf.pipeline.quantize import open_source
from step_gguf.synth.tokenizer import BASE_MODEL
from step_gguf.synth.writer import synth

ORG, NAME, REV = "stepfun-ai", "Step-3.5-Flash-Tiny", "0f3c9a1e5b7d2c4a6e8f0b1d3c5e7a9b2d4f6a8c"
General = gguf.Keys.General


def hub_snapshot(src: Path, cache: Path, org: str = ORG, name: str = NAME) -> Path:
    """`src` as the hub client caches it: blobs by hash, a snapshot of relative links, refs/main."""
    repo = cache / f"models--{org}--{name}"
    snapshot = repo / "snapshots" / REV
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        sha = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / sha)
        (snapshot / f.name).symlink_to(Path("..", "..", "blobs", sha))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REV)
    return snapshot


def local_dir(src: Path, dest: Path) -> Path:
    """`src` as `hf download --local-dir` leaves it: the files plus .cache/huggingface/."""
    shutil.copytree(src, dest)
    meta = dest / ".cache" / "huggingface"
    (meta / "download").mkdir(parents=True)
    (meta / ".gitignore").write_text("*\n")
    for f in sorted(src.iterdir()):
        sha = hashlib.sha256(f.read_bytes()).hexdigest()
        (meta / "download" / f"{f.name}.metadata").write_text(f"{REV}\n{sha}\n1767225600.0\n")
        (meta / "download" / f"{f.name}.lock").touch()
    (meta / "download" / "half-done.incomplete").write_bytes(b"\0" * 100)
    return dest


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    return synth(tmp_path_factory.mktemp("plain") / NAME, "tiny", seed=11)


def _fields(path: Path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}


def test_every_layout_gives_the_same_bytes(plain, tmp_path):
    snapshot = hub_snapshot(plain, tmp_path / "cache")
    assert hub_repo(snapshot).url == f"https://huggingface.co/{ORG}/{NAME}"
    local = local_dir(plain, tmp_path / "local" / NAME)
    outs = []
    for i, src in enumerate((plain, snapshot, local)):
        outs.append(tmp_path / f"{i}.gguf")
        convert(src, outs[-1], outtype="bf16")
    assert outs[0].read_bytes() == outs[1].read_bytes() == outs[2].read_bytes()


def test_without_a_card_a_snapshot_is_named_after_its_repo_not_its_revision(plain, tmp_path):
    bare = tmp_path / NAME
    shutil.copytree(plain, bare)
    (bare / "README.md").unlink()
    snapshot = hub_snapshot(bare, tmp_path / "cache")
    convert(bare, tmp_path / "plain.gguf", outtype="bf16")
    convert(snapshot, tmp_path / "hub.gguf", outtype="bf16")
    ours, hub = _fields(tmp_path / "plain.gguf"), _fields(tmp_path / "hub.gguf")
    assert hub[General.NAME] == ours[General.NAME] == "Step 3.5 Flash Tiny"
    assert hub[General.SOURCE_REPO_URL] == f"https://huggingface.co/{ORG}/{NAME}"
    assert General.SOURCE_REPO_URL not in ours  # a plain folder does not say where it came from
    assert hub[General.SIZE_LABEL] == ours[General.SIZE_LABEL]


@pytest.mark.parametrize("victim", ["model-00001-of-00003.safetensors", "tokenizer.json", "README.md"])
@pytest.mark.parametrize("where", ["outside the cache", "another repo's blobs"])
def test_a_snapshot_link_leaving_the_repo_is_refused(plain, tmp_path, victim, where):
    cache = tmp_path / "cache"
    snapshot = hub_snapshot(plain, cache)
    if where == "outside the cache":
        target = tmp_path / "elsewhere" / victim
        target.parent.mkdir()
    else:
        target = hub_snapshot(plain, cache, name="Other").parent.parent / "blobs" / "copied"
    shutil.copyfile(snapshot / victim, target)
    (snapshot / victim).unlink()
    (snapshot / victim).symlink_to(Path("..", "..", "..", "..", target.relative_to(tmp_path)))
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    result = CliRunner().invoke(main, ["convert", str(snapshot), "-o", str(out)])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    repo = (cache / f"models--{ORG}--{NAME}").resolve()
    assert f"is a link to {target.resolve()}, outside {repo}; copy the file" in lines[0]
    assert list(out.parent.iterdir()) == []


def test_card_keys_come_from_the_synthetic_model_card(plain, tmp_path):
    out = tmp_path / "m.gguf"
    convert(plain, out, outtype="bf16")
    kv = _fields(out)
    assert kv[General.NAME] == "Step 3.5 Flash Synthetic Tiny"
    assert kv[General.SIZE_LABEL] == size_label(Step35Config.from_dir(plain))
    assert kv[General.LICENSE] == "mit"
    assert kv[General.SOURCE_REPO_URL] == f"https://huggingface.co/{BASE_MODEL}"
    assert kv[General.LANGUAGES] == ["en", "zh"]
    assert "synthetic" in kv[General.TAGS]
    assert General.QUANTIZED_BY not in kv  # BF16: nothing quantized


def test_cli_overrides_the_card_and_a_gguf_source_keeps_it(plain, tmp_path):
    first = tmp_path / "first.gguf"
    result = CliRunner().invoke(main, ["convert", str(plain), "-o", str(first), "--outtype", "f32",
                                       "--name", "Custom", "--license", "apache-2.0",
                                       "--basename", "Fam"])
    assert result.exit_code == 0, result.output
    kv = _fields(first)
    assert (kv[General.NAME], kv[General.LICENSE], kv[General.BASENAME]) == ("Custom", "apache-2.0", "Fam")
    assert kv[General.SOURCE_REPO_URL] == f"https://huggingface.co/{BASE_MODEL}"

    second = tmp_path / "second.gguf"
    result = CliRunner().invoke(main, ["quantize", str(first), "-o", str(second), "--scheme", "F16",
                                       "--name", "Renamed"])
    assert result.exit_code == 0, result.output
    kv = _fields(second)
    assert (kv[General.NAME], kv[General.LICENSE], kv[General.BASENAME]) == ("Renamed", "apache-2.0", "Fam")
    assert kv[General.SOURCE_REPO_URL] == f"https://huggingface.co/{BASE_MODEL}"


def test_quantized_outputs_say_who_quantized_them(plain, tmp_path):
    # the header alone: writing Q8_0 data would need the runtime's quantizers
    source = open_source(plain, Recipe.single(Q.Q8_0))
    write_shape_only(tmp_path / "q.gguf", source.plans, source.write_kv)
    kv = _fields(tmp_path / "q.gguf")
    assert kv[General.QUANTIZED_BY] == QUANTIZED_BY
    assert kv[General.NAME] == "Step 3.5 Flash Synthetic Tiny"


@pytest.mark.runtime
def test_quantize_writes_the_card_and_quantized_by(plain, tmp_path):
    f32 = tmp_path / "f32.gguf"
    convert(plain, f32, outtype="f32")
    for src, extra in ((plain, []), (f32, ["--license", "apache-2.0"])):
        out = tmp_path / f"q-{len(extra)}.gguf"
        result = CliRunner().invoke(main, ["quantize", str(src), "-o", str(out), "--scheme", "Q8_0", *extra])
        assert result.exit_code == 0, result.output
        kv = _fields(out)
        assert kv[General.QUANTIZED_BY] == QUANTIZED_BY
        assert kv[General.NAME] == "Step 3.5 Flash Synthetic Tiny"
        assert kv[General.LICENSE] == ("apache-2.0" if extra else "mit")


def test_front_matter_that_is_not_yaml_is_left_out_with_a_warning(plain, tmp_path, caplog):
    src = tmp_path / NAME
    shutil.copytree(plain, src)
    (src / "README.md").write_text("---\nlicense: [unclosed\ntags: {a: 1}\n---\n# card\n")
    convert(src, tmp_path / "m.gguf", outtype="bf16")
    kv = _fields(tmp_path / "m.gguf")
    assert kv[General.NAME] == "Step 3.5 Flash Tiny" and General.LICENSE not in kv
    assert "front matter unreadable" in caplog.text


def test_size_label_of_the_real_model(real_config):
    cfg = Step35Config.from_dict(json.loads(real_config.read_text()))
    total, active = param_counts(cfg)
    # 42 MoE layers x 288 experts x 3 x 4096 x 1280 = 190.3B routed; 8 of 288 run per token
    assert 196e9 < total < 197e9 and 11e9 < active < 12e9
    assert size_label(cfg) == "196B-A11B"
