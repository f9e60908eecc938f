"""Partial outputs that survive a crash: a hidden file beside the output plus a journal.

Tensors are written in a fixed order, so a partial file is the finished file cut short. After
each tensor the journal records how far the partial is complete and for which plan (a
fingerprint of the header bytes, the source files' sizes and mtimes, the transforms and the
step-gguf version). Re-running the same command after a crash or kill continues after the last
complete tensor; the result is byte-identical to an uninterrupted run.

What survives a killed process is everything it wrote (the page cache); what survives a power
loss is only what was synced. The journal keeps both points, with the boot id: after a reboot
only the synced point is trusted. Syncing every SYNC_BYTES keeps that cost small.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from .. import __version__
from ..core.errors import StepGGUFError

log = logging.getLogger(__name__)

SYNC_BYTES = 1 << 30


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def source_fingerprint(plans) -> str:
    """What the plan reads and how it transforms it, beyond what the header already says."""
    h = hashlib.sha256(__version__.encode())
    stats: dict[str, os.stat_result] = {}
    for p in plans:
        if p.src is not None:
            shard = str(p.src.shard)
            st = stats.setdefault(shard, os.stat(shard))
            h.update(f"{p.name}\0{shard}\0{st.st_size}\0{st.st_mtime_ns}\0{p.src.offset}\0".encode())
        for arr in (p.col_scale, p.imatrix, p.data):
            if arr is not None:
                h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


class Partial:
    """The partial file of one output, its journal and its lock."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out.with_name(f".{out.name}.partial")
        self.journal = out.with_name(f".{out.name}.partial.json")
        self._journal_tmp = self.journal.with_name(self.journal.name + ".tmp")  # the next journal
        self._lock_path = out.with_name(f".{out.name}.partial.lock")
        self._lock = None
        self._synced = (0, 0)
        self._since_sync = 0

    def lock(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(self._lock_path, "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise StepGGUFError(f"another step-gguf run is writing {self.out} (it holds "
                                f"{self._lock_path}); wait for it to finish or stop it") from None

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock_path.unlink(missing_ok=True)
            self._lock.close()
            self._lock = None

    @property
    def existing_bytes(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def resume_point(self, fingerprint: str) -> tuple[int, int] | None:
        """(tensors complete, byte offset after them) of a partial made by the same plan, or
        None after removing a partial that cannot be continued."""
        state = None
        if self.journal.is_file():
            try:
                state = json.loads(self.journal.read_text())
            except (OSError, ValueError):
                state = None
        point = None
        if isinstance(state, dict) and state.get("fingerprint") == fingerprint:
            key = "written" if state.get("boot_id") == _boot_id() and _boot_id() else "synced"
            done, offset = state.get(key, (0, 0))
            if isinstance(done, int) and isinstance(offset, int) and 0 < offset <= self.existing_bytes:
                point = (done, offset)
        if point is None and self.left:
            why = ("from another plan or version" if isinstance(state, dict)
                   else "left by a run that died before its first tensor")
            log.warning("removing %s: a partial output %s", self.path, why)
            self.discard()
        return point

    def record(self, fd: int, fingerprint: str, done: int, offset: int, written: int) -> None:
        """`done` tensors are complete up to `offset`; sync once SYNC_BYTES have accumulated."""
        self._since_sync += written
        if self._since_sync >= SYNC_BYTES:
            os.fdatasync(fd)
            self._synced, self._since_sync = (done, offset), 0
        state = {"fingerprint": fingerprint, "boot_id": _boot_id(), "written": [done, offset],
                 "synced": list(self._synced)}
        self._journal_tmp.write_text(json.dumps(state))
        os.replace(self._journal_tmp, self.journal)

    @property
    def left(self) -> bool:
        """Whether a run left anything of this partial (a kill can land between a journal's
        write and its rename)."""
        return any(f.exists() for f in (self.path, self.journal, self._journal_tmp))

    def discard(self) -> None:
        for f in (self.path, self.journal, self._journal_tmp):
            f.unlink(missing_ok=True)

    def finish(self) -> None:
        """Move the complete partial into place and clear its journal and lock."""
        os.replace(self.path, self.out)
        self.journal.unlink(missing_ok=True)
        self._journal_tmp.unlink(missing_ok=True)
        self.unlock()
