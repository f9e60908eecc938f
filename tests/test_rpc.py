"""A model split over this machine and two ggml RPC servers on loopback: the placement the
planner chose is the one llama.cpp makes, and logits and greedy text equal the single-host run."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from step_gguf import plan as P
from step_gguf.core.errors import StepGGUFError
from step_gguf.pipeline.source_facts import read_facts

CTX, UBATCH = 256, 32
# usable share of a small machine's memory: the margin and a reserve of an eighth
USABLE = 1 - P.RAM_MARGIN - 1 / 8


@pytest.fixture(scope="module")
def hosts(runtime):
    from step_gguf.runtime import rpc

    with rpc.start(threads=1) as first, rpc.start(threads=1) as second:
        yield first, second


def _spread_over_three(m: P.ModelFacts, first: P.RpcHost, second: P.RpcHost, *,
                       mtp: bool) -> P.Plan:
    """The smallest machine that keeps some layers itself, then the smallest first host
    that takes some more, so that this machine and both hosts hold layers."""
    def attempt(ram: int, rpc: tuple) -> P.Plan | None:
        machine = P.machine("custom", ram_gb=ram / USABLE / P.GiB, mem_bw_gbs=10)
        try:
            return P.plan(m, machine, CTX, n_ubatch=UBATCH, checkpoints=0, mtp=mtp, rpc=rpc)
        except StepGGUFError:
            return None

    steps = range(64 << 10, 64 << 20, 64 << 10)
    ram = next(r for r in steps if (p := attempt(r, (second,))) and p.devices[0].kv_layers)
    for host in steps:
        p = attempt(ram, (P.RpcHost(first.endpoint, int(host / USABLE), first.bandwidth), second))
        if p is not None and len(p.devices) == 3:
            return p
    raise AssertionError("no first host makes the model spread over three devices")


def test_split_model_gives_the_single_host_logits(runtime, hosts, gguf_file):
    from step_gguf.runtime import llama, rpc

    path = gguf_file("tiny", "bf16")
    m = read_facts(path)
    asked = rpc.memory(list(hosts))
    assert set(asked) == set(hosts) and all(v > 0 for v in asked.values())
    first, second = rpc.hosts(",".join(hosts), 10e9)
    p = _spread_over_three(m, first, second, mtp=False)  # the wrapper does not draft
    cpu, h0, h1 = p.devices
    assert (cpu.name, h0.endpoint, h1.endpoint) == ("CPU", first.endpoint, second.endpoint)
    assert p.rpc == list(hosts) and p.gpu_layers == sum(p.tensor_split)
    assert all(d.bytes <= d.capacity for d in p.devices)
    # CPU first, then the hosts in order; the last host also takes the output layer
    n_all = m.n_layer + m.n_nextn
    assert sorted(cpu.kv_layers) == list(range(n_all + 1 - p.gpu_layers))
    assert max(h0.kv_layers) < min(h1.kv_layers) and max(h1.kv_layers) == n_all - 1

    tokens = list(range(5, 37))
    with llama.load(path, plan=p, logits_all=True) as split:
        placed = {int(i): dev for i, dev in
                  re.findall(r"layer +(\d+) assigned to device (\S+),", "".join(split.load_log))}
        buffers = dict(re.findall(r"load_tensors: +RPC\d+\[(\S+)\] model buffer size = +([\d.]+) MiB",
                                  "".join(split.load_log)))
        with_rpc = split.logits(tokens)
    expected = {i: "CPU" for i in cpu.kv_layers} | {i: "RPC0" for i in h0.kv_layers} | \
               {i: "RPC1" for i in h1.kv_layers} | {n_all: "RPC1"}
    assert placed == expected
    for h in (h0, h1):  # what llama.cpp allocated on each host is the plan's weights there
        assert float(buffers[h.endpoint]) == pytest.approx(h.weights / 2**20, abs=0.01)
    # the same context, batches, cache and attention kernels, all on this machine
    alone = dataclasses.replace(p, gpu_layers=0, rpc=[], tensor_split=[])
    with llama.load(path, plan=alone, logits_all=True) as local:
        single = local.logits(tokens)
    assert np.array_equal(with_rpc, single)
    # the in-process connections are gone with the model: the hosts answer others again
    assert set(rpc.memory(list(hosts))) == set(hosts)


def test_llama_server_over_rpc_answers_as_the_single_host(runtime, hosts, gguf_file):
    from step_gguf.runtime import rpc, server

    path = gguf_file("tiny", "bf16")
    m = read_facts(path)
    p = _spread_over_three(m, *rpc.hosts(",".join(hosts), 10e9), mtp=True)
    assert p.server_flags()[p.server_flags().index("--rpc") + 1] == ",".join(hosts)
    messages = [{"role": "user", "content": "hello there"}]
    replies = []
    for plan in (p, P.plan(m, P.machine("cpu"), CTX, n_ubatch=UBATCH, checkpoints=0)):
        with server.serve(path, plan=plan) as url:
            replies.append(server.chat(url, messages, max_tokens=24))
    assert replies[0].text == replies[1].text and replies[0].completion_tokens == 24


def test_unreachable_or_malformed_hosts_are_refused(runtime):
    from step_gguf.native import process
    from step_gguf.runtime import rpc

    dead = f"127.0.0.1:{process.free_port()}"
    with pytest.raises(StepGGUFError, match="cannot reach the RPC host .*step-gguf rpc-server"):
        rpc.hosts(dead, 10e9)
    for bad, why in (("localhost", "HOST:PORT"), ("a:70000", "HOST:PORT"), ("a:1=x", "GiB"),
                     ("a:1,a:1", "twice"), (",", "at least one")):
        with pytest.raises(StepGGUFError, match=why):
            rpc.parse(bad)
    assert rpc.parse("10.0.0.2:50052=64, [::1]:9") == [("10.0.0.2:50052", 64 << 30), ("[::1]:9", None)]


_AFTER_A_HOST_WENT_AWAY = """
import sys
from step_gguf.native import propagation
from step_gguf.runtime import llama, rpc

with rpc.start(threads=1) as host:
    rpc.devices([host])  # registered in this process for good, as a split load leaves it
gains = propagation.measure(sys.argv[1], " ".join(["hello there"] * 40), ctx=32)
with llama.load(sys.argv[1], n_ctx=64) as m:
    m.logits([5, 6, 7])
print(len(gains))
"""


def test_in_process_loads_outlive_a_registered_host(runtime, gguf_file):
    """llama.cpp asks every registered device when a load names none, and a host that is gone
    aborts the process: every in-process load (the wrapper, the depth gains of imatrix) names
    its devices. In a child process, so that an abort fails this test, not the whole run."""
    import subprocess
    import sys

    path = gguf_file("tiny", "q8_0")
    done = subprocess.run([sys.executable, "-c", _AFTER_A_HOST_WENT_AWAY, str(path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    n_layer = read_facts(path).n_layer
    assert done.stdout.split()[-1] == str(2 * n_layer + 2)  # embd, 2 per layer, output
