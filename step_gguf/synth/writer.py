"""Synthetic Step 3.5 checkpoints in the exact hub layout, random weights, deterministic by seed.

Every architectural feature is switched on: leading dense layers, MoE with router bias and a
shared expert, 3:1 sliding/full attention with more query heads on sliding layers, partial
RoPE with llama3 scaling on full layers, SwiGLU clamps on the last trunk layers, MTP blocks.
`wide` uses the real per-expert shapes (4096 x 1280) with few layers and experts.
"""

from __future__ import annotations

import functools
import json
import math
import os
import secrets
import shutil
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import gguf
import numpy as np

from ..core.errors import StepGGUFError
from ..core.model import Step35Config
from ..files.checkpoint import FP8_E4M3_VALUES, INDEX, fp8_scale_shape
from . import locality
from .presets import PRESETS, Preset
from .script import head_successors, scripted_weights
from .vision import IMAGE_PLACEHOLDER, VISION_CONFIG, VISION_TOKENS, projector_config, vision_tensors
from .tokenizer import model_card, tokenizer_files


def preset_config(p: Preset, seed: int) -> dict:
    """A hub-style config.json for the preset (Step3p5ForCausalLM)."""
    n_all = p.n_layer + p.n_nextn
    # 3:1 pattern, continued over the MTP layers; the seed shifts nothing structural
    layer_types = ["full_attention" if i % 4 == 0 else "sliding_attention" for i in range(n_all)]
    limits = [0.0] * n_all
    limits_shared = [0.0] * n_all
    for i in (p.n_layer - 2, p.n_layer - 1):
        limits[i], limits_shared[i] = p.swiglu
    return {
        "architectures": ["Step3p5ForCausalLM"],
        "model_type": "step3p5",
        "hidden_size": p.hidden,
        "num_hidden_layers": p.n_layer,
        "num_nextn_predict_layers": p.n_nextn,
        "vocab_size": p.vocab,
        "num_attention_heads": p.n_head,
        "num_attention_groups": p.n_kv,
        "attention_other_setting": {"num_attention_heads": p.n_head_swa, "num_attention_groups": p.n_kv},
        "head_dim": p.head_dim,
        "layer_types": layer_types,
        "sliding_window": p.window,
        "partial_rotary_factors": [1.0 if t == "sliding_attention" else 0.5 for t in layer_types],
        "rope_theta": [1e4 if t == "sliding_attention" else 5e6 for t in layer_types],
        "rope_scaling": {"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 32.0, "original_max_position_embeddings": p.rope_orig_ctx},
        "yarn_only_types": ["full_attention"],
        "max_position_embeddings": 4 * p.rope_orig_ctx,
        "intermediate_size": p.ff,
        "moe_layers_enum": ",".join(str(i) for i in range(p.n_dense, p.n_layer)),
        "moe_num_experts": p.n_expert,
        "moe_top_k": p.top_k,
        "moe_intermediate_size": p.expert_ff,
        "share_expert_dim": p.shexp_ff,
        "moe_router_activation": "sigmoid",
        "use_moe_router_bias": True,
        "norm_expert_weight": True,
        "moe_router_scaling_factor": 3.0,
        "swiglu_limits": limits,
        "swiglu_limits_shared": limits_shared,
        "use_qk_norm": True,
        "use_head_wise_attn_gate": True,
        "zero_centered": True,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "step_gguf_synthetic_seed": seed,
    }


# ------------------------------------------------------------------ tokenizer


# ------------------------------------------------------------------ weights

def _std(name: str, shape: tuple[int, ...], hidden: int) -> float:
    """Scales that make a random model behave like a trained one where numerics care:
    activations O(1); output projections small (each layer nudges the residual stream, so a
    routing near-tie flipped by rounding moves the logits little); router biases spread
    (clear expert margins); logits spread enough for a clear top-1."""
    if name.endswith("embed_tokens.weight"):
        return 1.0
    if name.endswith(("lm_head.weight", "shared_head.output.weight")):
        return 3.0 / math.sqrt(hidden)
    if name.endswith("router_bias"):
        return 1.0
    if len(shape) == 1:
        return 0.2  # zero-centred norm weights: the scale is 1 + w
    if name.endswith(("down_proj.weight", "o_proj.weight")):
        return 0.3 / math.sqrt(shape[-1])
    return 1.0 / math.sqrt(shape[-1])


def _fp8_candidate(name: str, shape: tuple[int, ...]) -> bool:
    # as in the FP8 releases: projections are FP8; embeddings, heads, router and norms are not
    return len(shape) >= 2 and not name.endswith(
        ("embed_tokens.weight", "lm_head.weight", "shared_head.output.weight", "moe.gate.weight"))


@functools.cache
def _e4m3_codebook() -> tuple[np.ndarray, np.ndarray]:
    """The finite float8-e4m3fn values, sorted, with their codes."""
    codes = np.arange(256, dtype=np.uint8)
    finite = np.isfinite(FP8_E4M3_VALUES)
    order = np.argsort(FP8_E4M3_VALUES[finite], kind="stable")
    return FP8_E4M3_VALUES[finite][order], codes[finite][order]


def _to_e4m3(x: np.ndarray) -> np.ndarray:
    """Nearest float8-e4m3fn code for each value (|x| <= 448)."""
    values, codes = _e4m3_codebook()
    idx = np.clip(np.searchsorted(values, x), 1, len(values) - 1)
    lower = np.abs(x - values[idx - 1]) <= np.abs(values[idx] - x)
    return codes[np.where(lower, idx - 1, idx)]


@dataclass(frozen=True)
class _Spec:
    name: str        # stored name
    dtype: str
    shape: tuple[int, ...]
    write: Callable[[], Iterator[bytes]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * {"BF16": 2, "F32": 4, "F8_E4M3": 1}[self.dtype]


def _tensor_specs(cfg: Step35Config, p: Preset, seed: int, fp8: bool,
                  script: dict[int, int] | None = None, head_accuracy: float = 1.0,
                  routing_locality: bool = False) -> list[_Spec]:
    specs = []
    for idx, (name, shape) in enumerate(cfg.expected_shapes().items()):
        std = _std(name, shape, p.hidden)
        rng_seed = (seed, idx)
        change = locality.transform(name, shape, cfg) if routing_locality else None
        follows = script
        if script is not None and name.endswith("shared_head.output.weight"):
            follows = head_successors(script, head_accuracy, (seed, idx))
        if follows is not None and (fixed := scripted_weights(name, shape, follows)) is not None:
            specs.append(_Spec(name, "BF16", shape, fixed))
        elif name.endswith("router_bias"):
            specs.append(_Spec(name, "F32", shape, _gen(rng_seed, shape, std, "F32", change)))
        elif p.outliers and name.endswith(_OUTLIER_NORMS):
            specs.append(_Spec(name, "BF16", shape, _outlier_norm(rng_seed, shape, std, p, seed)))
        elif fp8 and _fp8_candidate(name, shape):
            # each half recomputes the (small, FP8-test-only) quantisation: no shared state
            quantise = functools.partial(_fp8_quantise, rng_seed, shape, std, p.fp8_block)
            specs.append(_Spec(name, "F8_E4M3", shape, lambda q=quantise: iter([q()[0].tobytes()])))
            specs.append(_Spec(name + "_scale_inv", "F32", fp8_scale_shape(shape, (p.fp8_block,) * 2),
                               lambda q=quantise: iter([q()[1].tobytes()])))
        else:
            specs.append(_Spec(name, "BF16", shape, _gen(rng_seed, shape, std, "BF16", change)))
    return specs


_ELEMS_PER_CHUNK = 2**22  # generated at a time: bounded memory on `wide`


def _gen(rng_seed: tuple[int, int], shape: tuple[int, ...], std: float, dtype: str,
         change: locality.Transform | None = None):
    def chunks() -> Iterator[bytes]:
        rng = np.random.default_rng(list(rng_seed))
        total, cols = math.prod(shape), shape[-1]
        step = max(cols, _ELEMS_PER_CHUNK // cols * cols)
        for start in range(0, total, step):
            x = rng.standard_normal(min(step, total - start), dtype=np.float32) * np.float32(std)
            if change:
                x = change(x.reshape(-1, cols), start // cols).reshape(-1)
            yield x.tobytes() if dtype == "F32" else gguf.quants.quantize(x, gguf.GGMLQuantizationType.BF16).tobytes()
    return chunks


_OUTLIER_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")


def _outlier_norm(rng_seed: tuple[int, int], shape: tuple[int, ...], std: float, p: Preset,
                  seed: int):
    """A zero-centred norm whose scale (1 + w) is `outlier_gain` times larger on the same few
    channels in every layer, so those channels dominate the inputs of every matmul."""
    def chunks() -> Iterator[bytes]:
        w = np.random.default_rng(list(rng_seed)).standard_normal(shape, dtype=np.float32) * np.float32(std)
        channels = np.random.default_rng([seed, 1 << 30]).choice(shape[0], p.outliers, replace=False)
        w[channels] = (1 + w[channels]) * np.float32(p.outlier_gain) - 1
        yield gguf.quants.quantize(w, gguf.GGMLQuantizationType.BF16).tobytes()
    return chunks


def _fp8_quantise(rng_seed: tuple[int, int], shape: tuple[int, ...], std: float,
                  block: int) -> tuple[np.ndarray, np.ndarray]:
    """FP8 codes and their inverse block scales (DeepSeek layout: w = q * scale_inv)."""
    rng = np.random.default_rng(list(rng_seed))
    x = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    R, C = shape[-2:]
    nb_r, nb_c = fp8_scale_shape(shape, (block, block))[-2:]
    pad = np.zeros((*shape[:-2], nb_r * block, nb_c * block), np.float32)
    pad[..., :R, :C] = x
    blocks = pad.reshape(*shape[:-2], nb_r, block, nb_c, block)
    amax = np.abs(blocks).max(axis=(-3, -1))
    scale = np.where(amax > 0, amax / 448.0, 1.0).astype(np.float32)
    q = blocks / scale[..., :, None, :, None]
    return _to_e4m3(q.reshape(pad.shape)[..., :R, :C]), scale


def _shards(specs: list[_Spec], limit: int) -> list[list[_Spec]]:
    shards: list[list[_Spec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def _write_safetensors(path: Path, specs: list[_Spec], on_bytes: Callable[[int], None]) -> None:
    header, offset = {}, 0
    for s in specs:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for s in specs:
            for chunk in s.write():
                f.write(chunk)
                on_bytes(len(chunk))


def synth(out: str | os.PathLike, preset: str = "tiny", seed: int = 0, fp8: bool = False,
          step3p7: bool = False, on_start: Callable[[int], None] = lambda total: None,
          on_bytes: Callable[[int], None] = lambda n: None, script: Sequence[str] = (),
          chat_template: str | None = None, head_accuracy: float = 1.0, routing_locality: bool = False,
          **overrides) -> Path:
    """Write a synthetic checkpoint folder at `out` (built aside, renamed when complete).

    `script`: pieces of text, each made one token, that greedy decoding emits in order after
    any prompt, then end of turn; the MTP heads predict the same, except that each head
    predicts a wrong token for a share 1 - `head_accuracy` of its inputs (the draft acceptance
    the tests and benches set; the output never changes). `chat_template` replaces the
    simple built-in one (e.g. the model's own, from the llama.cpp sources). `routing_locality`:
    consecutive tokens favour the experts recent tokens used (synth.locality). `overrides` replace
    preset fields (e.g. n_layer=4) for tests that need other shapes.
    """
    if preset not in PRESETS:
        raise StepGGUFError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    p = replace(PRESETS[preset], **overrides)
    if len(set(script)) != len(script) or any(not piece for piece in script):
        raise StepGGUFError("script pieces must be distinct and non-empty: each is one token "
                            "whose successor is fixed")
    if not 0.0 <= head_accuracy <= 1.0 or (head_accuracy < 1.0 and not script):
        raise StepGGUFError(f"head accuracy {head_accuracy} needs a script and a value from 0 to 1")
    if len(script) >= p.hidden:
        raise StepGGUFError(f"a script of {len(script)} pieces needs a hidden size above that; "
                            f"{preset} has {p.hidden}")
    out = Path(out)
    if out.exists():
        raise StepGGUFError(f"{out} already exists; choose a new folder")
    config = preset_config(p, seed)
    if fp8:
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                         "activation_scheme": "dynamic",
                                         "weight_block_size": [p.fp8_block, p.fp8_block]}
    cfg = Step35Config.from_dict(config)
    tokenizer = tokenizer_files(p.vocab, script, chat_template, VISION_TOKENS if step3p7 else ())
    ids = {t["content"]: t["id"] for t in tokenizer["tokenizer.json"]["added_tokens"]}
    successor = None
    if script:
        chain = [ids[piece] for piece in script] + [ids["<|im_end|>"]]
        successor = {-1: chain[0], **dict(zip(chain[:-1], chain[1:]))}
    # Step 3.7 as transformers saves it keeps the decoder's names (model.layers.*) too
    specs = _tensor_specs(cfg, p, seed, fp8, successor, head_accuracy, routing_locality)
    if step3p7:
        specs += _vision_specs(p.hidden, seed)
        quant = config.pop("quantization_config", None)
        config = {"architectures": ["Step3p7ForConditionalGeneration"], "model_type": "step3p7",
                  "text_config": {k: v for k, v in config.items() if k != "architectures"},
                  "vision_config": dict(VISION_CONFIG), **projector_config(ids[IMAGE_PLACEHOLDER])}
        if quant:
            config["quantization_config"] = quant

    on_start(sum(s.nbytes for s in specs))
    files = {"config.json": json.dumps(config, indent=1), "README.md": model_card(preset)}
    files |= {name: json.dumps(content, ensure_ascii=False, indent=1) for name, content in tokenizer.items()}
    _write_folder(out, _shards(specs, p.shard_bytes), files, on_bytes)
    return out


def _vision_specs(text_hidden: int, seed: int) -> list[_Spec]:
    """Step 3.7's vision tower and projector, in BF16 as the releases keep them."""
    def centred(centre: float) -> locality.Transform:
        return lambda block, row0: block + np.float32(centre)

    return [_Spec(name, "BF16", shape, _gen((seed, (1 << 20) + i), shape, spread, "BF16",
                                            centred(centre) if centre else None))
            for i, (name, (shape, spread, centre)) in enumerate(vision_tensors(VISION_CONFIG, text_hidden).items())]


def _write_folder(out: Path, shards: list[list[_Spec]], files: dict[str, str],
                  on_bytes: Callable[[int], None]) -> None:
    """The checkpoint folder: safetensors shards with their index, and the text `files`; built
    aside and renamed into place when complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    tmp.mkdir()
    try:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _write_safetensors(tmp / fname, shard, on_bytes)
            for s in shard:
                weight_map[s.name] = fname
                total += s.nbytes
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        for fname, text in files.items():
            (tmp / fname).write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
