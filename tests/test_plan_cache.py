"""The planner's routed-expert cache (patch 0021) on the real 196B config: sized where it predicts
a faster decode, off where it cannot pay, a fixed size honoured or refused in one line, and
carried to llama-server as its environment and flags."""

import json
import math

import pytest

from cli_checks import PLAN_ARGS, cli, one_line_error
from step_gguf import plan as P
from step_gguf.core.errors import StepGGUFError
from step_gguf.core.gguf_names import is_routed
from step_gguf.pipeline.source_facts import read_facts
from step_gguf.plan.expert_cache import LOCALITY, MIN_GAIN

GiB, MiB = 1 << 30, 1 << 20
CTX = 65536


@pytest.fixture(scope="module")
def real(real_config):
    return read_facts(real_config)   # priced under int4-mixed, from the config alone


def _gpu_cpu(p: P.Plan):
    return (next(d for d in p.devices if d.name == n) for n in ("GPU", "CPU"))


def test_a_24gb_card_gives_the_cache_the_room_that_predicts_the_fastest_decode(real):
    off = P.plan(real, P.machine("gpu-24gb"), CTX, expert_cache="off")
    on = P.plan(real, P.machine("gpu-24gb"), CTX)
    c = on.expert_cache
    assert off.expert_cache is None and c is not None
    assert on.predicted_decode_tps >= MIN_GAIN * off.predicted_decode_tps
    assert c.speedup == pytest.approx(on.predicted_decode_tps / off.predicted_decode_tps)
    gpu, cpu = _gpu_cpu(on)
    assert gpu.extra["expert_cache"] == c.bytes and c.bytes % MiB == 0
    assert gpu.bytes <= gpu.capacity and cpu.bytes <= cpu.capacity
    # the share is of the experts left in system memory, the hit rate its published curve
    in_ram = sum(t.bytes for t in cpu.tensors if is_routed(t.name))
    assert c.share == pytest.approx(c.bytes / in_ram)
    assert c.hit_rate == pytest.approx(c.share ** LOCALITY)
    # experts it displaced from the GPU went to system memory, and llama-server is told so
    assert set(off.cpu_tensors) <= set(on.cpu_tensors)
    assert len(on.cpu_tensors) - len(off.cpu_tensors) == c.displaced
    assert "--no-repack" in on.server_args("m.gguf") and "--no-repack" not in off.server_args("m.gguf")
    env = on.server_env()
    assert float(env["LLAMA_EXPERT_CACHE_MIB"]) * MiB == c.bytes
    assert float(env["LLAMA_EXPERT_CACHE_LINK_BW"]) == P.machine("gpu-24gb").link_bw
    assert off.server_env() == {}


def test_a_slow_link_turns_the_cache_off(real):
    """A PCIe 3.0 x4 eGPU: copies cost more than the hits save (llama.cpp #29887 measured
    35 -> 1-8 tok/s with a cache there); a size asked for is still given, and predicted slower."""
    egpu = P.machine("gpu-24gb", link_bw_gbs=3.5)
    assert P.plan(real, egpu, CTX).expert_cache is None
    forced = P.plan(real, egpu, CTX, expert_cache=4 * GiB)
    assert forced.expert_cache.bytes == 4 * GiB and forced.expert_cache.speedup < 1


def test_a_fixed_size_is_given_or_refused_in_one_line(real):
    p = P.plan(real, P.machine("gpu-24gb"), CTX, expert_cache=2 * GiB)
    assert p.expert_cache.bytes == 2 * GiB
    with pytest.raises(StepGGUFError, match="more than the GPU can free"):
        P.plan(real, P.machine("gpu-24gb"), CTX, expert_cache=200 * GiB)
    # one memory pool: nothing to copy; auto leaves it off, a size is refused
    assert P.plan(real, P.machine("dgx-spark"), CTX).expert_cache is None
    with pytest.raises(StepGGUFError, match="discrete GPU"):
        P.plan(real, P.machine("dgx-spark"), CTX, expert_cache=2 * GiB)
    assert P.plan(real, P.machine("cpu"), CTX).expert_cache is None   # no GPU at all


def test_runs_refine_the_locality_curve():
    assert P.Locality.fitted([(0.25, 0.67)]).exponent == pytest.approx(math.log(0.67) / math.log(0.25))
    assert P.Locality.fitted([(0.25, 0.67), (0.5, 0.8)]).exponent == pytest.approx(
        (math.log(0.67) / math.log(0.25) + math.log(0.8) / math.log(0.5)) / 2)
    # a run that says nothing about the curve (all hits, no cache) leaves the published one
    assert P.Locality.fitted([(1.0, 1.0), (0.0, 0.0)]).exponent == LOCALITY
    assert P.Locality().hit_rate(0) == 0 and P.Locality().hit_rate(2) == 1


def test_the_plan_command_takes_the_cache_size(real_config):
    r = cli("plan", real_config, "--profile", "gpu-24gb", "-c", "32768", "--expert-cache", "3GiB", "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    assert got["expert_cache"]["bytes"] == 3 * GiB and "--no-repack" in got["server_args"]
    assert float(got["server_env"]["LLAMA_EXPERT_CACHE_MIB"]) == 3072
    off = json.loads(cli("plan", real_config, "--profile", "gpu-24gb", "--expert-cache", "off", "--json").output)
    assert off["expert_cache"] is None and off["server_env"] == {}
    one_line_error(cli("plan", real_config, *PLAN_ARGS, "--expert-cache", "lots"), "--expert-cache")
