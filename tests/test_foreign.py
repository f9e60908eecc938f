"""GGUFs made by other tools: llama.cpp's own quantizer (stock ftypes, --tensor-type mixes,
--pure, imatrix types), its gguf-split, its converter, and metadata in the other forms
llama.cpp's loader accepts (scalar head counts, per-layer arrays, missing optional keys). Each
goes through `plan`, `run`, `serve`, `eval` and `quantize --allow-requantize`.

The files are made here with the stock tools of our own build from a scripted synthetic
checkpoint with K-quant row widths, so greedy decoding of any of them must give the script."""

from __future__ import annotations

import json
import math
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from cli_checks import cli, one_line_error

SCRIPT = ["Hello", " from", " a", " foreign", " file."]
# the quant preset shrunk (hidden 256: K-quants apply), with per-layer head counts
SHAPE = dict(n_layer=3, n_dense=1, n_expert=8, top_k=2, vocab=1024)
UNIFORM = dict(SHAPE, n_head_swa=4)   # one head count for every layer: scalar-able metadata

# name -> llama-quantize arguments before SRC OUT TYPE ("@imatrix" is the importance matrix)
STOCK = {
    "Q4_K_M": [], "Q5_K_S": [], "Q6_K": [], "Q8_0": [], "IQ4_XS": [], "Q3_K_M": [], "Q2_K": [],
    "Q4_0": [], "IQ4_NL": [], "MXFP4_MOE": [], "TQ1_0": [],
    "IQ2_XXS": ["--imatrix", "@imatrix"], "IQ3_S": ["--imatrix", "@imatrix"],
    "IQ1_M": ["--imatrix", "@imatrix"],
}
# name -> (llama-quantize arguments, its type)
MIXES = {
    "mix-Q3_K_M": (["--tensor-type", "ffn_down_exps=q6_k", "--tensor-type", "attn_q=q8_0",
                    "--output-tensor-type", "q8_0", "--token-embedding-type", "q6_k"], "Q3_K_M"),
    "pure-Q4_K": (["--pure"], "Q4_K"),
}
# name -> gguf-split arguments (of the Q4_K_M file)
SPLITS = {"split": ["--split-max-tensors", "20"],
          "split-empty-first": ["--split-max-tensors", "30", "--no-tensor-first-split"]}
OTHERS = ["llama.cpp-bf16", "llama.cpp-Q4_K_M", "keys-Q4_K_M"]
# llama.cpp's converter's trunk (--no-mtp) and MTP draft (--mtp), each through llama-quantize
DRAFTS = {"llama.cpp-trunk-Q4_K_M": ("--no-mtp", "Q4_K_M"), "llama.cpp-draft-Q8_0": ("--mtp", "Q8_0")}
FOREIGN = [*STOCK, *MIXES, *SPLITS, *OTHERS]
FLOAT_SOURCES = {"llama.cpp-bf16"}


def _files(path: Path) -> list[Path]:
    """Every file of the model at `path`: the one file, or all shards of its set."""
    from step_gguf.files.gguf_source import parse_shard_name, shard_path

    parsed = parse_shard_name(path)
    if parsed is None:
        return [path]
    out, _, count = parsed
    return [shard_path(out, i, count) for i in range(count)]


# ---------------------------------------------------------------- metadata as others write it

def rewrite(src: Path, out: Path, edit) -> Path:
    """`src` with its metadata passed through `edit(dict name -> (value, type, sub_type))`
    (keys in the returned order), tensors byte for byte."""
    reader = gguf.GGUFReader(src)
    kv = {f.name: (f.contents(), f.types[0], f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
          for f in reader.fields.values()
          if not f.name.startswith("GGUF.") and f.name != "general.architecture"}
    w = gguf.GGUFWriter(out, reader.get_field("general.architecture").contents())
    for name, (value, vtype, sub) in edit(kv).items():
        w.add_key_value(name, value, vtype, sub_type=sub)
    for t in reader.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)   # quantized data: byte rows
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def other_keys(kv: dict) -> dict:
    """Metadata in the forms llama.cpp's loader accepts and other converters write: head
    counts and expert sizes as scalars or per-layer arrays, no model card, the optional head
    size, RoPE dimensions and gating function left to their defaults, extra keys, another order."""
    U32, ARR, STR, BOOL = (gguf.GGUFValueType.UINT32, gguf.GGUFValueType.ARRAY,
                           gguf.GGUFValueType.STRING, gguf.GGUFValueType.BOOL)
    n_all = kv["step35.block_count"][0]
    heads, kv_heads = kv["step35.attention.head_count"][0], kv["step35.attention.head_count_kv"][0]
    assert len(set(heads)) == 1 and len(set(kv_heads)) == 1   # the UNIFORM checkpoint
    out = {k: v for k, v in kv.items() if not k.startswith("general.") and k not in (
        "step35.attention.key_length", "step35.attention.value_length",
        "step35.rope.dimension_count", "step35.expert_gating_func")}
    out["step35.attention.head_count"] = (heads[0], U32, None)
    out["step35.attention.head_count_kv"] = (kv_heads[0], U32, None)
    out["step35.expert_used_count"] = ([kv["step35.expert_used_count"][0]] * n_all, ARR, U32)
    out["step35.expert_feed_forward_length"] = ([kv["step35.expert_feed_forward_length"][0]] * n_all, ARR, U32)
    out["step35.moe_every_n_layers"] = (1, U32, None)
    out["general.type"] = ("model", STR, None)
    out["tokenizer.ggml.add_eos_token"] = (False, BOOL, None)
    return dict(reversed(out.items()))


# ---------------------------------------------------------------- the files

@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Our scripted checkpoints and BF16 conversions: the main one and the uniform-head one."""
    from step_gguf.pipeline.convert import convert
    from step_gguf.synth.writer import synth

    root = tmp_path_factory.mktemp("foreign")
    out = {"root": root}
    for name, shape in (("main", SHAPE), ("uniform", UNIFORM)):
        ckpt = synth(root / f"{name}-ckpt", "quant", seed=3, script=SCRIPT, **shape)
        out[name] = ckpt
        out[f"{name}-bf16"] = root / f"{name}-bf16.gguf"
        convert(ckpt, out[f"{name}-bf16"], outtype="bf16")
    return out


def _llama_cpp_convert(made, out: Path, *flags: str) -> None:
    """llama.cpp's own convert_hf_to_gguf.py from the sdist our runtime is built from, run as
    a Step 3.5 user must (config.json read directly: transformers drops partial_rotary_factors;
    the pre-tokenizer named: it refuses unregistered tokenizer hashes)."""
    pytest.importorskip("torch")
    from step_gguf.native.build import fetch_sdist

    tree = made["root"] / "llama.cpp"
    if not tree.exists():
        wanted = ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/conversion/",
                  "vendor/llama.cpp/gguf-py/gguf/")
        with tarfile.open(fetch_sdist()) as tar:
            members = []
            for m in tar.getmembers():
                rel = m.name.partition("/")[2]
                if m.isfile() and rel.startswith(wanted):
                    m.name = rel.removeprefix("vendor/llama.cpp/")
                    members.append(m)
            tar.extractall(tree, members=members, filter="data")
    runner = textwrap.dedent("""
        import json, sys
        sys.path[:0] = [sys.argv[1], sys.argv[1] + "/gguf-py"]
        sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[2:]
        from conversion import base
        base.ModelBase.load_hparams = staticmethod(
            lambda dir_model, is_mistral_format: json.loads((dir_model / "config.json").read_text()))
        base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "deepseek-v3"
        import convert_hf_to_gguf
        convert_hf_to_gguf.main()
    """)
    r = subprocess.run([sys.executable, "-c", runner, str(tree), str(made["main"]), "--outfile", str(out),
                        "--outtype", "bf16", *flags], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.fixture(scope="module")
def foreign(made, runtime):
    """foreign(name) -> the model `name` as another tool made it (a path llama.cpp loads;
    for a split set, its second shard: any shard names the set)."""
    root = made["root"]
    cache: dict[str, Path] = {}

    def quantize(src: Path, out: Path, args: list[str], qtype: str) -> Path:
        args = [str(imatrix()) if a == "@imatrix" else a for a in args]
        r = subprocess.run([str(runtime.tool("llama-quantize")), *args, str(src), str(out), qtype, "2"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        return out

    def imatrix() -> Path:
        if "imatrix" not in cache:
            from step_gguf.native import tools
            cache["imatrix"] = tools.imatrix(made["main-bf16"], root / "imatrix.gguf", ctx=128, chunks=4)
        return cache["imatrix"]

    def get(name: str) -> Path:
        if name in cache:
            return cache[name]
        out = root / f"{name}.gguf"
        if name in STOCK:
            quantize(made["main-bf16"], out, STOCK[name], name)
        elif name in MIXES:
            quantize(made["main-bf16"], out, *MIXES[name])
        elif name in SPLITS:
            folder = root / name
            folder.mkdir()
            r = subprocess.run([str(runtime.tool("llama-gguf-split")), "--split", *SPLITS[name],
                                str(get("Q4_K_M")), str(folder / "m")], capture_output=True, text=True)
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
            shards = sorted(folder.glob("m-*-of-*.gguf"))
            assert len(shards) > 2
            out = shards[1]
        elif name == "llama.cpp-bf16":
            _llama_cpp_convert(made, out)
        elif name == "llama.cpp-Q4_K_M":
            quantize(get("llama.cpp-bf16"), out, [], "Q4_K_M")
        elif name in DRAFTS:
            flag, qtype = DRAFTS[name]
            _llama_cpp_convert(made, root / f"{name}-bf16.gguf", flag)
            quantize(root / f"{name}-bf16.gguf", out, [], qtype)
        elif name == "keys-Q4_K_M":
            quantize(rewrite(made["uniform-bf16"], root / "keys-bf16.gguf", other_keys), out, [], "Q4_K_M")
        else:
            raise KeyError(name)
        cache[name] = out
        return out
    return get


# ---------------------------------------------------------------- plan

def _check_plan(result, model: Path) -> dict:
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    files = _files(model)
    want = sum(int(t.n_bytes) for f in files for t in gguf.GGUFReader(f).tensors)
    assert sum(d["weights"] for d in plan["devices"]) == want        # every tensor, once
    assert sum(sum(d["classes"].values()) for d in plan["devices"]) == want
    assert plan["model"] == files[0].name and plan["server_args"][1] == str(files[0])
    return plan


@pytest.mark.runtime
@pytest.mark.parametrize("name", FOREIGN)
def test_plan_prices_every_tensor(name, foreign):
    path = foreign(name)
    plan = _check_plan(cli("plan", path, "--profile", "cpu", "--json"), path)
    assert plan["mtp"] is True   # the heads are found whatever wrote the file


@pytest.mark.parametrize("edit", ["other-keys", "per-layer-arrays"])
def test_plan_reads_metadata_in_every_form_llama_cpp_accepts(edit, made, tmp_path):
    """No runtime needed: a BF16 file with the keys rewritten prices as ours does."""
    if edit == "other-keys":
        path = rewrite(made["uniform-bf16"], tmp_path / "m.gguf", other_keys)
        ref = made["uniform-bf16"]
    else:  # the per-layer array forms of keys we write as scalars, and scalar swiglu clamps
        def arrays(kv):
            n = kv["step35.block_count"][0]
            A, U32, F32 = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
            kv = dict(kv)
            for key in ("step35.expert_used_count", "step35.expert_feed_forward_length",
                        "step35.feed_forward_length"):
                kv[key] = ([kv[key][0]] * n, A, U32)
            kv["step35.swiglu_clamp_shexp"] = (8.0, F32, None)
            return kv
        path = rewrite(made["main-bf16"], tmp_path / "m.gguf", arrays)
        ref = made["main-bf16"]
    plan = _check_plan(cli("plan", path, "--profile", "cpu", "--json"), path)
    ours = json.loads(cli("plan", ref, "--profile", "cpu", "--json").output)
    for key in ("kv_bytes", "ctx", "devices", "predicted_decode_tps"):
        assert plan[key] == ours[key], key
    dry = cli("quantize", path, "--dry-run", "--json", "--scheme", "int4-mixed")
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.output)["total_bytes"] == \
        json.loads(cli("quantize", ref, "--dry-run", "--json", "--scheme", "int4-mixed").output)["total_bytes"]


# ---------------------------------------------------------------- quantize

@pytest.mark.runtime
@pytest.mark.parametrize("name", FOREIGN)
def test_requantizing_a_foreign_file(name, foreign, tmp_path, runtime):
    from step_gguf.pipeline.quantize import KV_RECIPE
    from step_gguf.runtime import llama

    src = foreign(name)
    out = tmp_path / "int4.gguf"
    if name not in FLOAT_SOURCES:
        one_line_error(cli("quantize", src, "-o", out, "--scheme", "int4-mixed"), "--allow-requantize")
        assert not out.exists() and not list(tmp_path.iterdir())
    result = cli("quantize", src, "-o", out, "--scheme", "int4-mixed", "--allow-requantize")
    assert result.exit_code == 0, result.output
    reader = gguf.GGUFReader(out)
    names = [f.name for f in reader.fields.values()]
    assert len(names) == len(set(names))
    assert reader.get_field(KV_RECIPE).contents() == "int4-mixed"
    assert not [n for n in names if n.startswith(("quantize.", "split."))]  # llama-quantize's own, gone
    assert reader.get_field("general.file_type").contents() == 15   # MOSTLY_Q4_K_M, as we write it
    theirs = {t.name for f in _files(src) for t in gguf.GGUFReader(f).tensors}
    assert {t.name for t in reader.tensors} == theirs
    assert reader.get_field("tokenizer.ggml.tokens").contents() == \
        gguf.GGUFReader(_files(src)[0]).get_field("tokenizer.ggml.tokens").contents()
    with llama.load(out, n_ctx=128, logits_all=True) as m:
        logits = m.logits(m.tokenize("Hello"))
        assert np.isfinite(logits).all()


@pytest.mark.runtime
def test_requantizing_to_an_imatrix_type_asks_for_one(foreign, tmp_path):
    out = tmp_path / "iq2.gguf"
    one_line_error(cli("quantize", foreign("IQ2_XXS"), "-o", out, "--scheme", "IQ2_XXS",
                         "--allow-requantize"), "importance data", "--imatrix")
    assert not out.exists()


@pytest.mark.runtime
def test_a_type_the_gguf_package_cannot_read_is_one_line(made, runtime, tmp_path):
    """llama.cpp's Q2_0 (ggml type 42) is newer than the gguf package on PyPI."""
    out = tmp_path / "q2_0.gguf"
    r = subprocess.run([str(runtime.tool("llama-quantize")), str(made["main-bf16"]), str(out), "Q2_0", "2"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("this llama-quantize has no Q2_0")
    try:
        Q(42)
        pytest.skip("the installed gguf package reads Q2_0")
    except ValueError:
        pass
    one_line_error(cli("plan", out, "--profile", "cpu"), "ggml type 42 (Q2_0)", "gguf")
    one_line_error(cli("quantize", out, "-o", tmp_path / "x.gguf", "--allow-requantize"), "Q2_0")


# ---------------------------------------------------------------- run, eval, serve

@pytest.mark.runtime
@pytest.mark.parametrize("name", ["Q4_K_M", "IQ2_XXS", "split-empty-first", "llama.cpp-Q4_K_M",
                                  "keys-Q4_K_M"])
def test_run_gives_the_script(name, foreign):
    r = cli("run", foreign(name), "-p", "hi", "-n", "16", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["text"].strip() == "".join(SCRIPT)
    assert out["mtp"]["drafted"] > 0   # the foreign file's MTP head drafts


@pytest.mark.runtime
@pytest.mark.parametrize("name", ["mix-Q3_K_M", "split"])
def test_eval_against_our_bf16(name, foreign, made, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(Path(__file__).parent.parent.joinpath("quant", "calibration.txt")
                    .read_text(encoding="utf-8")[:3000], encoding="utf-8")
    r = cli("eval", foreign(name), "--reference", made["main-bf16"], "--text", text, "-c", "128", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert math.isfinite(out["kld_mean"]) and out["kld_mean"] >= -1e-6 and math.isfinite(out["kld_p99"])
    assert out["top1_pct"] >= 99.0   # the script survives the quantizer: same greedy tokens
    assert out["chunks"] > 0


@pytest.mark.runtime
def test_llama_cpps_trunk_and_draft_files_plan_and_run_together(foreign, tmp_path):
    trunk, draft = foreign("llama.cpp-trunk-Q4_K_M"), foreign("llama.cpp-draft-Q8_0")
    r = cli("plan", trunk, "--profile", "cpu", "--draft", draft, "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["draft"] == str(draft) and plan["mtp"] is True
    want = sum(int(t.n_bytes) for f in (trunk, draft) for t in gguf.GGUFReader(f).tensors)
    assert sum(d["weights"] for d in plan["devices"]) == want
    r = cli("run", trunk, "--draft", draft, "-p", "hi", "-n", "16", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["text"].strip() == "".join(SCRIPT) and out["mtp"]["drafted"] > 0
    for src in (trunk, draft):
        result = cli("quantize", src, "-o", tmp_path / src.name, "--allow-requantize")
        assert result.exit_code == 0, result.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.runtime
def test_serve_answers_over_loopback(foreign):
    from step_gguf.runtime import server

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "step_gguf.cli", "serve", str(foreign("split")),
                             "--port", str(port), "-c", "512"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url == f"http://127.0.0.1:{port}/v1", proc.stderr.read() if not url else url
        reply = server.chat(url.removesuffix("/v1"), [{"role": "user", "content": "hi"}], max_tokens=16)
        assert reply.text.strip() == "".join(SCRIPT)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
