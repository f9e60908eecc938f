"""The model card of a GGUF: its `general.*` keys, by the convention of gguf-py's
`gguf.metadata.Metadata` (the keys llama.cpp's own converter writes).

Sources, lowest priority first: the folder name (for a hub cache snapshot the repo's NAME, not
the revision, so every layout of the same files gives the same bytes), config.json
(`_name_or_path`, and the size label computed from the shapes), README.md's YAML front
matter, then the user's overrides. `general.quantized_by` is written with the file type
(convert.write_file_type): only the tensors say whether a file is quantized.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import yaml
from gguf.metadata import Metadata

from ..core.errors import MALFORMED, describe
from ..core.hub_layout import checkpoint_file, hub_repo
from ..core.model import Step35Config

log = logging.getLogger(__name__)

CARD = "README.md"
QUANTIZED_BY = "step-gguf"
EMBEDDING = "model.embed_tokens.weight"
_LISTS = ("tags", "languages")              # string arrays
_ENTRIES = ("base_models", "datasets")      # lists of {field: string}


@dataclass(frozen=True)
class CardOverrides:
    """What the user says, over anything the checkpoint says; None keeps what it says."""

    name: str | None = None
    basename: str | None = None
    license: str | None = None

    def write(self, w: gguf.GGUFWriter) -> None:
        """Apply over a card already in `w`, such as one copied from a source GGUF."""
        for key, add, value in ((gguf.Keys.General.NAME, w.add_name, self.name),
                                (gguf.Keys.General.BASENAME, w.add_basename, self.basename),
                                (gguf.Keys.General.LICENSE, w.add_license, self.license)):
            if value is not None:
                w.kv_data[0].pop(key, None)  # replaced, without the writer's duplicate-key warning
                add(value)


def param_counts(cfg: Step35Config) -> tuple[int, int]:
    """(trunk parameters, those each token uses). The token embedding counts in neither (a
    table lookup, no arithmetic: the scaling-law convention), nor do the MTP blocks (drafters
    on top of the trunk)."""
    shapes = cfg.expected_shapes(with_mtp=False)
    counts = {name: math.prod(shape) for name, shape in shapes.items() if name != EMBEDDING}
    total = sum(counts.values())
    # the routed experts are the only 3-D tensors (a layer's experts stacked); top-k of them run
    routed = sum(n for name, n in counts.items() if len(shapes[name]) == 3)
    active = total - routed + (routed * cfg.n_expert_used // cfg.n_expert if routed else 0)
    return total, active


def size_label(cfg: Step35Config) -> str:
    """`196B-A11B` for Step 3.5 Flash: total, then active parameters for a MoE model."""
    total, active = param_counts(cfg)
    label = gguf.model_weight_count_rounded_notation(total)
    return label if active == total else f"{label}-A{gguf.model_weight_count_rounded_notation(active)}"


def load_card(folder: str | os.PathLike, cfg: Step35Config,
              overrides: CardOverrides | None = None) -> Metadata:
    """The card of the checkpoint folder `folder`, whose config is `cfg`."""
    folder = Path(folder)
    total = param_counts(cfg)[0]
    repo = hub_repo(folder)
    named = Metadata.apply_metadata_heuristic(
        Metadata(), model_path=Path(repo.name if repo else folder.resolve().name), total_params=total)
    if repo is not None:
        named.source_repo_url = repo.url
    configured = Metadata.apply_metadata_heuristic(Metadata(), hf_params=_hf_params(folder),
                                                   total_params=total)
    configured.size_label = size_label(cfg)
    card = _merge(_front_matter(folder, total), configured, named)
    if overrides is not None:
        card = dataclasses.replace(card, **{k: v for k, v in dataclasses.asdict(overrides).items()
                                            if v is not None})
    if card.basename is None:  # what gguf's naming convention falls back to
        card.basename = card.name.strip().replace(" ", "-")
    return card


def _hf_params(folder: Path) -> dict | None:
    """config.json's `_name_or_path`, the one field of it gguf-py's heuristics read."""
    try:
        raw = json.loads(checkpoint_file(folder, "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None  # checkpoint sources validated it already; a bare config may have none beside it
    name = raw.get("_name_or_path") if isinstance(raw, dict) else None
    return {"_name_or_path": name} if isinstance(name, str) else None


def _front_matter(folder: Path, total: int) -> Metadata:
    """The card's fields from README.md's front matter. A card is documentation beside the
    weights: one that cannot be read is reported and left out, not a reason to refuse."""
    path = checkpoint_file(folder, CARD)
    try:
        front = Metadata.load_model_card(folder)
        card = Metadata.apply_metadata_heuristic(Metadata(), model_card=front, total_params=total)
    except (yaml.YAMLError, OSError, *MALFORMED) as exc:
        log.warning("%s: front matter unreadable (%s); the GGUF gets no model card from it",
                    path, describe(exc))
        return Metadata()
    card = _textual(card, path)
    if card.source_repo_url is None and card.base_models and len(card.base_models) == 1:
        card.source_repo_url = card.base_models[0].get("repo_url")
    return card


def _textual(card: Metadata, path: Path) -> Metadata:
    """The fields a GGUF string (or string array) holds; YAML may give any type."""
    def text(value):
        if isinstance(value, str):
            return value
        # numbers are written as YAML scalars (`version: 1.0`), but a bool is no text
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    for f in dataclasses.fields(card):
        value = getattr(card, f.name)
        if value is None:
            continue
        if f.name in _LISTS or (f.name == "license" and isinstance(value, list)):
            items = [text(v) for v in value]
            clean, dropped = [t for t in items if t is not None] or None, None in items
        elif f.name in _ENTRIES:
            entries = [{k: text(v) for k, v in e.items()} if isinstance(e, dict) else None for e in value]
            clean = [{k: t for k, t in e.items() if t is not None} for e in entries if e] or None
            dropped = any(e is None or None in e.values() for e in entries)
        else:
            clean = text(value)
            dropped = clean is None
        if dropped:
            log.warning("%s: front matter for %s holds values that are not text; they are left out",
                        path, f.name)
        setattr(card, f.name, clean)
    return card


def _merge(*cards: Metadata) -> Metadata:
    """Field by field, the first card that has it."""
    return Metadata(**{f.name: next((getattr(c, f.name) for c in cards if getattr(c, f.name) is not None), None)
                       for f in dataclasses.fields(Metadata)})
