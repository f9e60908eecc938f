"""Step 3.5 checkpoint -> GGUF: the checkpoint read and checked (config, shards, shapes,
tokenizer) before the first byte is written (`open_checkpoint`), its metadata, and the output
jobs (one GGUF, or trunk + MTP draft) that `output.write_outputs` streams tensor by tensor.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import gguf
from gguf import GGMLQuantizationType as Q
from gguf.metadata import Metadata

from ..core.choices import MTP_MODES, OUTTYPES, MtpMode, OutType
from ..core.errors import CheckpointError, StepGGUFError
from ..core.model import Step35Config, layer_of, read_config
from ..core.vision import VisionConfig, read_vision
from ..core.recipe import Recipe
from ..files.checkpoint import Checkpoint
from ..files.model_card import CardOverrides, load_card
from ..files.vocab import Vocab, load_vocab
from .mmproj import mmproj_job, mmproj_plans
from .output import OutputJob, SplitLimits, write_outputs
from .output_tensors import OutputTensor, output_tensors, split_mtp

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- metadata


def write_metadata(w: gguf.GGUFWriter, cfg: Step35Config, vocab: Vocab, with_nextn: bool,
                   card: Metadata) -> None:
    n = cfg.n_layer_all if with_nextn else cfg.n_layer
    card.set_gguf_meta_model(w)
    w.add_block_count(n)
    if with_nextn and cfg.n_nextn:
        w.add_nextn_predict_layers(cfg.n_nextn)
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(list(cfg.n_head[:n]))
    w.add_head_count_kv(list(cfg.n_head_kv[:n]))
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_sliding_window(cfg.sliding_window)
    w.add_sliding_window_pattern(list(cfg.is_swa[:n]))
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_rope_dimension_count(cfg.head_dim)  # llama.cpp halves it on full-attention layers
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_freq_base_swa(cfg.rope_theta_swa)
    w.add_expert_count(cfg.n_expert)
    w.add_expert_used_count(cfg.n_expert_used)
    w.add_expert_feed_forward_length(cfg.expert_ff)
    w.add_expert_shared_feed_forward_length(cfg.shexp_ff)
    w.add_expert_weights_scale(cfg.expert_weights_scale)
    w.add_expert_weights_norm(cfg.expert_weights_norm)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_leading_dense_block_count(cfg.leading_dense)
    w.add_swiglu_clamp_exp(list(cfg.swiglu_limits[:n]))
    w.add_swiglu_clamp_shexp(list(cfg.swiglu_limits_shared[:n]))

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.token_types)
    w.add_token_merges(vocab.merges)
    for setter, value in ((w.add_bos_token_id, vocab.bos_id), (w.add_eos_token_id, vocab.eos_id),
                          (w.add_pad_token_id, vocab.pad_id)):
        if value is not None:
            setter(value)
    w.add_add_bos_token(vocab.add_bos)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)


# ---------------------------------------------------------------- tensor data


@dataclass(frozen=True)
class ConvertResult:
    outputs: tuple[Path, ...]
    n_tensors: int
    source_bytes: int
    notes: tuple[str, ...] = ()     # what of the source was left out, and why


@dataclass(frozen=True)
class OpenedCheckpoint:
    cfg: Step35Config
    plans: list[OutputTensor]
    vocab: Vocab
    card: Metadata
    heads: bool = True              # the MTP heads are among the plans
    notes: tuple[str, ...] = ()     # what of the source was left out, and why
    vision: VisionConfig | None = None      # with `mmproj`: the vision tower and its plans
    vision_plans: tuple[OutputTensor, ...] = ()


def open_checkpoint(src: str | os.PathLike, recipe: Recipe, *, mtp: MtpMode = "keep",
                    tokenizer_pre: str | None = None, card: CardOverrides | None = None,
                    mmproj: bool = False) -> OpenedCheckpoint:
    """Read and validate a checkpoint folder and plan its tensors under `recipe` (no weight read);
    with `mmproj`, its vision tower's too."""
    src = Path(src)
    if mtp not in MTP_MODES:
        raise StepGGUFError(f"unknown MTP mode {mtp!r}; choose one of {', '.join(MTP_MODES)}")
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a folder; point to the checkpoint directory")
    raw = read_config(src)
    cfg = Step35Config.from_dir(src, raw)
    ckpt = Checkpoint(src)
    notes = []
    if cfg.n_nextn and not any((layer_of(n) or 0) >= cfg.n_layer for n in ckpt.tensors):
        if mtp == "split":
            raise CheckpointError(f"{src} has no weights for the {cfg.n_nextn} MTP heads its config.json names, "
                                  "so there is no draft to split off; leave out --mtp split")
        notes.append(f"{src.name} has no weights for the {cfg.n_nextn} MTP heads its config.json names "
                     "(transformers' save_pretrained leaves them out): converted without heads, so "
                     "there is no MTP drafting")
        mtp = "drop"
    vision, vision_plans = None, []
    if mmproj:
        vision = read_vision(src, raw, cfg.hidden_size)
        if vision is None:
            raise CheckpointError(f"{src} is Step 3.5, which has no vision tower: leave out --mmproj")
        vision_plans = mmproj_plans(vision, ckpt.outside, recipe)
    elif ckpt.outside:
        notes.append(f"left out the vision tower and projector ({len(ckpt.outside)} tensors, "
                     f"{next(iter(ckpt.outside))} ...): add --mmproj OUT-mmproj.gguf to write them "
                     "as the file llama.cpp's mtmd loads beside the model")
    plans = output_tensors(cfg, ckpt, recipe, with_mtp=mtp != "drop")
    return OpenedCheckpoint(cfg, plans, load_vocab(src, cfg.vocab_size, tokenizer_pre),
                            load_card(src, cfg, card), heads=mtp != "drop", notes=tuple(notes),
                            vision=vision, vision_plans=tuple(vision_plans))


def checkpoint_jobs(opened: OpenedCheckpoint, out: Path, *, mtp: MtpMode = "keep",
                    draft_out: str | os.PathLike | None = None, mmproj_out: str | os.PathLike | None = None,
                    extra_kv: Callable[[gguf.GGUFWriter], None] = lambda w: None) -> list[OutputJob]:
    """The output files of a checkpoint conversion: one GGUF, or trunk + draft for mtp="split";
    and the mmproj at `mmproj_out` for a checkpoint opened with its vision tower."""
    if (mtp == "split") != (draft_out is not None):
        raise StepGGUFError("a separate draft GGUF needs both mtp='split' and a draft output path")
    if (mmproj_out is not None) != (opened.vision is not None):
        raise StepGGUFError("an mmproj GGUF needs both a checkpoint opened with its vision tower and a path")
    vision = [] if mmproj_out is None else [
        mmproj_job(opened.vision, list(opened.vision_plans), opened.card.name, Path(mmproj_out))]
    cfg, plans = opened.cfg, opened.plans

    def job(path: Path, ps: list[OutputTensor], with_nextn: bool) -> OutputJob:
        def write_kv(w: gguf.GGUFWriter) -> None:
            write_metadata(w, cfg, opened.vocab, with_nextn, opened.card)
            extra_kv(w)
        return OutputJob(path, ps, write_kv)

    if not opened.heads:
        return [job(out, plans, False), *vision]
    if mtp == "keep" or not cfg.n_nextn:
        return [job(out, plans, True), *vision]
    trunk, draft = split_mtp(plans, cfg)
    return [job(out, trunk, True), job(Path(draft_out), draft, True), *vision]


def convert(src: str | os.PathLike, out: str | os.PathLike, *, outtype: OutType = "bf16",
            mtp: MtpMode = "keep", draft_out: str | os.PathLike | None = None,
            mmproj_out: str | os.PathLike | None = None, tokenizer_pre: str | None = None,
            threads: int | None = None, resume: bool = True,
            card: CardOverrides | None = None, split: SplitLimits | None = None,
            on_start: Callable[[int], None] = lambda total: None,
            on_bytes: Callable[[int], None] = lambda n: None) -> ConvertResult:
    """Convert the checkpoint folder `src` to `out` (and, with mtp="split", `draft_out`).

    With `split` limits, `out` is written as llama.cpp's gguf-split shards OUT-00001-of-0000N.gguf
    ... (the draft GGUF of mtp="split" stays one file).

    on_start(total_source_bytes) is called once validation passed, then on_bytes(n) as
    source bytes are consumed: enough for a byte-counting progress bar. An interrupted run of
    the same conversion is continued unless `resume` is false. `card` overrides the model
    card's name, basename or license. With `mmproj_out`, Step 3.7's vision tower is written
    there too, as the mmproj GGUF llama.cpp's mtmd loads beside the model.
    """
    if outtype not in OUTTYPES:
        raise StepGGUFError(f"unknown outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    opened = open_checkpoint(src, Recipe.single(Q[outtype.upper()]), mtp=mtp, tokenizer_pre=tokenizer_pre,
                             card=card, mmproj=mmproj_out is not None)
    jobs = checkpoint_jobs(opened, Path(out), mtp=mtp, draft_out=draft_out, mmproj_out=mmproj_out)
    jobs[0] = replace(jobs[0], split=split)
    written = write_outputs(jobs, on_start, on_bytes, threads=threads, resume=resume)
    return ConvertResult(written.paths, sum(len(j.plans) for j in jobs), written.source_bytes, opened.notes)
