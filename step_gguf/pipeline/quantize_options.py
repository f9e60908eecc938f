"""What `quantize` takes beside the source, the output and the recipe: a size target and the
options the command line sets, as values the CLI builds once."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import gguf

from ..core.choices import MtpMode
from ..core.model_facts import MadeFor
from ..files.model_card import CardOverrides
from .output import SplitLimits


@dataclass(frozen=True)
class Target:
    """A size budget: the bytes of the whole output (header, metadata, the plan stored in it
    and alignment padding included: what the disk and the loader see), bits per weight of the
    tensor data, or bytes of the tensor data."""

    bytes: int | None = None
    bpw: float | None = None
    data: int | None = None     # bytes of tensor data alone (a size the planner chose)

    def resolve(self, n_params: int) -> int:
        if self.data is not None:
            return self.data
        return self.bytes if self.bytes is not None else int(self.bpw * n_params / 8)


@dataclass(frozen=True, kw_only=True)
class QuantizeOptions:
    """How `quantize` applies a recipe, beyond the recipe: built once by the CLI from its flags.
    `imatrix` weights the input channels (and `equalization` derives per-channel scales from
    it); `target` picks every type for the least measured error within a size; `card`
    overrides the model card's name, basename or license (a GGUF source keeps its card
    otherwise); with `split` limits the output is written as llama.cpp's gguf-split shards
    OUT-00001-of-0000N.gguf ... (a draft GGUF of mtp="split", at `draft_out`, stays one file);
    `made_for` is stored in the file (`quantize --for`); `mmproj_out` receives a Step 3.7
    checkpoint's vision tower, typed by the recipe's rules for `v.` and `mm.` tensors."""

    mtp: MtpMode = "keep"
    draft_out: str | os.PathLike | None = None
    mmproj_out: str | os.PathLike | None = None     # Step 3.7's vision tower, from a checkpoint
    imatrix: str | os.PathLike | None = None
    equalization: bool = False
    target: Target | None = None
    allow_requantize: bool = False
    tokenizer_pre: str | None = None
    threads: int | None = None
    resume: bool = True
    card: CardOverrides | None = None
    split: SplitLimits | None = None
    made_for: MadeFor | None = None     # the machine and context the size was chosen for


def made_for_kv(made: MadeFor) -> Callable[[gguf.GGUFWriter], None]:
    """The keys `quantize --for` stores: the machine and context the file was made for."""
    def write(w: gguf.GGUFWriter) -> None:
        for key, value in zip(MadeFor.KEYS, made.values()):
            if isinstance(value, str):
                w.add_string(key, value)
            else:
                w.add_uint64(key, value)
    return write
