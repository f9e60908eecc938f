"""`OutputTensor`: one output tensor of a conversion or quantization, with where its data comes
from and how it is transformed, and the checks that hold every tensor of a checkpoint against
its config before a byte is written."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from gguf import GGMLQuantizationType as Q

from ..core.errors import CheckpointError
from ..core.model import Step35Config, gguf_name, is_zero_centred_norm, layer_of
from ..core.recipe import PINNED_1D, Recipe, Rule, tensor_bytes
from ..files.checkpoint import Checkpoint, TensorRef, fp8_scale_shape


FLOAT_TYPES = {Q.F32, Q.F16, Q.BF16}


SOURCE_QTYPE = {"F32": Q.F32, "F16": Q.F16, "BF16": Q.BF16}


@dataclass(frozen=True)
class OutputTensor:
    hf_name: str
    name: str                      # GGUF name
    shape: tuple[int, ...]         # PyTorch order, as the config expects it
    qtype: Q
    src: TensorRef | None = None
    scale: TensorRef | None = None  # FP8 block scales
    fp8_block: tuple[int, int] | None = None  # with `scale`: rows x cols sharing one scale
    add_one: bool = False
    data: np.ndarray | None = field(default=None, compare=False)  # generated tensors
    rule: Rule | None = None        # the recipe rule that chose qtype
    # importance of each input channel, one row per matrix (expert) of the tensor
    imatrix: np.ndarray | None = field(default=None, compare=False)
    # equalization: input channels multiplied by these, one row per matrix or one row for all
    # (1-D tensors: it scales the elements)
    col_scale: np.ndarray | None = field(default=None, compare=False)

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.shape, self.qtype)

    @property
    def n_params(self) -> int:
        return math.prod(self.shape)

    @property
    def src_nbytes(self) -> int:
        return self.src.nbytes if self.src else self.nbytes

    @property
    def passthrough(self) -> bool:
        """The source bytes are already the output bytes."""
        return (self.src is not None and self.scale is None and not self.add_one
                and self.col_scale is None
                and self.src.dtype == self.qtype.name)


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1) or (1,)


def output_tensors(cfg: Step35Config, ckpt: Checkpoint, recipe: Recipe,
                 with_mtp: bool = True) -> list[OutputTensor]:
    """Validate the checkpoint against the config and plan every output tensor (no data read).

    Without MTP, the MTP blocks may be absent from the checkpoint and are ignored if present.
    """
    expected = cfg.expected_shapes(with_mtp=with_mtp)
    known = cfg.expected_shapes(with_mtp=True)
    missing = sorted(set(expected) - set(ckpt.tensors), key=_natural)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"tensor {missing[0]} is missing{more}; the checkpoint does not "
                              f"match its config.json")
    extra = sorted(set(ckpt.tensors) - set(known), key=_natural)
    if extra:
        raise CheckpointError(f"unexpected tensor {extra[0]} {ckpt.tensors[extra[0]].shape}: not "
                              "part of Step 3.5 as its config.json describes it")
    plans = []
    for hf in sorted(expected, key=_natural):
        ref, want = ckpt.tensors[hf], expected[hf]
        # hub dumps sometimes carry singleton dims (e.g. [E, 1, H]); reshaping them is free
        if ref.shape != want and _squeezed(ref.shape) != _squeezed(want):
            raise CheckpointError(f"tensor {ref.raw_name} has shape {list(ref.shape)}, config.json "
                                  f"implies {list(want)}")
        scale = None
        if ref.dtype == "F8_E4M3":
            scale = _check_scale(cfg, ref, ckpt.scales.get(hf), want)
        elif ref.dtype not in SOURCE_QTYPE:
            raise CheckpointError(f"tensor {ref.raw_name} has dtype {ref.dtype}; expected BF16, "
                                  "F16, F32 or F8_E4M3")
        plans.append(_output(cfg, recipe, hf, want, ref, scale))
    return plans + _generated(cfg)


def output_shapes(cfg: Step35Config, recipe: Recipe, with_mtp: bool = True) -> list[OutputTensor]:
    """The plan of the model `cfg` describes, from shapes alone (pricing a bare config)."""
    shapes = cfg.expected_shapes(with_mtp=with_mtp)
    return [_output(cfg, recipe, hf, shapes[hf]) for hf in sorted(shapes, key=_natural)] + _generated(cfg)


def _output(cfg: Step35Config, recipe: Recipe, hf: str, shape: tuple[int, ...],
          ref: TensorRef | None = None, scale: TensorRef | None = None) -> OutputTensor:
    name = gguf_name(hf)
    assert name is not None, hf  # every expected name is in TENSOR_MAP
    choice = recipe.resolve(name, shape, cfg.n_layer)
    return OutputTensor(hf, name, shape, choice.qtype, ref, scale,
                      fp8_block=cfg.fp8_block if scale is not None else None,
                      add_one=is_zero_centred_norm(hf), rule=choice.rule)


def _generated(cfg: Step35Config) -> list[OutputTensor]:
    if (factors := cfg.llama3_rope_factors()) is None:
        return []
    return [OutputTensor("", "rope_freqs.weight", (len(factors),), Q.F32,
                       data=np.asarray(factors, dtype=np.float32), rule=PINNED_1D)]


def _check_scale(cfg: Step35Config, ref: TensorRef, scale: TensorRef | None,
                 want: tuple[int, ...]) -> TensorRef:
    if scale is None:
        raise CheckpointError(f"FP8 tensor {ref.raw_name} has no weight_scale_inv beside it")
    blocks = fp8_scale_shape(want, cfg.fp8_block)
    if _squeezed(scale.shape) != _squeezed(blocks):
        raise CheckpointError(f"{scale.raw_name} has shape {list(scale.shape)}, expected "
                              f"{list(blocks)} for {cfg.fp8_block[0]}x{cfg.fp8_block[1]} blocks")
    return scale


def _natural(name: str) -> tuple:
    layer = layer_of(name)
    return (layer if layer is not None else -1, name)


def split_mtp(plans: list[OutputTensor], cfg: Step35Config) -> tuple[list[OutputTensor], list[OutputTensor]]:
    """(trunk, draft): the draft holds the MTP blocks plus the embeddings and head they share."""
    def is_mtp(p: OutputTensor) -> bool:
        layer = layer_of(p.hf_name)
        return layer is not None and layer >= cfg.n_layer

    shared = {"token_embd.weight", "output_norm.weight", "output.weight", "rope_freqs.weight"}
    return ([p for p in plans if not is_mtp(p)],
            [p for p in plans if is_mtp(p) or p.name in shared])
