"""The `ModelFacts` of a model as a file holds it: a GGUF as it is (one file or a split set,
with a separate MTP draft beside it), or a checkpoint folder or bare config.json as a recipe
would quantize it, priced from shapes alone."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from gguf import Keys

from ..core.errors import SourceError, StepGGUFError, malformed
from ..core.model import Step35Config
from ..core.model_facts import MadeFor, ModelFacts, Tensor
from ..core.recipe import load_recipe
from ..files.draft import check
from ..files.mmproj import read_mmproj
from ..files.gguf_source import first_shard, open_gguf
from ..files.source_path import locate
from .output_tensors import OutputTensor
from .quantize import open_source


def read_facts(src: str | os.PathLike, scheme: str | None = None,
               draft: str | os.PathLike | None = None, mmproj: str | os.PathLike | None = None) -> ModelFacts:
    """Sizes and shapes of a GGUF as it is, or of a checkpoint folder / config.json under a
    quantization scheme (default int4-mixed), priced by the quantizer's dry run. `draft`: a
    separate MTP draft GGUF for the GGUF `src` (checked against it), loaded beside it;
    `mmproj`: Step 3.7's vision tower, loaded beside it for images."""
    src = Path(src)
    if mmproj is not None:
        return replace(read_facts(src, scheme, draft), vision=read_mmproj(mmproj))
    if locate(src)[0] == "gguf":
        if scheme:
            raise StepGGUFError(f"{src} is already a GGUF; --scheme prices a checkpoint or config")
        if draft is not None:
            check(src, draft)
            with malformed(draft, SourceError, "is not a readable GGUF"):
                d = _gguf_facts(Path(draft))
        with malformed(src, SourceError, "is not a readable GGUF"):
            m = _gguf_facts(src)
        return m if draft is None else _with_draft(m, d, draft)
    if draft is not None:
        raise StepGGUFError(f"--draft goes with a GGUF model; {src} is a checkpoint or config, "
                            "planned with its own MTP heads")
    source = open_source(src, load_recipe(scheme or "int4-mixed"))
    return planned_facts(src.name, source.cfg, source.plans)


def planned_tensors(plans: list[OutputTensor]) -> tuple[Tensor, ...]:
    """The tensors of the file `plans` would write, as placement knows them."""
    return tuple(Tensor(p.name, p.nbytes, p.n_params) for p in plans)


def planned_facts(name: str, cfg: Step35Config, plans: list[OutputTensor]) -> ModelFacts:
    """The facts of the file `plans` would write for a model of `cfg`."""
    return ModelFacts(name=name, n_layer=cfg.n_layer, n_nextn=cfg.n_nextn, is_swa=cfg.is_swa,
                      n_head_kv=cfg.n_head_kv, head_dim=cfg.head_dim, window=cfg.sliding_window,
                      n_vocab=cfg.vocab_size, n_embd=cfg.hidden_size, n_expert=cfg.n_expert,
                      n_expert_used=cfg.n_expert_used, expert_ff=cfg.expert_ff, max_heads=max(cfg.n_head),
                      n_ctx_train=cfg.context_length, tensors=planned_tensors(plans))


def _gguf_facts(path: Path) -> ModelFacts:
    """Facts of a GGUF: one file, or the whole set from any shard's path (named by the first
    shard, the file llama.cpp loads)."""
    reader = open_gguf(path)
    kv = reader.kv
    path = reader.path
    n_trunk, n_nextn = reader.layers
    n_all = n_trunk + n_nextn

    def per_layer(value) -> tuple:
        values = tuple(value) if isinstance(value, list) else (value,) * n_all
        if len(values) < n_all:
            raise SourceError(f"{path} has a per-layer array shorter than block_count {n_all}")
        return values[:n_all]

    def largest(value) -> int:  # a scalar, or llama.cpp's per-layer array form of the key
        return max(int(x) for x in per_layer(value))

    tensors = tuple(Tensor(t.name, int(t.n_bytes), int(t.n_elements)) for t in reader.tensors)
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise SourceError(f"{path} has no token_embd.weight")
    # head counts may be scalars or per-layer arrays; like llama.cpp's loader, the KV heads
    # default to the heads and the head size to embedding_length / the first layer's heads
    n_embd = int(kv(Keys.LLM.EMBEDDING_LENGTH))
    n_head = tuple(int(x) for x in per_layer(kv(Keys.Attention.HEAD_COUNT)))
    n_head_kv = tuple(int(x) for x in per_layer(kv(Keys.Attention.HEAD_COUNT_KV, list(n_head))))
    head_dim = int(kv(Keys.Attention.KEY_LENGTH, n_embd // n_head[0] if n_head[0] else 0))
    return ModelFacts(
        name=path.name, n_layer=n_trunk, n_nextn=n_nextn,
        is_swa=tuple(bool(x) for x in per_layer(kv(Keys.Attention.SLIDING_WINDOW_PATTERN, [False] * n_all))),
        n_head_kv=n_head_kv, head_dim=head_dim, window=int(kv(Keys.Attention.SLIDING_WINDOW, 0)),
        n_vocab=int(embd.shape[1]), n_embd=n_embd, n_expert=int(kv(Keys.LLM.EXPERT_COUNT, 1)),
        n_expert_used=reader.experts_used,
        expert_ff=largest(kv(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, 0)),
        max_heads=max(n_head), n_ctx_train=int(kv(Keys.LLM.CONTEXT_LENGTH)), tensors=tensors,
        made_for=_made_for(kv))


def _made_for(kv) -> MadeFor | None:
    values = [kv(key, None) for key in MadeFor.KEYS]
    if any(v is None for v in values):
        return None
    profile, *numbers = values
    return MadeFor(str(profile), *(int(n) for n in numbers))


def _with_draft(m: ModelFacts, d: ModelFacts, path: str | os.PathLike) -> ModelFacts:
    """The trunk `m` drafting with the heads of the separate draft `d`. llama.cpp loads the
    draft file as a second model, every tensor of it: its copies of the embeddings, output
    norm, output and RoPE factors come on top of the trunk's, as class draft_shared."""
    heads = slice(m.n_layer, m.n_layer + d.n_nextn)
    return replace(m, n_nextn=d.n_nextn, is_swa=m.is_swa[:m.n_layer] + d.is_swa[heads],
                   n_head_kv=m.n_head_kv[:m.n_layer] + d.n_head_kv[heads],
                   max_heads=max(m.max_heads, d.max_heads),
                   tensors=m.tensors + tuple(replace(t, draft=True) for t in d.tensors),
                   draft=str(first_shard(path)))
