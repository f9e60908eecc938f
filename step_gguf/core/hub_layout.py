"""The layouts a checkpoint folder comes in, and the rule that keeps reads inside it.

A folder is a plain one, a `--local-dir` download (plain files plus a `.cache/huggingface/`
folder, which nothing here reads) or a hub cache snapshot, `models--ORG--NAME/snapshots/REV/`,
whose files are relative links to `../../blobs/SHA256`. Links may resolve anywhere inside the
repo's cache folder for a snapshot, inside the checkpoint folder otherwise: a checkpoint from
the internet must not make us read (and write into a GGUF) a file from elsewhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError

HUB_PREFIX = "models--"  # the hub client names a model's cache folder models--ORG--NAME
HUB_SEP = "--"           # stands for the `/` of ORG/NAME; the hub refuses `--` inside names


@dataclass(frozen=True)
class HubRepo:
    folder: Path          # models--ORG--NAME, resolved
    org: str | None       # None for a model without an organisation (models--NAME)
    name: str

    @property
    def repo_id(self) -> str:
        return f"{self.org}/{self.name}" if self.org else self.name

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo_id}"


def hub_repo(folder: str | os.PathLike) -> HubRepo | None:
    """The repo whose cache snapshot `folder` is, or None for any other folder."""
    snapshot = Path(folder).resolve()
    repo = snapshot.parent.parent
    if snapshot.parent.name != "snapshots" or not repo.name.startswith(HUB_PREFIX):
        return None
    parts = repo.name.removeprefix(HUB_PREFIX).split(HUB_SEP)
    if not 1 <= len(parts) <= 2 or not all(parts):
        return None
    return HubRepo(repo, *(parts if len(parts) == 2 else (None, parts[0])))


def checkpoint_file(folder: str | os.PathLike, name: str, what: str | None = None) -> Path:
    """`folder / name`, refused when it is a link that resolves outside the folder (for a hub
    snapshot: outside the repo's cache folder). It need not exist."""
    path = Path(folder) / name
    repo = hub_repo(folder)
    root = repo.folder if repo else Path(folder).resolve()
    target = path.resolve()
    if not target.is_relative_to(root):
        raise CheckpointError(f"{what or name} is a link to {target}, outside "
                              f"{repo.folder if repo else folder}; copy the file into the "
                              "checkpoint folder")
    return path
