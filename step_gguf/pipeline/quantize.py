"""Mixed quantization: the conversion pipeline with a recipe choosing each tensor's type.

The source is a hub checkpoint folder (one pass, no intermediate file), a GGUF, or, for
pricing only, a bare `config.json`. Every quantized type is encoded by ggml's own quantizers
(native/ggml.py); everything else (planning, streaming, atomic output) is the converter's.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import gguf
from gguf import GGMLQuantizationType as Q

from ..core.choices import MtpMode
from ..core.errors import SourceError, StepGGUFError, describe, malformed
from ..core.model import Step35Config, routing_weight
from ..core.recipe import NEEDS_IMATRIX, Recipe, tensor_bytes
from ..files.gguf_source import add_kv_fields, kv_fields, open_gguf
from ..files.imatrix import Imatrix, load_imatrix
from ..files.model_card import CardOverrides, load_card
from ..files.source_path import SourceKind, locate
from ..files.vocab import NORMAL, Vocab
from ..native.build import cache_dir
from .budget import BudgetError, budget_recipe
from .convert import OpenedCheckpoint, checkpoint_jobs, open_checkpoint, write_metadata
from .equalize import Equalized, equalize
from .output import OutputJob, file_bytes, write_outputs, write_shape_only
from .output_tensors import FLOAT_TYPES, OutputTensor, output_shapes
from .quantize_options import QuantizeOptions, Target, made_for_kv

log = logging.getLogger(__name__)

KV_RECIPE = "step_gguf.recipe"            # the recipe's name
KV_RECIPE_TOML = "step_gguf.recipe.toml"  # the recipe (or budget plan) itself, reusable as --recipe


@dataclass(kw_only=True)
class Source:
    """What a recipe is applied to: the planned tensors and how to write the metadata."""

    kind: SourceKind
    path: Path
    n_layer: int                  # trunk layers (recipe layer spans count these)
    plans: list[OutputTensor]
    write_kv: Callable[[gguf.GGUFWriter], None]
    top_k: int                    # experts each token uses
    opened: OpenedCheckpoint | None = None   # checkpoint sources: config, vocab
    cfg: Step35Config | None = None          # checkpoint and config sources
    routing_weight: float = 1.0   # what the router multiplies a chosen expert's output by, typically

    @property
    def readable(self) -> bool:
        return self.kind != "config"

    def opened_with_plans(self) -> OpenedCheckpoint:
        """A checkpoint source's opened checkpoint, with the plans as they are now."""
        return replace(self.opened, plans=self.plans)


def _placeholder_vocab(n: int) -> Vocab:
    # pricing needs a loadable header, not a tokenizer
    return Vocab("default", [f"<t{i}>" for i in range(n)], [NORMAL] * n, [], None, None, None,
                 False, None)


def open_source(src: str | os.PathLike, recipe: Recipe, *, mtp: MtpMode = "keep",
                tokenizer_pre: str | None = None, card: CardOverrides | None = None, mmproj: bool = False) -> Source:
    """Plan `src` under `recipe`, reading headers only. `card` and `mmproj` (the vision tower
    planned too) apply to checkpoint sources."""
    kind, src = locate(src)
    if mmproj and kind != "checkpoint":
        raise SourceError(f"{src} holds no vision tower: --mmproj takes it from a Step 3.7 checkpoint folder")
    if kind == "checkpoint":
        opened = open_checkpoint(src, recipe, mtp=mtp, tokenizer_pre=tokenizer_pre, card=card, mmproj=mmproj)
        return Source(kind="checkpoint", path=src, n_layer=opened.cfg.n_layer, plans=opened.plans,
                      write_kv=lambda w: write_metadata(w, opened.cfg, opened.vocab, opened.heads, opened.card),
                      top_k=opened.cfg.n_expert_used, opened=opened, cfg=opened.cfg,
                      routing_weight=opened.cfg.routing_weight)
    if kind == "config":
        cfg = _config(src)
        vocab = _placeholder_vocab(cfg.vocab_size)
        plans = output_shapes(cfg, recipe, with_mtp=mtp != "drop")
        card = load_card(src.parent, cfg)
        return Source(kind="config", path=src, n_layer=cfg.n_layer, plans=plans,
                      write_kv=lambda w: write_metadata(w, cfg, vocab, mtp != "drop", card),
                      top_k=cfg.n_expert_used, cfg=cfg, routing_weight=cfg.routing_weight)
    return _open_gguf(src, recipe)


def _config(path: Path) -> Step35Config:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SourceError(f"{path} is not a readable JSON config ({describe(exc)})") from None
    if not isinstance(raw, dict):
        raise SourceError(f"{path} is not a config.json (expected a JSON object)")
    with malformed(path, SourceError, "has a field of the wrong type or value"):
        return Step35Config.from_dict(raw)


# keys a re-encoded GGUF must not inherit: the writer sets them anew (split.*: a split source's
# shard keys; a split output gets its own)
_DERIVED_KEYS = ("GGUF.", gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE,
                 gguf.Keys.General.QUANTIZATION_VERSION, gguf.Keys.General.ALIGNMENT, "quantize.",
                 "step_gguf.", "split.", gguf.Keys.General.QUANTIZED_BY)


def _open_gguf(path: Path, recipe: Recipe) -> Source:
    with malformed(path, SourceError, "is not a readable GGUF"):
        return _read_gguf(path, recipe)


def _read_gguf(path: Path, recipe: Recipe) -> Source:
    reader = open_gguf(path)  # one file or any shard of a split set, checked
    kv = reader.kv
    n_layer = reader.layers[0]
    plans = []
    for t in reader.tensors:  # in shard order, each pointing into its shard
        shape = t.torch_shape
        choice = recipe.resolve(t.name, shape, n_layer)
        plans.append(OutputTensor("", t.name, shape, choice.qtype, t.ref(), rule=choice.rule))

    # decoded now, so a corrupt value is reported as unreadable input, not met while writing
    fields = kv_fields(reader, _DERIVED_KEYS)
    top_k = reader.experts_used
    routing = routing_weight(float(kv(gguf.Keys.LLM.EXPERT_WEIGHTS_SCALE, 1.0) or 1.0),
                             bool(kv(gguf.Keys.LLM.EXPERT_WEIGHTS_NORM, False)), top_k)
    return Source(kind="gguf", path=path, n_layer=n_layer, plans=plans,
                  write_kv=lambda w: add_kv_fields(w, fields), top_k=top_k, routing_weight=routing)


# ---------------------------------------------------------------- pricing

@dataclass(frozen=True)
class PlanRow:
    name: str
    shape: tuple[int, ...]
    qtype: str
    bytes: int
    why: str


@dataclass(frozen=True)
class Pricing:
    recipe: str
    rows: tuple[PlanRow, ...]
    n_params: int

    @property
    def total_bytes(self) -> int:
        return sum(r.bytes for r in self.rows)

    @property
    def bpw(self) -> float:
        return 8 * self.total_bytes / max(self.n_params, 1)

    def by_type(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r.qtype] = out.get(r.qtype, 0) + r.bytes
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def to_json(self) -> dict:
        return {"recipe": self.recipe, "total_bytes": self.total_bytes, "n_params": self.n_params,
                "bpw": round(self.bpw, 4), "by_type": self.by_type(),
                "tensors": [{"name": r.name, "shape": list(r.shape), "type": r.qtype,
                             "bytes": r.bytes, "why": r.why} for r in self.rows]}


def price(plans: list[OutputTensor], recipe_name: str) -> Pricing:
    rows = tuple(PlanRow(p.name, p.shape, p.qtype.name, p.nbytes, p.rule.why if p.rule else "")
                 for p in plans)
    return Pricing(recipe_name, rows, sum(p.n_params for p in plans))


def dry_run(src: str | os.PathLike, recipe: Recipe, *, mtp: MtpMode = "keep") -> Pricing:
    """The plan and its size, from headers alone."""
    return price(open_source(src, recipe, mtp=mtp).plans, recipe.name)


@dataclass(frozen=True)
class StockPricing:
    ftype: str
    total_bytes: int
    types: dict[str, str]     # tensor -> type llama.cpp's quantizer chose

    def to_json(self) -> dict:
        return {"ftype": self.ftype, "total_bytes": self.total_bytes}


def price_stock(src: str | os.PathLike, ftype: str, *, mtp: MtpMode = "keep",
                workdir: Path | None = None) -> StockPricing:
    """What llama.cpp's own quantizer makes of `src` as `ftype` (e.g. Q4_K_M), asked in its
    dry-run mode on a shape-only GGUF: the real header, a sparse data region."""
    import tempfile  # noqa: PLC0415

    from ..native import tools  # noqa: PLC0415

    source = open_source(src, Recipe.single(Q.BF16), mtp=mtp)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        shape_file = Path(tmp) / "shapes.gguf"
        write_shape_only(shape_file, source.plans, source.write_kv)
        types = tools.stock_dry_run(shape_file, ftype)
    shapes = {p.name: p.shape for p in source.plans}
    missing = set(shapes) - set(types)
    if missing:
        raise StepGGUFError(f"llama.cpp's quantizer did not report {sorted(missing)[0]}")
    total = sum(tensor_bytes(shapes[n], Q[t]) for n, t in types.items())
    return StockPricing(ftype, total, types)


# llama-quantize's record of the importance data it used (llama.cpp's LLM_KV_QUANTIZE_IMATRIX_*;
# gguf-py has no names for them)
_IMATRIX_FILE, _IMATRIX_DATASET = "quantize.imatrix.file", "quantize.imatrix.dataset"
_IMATRIX_ENTRIES, _IMATRIX_CHUNKS = "quantize.imatrix.entries_count", "quantize.imatrix.chunks_count"

# ---------------------------------------------------------------- quantizing

def _requantize_check(source: Source, allow: bool) -> None:
    requantized = []
    for p in source.plans:
        if p.src is not None and p.src.dtype not in {q.name for q in FLOAT_TYPES} and p.src.dtype != p.qtype.name:
            if allow:
                requantized.append(p)
                continue
            raise StepGGUFError(
                f"{source.path.name} already holds quantized tensors ({p.name} is {p.src.dtype}); "
                "requantizing stacks a second rounding error on the first. Quantize from the "
                "checkpoint or a BF16/F32 GGUF, or pass --allow-requantize to do it anyway")
    if requantized:  # one line, not one per tensor (a real model has hundreds)
        p = requantized[0]
        log.warning("requantizing %d already quantized tensors (%s from %s to %s, ...)",
                    len(requantized), p.name, p.src.dtype, p.qtype.name)


def recipe_kv(recipe: Recipe) -> Callable[[gguf.GGUFWriter], None]:
    def write(w: gguf.GGUFWriter) -> None:
        w.add_string(KV_RECIPE, recipe.name)
        w.add_string(KV_RECIPE_TOML, recipe.to_toml())
    return write


def attach_imatrix(plans: list[OutputTensor], imat: Imatrix | None, recipe: Recipe) -> list[OutputTensor]:
    """Give every quantized matrix its importance data; refuse types that cannot do without."""
    if imat is not None:
        imat.check_against({p.name: tuple(reversed(p.shape)) for p in plans})
        plans = [replace(p, imatrix=imat[p.name]) if p.name in imat and p.qtype not in FLOAT_TYPES
                 else p for p in plans]
    for p in plans:
        if p.qtype in NEEDS_IMATRIX and p.imatrix is None:
            raise StepGGUFError(
                f"{p.name} is to be {p.qtype.name}, which ggml cannot quantize without importance "
                "data; make one with `step-gguf imatrix MODEL.gguf -o imatrix.gguf` and pass "
                "--imatrix" + (" (this imatrix has no entry for it)" if imat is not None else ""))
    if recipe.needs_imatrix and imat is None:
        raise StepGGUFError(f"recipe {recipe.name} needs an importance matrix: make one with "
                            "`step-gguf imatrix MODEL.gguf -o imatrix.gguf` and pass --imatrix")
    return plans


def imatrix_kv(imat: Imatrix) -> Callable[[gguf.GGUFWriter], None]:
    """The keys llama-quantize records about the importance data it used."""
    def write(w: gguf.GGUFWriter) -> None:
        w.add_string(_IMATRIX_FILE, imat.path.name)
        if imat.datasets:
            w.add_string(_IMATRIX_DATASET, imat.datasets[0])
        w.add_int32(_IMATRIX_ENTRIES, len(imat))
        w.add_int32(_IMATRIX_CHUNKS, imat.chunk_count)
    return write


def retype(plans: list[OutputTensor], recipe: Recipe, n_layer: int) -> list[OutputTensor]:
    out = []
    for p in plans:
        choice = recipe.resolve(p.name, p.shape, n_layer)
        out.append(replace(p, qtype=choice.qtype, rule=choice.rule))
    return out


@dataclass(frozen=True)
class QuantizeResult:
    outputs: tuple[Path, ...]
    pricing: Pricing
    source_bytes: int
    recipe: Recipe
    equalized: tuple[Equalized, ...] = ()
    notes: tuple[str, ...] = ()     # what of the source was left out, and why


def _jobs(source: Source, out: Path, o: QuantizeOptions,
          extra: list[Callable[[gguf.GGUFWriter], None]]) -> list[OutputJob]:
    """The files quantizing `source` writes: its metadata (a GGUF's own keys, with the card's
    overrides) and the `extra` keys after it."""
    def kv(w: gguf.GGUFWriter) -> None:
        for write in extra:
            write(w)

    if source.opened is not None:
        return checkpoint_jobs(source.opened_with_plans(), out, mtp=o.mtp, extra_kv=kv, draft_out=o.draft_out,
                               mmproj_out=o.mmproj_out)

    def write_kv(w: gguf.GGUFWriter) -> None:
        source.write_kv(w)
        if o.card is not None:
            o.card.write(w)
        kv(w)
    return [OutputJob(out, source.plans, write_kv)]


def _fit(source: Source, plans: list[OutputTensor], imat: Imatrix | None, base: str, target: Target,
         jobs_for: Callable[[Recipe], list[OutputJob]], on_stage: Callable[[str], None]) -> Recipe:
    """The budget recipe for `target`, applied to `source.plans`. A size target holds the whole
    output: the tensor budget is the target less what the header, the stored plan and the
    padding take, measured on the files the recipe makes, and lowered until they fit."""
    budget = target.resolve(sum(p.n_params for p in plans))
    limit = budget
    for _ in range(8):  # the header barely depends on the allocation: one or two rounds
        recipe = budget_recipe(plans, imat, source.top_k, limit, base, cache_dir() / "sensitivity",
                                 source.n_layer, source.routing_weight,
                                 on_tensor=lambda name: on_stage(f"measuring {name}"))
        source.plans = attach_imatrix(retype(plans, recipe, source.n_layer), imat, recipe)
        if target.bytes is None:  # a share of the tensor data, or its bytes
            return recipe
        size = file_bytes(jobs_for(recipe))
        if size <= budget:
            return recipe
        # what the file holds beyond the tensor data the allocation counted comes off its budget
        limit = min(limit - 1, budget - (size - sum(p.nbytes for p in source.plans)))
    raise BudgetError(f"the output does not fit {budget} bytes with its header; raise --target-size")


# a source ready to quantize: its importance data attached, its equalization applied
Prepared = tuple[Source, Imatrix | None, tuple[Equalized, ...]]


def prepare(src: str | os.PathLike, recipe: Recipe, options: QuantizeOptions = QuantizeOptions(),
            on_stage: Callable[[str], None] = lambda what: None) -> Prepared:
    """The source `quantize` writes from, its importance data attached and its equalization
    applied: (source, importance data, what equalization did)."""
    o = options
    source = open_source(src, recipe, mtp=o.mtp, tokenizer_pre=o.tokenizer_pre, card=o.card,
                         mmproj=o.mmproj_out is not None)
    if not source.readable:
        raise SourceError(f"{source.path} is a config without weights: it can be priced "
                          "(--dry-run), not quantized")
    if source.kind == "gguf" and o.mtp != "keep":
        raise SourceError("--mtp drop/split applies to checkpoint sources; this GGUF is quantized as it is")
    if o.equalization and o.imatrix is None:
        raise StepGGUFError("equalization derives its scales from activations: pass --imatrix too")
    _requantize_check(source, o.allow_requantize)
    imat = load_imatrix(o.imatrix) if o.imatrix is not None else None
    plans = attach_imatrix(source.plans, imat, recipe)
    report: list[Equalized] = []
    if o.equalization:
        on_stage("equalizing")
        plans, report = equalize(plans, imat, source.top_k)
    source.plans = plans
    return source, imat, tuple(report)


def quantize(src: str | os.PathLike, out: str | os.PathLike, recipe: Recipe,
             options: QuantizeOptions = QuantizeOptions(), *,
             on_stage: Callable[[str], None] = lambda what: None,
             on_start: Callable[[int], None] = lambda total: None,
             on_bytes: Callable[[int], None] = lambda n: None,
             prepared: Prepared | None = None) -> QuantizeResult:
    """Quantize `src` to `out` under `recipe` in one streaming pass, as `options` say. Nothing
    appears at `out` unless the whole file was written. `on_stage` names each preparatory step
    (measuring can take a while on a large model); `on_start` and `on_bytes` count source
    bytes for a progress bar. `prepared`: what prepare() returned for the same arguments."""
    o = options
    source, imat, report = prepared or prepare(src, recipe, o, on_stage)
    plans = source.plans
    extra = [made_for_kv(o.made_for)] if o.made_for is not None else []

    def jobs_for(r: Recipe) -> list[OutputJob]:
        made = _jobs(source, Path(out), o, [recipe_kv(r)] + ([imatrix_kv(imat)] if imat is not None else []) + extra)
        return [replace(made[0], split=o.split), *made[1:]]

    if o.target is not None:
        recipe = _fit(source, plans, imat, recipe.name, o.target, jobs_for, on_stage)
        plans = source.plans
    jobs = jobs_for(recipe)
    on_stage("writing")
    written = write_outputs(jobs, on_start, on_bytes, threads=o.threads, resume=o.resume)
    return QuantizeResult(written.paths, price(plans, recipe.name), written.source_bytes, recipe, report,
                          source.opened.notes if source.opened is not None else ())
