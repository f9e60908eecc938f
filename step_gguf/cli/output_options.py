"""The options of every command that writes model files, beside what it writes: the model card's
fields, llama.cpp's split limits, where a draft and Step 3.7's mmproj go."""

from __future__ import annotations

from pathlib import Path

import click

from ..core.units import SIZE_HELP, parse_size


def card_options(f):
    """--name, --basename, --license: the model card's fields, over what the checkpoint says."""
    for option in reversed([
        click.option("--name", "card_name", default=None, metavar="TEXT", help="general.name "
                     "[from README.md's front matter, config.json or the folder name]."),
        click.option("--basename", "card_basename", default=None, metavar="TEXT",
                     help="general.basename, the model family (e.g. Step-3.5-Flash)."),
        click.option("--license", "card_license", default=None, metavar="ID",
                     help="general.license (e.g. apache-2.0) [from README.md's front matter]."),
    ]):
        f = option(f)
    return f


def card(name: str | None, basename: str | None, license_id: str | None):
    from ..files.model_card import CardOverrides

    return CardOverrides(name, basename, license_id)


def split_options(f):
    """--split-max-size, --split-max-tensors: llama.cpp's gguf-split flags, for the output."""
    for option in reversed([
        click.option("--split-max-size", default=None, metavar="SIZE",
                     help="Write OUT as shards OUT-00001-of-0000N.gguf ... (llama.cpp's gguf-split "
                          "layout, loaded from the first shard), each file at most SIZE: "
                          f"{SIZE_HELP}."),
        click.option("--split-max-tensors", type=click.IntRange(1), default=None, metavar="N",
                     help="Shards of at most N tensors each (with --split-max-size: whichever "
                          "limit comes first)."),
    ]):
        f = option(f)
    return f


mmproj_option = click.option(
    "--mmproj", type=click.Path(path_type=Path), default=None, is_flag=False, flag_value=Path(),
    metavar="[PATH]", help="Step 3.7: write the vision tower and projector too, as the mmproj GGUF "
    "llama.cpp's mtmd loads (llama-server --mmproj); PATH defaults to OUT with an -mmproj suffix, "
    "where serve and run look for it.")


def mmproj_out(mmproj: Path | None, out: Path) -> Path | None:
    """--mmproj's path: as given, or beside `out` for the bare flag."""
    from ..core.vision import mmproj_path

    return None if mmproj is None else mmproj if mmproj != Path() else mmproj_path(out)


def split_limits(max_size: str | None, max_tensors: int | None):
    from ..pipeline.output import SplitLimits

    if max_size is None and max_tensors is None:
        return None
    return SplitLimits(parse_size(max_size, "--split-max-size") if max_size else 0, max_tensors or 0)


def draft_out_for(mtp: str, draft_out: Path | None, out: Path) -> Path | None:
    """Where --mtp split writes the draft: --draft-out, or beside `out`, where run, serve and
    plan look for it; None for the other modes."""
    from ..files.draft import draft_path

    return (draft_out or draft_path(out)) if mtp == "split" else None
