"""The GGUF files an output job writes: one file, or llama.cpp's gguf-split shards within size
and tensor limits. Each is written to a hidden partial beside it, journaled per tensor, locked
against a second run, resumable, and renamed into place with the others once all are done."""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from ..core.errors import StepGGUFError
from ..core.model import ARCH
from ..files.gguf_source import MAX_SHARDS, SPLIT_COUNT, SPLIT_NO, SPLIT_TENSORS, parse_shard_name, shard_path
from ..files.model_card import QUANTIZED_BY
from ..files.resume import Partial, source_fingerprint
from .output_tensors import FLOAT_TYPES, OutputTensor
from .tensor_data import write_all, write_tensor

log = logging.getLogger(__name__)


# general.file_type (llama_ftype "mostly X"): a mixed file is named after its largest type
FILE_TYPE = {Q.F32: 0, Q.F16: 1, Q.Q4_0: 2, Q.Q4_1: 3, Q.Q8_0: 7, Q.Q5_0: 8, Q.Q5_1: 9,
             Q.Q2_K: 10, Q.Q3_K: 12, Q.Q4_K: 15, Q.Q5_K: 17, Q.Q6_K: 18, Q.IQ2_XXS: 19,
             Q.IQ2_XS: 20, Q.IQ3_XXS: 23, Q.IQ1_S: 24, Q.IQ4_NL: 25, Q.IQ3_S: 26, Q.IQ2_S: 28,
             Q.IQ4_XS: 30, Q.IQ1_M: 31, Q.BF16: 32}


ALIGN = gguf.GGUF_DEFAULT_ALIGNMENT  # the writer's data alignment: tensors start on it


def file_type(plans: list[OutputTensor]) -> tuple[int, bool]:
    """(general.file_type, whether any tensor is quantized) of a file holding `plans`."""
    weight: dict[Q, int] = {}
    for p in plans:
        if len(p.shape) > 1:
            weight[p.qtype] = weight.get(p.qtype, 0) + p.nbytes
    main = max(weight, key=weight.get, default=Q.F32)
    return FILE_TYPE.get(main, FILE_TYPE[Q.F32]), any(q not in FLOAT_TYPES for q in weight)


def write_file_type(w: gguf.GGUFWriter, plans: list[OutputTensor]) -> None:
    ftype, quantized = file_type(plans)
    w.add_file_type(ftype)
    if quantized:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_quantized_by(QUANTIZED_BY)


def _header(plans: list[OutputTensor], write_kv: Callable[[gguf.GGUFWriter], None] | None,
            scratch: Path, *, model_plans: list[OutputTensor] | None = None,
            split: tuple[int, int, int] | None = None, pad: bool = True, arch: str = ARCH) -> bytes:
    """The file's bytes before its first tensor (metadata, tensor infos, alignment padding).

    A shard of a split output (`split`: its number from 0, the shard count, the tensors of all
    shards) gets llama.cpp's split keys after the metadata, and its file type is that of
    `model_plans`, the whole model. Only the first shard has metadata: the others (`write_kv`
    None) hold the three split keys alone, as llama.cpp's gguf-split writes them."""
    w = gguf.GGUFWriter(None, arch)
    if write_kv is None:
        w.kv_data[0].clear()  # not even general.architecture
    else:
        write_kv(w)
        write_file_type(w, plans if model_plans is None else model_plans)
    if split is not None:  # in gguf-split's order (it sets split.count last), for its very bytes
        no, count, total = split
        w.add_uint16(SPLIT_NO, no)
        w.add_int32(SPLIT_TENSORS, total)
        w.add_uint16(SPLIT_COUNT, count)
    for p in plans:
        w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
    try:
        w.write_header_to_file(scratch)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        head = scratch.read_bytes()
    finally:
        scratch.unlink(missing_ok=True)
    return head + bytes(-len(head) % ALIGN) if pad else head


def _write_partial(partial: Partial, header: bytes, plans: list[OutputTensor], resume: bool,
                   on_bytes: Callable[[int], None], workers: int) -> None:
    """Write (or continue) the partial file: header, then each tensor padded to alignment,
    journaled after each tensor."""
    fingerprint = hashlib.sha256(header + source_fingerprint(plans).encode()).hexdigest()
    point = partial.resume_point(fingerprint) if resume else None
    if point is None:
        partial.discard()
        done, offset = 0, len(header)
    else:
        done, offset = point
        log.warning("resuming %s after %d of %d tensors", partial.out, done, len(plans))
    # a fresh file, not O_TRUNC on an old one: ext4 flushes a file truncated that way on close
    fd = os.open(partial.path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        if point is None:
            write_all(fd, header)
        else:
            os.ftruncate(fd, offset)
            os.lseek(fd, offset, os.SEEK_SET)
            on_bytes(sum(p.src_nbytes for p in plans[:done]))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for i, p in enumerate(plans[done:], start=done):
                write_tensor(p, fd, pool, workers, on_bytes)
                write_all(fd, bytes(-p.nbytes % ALIGN))
                size = _padded(p.nbytes)
                offset += size
                partial.record(fd, fingerprint, i + 1, offset, size)
    finally:
        os.close(fd)


def write_shape_only(out: Path, plans: list[OutputTensor],
                     write_kv: Callable[[gguf.GGUFWriter], None]) -> None:
    """A GGUF with the real header and a sparse (unwritten) data region: enough for tools that
    plan from shapes, such as llama.cpp's quantizer in dry-run mode, on a model of any size."""
    head = _header(plans, write_kv, out.with_name(out.name + ".header"))
    with open(out, "wb") as f:
        f.write(head)
        f.truncate(len(head) + sum(_padded(p.nbytes) for p in plans))


@dataclass(frozen=True)
class SplitLimits:
    """Limits per file of a split output, after llama.cpp's gguf-split (--split-max-size,
    --split-max-tensors); 0 is no limit. `max_bytes` bounds the whole file, header included."""

    max_bytes: int = 0
    max_tensors: int = 0

    def __bool__(self) -> bool:
        return bool(self.max_bytes or self.max_tensors)


def _tensor_info_bytes(p: OutputTensor) -> int:
    """Header bytes of one tensor's info: name (u64 length, UTF-8), n_dims, dims, type, offset."""
    return 8 + len(p.name.encode()) + 4 + 8 * len(p.shape) + 4 + 8


def _padded(n: int) -> int:
    return n + -n % ALIGN


def split_shards(plans: list[OutputTensor], limits: SplitLimits, first_kv: int,
                 later_kv: int) -> list[list[OutputTensor]]:
    """The tensors of each shard, in order, cut as llama.cpp's gguf-split cuts them: a new shard
    starts when this one holds `max_tensors`, or when the next tensor would take its file past
    `max_bytes` (a tensor larger than that gets a shard of its own). Unlike gguf-split, which
    counts tensor data only, the file is counted whole: `first_kv` and `later_kv` are the
    header bytes before the tensor infos of the first shard (the metadata) and of the others."""
    shards: list[list[OutputTensor]] = [[]]
    kv, infos, data = first_kv, 0, 0
    for p in plans:
        shard = shards[-1]
        if shard and ((limits.max_tensors and len(shard) >= limits.max_tensors) or
                      (limits.max_bytes and _padded(kv + infos + _tensor_info_bytes(p)) + data
                       + _padded(p.nbytes) > limits.max_bytes)):
            shards.append([])
            kv, infos, data = later_kv, 0, 0
        shards[-1].append(p)
        infos += _tensor_info_bytes(p)
        data += _padded(p.nbytes)
    return shards


@dataclass(frozen=True)
class OutputJob:
    path: Path
    plans: list[OutputTensor]
    write_kv: Callable[[gguf.GGUFWriter], None]
    # write PATH-00001-of-0000N.gguf ... (llama.cpp's gguf-split layout) within these limits
    split: SplitLimits | None = None
    arch: str = ARCH            # general.architecture: the model's, or "clip" for an mmproj


@dataclass(frozen=True)
class _File:
    """One file an output job writes: the job's GGUF, or one shard of it."""

    path: Path
    plans: list[OutputTensor]
    header: bytes

    @property
    def size(self) -> int:
        return len(self.header) + sum(_padded(p.nbytes) for p in self.plans)


def _job_files(job: OutputJob, scratch: Path) -> list[_File]:
    """The files of `job`: its GGUF, or its shards under its split limits."""
    def whole() -> list[_File]:
        return [_File(job.path, job.plans, _header(job.plans, job.write_kv, scratch, arch=job.arch))]

    if not job.split:
        return whole()
    n = len(job.plans)
    first_kv = len(_header([], job.write_kv, scratch, model_plans=job.plans, split=(0, 1, n), pad=False))
    later_kv = len(_header([], None, scratch, split=(1, 1, n), pad=False))
    shards = split_shards(job.plans, job.split, first_kv, later_kv)
    if len(shards) == 1:  # it fits one file: a plain GGUF, as gguf-py's writer does then
        return whole()
    if len(shards) > MAX_SHARDS:
        raise StepGGUFError(f"{job.path} would take {len(shards)} shards, more than the {MAX_SHARDS} "
                            "a split GGUF can have; raise --split-max-size or --split-max-tensors")
    count = len(shards)
    return [_File(shard_path(job.path, i, count), ps,
                  _header(ps, job.write_kv if i == 0 else None, scratch, model_plans=job.plans,
                          split=(i, count, n)))
            for i, ps in enumerate(shards)]


def file_bytes(jobs: list[OutputJob]) -> int:
    """The bytes the jobs' files will take, headers (metadata, tensor infos) and alignment
    padding included, every shard of a split job counted."""
    with tempfile.TemporaryDirectory() as tmp:
        files = [f for job in jobs for f in _job_files(job, Path(tmp) / "header")]
    return sum(f.size for f in files)


def _discard_stale(job: OutputJob, lock: Partial, keep: set[Path]) -> None:
    """Remove the partials of `job.path` that a run with other split limits (or none) left: they
    cannot be continued, and may be large. One another run still holds is left alone."""
    folder, prefix = job.path.parent, job.path.name.removesuffix(".gguf")
    outs = {job.path}
    for hidden in folder.glob(f".{glob.escape(prefix)}-*-of-*.gguf.partial*"):  # partial, journal, lock
        out = folder / hidden.name[1: hidden.name.index(".gguf.partial") + len(".gguf")]
        parsed = parse_shard_name(out)
        if parsed is not None and parsed[0] == job.path:
            outs.add(out)
    for out in outs - keep:
        if out == job.path:
            lock.discard()  # this run holds its lock
            continue
        stale = Partial(out)
        try:
            stale.lock()
        except StepGGUFError:
            continue
        if stale.left:
            log.warning("removing %s: a partial output of other split limits", stale.path)
            stale.discard()
        stale.unlock()  # removes the lock file a killed run left too


@dataclass(frozen=True)
class Written:
    paths: tuple[Path, ...]     # every file written, each shard of a split output
    source_bytes: int


def write_outputs(jobs: list[OutputJob], on_start: Callable[[int], None],
                  on_bytes: Callable[[int], None], *, threads: int | None = None, resume: bool = True) -> Written:
    """Write every job's GGUF, or its shards for a job with split limits; they appear under
    their names together, or not at all.

    Each file (each shard) is written to a hidden partial beside it, journaled per tensor and
    locked against a second run. A partial left by an interrupted run of the same plan is
    continued (unless `resume` is false); the disk must have room for what remains. The files
    are renamed into place once all are complete, a split job's first shard (the one loaders
    open) last."""
    locks = [Partial(job.path) for job in jobs]  # each job's, held while anything is decided
    partials: list[Partial] = []
    try:
        for lock in locks:
            lock.lock()
        files: list[_File] = []
        for job, lock in zip(jobs, locks):
            mine = _job_files(job, lock.path.with_suffix(".header"))
            for f in mine:
                partial = lock if f.path == job.path else Partial(f.path)
                if partial is not lock:
                    partial.lock()
                partials.append(partial)
            _discard_stale(job, lock, {f.path for f in mine})
            files += mine
        _check_space(files, partials)
        total = sum(p.src_nbytes for job in jobs for p in job.plans)
        on_start(total)
        workers = threads or os.cpu_count() or 1
        for f, partial in zip(files, partials):
            log.info("writing %s: %d tensors", f.path, len(f.plans))
            try:
                _write_partial(partial, f.header, f.plans, resume, on_bytes, workers)
            except StepGGUFError:
                for p in partials:
                    p.discard()  # bad input: running again gives the same error
                raise
        for partial in reversed(partials):  # every file appears, or none; first shards last
            partial.finish()
    finally:
        for partial in partials + locks:
            partial.unlock()
    return Written(tuple(f.path for f in files), total)


def _check_space(files: list[_File], partials: list[Partial]) -> None:
    """Fail before writing when the outputs cannot fit, rather than at 90%."""
    need = sum(f.size for f in files)
    need -= sum(partial.existing_bytes for partial in partials)  # reused, or removed first
    folder = files[0].path.parent
    free = shutil.disk_usage(folder).free
    if need > free:
        what = ", ".join(str(f.path) for f in files[:2]) + (f" and {len(files) - 2} more files"
                                                           if len(files) > 2 else "")
        raise StepGGUFError(f"{what} need{'s' if len(files) == 1 else ''} {need / 2**30:.2f} GiB "
                            f"({need} bytes) more, but {folder} has {free / 2**30:.2f} GiB ({free} "
                            "bytes) free; free some space or write elsewhere")
