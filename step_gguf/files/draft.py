"""Separate MTP draft GGUFs: the file `--mtp split` writes beside the trunk, found and checked.

A draft holds the MTP blocks (`blk.N.nextn.*` and the decoder layer around them, N past the
trunk) plus the token embeddings, output norm and head that llama.cpp's `step35` loader needs
to load it on its own; llama-server drafts from it with `--spec-draft-model`. Everything here
reads GGUF headers only: no runtime.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import gguf

from ..core.errors import StepGGUFError
from ..core.model import ARCH
from .gguf_source import GGUFSource, open_gguf, parse_shard_name

log = logging.getLogger(__name__)

SUFFIX = "-mtp"  # OUT.gguf -> OUT-mtp.gguf

_K = gguf.Keys.LLM
_NAMES = gguf.TENSOR_NAMES
_T = gguf.MODEL_TENSOR


def _key(template: str) -> str:
    return template.format(arch=ARCH)


def _weight(tensor: gguf.MODEL_TENSOR, bid: int | None = None) -> str:
    return _NAMES[tensor].format(bid=bid) + ".weight"


def draft_path(out: str | os.PathLike) -> Path:
    """The draft GGUF `--mtp split` writes for the output `out` when no --draft-out is given."""
    out = Path(out)
    return out.with_name(out.stem + SUFFIX + out.suffix)


def beside(model: str | os.PathLike) -> Path:
    """Where `--mtp split` put the draft of the GGUF `model`: a split model's shards all name
    the draft of their set's output (OUT-00002-of-00003.gguf -> OUT-mtp.gguf)."""
    parsed = parse_shard_name(model)
    return draft_path(parsed[0] if parsed else model)


def _int(src: GGUFSource, template: str, default: int | None = None) -> int | None:
    f = src.get_field(_key(template))
    return int(f.contents()) if f is not None else default


def _shape(src: GGUFSource) -> tuple[int, int, int, int]:
    """(trunk layers, MTP heads declared, embedding length, vocabulary rows) of a step35 GGUF."""
    n_all = _int(src, _K.BLOCK_COUNT, 0)
    n_nextn = _int(src, _K.NEXTN_PREDICT_LAYERS, 0)
    embd = next((t for t in src.tensors if t.name == _weight(_T.TOKEN_EMBD)), None)
    return n_all - n_nextn, n_nextn, _int(src, _K.EMBEDDING_LENGTH, 0), embd.shape[1] if embd else 0


def has_heads(src: GGUFSource) -> bool:
    """Whether the GGUF holds its MTP heads (not only declares them, as a trunk does)."""
    n_layer, n_nextn, _, _ = _shape(src)
    names = {t.name for t in src.tensors}
    return n_nextn > 0 and all(_weight(_T.NEXTN_EH_PROJ, i) in names
                               for i in range(n_layer, n_layer + n_nextn))


def check(model: str | os.PathLike, draft: str | os.PathLike) -> None:
    """Raise a one-line StepGGUFError unless `draft` is a step35 draft GGUF (MTP blocks only)
    for the trunk GGUF `model`: same trunk depth, embedding length and vocabulary."""
    draft = Path(draft)
    if not draft.is_file():
        raise StepGGUFError(f"draft {draft} does not exist; give the draft GGUF that `convert "
                            f"--mtp split` wrote (NAME{SUFFIX}.gguf)")
    m, d = open_gguf(model), open_gguf(draft)
    if has_heads(m):
        raise StepGGUFError(f"{m.path.name} already holds its MTP heads; drop --draft (or "
                            "convert with --mtp split for a separate draft)")
    d_layer, d_nextn, d_embd, d_vocab = _shape(d)
    names = {t.name for t in d.tensors}
    if not d_nextn:
        raise StepGGUFError(f"{draft.name} declares no MTP heads ({_key(_K.NEXTN_PREDICT_LAYERS)} "
                            "missing or 0): it is not a draft; give the file `--mtp split` wrote")
    if not has_heads(d):
        raise StepGGUFError(f"{draft.name} declares {d_nextn} MTP heads but lacks their "
                            f"blk.N.nextn.* tensors: it is a trunk, not a draft; give the file "
                            "`--mtp split` wrote")
    if _weight(_T.ATTN_NORM, 0) in names:
        raise StepGGUFError(f"{draft.name} holds a whole model (trunk layers and MTP heads), not a "
                            "draft: run it as the model, or give the draft `--mtp split` wrote")
    missing = [n for n in (_weight(_T.TOKEN_EMBD), _weight(_T.OUTPUT_NORM)) if n not in names]
    if missing:
        raise StepGGUFError(f"{draft.name} lacks {', '.join(missing)}, which llama.cpp needs to "
                            "load a draft on its own; write it again with `--mtp split`")
    m_layer, _, m_embd, m_vocab = _shape(m)
    theirs = (d_layer, d_embd, d_vocab)
    if theirs != (m_layer, m_embd, m_vocab):
        raise StepGGUFError(
            f"{draft.name} is the draft of another model: trunk layers, embedding length and "
            f"vocabulary {'/'.join(map(str, theirs))} against {m.path.name}'s "
            f"{m_layer}/{m_embd}/{m_vocab}; give the draft converted with this model")


def resolve(model: str | os.PathLike, given: str | os.PathLike | None,
            mtp: bool = True) -> Path | None:
    """The draft GGUF to draft `model` with: `given`; else, for a GGUF without MTP heads of
    its own, the one `--mtp split` wrote beside it (checked here, so that a stale file names
    itself); None when drafting is off or there is none."""
    if not mtp:
        if given is not None:
            log.info("MTP drafting is off: not loading the draft %s", given)
        return None
    if given is not None:
        log.info("drafting with %s", given)
        return Path(given)
    model = Path(model)
    found = beside(model)
    if model.suffix != ".gguf" or not model.is_file() or not found.is_file() or found == model:
        return None
    if has_heads(open_gguf(model)):
        return None  # the embedded heads draft; a file beside them is not needed
    try:
        check(model, found)
    except StepGGUFError as exc:
        raise StepGGUFError(f"{exc} ({found.name} was found beside {model.name}: give --draft "
                            "FILE, or --no-mtp)") from None
    log.info("drafting with %s, found beside %s", found, model.name)
    return found
