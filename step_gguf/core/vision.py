"""Step 3.7's vision tower as llama.cpp's mtmd runs it (projector type `step3vl`): its config,
read from config.json's `vision_config` (transformers' key names or the hub's aliases) and the
image processor's config, the source -> GGUF tensor name table, and the shape of every tensor.

The mtmd graph fixes what the file cannot say: two stride-2 downsampling convolutions after the
transformer (a 4x4 patch merge), 2-D rotary positions at theta 10000, and quick-GELU unless a
key says GELU or SiLU. A config that asks for anything else is refused, never approximated."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, TENSOR_NAMES, VisionProjectorType
from gguf import MODEL_TENSOR as T

from .errors import CheckpointError, describe
from .hub_layout import checkpoint_file


def _gguf(tensor: T, suffix: str, bid: str | int | None = None) -> str:
    name = TENSOR_NAMES[tensor]
    return (name.format(bid=bid) if bid is not None else name) + "." + suffix


_BLOCK = "vision_model.transformer.resblocks.{bid}."
# source name (with {bid} for a transformer block) -> GGUF name, as mtmd's loader reads them
TENSOR_MAP: dict[str, str] = {
    "vision_model.conv1.weight": _gguf(T.V_ENC_EMBD_PATCH, "weight"),
    "vision_model.positional_embedding": _gguf(T.V_ENC_EMBD_POS, "weight"),
    "vision_model.ln_pre.weight": _gguf(T.V_PRE_NORM, "weight"),
    "vision_model.ln_pre.bias": _gguf(T.V_PRE_NORM, "bias"),
    _BLOCK + "attn.in_proj_weight": _gguf(T.V_ENC_ATTN_QKV, "weight", "{bid}"),   # rows q, k, v
    _BLOCK + "attn.in_proj_bias": _gguf(T.V_ENC_ATTN_QKV, "bias", "{bid}"),
    _BLOCK + "attn.out_proj.weight": _gguf(T.V_ENC_ATTN_O, "weight", "{bid}"),
    _BLOCK + "attn.out_proj.bias": _gguf(T.V_ENC_ATTN_O, "bias", "{bid}"),
    _BLOCK + "ln_1.weight": _gguf(T.V_ENC_INPUT_NORM, "weight", "{bid}"),
    _BLOCK + "ln_1.bias": _gguf(T.V_ENC_INPUT_NORM, "bias", "{bid}"),
    _BLOCK + "ln_2.weight": _gguf(T.V_ENC_POST_ATTN_NORM, "weight", "{bid}"),
    _BLOCK + "ln_2.bias": _gguf(T.V_ENC_POST_ATTN_NORM, "bias", "{bid}"),
    _BLOCK + "ls_1.gamma": _gguf(T.V_LAYER_SCALE_1, "weight", "{bid}"),
    _BLOCK + "ls_2.gamma": _gguf(T.V_LAYER_SCALE_2, "weight", "{bid}"),
    _BLOCK + "mlp.c_fc.weight": _gguf(T.V_ENC_FFN_UP, "weight", "{bid}"),
    _BLOCK + "mlp.c_fc.bias": _gguf(T.V_ENC_FFN_UP, "bias", "{bid}"),
    _BLOCK + "mlp.c_proj.weight": _gguf(T.V_ENC_FFN_DOWN, "weight", "{bid}"),
    _BLOCK + "mlp.c_proj.bias": _gguf(T.V_ENC_FFN_DOWN, "bias", "{bid}"),
    "vision_model.vit_downsampler1.weight": _gguf(T.V_MMPROJ, "weight", 0),
    "vision_model.vit_downsampler1.bias": _gguf(T.V_MMPROJ, "bias", 0),
    "vision_model.vit_downsampler2.weight": _gguf(T.V_MMPROJ, "weight", 1),
    "vision_model.vit_downsampler2.bias": _gguf(T.V_MMPROJ, "bias", 1),
    "vit_large_projector.weight": _gguf(T.V_MMPROJ_FC, "weight"),
}
POSITIONS = TENSOR_MAP["vision_model.positional_embedding"]

# names a source may use for a key, transformers' first (its config accepts the others)
ALIASES = {"hidden_size": ("hidden_size", "width"), "num_hidden_layers": ("num_hidden_layers", "layers"),
           "num_attention_heads": ("num_attention_heads", "heads")}
ROPE_THETA = 10000.0        # mtmd's step3vl graph rotates at this theta, whatever the file says
MERGE = 4                   # two stride-2 downsamplers: 4 x 4 patches make one image token
ACTIVATIONS = ("quick_gelu", "gelu", "silu")   # what mtmd's FFN runs
# transformers' Step3p7ImageProcessor defaults (OpenAI CLIP's statistics), for a checkpoint
# saved without a preprocessor config
DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)
DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MAX_IMAGE = 3024    # the processor's cap on an image's longest edge
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
MMPROJ_ARCH = MODEL_ARCH_NAMES[MODEL_ARCH.MMPROJ]     # general.architecture of every mmproj ("clip")
PROJECTOR = VisionProjectorType.STEP3VL               # the projector mtmd runs Step's tower as
MMPROJ_SUFFIX = "-mmproj"   # NAME.gguf's vision tower is NAME-mmproj.gguf, where llama.cpp's tools put it


def mmproj_path(out: str | os.PathLike) -> Path:
    """The mmproj GGUF beside the model GGUF `out`."""
    out = Path(out)
    return out.with_name(out.stem + MMPROJ_SUFFIX + out.suffix)


@dataclass(frozen=True)
class VisionConfig:
    width: int
    ff: int
    n_layer: int
    n_head: int
    channels: int
    image_size: int
    patch_size: int
    eps: float
    act: str
    text_hidden: int            # the projector's output: the text model's width
    image_mean: tuple[float, ...] = DEFAULT_MEAN
    image_std: tuple[float, ...] = DEFAULT_STD
    max_image: int = DEFAULT_MAX_IMAGE
    processor: str | None = None    # the file the image statistics came from

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Source name -> PyTorch shape of every vision tensor."""
        w, f, c, p = self.width, self.ff, self.channels, self.patch_size
        one = {"vision_model.conv1.weight": (w, c, p, p), "vision_model.positional_embedding": (self.grid ** 2, w),
               "vision_model.ln_pre.weight": (w,), "vision_model.ln_pre.bias": (w,),
               "vision_model.vit_downsampler1.weight": (2 * w, w, 3, 3), "vision_model.vit_downsampler1.bias": (2 * w,),
               "vision_model.vit_downsampler2.weight": (4 * w, 2 * w, 3, 3),
               "vision_model.vit_downsampler2.bias": (4 * w,), "vit_large_projector.weight": (self.text_hidden, 4 * w)}
        block = {"attn.in_proj_weight": (3 * w, w), "attn.in_proj_bias": (3 * w,), "attn.out_proj.weight": (w, w),
                 "attn.out_proj.bias": (w,), "mlp.c_fc.weight": (f, w), "mlp.c_fc.bias": (f,),
                 "mlp.c_proj.weight": (w, f), "mlp.c_proj.bias": (w,),
                 **{f"{n}.{s}": (w,) for n in ("ln_1", "ln_2") for s in ("weight", "bias")},
                 "ls_1.gamma": (w,), "ls_2.gamma": (w,)}
        return one | {_BLOCK.format(bid=i) + k: s for i in range(self.n_layer) for k, s in block.items()}

    @classmethod
    def from_dict(cls, raw: dict, text_hidden: int, processor: dict | None = None,
                  processor_file: str | None = None) -> "VisionConfig":
        """From a top-level config.json (its `vision_config`) and the image processor's config."""
        v = raw["vision_config"]

        def key(name: str):
            for alias in ALIASES.get(name, (name,)):
                if alias in v:
                    return v[alias]
            raise KeyError(f"vision_config.{name}")

        width = _whole("hidden_size", key("hidden_size"))
        ff = v.get("intermediate_size") or int(width * float(key("mlp_ratio")))  # transformers' rule
        act = key("hidden_act")
        if act not in ACTIVATIONS:
            raise CheckpointError(f"vision_config.hidden_act {act!r} is not one llama.cpp's mtmd runs "
                                  f"({', '.join(ACTIVATIONS)})")
        theta = (v.get("rope_parameters") or {}).get("rope_theta", ROPE_THETA)
        if float(theta) != ROPE_THETA:
            raise CheckpointError(f"vision_config rope_theta {theta} differs from the {ROPE_THETA:g} "
                                  "llama.cpp's step3vl graph rotates at")
        if int(raw.get("understand_projector_stride", 2)) != 2:
            raise CheckpointError(f"understand_projector_stride {raw['understand_projector_stride']} is not "
                                  "the 2 of llama.cpp's step3vl graph (two stride-2 downsamplers)")
        cfg = cls(width, _whole("intermediate_size", ff), _whole("num_hidden_layers", key("num_hidden_layers")),
                  _whole("num_attention_heads", key("num_attention_heads")), _whole("num_channels", key("num_channels")),
                  _whole("image_size", key("image_size")), _whole("patch_size", key("patch_size")),
                  float(key("layer_norm_eps")), act, text_hidden)
        if cfg.width % cfg.n_head or cfg.image_size % cfg.patch_size:
            raise CheckpointError(f"vision_config: hidden_size {width} must divide by num_attention_heads "
                                  f"{cfg.n_head}, and image_size {cfg.image_size} by patch_size {cfg.patch_size}")
        return cfg._with_processor(processor or {}, processor_file)

    def _with_processor(self, p: dict, file: str | None) -> "VisionConfig":
        mean, std = p.get("image_mean", DEFAULT_MEAN), p.get("image_std", DEFAULT_STD)
        if len(mean) != self.channels or len(std) != self.channels or min(map(float, std)) <= 0:
            raise CheckpointError(f"{file}: image_mean and image_std need {self.channels} values each, "
                                  "the deviations above 0")
        return replace(self, image_mean=tuple(map(float, mean)), image_std=tuple(map(float, std)),
                       max_image=_whole("max_image_size", p.get("max_image_size", DEFAULT_MAX_IMAGE)),
                       processor=file if "image_mean" in p else None)


def _whole(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value <= 0:
        raise CheckpointError(f"vision_config.{name} = {str(value)[:40]} is not a positive whole number")
    return int(value)


def read_vision(path: Path, raw: dict, text_hidden: int) -> VisionConfig | None:
    """The vision tower of the checkpoint folder `path` (config.json parsed as `raw`), or None
    for a config without one (Step 3.5)."""
    if not isinstance(raw.get("vision_config"), dict):
        return None
    processor, found = {}, None
    for name in PROCESSOR_FILES:
        file = checkpoint_file(path, name)
        if file.is_file():
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
                processor, found = data.get("image_processor", data), name
            except (ValueError, UnicodeDecodeError, AttributeError) as exc:
                raise CheckpointError(f"{file} is not a valid image processor config ({describe(exc)})") from None
            break
    try:
        return VisionConfig.from_dict(raw, text_hidden, processor, found)
    except KeyError as exc:
        raise CheckpointError(f"config.json lacks required field {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"config.json vision_config has a field of the wrong type ({describe(exc)})") from None
