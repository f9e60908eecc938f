"""Step 3.7's vision tower and projector -> an mmproj GGUF, the file llama.cpp's mtmd loads beside
the model (`--mmproj`): its tensors checked against the vision config and planned under the
recipe (what mtmd's graph can run pins some types), and the `clip.*` metadata it reads."""

from __future__ import annotations

from pathlib import Path

import gguf

from ..core.errors import CheckpointError
from ..core.recipe import Recipe
from ..core.vision import MERGE, MMPROJ_ARCH, PROJECTOR, TENSOR_MAP, VisionConfig
from ..files.checkpoint import TensorRef
from .output import OutputJob
from .output_tensors import SOURCE_QTYPE, OutputTensor


def _gguf_name(source: str) -> str:
    parts = source.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():  # a transformer block
            return TENSOR_MAP[".".join(parts[:i] + ["{bid}"] + parts[i + 1:])].format(bid=part)
    return TENSOR_MAP[source]


def mmproj_plans(vision: VisionConfig, tensors: dict[str, TensorRef], recipe: Recipe) -> list[OutputTensor]:
    """Every vision tensor of the checkpoint (`tensors`, by stored name), checked against the
    config and typed by `recipe` (no data read)."""
    expected = vision.expected_shapes()
    missing = [n for n in expected if n not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"vision tensor {missing[0]} is missing{more}; the checkpoint has no complete "
                              "vision tower to write an mmproj from")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise CheckpointError(f"unexpected tensor {extra[0]} {list(tensors[extra[0]].shape)}: not part of "
                              "Step 3.7's vision tower as config.json's vision_config describes it")
    plans = []
    for source, shape in expected.items():
        ref = tensors[source]
        if ref.shape != shape:
            raise CheckpointError(f"tensor {source} has shape {list(ref.shape)}, config.json's vision_config "
                                  f"implies {list(shape)}")
        if ref.dtype not in SOURCE_QTYPE:
            raise CheckpointError(f"vision tensor {source} has dtype {ref.dtype}; expected BF16, F16 or F32")
        name = _gguf_name(source)
        choice = recipe.resolve(name, shape, 0)
        plans.append(OutputTensor(source, name, shape, choice.qtype, ref, rule=choice.rule))
    return plans


def mmproj_job(vision: VisionConfig, plans: list[OutputTensor], name: str | None, out: Path) -> OutputJob:
    """The mmproj GGUF at `out`: `plans` and the keys mtmd's step3vl loader reads."""
    def write_kv(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.MMPROJ)
        if name:
            w.add_name(name)
        w.add_clip_has_vision_encoder(True)
        w.add_clip_projector_type(PROJECTOR)
        w.add_vision_projection_dim(vision.text_hidden)
        w.add_vision_embedding_length(vision.width)
        w.add_vision_feed_forward_length(vision.ff)
        w.add_vision_block_count(vision.n_layer)
        w.add_vision_head_count(vision.n_head)
        w.add_vision_attention_layernorm_eps(vision.eps)
        w.add_vision_image_size(vision.image_size)
        w.add_vision_patch_size(vision.patch_size)
        w.add_vision_image_mean(list(vision.image_mean))
        w.add_vision_image_std(list(vision.image_std))
        w.add_vision_projector_scale_factor(MERGE)
        w.add_vision_preproc_image_size(vision.max_image)
        if vision.act == "gelu":
            w.add_vision_use_gelu(True)
        elif vision.act == "silu":
            w.add_vision_use_silu(True)
    return OutputJob(out, plans, write_kv, arch=MMPROJ_ARCH)
