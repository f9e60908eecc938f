"""Byte sizes as a user writes them, read as llama.cpp's tools read them (gguf-split's
--split-max-size, convert_hf_to_gguf.py): K, M, G and T, with or without B, are powers of 1000;
KiB, MiB, GiB and TiB powers of 1024; a plain number is bytes. Every size option takes this one
reading, so 100G is the same bytes wherever it is written."""

from __future__ import annotations

import re

from .errors import StepGGUFError

SIZE_HELP = "100G (100*10^9 bytes, as llama.cpp's gguf-split reads it), 96GiB (96*2^30) or a number of bytes"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(i?)B?|B)?\s*$", re.I)


def parse_size(text: str, option: str) -> int:
    """'100G' -> 100 * 10**9, '2 GB' -> 2 * 10**9, '96GiB' -> 96 * 2**30, '123456' -> 123456;
    anything else, or a size of no bytes, is an error naming `option`."""
    m = _SIZE.match(text)
    value = 0
    if m:
        unit = m.group(2)
        base = 1 if unit is None else (1024 if m.group(3) else 1000) ** ("KMGT".index(unit.upper()) + 1)
        value = int(float(m.group(1)) * base)
    if value <= 0:
        raise StepGGUFError(f"{option} {text!r} is not a size such as {SIZE_HELP}")
    return value


GiB = 1 << 30


def human_size(n: float) -> str:
    """Bytes in binary units, as people read sizes: 512 B, 1.5 KiB, 22.8 MiB, 135.9 GiB."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"
