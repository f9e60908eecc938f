"""The choices a user names on the command line, as types: light enough that `step-gguf --help`
lists them without loading the modules that act on them (numpy, gguf)."""

from __future__ import annotations

from typing import Literal, get_args

# what happens to the MTP blocks: kept in the output, dropped, or split into a draft GGUF
MtpMode = Literal["keep", "drop", "split"]
MTP_MODES: tuple[str, ...] = get_args(MtpMode)

# the types `convert` writes every tensor as (ggml's names, lower case)
OutType = Literal["f32", "f16", "bf16", "q8_0"]
OUTTYPES: tuple[str, ...] = get_args(OutType)
