"""A plan applied by the wrapper: the overrides reach llama.cpp, outputs do not change, and the
sliding-window cache is window-sized, all read back from the loaded model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from step_gguf import plan as P
from step_gguf.pipeline.source_facts import read_facts


def _half_the_experts_fit(m: P.ModelFacts, ctx: int) -> P.Plan:
    """A custom GPU machine whose usable memory holds everything but half the routed experts."""
    everything = P.plan(m, P.machine("custom", ram_gb=4, mem_bw_gbs=10, vram_gb=4, gpu_bw_gbs=100),
                        ctx)
    gpu = everything.devices[0]
    experts = sum(t.bytes for t in gpu.tensors if m.kind(t) == "experts")
    usable = gpu.bytes - experts // 2
    # usable = vram * (1 - margin) - vram / 8 on a machine this small
    vram = usable / (1 - P.GPU_MARGIN - 1 / 8) / P.GiB
    p = P.plan(m, P.machine("custom", ram_gb=4, mem_bw_gbs=10, vram_gb=vram, gpu_bw_gbs=100), ctx)
    assert 0 < len(p.cpu_tensors) < len([t for t in m.tensors if m.kind(t) == "experts"])
    return p


def test_overrides_reach_llama_cpp_and_leave_outputs_unchanged(runtime, gguf_file):
    from step_gguf.runtime import llama

    path = gguf_file("tiny", "bf16")
    p = _half_the_experts_fit(read_facts(path), 256)
    tokens = list(range(5, 37))
    with llama.load(path, plan=p, logits_all=True) as placed:
        # llama.cpp reports each tensor an override placed: exactly the plan's CPU experts
        assert set(placed.overridden) == set(p.cpu_tensors)
        with_plan = placed.logits(tokens)
    with llama.load(path, plan=dataclasses.replace(p, cpu_tensors=[]), logits_all=True) as plain:
        assert plain.overridden == {}
        without = plain.logits(tokens)
    assert np.array_equal(with_plan, without)


@pytest.mark.parametrize("swa_full", [False, True])
def test_sliding_window_cache_is_window_sized(runtime, gguf_file, swa_full):
    from step_gguf.runtime import llama

    path = gguf_file("tiny", "bf16")
    m = read_facts(path)
    ctx = 4096
    with llama.load(path, n_ctx=ctx, swa_full=swa_full) as model:
        caches = sorted(model.kv_caches, key=lambda c: c.cells)
    n_swa = sum(m.is_swa[:m.n_layer])
    assert sum(c.layers for c in caches) == m.n_layer
    window = P.kv_positions(m, m.is_swa.index(True), ctx, 512)
    if swa_full:
        assert all(c.cells == ctx for c in caches)
    else:
        # the 16-token window plus one 512-token micro-batch, padded to 256: 768 cells
        assert [(c.cells, c.layers) for c in caches] == [(window, n_swa), (ctx, m.n_layer - n_swa)]
        # and the planner's arithmetic is what llama.cpp allocated (its log rounds to 0.01 MiB)
        assert sum(c.bytes for c in caches) == pytest.approx(
            P.kv_bytes(m, range(m.n_layer), ctx, "f16", 512), abs=2 * 0.005 * 2**20)


@pytest.mark.parametrize("slots", [1, 3])
def test_every_slots_cache_is_what_the_planner_counts(runtime, gguf_file, tmp_path, slots):
    """llama-server with the plan's flags for `slots` slots of the model's whole context
    allocates, by its own log, the KV cache the planner counted: a stream per slot."""
    from step_gguf.runtime import llama, server

    path = gguf_file("tiny", "bf16")
    m = read_facts(path)
    p = P.plan(m, P.machine("cpu", ram_gb=16), m.n_ctx_train, mtp=False, parallel=slots)
    log = tmp_path / "server.log"
    with server.serve(path, plan=p, log_path=log, extra_args=["-lv", "4"]):  # info: the cache sizes
        pass
    caches = [llama.KVCache(int(g.group(2)), int(g.group(3)), round(float(g.group(1)) * 2**20))
              for g in map(llama._KV_LINE.search, log.read_text().splitlines()) if g]
    assert sum(c.layers for c in caches) == m.n_layer
    assert all(c.cells == p.ctx for c in caches)  # cells of one slot's stream
    assert sum(c.bytes for c in caches) == pytest.approx(p.kv_bytes, abs=2 * 0.005 * 2**20)
