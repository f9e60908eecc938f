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
    from step_gguf.runtime import llama

    log = tmp_path_factory.mktemp("server") / "llama-server.log"
    with llama.serve(gguf_file("tiny", "bf16"), n_ctx=256, extra_args=["-np", "1"], log_path=log) as url:
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
