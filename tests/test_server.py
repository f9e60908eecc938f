"""llama-server from our build, on a converted GGUF, over real HTTP on loopback."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def server(runtime, gguf_file, tmp_path_factory):
    from step_gguf.runtime import server as runtime_server

    log = tmp_path_factory.mktemp("server") / "llama-server.log"
    with runtime_server.serve(gguf_file("tiny", "bf16"), n_ctx=256, extra_args=["-np", "1"], log_path=log) as url:
        yield url


def test_chat_completion_uses_the_gguf_chat_template(server, checkpoint):
    from tokenizers import Tokenizer

    out = _post(f"{server}/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hello, who are you?"}],
        "max_tokens": 8, "temperature": 0})
    msg = out["choices"][0]["message"]
    assert msg["role"] == "assistant" and isinstance(msg["content"], str)
    assert 1 <= out["usage"]["completion_tokens"] <= 8
    hf = Tokenizer.from_file(str(checkpoint("tiny") / "tokenizer.json"))
    templated = "<|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\n"
    assert out["usage"]["prompt_tokens"] == len(hf.encode(templated, add_special_tokens=False).ids)


def test_server_greedy_token_matches_wrapper_logits(server, gguf_file):
    from step_gguf.runtime import llama

    prompt = list(range(5, 45))
    out = _post(f"{server}/completion", {"prompt": prompt, "n_predict": 1, "temperature": 0,
                                         "cache_prompt": False, "n_probs": 1})
    with llama.load(gguf_file("tiny", "bf16"), n_ctx=256, logits_all=True) as m:
        want = int(np.argmax(m.logits(prompt)[-1]))
    assert out["completion_probabilities"][0]["id"] == want


def test_health_and_model_listing(server):
    with urllib.request.urlopen(f"{server}/v1/models", timeout=10) as resp:
        models = json.loads(resp.read())
    assert models["data"] and "tiny-bf16" in models["data"][0]["id"]


@pytest.fixture(scope="module")
def split_gguf(checkpoint, workdir):
    from step_gguf.pipeline.convert import convert

    trunk, draft = workdir / "server-trunk.gguf", workdir / "server-mtp.gguf"
    if not trunk.exists():
        convert(checkpoint("tiny"), trunk, outtype="bf16", mtp="split", draft_out=draft)
    return trunk, draft


def _greedy(url: str) -> dict:
    return _post(f"{url}/completion", {"prompt": list(range(5, 17)), "n_predict": 24,
                                       "temperature": 0, "cache_prompt": False})


@pytest.mark.parametrize("layout", ["combined", "split"])
def test_mtp_drafting_runs_and_keeps_greedy_output(layout, runtime, gguf_file, split_gguf, server):
    """llama.cpp drafts with the converted MTP heads (from the same GGUF, or from the separate
    draft GGUF); speculative decoding must not change the greedy continuation."""
    from step_gguf.runtime import server as runtime_server

    plain = _greedy(server)
    if layout == "combined":
        model, extra = gguf_file("tiny", "bf16"), ["--spec-type", "draft-mtp"]
    else:
        model, extra = split_gguf[0], ["--spec-type", "draft-mtp", "-md", str(split_gguf[1])]
    with runtime_server.serve(model, n_ctx=256, extra_args=["-np", "1", *extra]) as url:
        drafted = _greedy(url)
    assert drafted["content"] == plain["content"]
    assert drafted["timings"]["draft_n"] > 0  # the MTP heads really ran
