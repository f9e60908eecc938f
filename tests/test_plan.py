"""The placement planner against numbers computed by hand for the real 196B config."""

import json
import re

import pytest
from click.testing import CliRunner

from step_gguf import plan as P
from step_gguf.cli import main
from step_gguf.core.errors import StepGGUFError
from step_gguf.pipeline.source_facts import read_facts

GiB = 1 << 30
# one cached position of one layer, f16: K and V, 8 KV heads x 128 dims x 2 bytes
POS = 2 * 8 * 128 * 2
# per routed-expert tensor of the real model: 288 experts x 1280 x 4096 weights
EXPERT_WEIGHTS = 288 * 1280 * 4096
Q4_K, Q5_K = EXPERT_WEIGHTS // 256 * 144, EXPERT_WEIGHTS // 256 * 176


@pytest.fixture(scope="module")
def real(real_config):
    return read_facts(real_config)   # priced under int4-mixed, from the config alone


@pytest.mark.parametrize("ctx, expected", [
    # 12 full-attention layers keep every position; 33 sliding layers keep the 512-token window
    # plus one 512-token micro-batch (llama.cpp's window-sized cache, padded to 256)
    (32768, 12 * 32768 * POS + 33 * 1024 * POS),      # 1.63 GiB
    (131072, 12 * 131072 * POS + 33 * 1024 * POS),    # 6.13 GiB
])
def test_kv_bytes_of_the_real_model(real, ctx, expected):
    assert P.kv_bytes(real, range(45), ctx, "f16", 512) == expected
    assert P.plan(real, P.machine("cpu", ram_gb=512), ctx, kv_type="f16").kv_bytes == expected


def test_bytes_per_class_at_int4_mixed(real):
    by_class: dict[str, int] = {}
    for t in real.tensors:
        by_class[real.kind(t)] = by_class.get(real.kind(t), 0) + t.bytes
    # 42 MoE layers: gate and up Q4_K everywhere, down Q5_K on the first and last quarter of
    # the trunk (layers 3-11 and 32-44: 22 layers) and Q4_K on the 20 between
    assert by_class["experts"] == 42 * 2 * Q4_K + 22 * Q5_K + 20 * Q4_K
    # embeddings: 128896 x 4096 in Q8_0 (34 bytes per 32 weights)
    assert by_class["embeddings"] == 128896 * 4096 // 32 * 34
    # output: 128896 x 4096 in Q6_K (210 bytes per 256) plus the F32 output norm
    assert by_class["output"] == 128896 * 4096 // 256 * 210 + 4096 * 4
    # the three MTP blocks are dense decoder layers (moe_layers stops at 44)
    assert set(by_class) == {"experts", "embeddings", "output", "attention", "dense", "shared",
                             "router", "norms", "mtp"}
    share = by_class["experts"] / sum(by_class.values())
    assert 0.93 < share < 0.97


def test_what_lands_on_a_24gb_card_at_64k(real):
    p = P.plan(real, P.machine("gpu-24gb"), 65536, expert_cache="off")
    gpu, cpu = p.devices
    assert p.kv_type == "f16"   # 3.1 GiB is under a sixth of the card
    usable = int(24 * GiB * 0.95) - (512 << 20)
    assert gpu.capacity == usable
    kv = 12 * 65536 * POS + 33 * 1024 * POS
    kv_mtp = 3 * 65536 * POS          # the MTP blocks are full-attention layers
    # per context: the f16 attention masks (full layers: 64K cells, sliding: 512 + 512) copied
    # to the device, then the widest activations
    masks = 2 * 512 * (65536 + 1024)
    compute = masks + 4 * 512 * (3 * 8 * 1280 + 3 * 96 * 128 + 9 * 4096)
    assert gpu.extra == {"kv": kv, "kv_mtp": kv_mtp, "compute": compute, "compute_mtp": compute}
    # the masks, token embeddings and positions stay in system memory too (the heads' graph
    # takes the trunk's hidden state on the device)
    assert cpu.extra["compute_host"] == masks + 3 * 4 * 4096 * 512
    assert cpu.extra["compute_host_mtp"] == masks
    # every non-expert tensor but the embeddings goes first, the MTP blocks among them
    fixed = sum(t.bytes for t in real.tensors
                if real.kind(t) not in ("experts", "embeddings"))
    assert {t.name for t in gpu.tensors if real.kind(t) != "experts"} == \
        {t.name for t in real.tensors if real.kind(t) not in ("experts", "embeddings")}
    # then whole MoE layers in order: layers 3-11 hold Q5_K down + 2 x Q4_K gate/up
    room = usable - fixed - kv - kv_mtp - 2 * compute
    per_layer = Q5_K + 2 * Q4_K
    n_layers = room // per_layer
    # what is left takes layer 7's down experts (Q5_K), and no second tensor fits
    assert n_layers == 4 and Q5_K <= room - 4 * per_layer < Q5_K + Q4_K
    on_gpu = {t.name for t in gpu.tensors if real.kind(t) == "experts"}
    assert on_gpu == {f"blk.{i}.ffn_{w}_exps.weight" for i in range(3, 7)
                      for w in ("gate", "up", "down")} | {"blk.7.ffn_down_exps.weight"}
    assert {t.name for t in cpu.tensors} == \
        {t.name for t in real.tensors if real.kind(t) in ("experts", "embeddings")} - on_gpu


def test_server_args_keep_exactly_the_planned_tensors_on_the_cpu(real):
    p = P.plan(real, P.machine("gpu-24gb"), 65536, expert_cache="off")
    args = p.server_args("m.gguf")
    assert args.count("-ot") == 1  # comma-separated: llama.cpp warns on a repeated -ot
    pats = [re.compile(o.rsplit("=", 1)[0]) for o in args[args.index("-ot") + 1].split(",")]
    assert len(pats) > 1
    matched = {t.name for t in real.tensors if any(r.search(t.name) for r in pats)}
    assert matched == set(p.cpu_tensors)
    assert args[args.index("-ngl") + 1] == str(45 + 3 + 1)
    assert args[args.index("--spec-type") + 1] == "draft-mtp"
    assert args[args.index("--spec-draft-n-max") + 1] == "3"


def test_refuses_a_machine_the_model_cannot_fit(real, real_config):
    # 12 GB GPU + 64 GB RAM: about 68 GiB usable for 111 GiB of weights
    with pytest.raises(StepGGUFError, match=r"does not fit gpu-12gb: it needs 1\d\d\.\d\d GiB"):
        P.plan(real, P.machine("gpu-12gb"), 32768)
    r = CliRunner().invoke(main, ["plan", str(real_config), "--profile", "gpu-12gb"])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    assert "does not fit" in r.output


def test_long_context_quantizes_the_cache_where_f16_does_not_fit(real):
    p = P.plan(real, P.machine("dgx-spark"), 131072)
    assert p.kv_type == "q8_0" and p.notes
    with pytest.raises(StepGGUFError, match="does not fit"):
        P.plan(real, P.machine("dgx-spark"), 131072, kv_type="f16")


def test_unified_memory_shares_one_pool(real):
    p = P.plan(real, P.machine("dgx-spark"), 32768)
    _, usable_ram = P.usable(P.machine("dgx-spark"))
    assert sum(d.bytes for d in p.devices) <= usable_ram
    args = p.server_args("m.gguf")
    assert args[args.index("--load-mode") + 1] == "none" and "--no-mmap" not in args


def test_cpu_only_has_no_overrides_and_reads_less_with_fewer_experts(real):
    p = P.plan(real, P.machine("cpu"), 8192)
    assert len(p.devices) == 1 and p.gpu_layers == 0 and "-ot" not in p.server_args("m")
    # decode reads the non-expert weights plus top_k / n_expert = 8/288 of the experts
    read = sum(t.bytes * (8 / 288 if real.kind(t) == "experts" else 1)
               for t in real.tensors if real.kind(t) not in ("mtp", "embeddings")) \
        + 128896 * 4096 // 32 * 34 / 128896
    bw = P.machine("cpu").mem_bw * P.CPU_EFFICIENCY
    assert p.predicted_decode_tps == pytest.approx(1 / (read / bw + 45 * P.CPU_LAYER_S), rel=1e-9)


def test_custom_profile_needs_its_figures():
    with pytest.raises(StepGGUFError, match="--ram and --mem-bw"):
        P.machine("custom")
    with pytest.raises(StepGGUFError, match="unknown profile"):
        P.machine("gpu-7gb")
    m = P.machine("custom", ram_gb=32, mem_bw_gbs=20, vram_gb=8, gpu_bw_gbs=300)
    assert m.vram == 8 * GiB and m.gpu_bw == 300e9


def test_plan_json_from_a_gguf(gguf_file):
    r = CliRunner().invoke(main, ["plan", str(gguf_file("tiny", "bf16")), "--profile", "custom",
                                  "--ram", "1", "--mem-bw", "10", "--vram", "0.5", "--gpu-bw",
                                  "100", "-c", "256", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert {"kv_bytes", "devices", "predicted_decode_tps", "server_args"} <= set(out)
    assert out["server_args"][:2] == ["-m", str(gguf_file("tiny", "bf16"))]
    names = [n for d in out["devices"] for n in d["tensors"]]
    assert len(names) == len(set(names))   # each tensor placed once


def _hosts(*gib: float) -> tuple[P.RpcHost, ...]:
    return tuple(P.RpcHost(f"10.0.0.{i + 2}:50052", int(g * GiB), 75e9) for i, g in enumerate(gib))


def test_rpc_hosts_take_the_layers_a_cpu_machine_cannot_hold(real):
    n_all = 45 + 3
    machine = P.machine("cpu", ram_gb=64)
    with pytest.raises(StepGGUFError, match="does not fit cpu"):
        P.plan(real, machine, 32768)
    p = P.plan(real, machine, 32768, rpc=_hosts(64, 64))
    cpu, *hosts = p.devices
    # this machine keeps the first layers, filled up; the hosts take the rest in order, the
    # second only what the first cannot hold, and the last one the output layer too
    assert all(d.bytes <= d.capacity for d in p.devices)
    assert sorted(cpu.kv_layers) == list(range(len(cpu.kv_layers))) and cpu.free < 3 * GiB
    assert [h.endpoint for h in hosts] == p.rpc == ["10.0.0.2:50052", "10.0.0.3:50052"]
    assert min(hosts[0].kv_layers) == len(cpu.kv_layers) and max(hosts[1].kv_layers) == n_all - 1
    assert any(t.name == "output.weight" for t in hosts[1].tensors)
    assert p.tensor_split == [len(hosts[0].kv_layers), len(hosts[1].kv_layers) + 1]
    assert p.gpu_layers == sum(p.tensor_split) == n_all + 1 - len(cpu.kv_layers)
    placed = [t.name for d in p.devices for t in d.tensors]
    assert sorted(placed) == sorted(t.name for t in real.tensors)
    args = p.server_args("m.gguf")
    assert args[args.index("--rpc") + 1] == "10.0.0.2:50052,10.0.0.3:50052"
    assert args[args.index("--tensor-split") + 1] == ",".join(map(str, p.tensor_split))
    # the network costs every token a round trip per host and the logits from the last
    alone = P.plan(real, P.machine("cpu", ram_gb=256), 32768)
    assert p.predicted_decode_tps < alone.predicted_decode_tps
    with pytest.raises(StepGGUFError, match=r"with 2 RPC host\(s\)"):
        P.plan(real, machine, 32768, rpc=_hosts(8, 8))


def test_rpc_hosts_take_the_first_layers_before_a_gpu(real):
    p = P.plan(real, P.machine("gpu-24gb", ram_gb=64), 32768, rpc=_hosts(48))
    gpu, cpu, host = p.devices
    n_all = 45 + 3
    # llama.cpp orders layers: CPU, RPC hosts, GPU; with a GPU every layer is offloaded and the
    # host holds the first ones whole, experts and all
    assert p.gpu_layers == n_all + 1 and sorted(host.kv_layers) == list(range(len(host.kv_layers)))
    assert p.tensor_split == [len(host.kv_layers), n_all + 1 - len(host.kv_layers)]
    assert not cpu.kv_layers and p.cpu_tensors
    assert all(real.kind(t) == "experts" and t.layer >= len(host.kv_layers) for t in cpu.tensors
               if not t.name.startswith("token_embd"))
    assert all(d.bytes <= d.capacity for d in p.devices)


def test_rpc_hosts_stay_unused_when_the_model_fits(real):
    p = P.plan(real, P.machine("cpu"), 32768, rpc=_hosts(64))
    assert not p.rpc and "--rpc" not in p.server_args("m") and "fits this machine" in p.notes[-1]


def test_a_context_above_the_models_keeps_every_note(real):
    """Capped at the model's context, the plan still says why its cache is q8_0."""
    p = P.plan(real, P.machine("gpu-24gb"), 2 * real.n_ctx_train)
    assert p.ctx == real.n_ctx_train and p.kv_type == "q8_0"
    assert any("context capped" in n for n in p.notes)
    assert any("KV cache in q8_0" in n for n in p.notes)


def test_a_failed_local_fit_leaves_no_note_in_the_rpc_plan(real):
    """A GPU too small for the non-expert weights, too little RAM: the hosts take the first
    layers and the GPU runs the rest, so no note may say that everything runs on the CPU."""
    machine = P.machine("custom", vram_gb=6, gpu_bw_gbs=500, ram_gb=48, mem_bw_gbs=80)
    p = P.plan(real, machine, 32768, rpc=_hosts(64, 64))
    assert [d.name for d in p.devices][:2] == ["GPU", "CPU"] and p.rpc
    assert not any("everything runs on the CPU" in n for n in p.notes), p.notes


def test_longest_context_on_a_24gb_card(real):
    """Without --ctx, serve/run/chat plan the longest context the machine holds: on a 24 GB card
    with 128 GB of RAM the real model gets at least 64K (here its whole 256K, in q8_0), and
    every device stays within what the profile gives it."""
    machine = P.machine("gpu-24gb")
    p = P.longest(real, machine)
    assert p.ctx >= 65536 and p.ctx % 256 == 0
    assert all(d.bytes <= d.capacity for d in p.devices)
    gpu, cpu = p.devices
    assert gpu.bytes <= machine.vram and cpu.bytes <= machine.ram
    if p.ctx < real.n_ctx_train:  # the longest: 256 tokens more would not fit
        with pytest.raises(StepGGUFError):
            P.plan(real, machine, p.ctx + 256)


def test_longest_context_stops_where_memory_does(real):
    """On a CPU machine whose RAM ends before the model's context does, the chosen context
    fits and the next step of 256 does not."""
    machine = P.machine("cpu")
    p = P.longest(real, machine)
    assert 4096 <= p.ctx < real.n_ctx_train
    assert sum(d.bytes for d in p.devices) <= P.usable(machine)[1]
    with pytest.raises(StepGGUFError):
        P.plan(real, machine, p.ctx + 256)


def test_serve_by_default_gives_several_slots_each_an_agents_context(real):
    """serve's default on a 24 GB card: as many slots as fit (up to MAX_SLOTS) while each keeps
    SLOT_CTX, at the longest context that leaves them that, within the profile's memory."""
    machine = P.machine("gpu-24gb")
    p = P.serving(real, machine)
    assert p.parallel == P.MAX_SLOTS and p.ctx >= P.SLOT_CTX >= 65536
    assert all(d.bytes <= d.capacity for d in p.devices)
    assert p.kv_bytes == P.kv_bytes(real, range(real.n_layer), p.ctx, p.kv_type, p.n_ubatch, p.parallel)
    assert ["-c", str(p.ctx * p.parallel)] == p.server_flags()[:2] and "-np" in p.server_flags()
    # a machine too small for two slots of SLOT_CTX serves one, at its longest context
    small = P.machine("cpu", ram_gb=124)
    cpu = P.serving(real, small)
    assert cpu.parallel == 1 and cpu.ctx == P.longest(real, small).ctx
