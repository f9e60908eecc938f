"""`quantize --for`: the largest file the planner fits on a machine at a context (or the largest
that still decodes at a speed), made by budget mode; what the file records of its machine, and
run/serve taking its context from it.

Machines are custom profiles scaled to the `small` synthetic model (tens of MiB); the real
config is sized from shapes alone (--dry-run)."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from cli_checks import cli, one_line_error
from step_gguf import plan as P
from step_gguf.core.recipe import load_recipe
from step_gguf.plan.sizing import Demand, largest, verdict

# the small model's machine: ~50 MiB of system memory, no GPU; the same with a small GPU
MACHINE = ["--for", "custom", "--ram", "0.06", "--mem-bw", "10"]
GPU_MACHINE = ["--for", "custom", "--ram", "0.3", "--mem-bw", "10", "--vram", "0.045", "--gpu-bw", "100"]
CTX = 1024      # the small model's own context


def _figures(args: list[str]) -> dict:
    """The machine figures of `--for custom --ram R ...` as the command line hands them on."""
    from step_gguf.cli.planning import FIGURES

    return dict.fromkeys(FIGURES) | {a.removeprefix("--").replace("-", "_"): float(v)
                                     for a, v in zip(args[2::2], args[3::2])}


def _machine(args: list[str]) -> P.Profile:
    from step_gguf.cli.planning import profile_machine

    return profile_machine("custom", _figures(args))


@pytest.fixture(scope="module")
def sizes(small_src):
    from step_gguf.pipeline.machine_fit import even_sizes

    return even_sizes(small_src, load_recipe("int4-mixed"))


def _grown(m, name: str, extra: int):
    """The facts of `m` with tensor `name` `extra` bytes larger."""
    return replace(m, tensors=tuple(replace(t, bytes=t.bytes + extra) if t.name == name else t
                                    for t in m.tensors))


def test_a_larger_machine_never_gets_a_smaller_file(sizes):
    """System memory from 60 to 300 MiB, then GPUs from 46 to 200 MiB beside 300 MiB: the size
    chosen never falls, and grows somewhere along each line."""
    chosen = []
    for ram in (0.06, 0.07, 0.08, 0.1, 0.3):
        chosen.append(largest(sizes.facts_at, Demand(P.machine("custom", ram_gb=ram, mem_bw_gbs=10), CTX),
                              sizes.smallest, sizes.largest).budget)
    assert chosen == sorted(chosen) and chosen[0] < chosen[-1], chosen
    gpus = [largest(sizes.facts_at, Demand(P.machine("custom", ram_gb=0.3, mem_bw_gbs=10, vram_gb=v, gpu_bw_gbs=100), CTX),
                    sizes.smallest, sizes.largest).budget for v in (0.045, 0.05, 0.1, 0.2)]
    assert gpus == sorted(gpus) and gpus[0] < gpus[-1], gpus


def test_the_bound_that_binds_is_named(sizes):
    """System memory on a CPU machine, the GPU where it cannot keep the non-expert weights,
    speed under --min-decode, nothing where every best type fits."""
    def bound(machine, **kw):
        return largest(sizes.facts_at, Demand(machine, CTX, **kw), sizes.smallest, sizes.largest)

    assert bound(_machine(MACHINE)).bound == "system memory"
    assert bound(_machine(GPU_MACHINE)).bound == "GPU"
    assert bound(P.machine("custom", ram_gb=4, mem_bw_gbs=10)).bound == "nothing"
    free = bound(P.machine("custom", ram_gb=4, mem_bw_gbs=0.5))
    slow = bound(P.machine("custom", ram_gb=4, mem_bw_gbs=0.5), min_decode=free.plan.predicted_decode_tps * 1.2)
    assert slow.bound == "speed" and slow.budget < free.budget
    assert slow.plan.predicted_decode_tps >= free.plan.predicted_decode_tps * 1.2


def test_too_small_a_machine_is_refused_naming_what_would_fit(real_config, tmp_path):
    """The real model on 48 GiB: not even its cheapest file fits; the line names the memory that
    would. At 128K on a machine that holds the cheapest file only at a shorter context, it names
    that context, and the context it names does fit."""
    out = tmp_path / "x.gguf"
    line = one_line_error(cli("quantize", real_config, "--dry-run", "--for", "custom", "--ram", "48",
                              "--mem-bw", "80", "--ctx", "131072"), "even with every tensor at its cheapest")
    assert "does not fit" in line and "GiB of system memory" in line
    from step_gguf.pipeline.machine_fit import even_sizes

    sizes = even_sizes(real_config, load_recipe("int4-mixed"))
    cheapest = sizes.facts_at(sizes.smallest)
    # the system memory holding the cheapest file at 4K and half of what 4K -> 128K adds (the
    # KV cache in q8_0, as the planner falls back to where f16 does not fit), with its margins
    at = {n: P.plan(cheapest, P.machine("custom", ram_gb=1024, mem_bw_gbs=80), n, kv_type="q8_0").devices[0].bytes
          for n in (4096, 131072)}
    ram = ((at[4096] + (at[131072] - at[4096]) / 2) / P.GiB + 4) / (1 - P.RAM_MARGIN)
    with pytest.raises(Exception) as refused:
        largest(sizes.facts_at, Demand(P.machine("custom", ram_gb=ram, mem_bw_gbs=80), 131072),
                sizes.smallest, sizes.largest)
    shorter = int(re.search(r"--ctx (\d+)", str(refused.value)).group(1))
    assert 4096 < shorter < 131072
    assert isinstance(verdict(cheapest, Demand(P.machine("custom", ram_gb=ram, mem_bw_gbs=80), shorter)), P.Plan)
    assert not out.exists()


def test_dry_run_prices_every_profile_from_the_real_config(real_config):
    """`--dry-run --for all`: a row per named profile and context; a longer context never gets a
    larger file, a bigger card of the same kind never a smaller one; bits per weight as the
    size says; each row placed on the published scale."""
    result = cli("quantize", real_config, "--dry-run", "--for", "all")
    assert result.exit_code == 0, result.output
    rows = {}
    for line in result.output.splitlines():
        m = re.match(r"(\S+)\s+(\d+)\s+([\d.]+) GiB\s+([\d.]+)\s+([\d.]+)\s+(\S+ ?\S*); (between|under|over)", line)
        if m:
            rows[m.group(1), int(m.group(2))] = float(m.group(3)), float(m.group(4))
    assert len(rows) == 3 * len(P.PROFILES), result.output
    for name in P.PROFILES:
        sizes = [rows[name, n][0] for n in (32768, 65536, 131072)]
        assert sizes == sorted(sizes, reverse=True), (name, sizes)
        gib, bpw = rows[name, 65536]
        assert bpw == pytest.approx(gib * 2**30 * 8 / 199.28e9, rel=0.01)
    cards = [rows[f"gpu-{n}gb", 65536][0] for n in (12, 16, 24, 32)]
    assert cards == sorted(cards), cards


@pytest.mark.runtime
def test_a_file_made_for_a_machine_fills_it_and_runs_at_its_context(small_src, tmp_path, runtime):
    """On the CPU machine and on the one with a small GPU: the file fits with under 2% of the
    binding memory to spare, and 1% of its size more in any one tensor would not fit; it records
    its machine, whose plan (plan, run) then takes its context by default."""
    from step_gguf.pipeline.source_facts import read_facts

    for args in (MACHINE, GPU_MACHINE):
        out = tmp_path / f"for-{len(args)}.gguf"
        result = cli("quantize", small_src, "-o", out, *args, "--ctx", CTX)
        assert result.exit_code == 0, result.output
        assert "sized for custom" in result.output and "binds at 1024 tokens" in result.output
        m = read_facts(out)
        assert m.made_for is not None and (m.made_for.ctx, m.made_for.parallel) == (CTX, 1)
        machine = _machine(args)
        demand = Demand(machine, CTX)
        p = verdict(m, demand)
        assert isinstance(p, P.Plan), p
        binding = next(d for d in p.devices if d.name == ("GPU" if machine.has_gpu else "CPU"))
        if machine.has_gpu:   # what binds is the GPU's room for everything but the experts
            kept = sum(t.bytes for t in binding.tensors if m.kind(t) not in ("experts",)) + sum(binding.extra.values())
            assert binding.capacity - kept < 0.02 * binding.capacity
        else:
            assert binding.free < 0.02 * binding.capacity, (binding.free, binding.capacity)
        one_percent = sum(t.bytes for t in m.tensors) // 100
        quantized = [t for t in m.tensors if t.bytes > 0 and ("attn" in t.name or "exps" in t.name or "output" in t.name)]
        for t in quantized if not machine.has_gpu else [t for t in quantized if m.kind(t) != "experts"]:
            assert not isinstance(verdict(_grown(m, t.name, one_percent), demand), P.Plan), t.name
        plan_out = cli("plan", out, "--profile", "custom", *args[2:])
        assert plan_out.exit_code == 0 and f"ctx {CTX}," in plan_out.output, plan_out.output
        chosen = _planned(out, args)
        assert (chosen.ctx, chosen.parallel) == (CTX, 1) and "sized for" in chosen.notes[0]
    elsewhere = _planned(out, GPU_MACHINE[:2] + ["--ram", "1.0"] + GPU_MACHINE[4:])   # another machine
    assert not any("sized for" in n for n in elsewhere.notes)


def _planned(model, args: list[str]):
    """The plan `run MODEL --profile custom FIGURES` starts its server with."""
    from step_gguf.cli.planning import planned

    return planned(model, "custom", None, True, say=False, parallel=None, figures=_figures(args))


def test_for_contradictions_are_usage_errors(small_src, tmp_path):
    out = tmp_path / "x.gguf"
    for args in (["--for", "custom", "--ram", "1", "--mem-bw", "10", "--target-size", "10M"],
                 ["--for", "all"],
                 ["--for", "gpu-24gb", "--dry-run", "--json"],
                 ["--for", "gpu-24gb", "--mtp", "split"],
                 ["--ctx", "4096"],
                 ["--ram", "4"]):
        result = cli("quantize", small_src, "-o", out, *args)
        assert result.exit_code == 2, (args, result.output)
        assert not out.exists()


@pytest.mark.runtime
def test_for_this_machine_sizes_for_the_memory_the_runtime_sees(small_src, runtime):
    """`--for this` in a child process (it asks ggml for the GPUs): one row for this machine,
    which holds the small model at its best types; machine figures beside it are refused."""
    from cli_checks import cli_process

    done = cli_process("quantize", small_src, "--dry-run", "--for", "this", "--ctx", CTX)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^this\s+1024\s+[\d.]+ MiB .* nothing;", done.stdout, re.M), done.stdout
    refused = cli_process("quantize", small_src, "--dry-run", "--for", "this", "--ram", "8")
    assert refused.returncode == 2 and "--for this measures this machine" in refused.stderr
