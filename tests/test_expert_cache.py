"""The routed-expert cache (patch 0021) on a real ggml GPU backend, llama.cpp's Vulkan on Mesa's
llvmpipe: a model with its routed experts in system memory and the rest on the device, run
by tests/native/expert_cache.cpp with the cache off, on, and with every expert on the device.

The cached run gives the uncached run's greedy tokens, logits no further from it than the
device's own rounding moves them, and counters that add up: every routed (token, expert) pair
is a hit or a miss, and every copy moves one expert's bytes."""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest

from native_build import compile_native
from scripted import scripted_checkpoint
from step_gguf.core.recipe import load_recipe
from step_gguf.native import build as b
from step_gguf.pipeline.quantize import quantize

PROMPT = "The cache keeps the experts a model routes to often in the memory of the device."
N_PREDICT = 12
SLOTS = 2                # of the tiny model's 8 experts a layer: hits, misses and evictions
ROUNDING_SLACK = 1e-4    # mean KL the cache may add to the device's own rounding
TIE = 0.05               # logits this close are a tie rounding may break either way


@dataclass
class Run:
    tokens: list[int]
    logits: np.ndarray           # rows x n_vocab: every prompt position, then every step
    counters: dict[str, int] | None


@pytest.fixture(scope="module")
def program(runtime) -> Path:
    if runtime.backend != "vulkan":
        pytest.fail("the expert cache needs a GPU backend: step-gguf runtime build --backend vulkan")
    return compile_native("expert_cache", b.RuntimeBuild(runtime.bin_dir.parent.parent))


@pytest.fixture(scope="module")
def model(checkpoint, workdir) -> Path:
    """The tiny model at int8: Q8_0 experts, the same bytes per expert on every layer."""
    out = workdir / "tiny-int8.gguf"
    if not out.exists():
        quantize(checkpoint("tiny"), out, load_recipe("int8"))
    return out


def _facts(path: Path) -> tuple[int, int, list[int], int]:
    """(n_vocab, experts per token, bytes of one expert on each MoE layer, experts a layer)."""
    r = gguf.GGUFReader(path)
    field = lambda key: int(r.fields[key].contents())  # noqa: E731
    per_layer: dict[int, int] = {}
    for t in r.tensors:
        if t.name.endswith(("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")):
            layer = int(t.name.split(".")[1])
            per_layer[layer] = per_layer.get(layer, 0) + int(t.n_bytes)
    n_expert = field("step35.expert_count")
    trunk = field("step35.block_count") - field("step35.nextn_predict_layers")
    bytes_ = [per_layer[i] // n_expert for i in sorted(per_layer) if i < trunk]
    return len(r.fields["tokenizer.ggml.tokens"].data), field("step35.expert_used_count"), bytes_, n_expert


def _run(program: Path, model: Path, tmp: Path, n_batch: int, cache_mib: float | None = None,
         experts_on_gpu: bool = False) -> Run:
    env = dict(os.environ, GGML_VK_VISIBLE_DEVICES="0")
    env.pop("LLAMA_EXPERT_CACHE_MIB", None)
    if cache_mib:
        env["LLAMA_EXPERT_CACHE_MIB"] = f"{cache_mib:.6f}"
    out = tmp / f"logits-{n_batch}-{cache_mib}-{experts_on_gpu}.f32"
    done = subprocess.run([str(program), str(model), PROMPT, str(n_batch), str(N_PREDICT), str(out),
                           str(int(experts_on_gpu))], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    tokens, counters = done.stdout.strip().splitlines()
    n_vocab = _facts(model)[0]
    names = ("rows", "hits", "misses", "copies", "bytes", "n_layers", "n_slots")
    return Run([int(t) for t in tokens.split()], np.fromfile(out, dtype=np.float32).reshape(-1, n_vocab),
               None if counters == "none" else dict(zip(names, map(int, counters.split()))))


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean KL(P || Q) over the rows, in float64."""
    def log_softmax(x):
        x = x.astype(np.float64) - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    p, q = log_softmax(p_logits), log_softmax(q_logits)
    return float((np.exp(p) * (p - q)).sum(axis=1).mean())


def _cache_mib(model: Path, slots: int) -> float:
    """The budget that gives every MoE layer `slots` slots (and its slot of zeros)."""
    return (slots + 1) * sum(_facts(model)[2]) / 2**20


def _agreeing_rows(ref: Run, other: Run) -> int:
    """Logit rows both runs computed on the same tokens: all of them when the greedy tokens
    agree; else up to where they part, which must be a tie in `ref`'s own logits (the two
    tokens within TIE), since the device rounds differently from the CPU."""
    n_prompt = len(ref.logits) - N_PREDICT
    for i, (mine, theirs) in enumerate(zip(ref.tokens, other.tokens)):
        if mine != theirs:
            row = ref.logits[n_prompt - 1 + i]      # the logits that chose token i
            assert abs(row[mine] - row[theirs]) <= TIE, (i, mine, theirs, row[mine], row[theirs])
            return n_prompt + i
    return len(ref.logits)


def test_cached_steps_give_the_uncached_tokens_and_count_every_routed_expert(program, model, tmp_path):
    """Prompt in batches of 4 (as MTP verifies), then single steps."""
    _, top_k, expert_bytes, _ = _facts(model)
    off = _run(program, model, tmp_path, 4)
    on = _run(program, model, tmp_path, 4, cache_mib=_cache_mib(model, SLOTS))
    device = _run(program, model, tmp_path, 4, experts_on_gpu=True)
    assert off.counters is None and device.counters is None
    same = _agreeing_rows(off, on)
    yardstick = _kl(off.logits[:_agreeing_rows(off, device)], device.logits[:_agreeing_rows(off, device)])
    cached = _kl(off.logits[:same], on.logits[:same])
    assert cached <= yardstick + ROUNDING_SLACK, (cached, yardstick)

    c = on.counters
    assert c["n_layers"] == len(expert_bytes) and c["n_slots"] == SLOTS
    assert c["rows"] == len(off.logits) * top_k * len(expert_bytes)   # every position, every MoE layer
    assert c["hits"] + c["misses"] == c["rows"]
    assert len(set(expert_bytes)) == 1 and c["bytes"] == c["copies"] * expert_bytes[0]
    assert c["hits"] > 0 and 0 < c["copies"] <= c["misses"]
    assert c["copies"] > SLOTS * len(expert_bytes)   # slots were taken back: evictions ran


def test_every_expert_fits_when_the_budget_holds_them_all(program, model, tmp_path):
    """A budget above the model's experts gives each layer as many slots as experts, no more."""
    n_expert = _facts(model)[3]
    on = _run(program, model, tmp_path, 4, cache_mib=_cache_mib(model, 3 * n_expert))
    assert on.counters["n_slots"] == n_expert
    assert on.counters["copies"] <= n_expert * on.counters["n_layers"]   # each copied once at most


def test_prompt_batches_take_the_plain_path(program, model, tmp_path):
    """A prompt of 32 tokens or more in one batch is not routed through the cache (op offload
    may stream the experts to the device then); the steps after it are."""
    _, top_k, expert_bytes, _ = _facts(model)
    off = _run(program, model, tmp_path, 256)
    on = _run(program, model, tmp_path, 256, cache_mib=_cache_mib(model, SLOTS))
    n_prompt = len(off.logits) - N_PREDICT
    assert 32 <= n_prompt <= 256
    assert np.array_equal(on.logits[:n_prompt], off.logits[:n_prompt])
    _agreeing_rows(off, on)
    assert on.counters["rows"] == N_PREDICT * top_k * len(expert_bytes)


def test_a_server_with_the_plans_cache_answers_as_without_it(runtime, workdir, monkeypatch):
    """The plan hands llama-server the cache (its environment and --no-repack) on a machine
    whose GPU holds the rest of the model and most experts: two slots' answers are the uncached
    ones, MTP drafting included, and the counters the server logs (what `run --json` reports)
    add up.
    Flash attention off: with experts in system memory it corrupts the heap on llvmpipe, in
    stock llama.cpp too (test_device.FA_CRASH)."""
    from step_gguf import plan as P
    from step_gguf.pipeline.source_facts import read_facts
    from step_gguf.runtime import server

    monkeypatch.setenv("GGML_VK_VISIBLE_DEVICES", "0")
    model = workdir / "scripted-int8.gguf"
    if not model.exists():
        quantize(scripted_checkpoint(workdir / "scripted"), model, load_recipe("int8"))
    facts = read_facts(model)
    machine = P.machine("custom", ram_gb=8, mem_bw_gbs=20, vram_gb=0.012, gpu_bw_gbs=50)
    replies, counters = {}, {}
    for cache in ("off", 240_000):
        p = P.plan(facts, machine, 4096, n_ubatch=64, kv_type="f16", checkpoints=0, parallel=2,
                   expert_cache=cache)
        assert p.cpu_tensors and p.mtp
        with server.running(model, plan=p, extra_args=["-fa", "off"]) as r, ThreadPoolExecutor(2) as pool:
            asks = ["Hello", "What is the weather?"]   # two slots at once: batches of both
            replies[cache] = list(pool.map(
                lambda ask: server.chat(r.url, [{"role": "user", "content": ask}], max_tokens=12), asks))
            counters[cache] = r.expert_cache() if p.expert_cache else None
    assert [a.text for a in replies[240_000]] == [a.text for a in replies["off"]]
    assert replies["off"][0].draft_tokens > 0
    c = counters[240_000]
    assert counters["off"] is None and c["routed"] > 0 and c["hits"] + c["misses"] == c["routed"]
    assert c["copies"] > 0 and c["bytes_copied"] == c["copies"] * _facts(model)[2][0]
