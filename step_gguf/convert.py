"""Step 3.5 checkpoint -> GGUF, streamed tensor by tensor.

Everything that can be wrong with the input (config, shards, shapes, tokenizer) is checked
before the first byte is written. Tensors whose bytes need no change (BF16 -> BF16 experts:
~97% of the model) are copied by the kernel while a second thread scans them for NaN/Inf;
the rest are decoded, transformed and encoded in bounded chunks. The output appears under
its name only when complete.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import math
import os
import re
import shutil
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.metadata import Metadata

from .checkpoint import ELEMENT_BYTES, Checkpoint, TensorRef, decode, fp8_scale_shape
from .errors import CheckpointError, StepGGUFError
from .gguf_source import MAX_SHARDS, SPLIT_COUNT, SPLIT_NO, SPLIT_TENSORS, parse_shard_name, shard_path
from .model_card import QUANTIZED_BY, CardOverrides, load_card
from .model import ARCH, Step35Config, gguf_name, is_zero_centred_norm, layer_of
from .recipe import PINNED_1D, Recipe, Rule, tensor_bytes
from .resume import Partial, source_fingerprint
from .vocab import Vocab, load_vocab

log = logging.getLogger(__name__)

OUTTYPES: dict[str, Q] = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
# general.file_type (llama_ftype "mostly X"): a mixed file is named after its largest type
FILE_TYPE = {Q.F32: 0, Q.F16: 1, Q.Q4_0: 2, Q.Q4_1: 3, Q.Q8_0: 7, Q.Q5_0: 8, Q.Q5_1: 9,
             Q.Q2_K: 10, Q.Q3_K: 12, Q.Q4_K: 15, Q.Q5_K: 17, Q.Q6_K: 18, Q.IQ2_XXS: 19,
             Q.IQ2_XS: 20, Q.IQ3_XXS: 23, Q.IQ1_S: 24, Q.IQ4_NL: 25, Q.IQ3_S: 26, Q.IQ2_S: 28,
             Q.IQ4_XS: 30, Q.IQ1_M: 31, Q.BF16: 32}
FLOAT_TYPES = {Q.F32, Q.F16, Q.BF16}
SOURCE_QTYPE = {"F32": Q.F32, "F16": Q.F16, "BF16": Q.BF16}
CHUNK_BYTES = 32 * 2**20  # float32 working set per chunk on the decode path
MTP_MODES = ("keep", "drop", "split")
ALIGN = gguf.GGUF_DEFAULT_ALIGNMENT  # the writer's data alignment: tensors start on it


@dataclass(frozen=True)
class TensorPlan:
    hf_name: str
    name: str                      # GGUF name
    shape: tuple[int, ...]         # PyTorch order, as the config expects it
    qtype: Q
    src: TensorRef | None = None
    scale: TensorRef | None = None  # FP8 block scales
    add_one: bool = False
    data: np.ndarray | None = field(default=None, compare=False)  # generated tensors
    rule: Rule | None = None        # the recipe rule that chose qtype
    # importance of each input channel, one row per matrix (expert) of the tensor
    imatrix: np.ndarray | None = field(default=None, compare=False)
    # equalization: input channels multiplied by these, one row per matrix or one row for all
    # (1-D tensors: it scales the elements)
    col_scale: np.ndarray | None = field(default=None, compare=False)

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.shape, self.qtype)

    @property
    def n_params(self) -> int:
        return math.prod(self.shape)

    @property
    def src_nbytes(self) -> int:
        return self.src.nbytes if self.src else self.nbytes

    @property
    def passthrough(self) -> bool:
        """The source bytes are already the output bytes."""
        return (self.src is not None and self.scale is None and not self.add_one
                and self.col_scale is None
                and self.src.dtype == self.qtype.name)


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1) or (1,)


def plan_tensors(cfg: Step35Config, ckpt: Checkpoint, recipe: Recipe,
                 with_mtp: bool = True) -> list[TensorPlan]:
    """Validate the checkpoint against the config and plan every output tensor (no data read).

    Without MTP, the MTP blocks may be absent from the checkpoint and are ignored if present.
    """
    expected = cfg.expected_shapes(with_mtp=with_mtp)
    known = cfg.expected_shapes(with_mtp=True)
    missing = sorted(set(expected) - set(ckpt.tensors), key=_natural)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"tensor {missing[0]} is missing{more}; the checkpoint does not "
                              f"match its config.json")
    extra = sorted(set(ckpt.tensors) - set(known), key=_natural)
    if extra:
        raise CheckpointError(f"unexpected tensor {extra[0]} {ckpt.tensors[extra[0]].shape}: not "
                              "part of Step 3.5 as its config.json describes it")
    plans = []
    for hf in sorted(expected, key=_natural):
        ref, want = ckpt.tensors[hf], expected[hf]
        # hub dumps sometimes carry singleton dims (e.g. [E, 1, H]); reshaping them is free
        if ref.shape != want and _squeezed(ref.shape) != _squeezed(want):
            raise CheckpointError(f"tensor {ref.raw_name} has shape {list(ref.shape)}, config.json "
                                  f"implies {list(want)}")
        scale = None
        if ref.dtype == "F8_E4M3":
            scale = _check_scale(cfg, ref, ckpt.scales.get(hf), want)
        elif ref.dtype not in SOURCE_QTYPE:
            raise CheckpointError(f"tensor {ref.raw_name} has dtype {ref.dtype}; expected BF16, "
                                  "F16, F32 or F8_E4M3")
        plans.append(_plan(cfg, recipe, hf, want, ref, scale))
    return plans + _generated(cfg)


def plan_shapes(cfg: Step35Config, recipe: Recipe, with_mtp: bool = True) -> list[TensorPlan]:
    """The plan of the model `cfg` describes, from shapes alone (pricing a bare config)."""
    shapes = cfg.expected_shapes(with_mtp=with_mtp)
    return [_plan(cfg, recipe, hf, shapes[hf]) for hf in sorted(shapes, key=_natural)] + _generated(cfg)


def _plan(cfg: Step35Config, recipe: Recipe, hf: str, shape: tuple[int, ...],
          ref: TensorRef | None = None, scale: TensorRef | None = None) -> TensorPlan:
    name = gguf_name(hf)
    assert name is not None, hf  # every expected name is in TENSOR_MAP
    choice = recipe.resolve(name, shape, cfg.n_layer)
    return TensorPlan(hf, name, shape, choice.qtype, ref, scale, is_zero_centred_norm(hf),
                      rule=choice.rule)


def _generated(cfg: Step35Config) -> list[TensorPlan]:
    if (factors := cfg.llama3_rope_factors()) is None:
        return []
    return [TensorPlan("", "rope_freqs.weight", (len(factors),), Q.F32,
                       data=np.asarray(factors, dtype=np.float32), rule=PINNED_1D)]


def _check_scale(cfg: Step35Config, ref: TensorRef, scale: TensorRef | None,
                 want: tuple[int, ...]) -> TensorRef:
    if scale is None:
        raise CheckpointError(f"FP8 tensor {ref.raw_name} has no weight_scale_inv beside it")
    blocks = fp8_scale_shape(want, cfg.fp8_block)
    if _squeezed(scale.shape) != _squeezed(blocks):
        raise CheckpointError(f"{scale.raw_name} has shape {list(scale.shape)}, expected "
                              f"{list(blocks)} for {cfg.fp8_block[0]}x{cfg.fp8_block[1]} blocks")
    return scale


def _natural(name: str) -> tuple:
    layer = layer_of(name)
    return (layer if layer is not None else -1, name)


def split_mtp(plans: list[TensorPlan], cfg: Step35Config) -> tuple[list[TensorPlan], list[TensorPlan]]:
    """(trunk, draft): the draft holds the MTP blocks plus the embeddings and head they share."""
    def is_mtp(p: TensorPlan) -> bool:
        layer = layer_of(p.hf_name)
        return layer is not None and layer >= cfg.n_layer

    shared = {"token_embd.weight", "output_norm.weight", "output.weight", "rope_freqs.weight"}
    return ([p for p in plans if not is_mtp(p)],
            [p for p in plans if is_mtp(p) or p.name in shared])


# ---------------------------------------------------------------- metadata

def file_type(plans: list[TensorPlan]) -> tuple[int, bool]:
    """(general.file_type, whether any tensor is quantized) of a file holding `plans`."""
    weight: dict[Q, int] = {}
    for p in plans:
        if len(p.shape) > 1:
            weight[p.qtype] = weight.get(p.qtype, 0) + p.nbytes
    main = max(weight, key=weight.get, default=Q.F32)
    return FILE_TYPE.get(main, FILE_TYPE[Q.F32]), any(q not in FLOAT_TYPES for q in weight)


def write_file_type(w: gguf.GGUFWriter, plans: list[TensorPlan]) -> None:
    ftype, quantized = file_type(plans)
    w.add_file_type(ftype)
    if quantized:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_quantized_by(QUANTIZED_BY)


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

def _encode(x: np.ndarray, qtype: Q, imatrix: np.ndarray | None = None) -> bytes | memoryview:
    if qtype == Q.F32:
        return x.astype(np.float32, copy=False).tobytes()
    if qtype == Q.F16:
        return x.astype(np.float16).tobytes()
    if qtype == Q.BF16:
        return gguf.quants.quantize(x, qtype).tobytes()  # round-to-nearest-even, as ggml
    from .runtime import ggml  # noqa: PLC0415 (float outputs need no runtime)
    return ggml.quantize(x.reshape(-1, x.shape[-1]), qtype, imatrix)


def _row_bytes(dtype: str, cols: int) -> int:
    """Bytes of one row of `cols` values stored as `dtype` (safetensors or ggml name)."""
    if dtype in ELEMENT_BYTES:
        return ELEMENT_BYTES[dtype] * cols
    return tensor_bytes((cols,), Q[dtype])


def _decode(raw: bytes, dtype: str, n_values: int) -> np.ndarray:
    if dtype in ELEMENT_BYTES:
        return decode(raw, dtype)
    from .runtime import ggml  # noqa: PLC0415 (only quantized GGUF sources need it)
    return ggml.dequantize(raw, Q[dtype], n_values)


def _chunks(plan: TensorPlan, block: tuple[int, int]) -> list[tuple[int, int, int]]:
    """(matrix, first row, rows) of bounded float32 chunks in file order.

    Chunks stay within one matrix of a stacked tensor (each expert has its own importance
    data), and FP8 chunks start on a block row."""
    cols = plan.shape[-1]
    rows = plan.shape[-2] if len(plan.shape) > 1 else 1
    align = block[0] if plan.scale is not None else 1
    step = max(align, CHUNK_BYTES // (cols * 4) // align * align)
    return [(m, r0, min(step, rows - r0)) for m in range(math.prod(plan.shape[:-2]))
            for r0 in range(0, rows, step)]


def read_rows(plan: TensorPlan, m: int, r0: int, n: int, block: tuple[int, int] = (128, 128),
              fp8_scales: np.ndarray | None = None) -> np.ndarray:
    """Rows [r0, r0+n) of matrix `m` of the source tensor as float32, FP8 block scales applied
    (`fp8_scales`: the tensor's scale grid; read here when not given)."""
    ref = plan.src
    assert ref is not None
    cols = plan.shape[-1]
    rows = plan.shape[-2] if len(plan.shape) > 1 else 1
    row_bytes = _row_bytes(ref.dtype, cols)
    x = _decode(ref.read((m * rows + r0) * row_bytes, n * row_bytes), ref.dtype, n * cols).reshape(n, cols)
    if plan.scale is not None:
        if fp8_scales is None:
            fp8_scales = plan.scale.array().reshape(-1, *fp8_scale_shape(plan.shape, block)[-2:])
        s = fp8_scales[m, r0 // block[0]: math.ceil((r0 + n) / block[0])]
        x *= np.repeat(np.repeat(s, block[0], axis=0)[:n], block[1], axis=1)[:, :cols]
    return x


def transformed_rows(plan: TensorPlan, m: int, r0: int, n: int, block: tuple[int, int] = (128, 128),
                     fp8_scales: np.ndarray | None = None) -> np.ndarray:
    """Rows as they are encoded: checked finite, +1 on norms, equalization scales applied."""
    x = read_rows(plan, m, r0, n, block, fp8_scales)
    if not np.isfinite(x).all():
        raise _nonfinite_error(plan)
    if plan.add_one:
        x = x + 1.0
    if plan.col_scale is not None:
        x = x * plan.col_scale[min(m, len(plan.col_scale) - 1)]
    return x


def _encode_chunk(plan: TensorPlan, m: int, r0: int, n: int, block: tuple[int, int],
                  fp8_scales: np.ndarray | None) -> tuple[bytes | memoryview, int]:
    """Read, decode, transform and encode one chunk: (output bytes, source bytes read)."""
    x = transformed_rows(plan, m, r0, n, block, fp8_scales)
    imatrix = plan.imatrix[m] if plan.imatrix is not None else None
    return _encode(x, plan.qtype, imatrix), n * _row_bytes(plan.src.dtype, plan.shape[-1])


# raw-bit thresholds: a value is NaN/Inf iff its bits, read as signed, reach `pos`, or read
# as unsigned reach `neg` (max-reductions only, no temporaries)
_NONFINITE_BITS = {"BF16": (np.int16, np.uint16, 0x7F80, 0xFF80),
                   "F16": (np.int16, np.uint16, 0x7C00, 0xFC00),
                   "F32": (np.int32, np.uint32, 0x7F800000, 0xFF800000)}


def _has_nonfinite_raw(ref: TensorRef) -> bool:
    if ref.dtype not in _NONFINITE_BITS:
        return False  # quantized GGUF tensors copied as they are: ggml validated them
    signed, unsigned, pos, neg = _NONFINITE_BITS[ref.dtype]
    buf = bytearray(8 * 2**20)
    with open(ref.shard, "rb") as f:
        done = 0
        while done < ref.nbytes:
            n = os.preadv(f.fileno(), [memoryview(buf)[: min(len(buf), ref.nbytes - done)]],
                          ref.offset + done)
            if n <= 0:
                raise ref.truncated()
            view = memoryview(buf)[:n]
            if np.frombuffer(view, signed).max() >= pos or np.frombuffer(view, unsigned).max() >= neg:
                return True
            done += n
    return False


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _copy_range(src: TensorRef, fd: int, on_bytes: Callable[[int], None]) -> None:
    """Append the tensor's bytes to `fd`: in the kernel where it can, else through a buffer."""
    kernel = hasattr(os, "copy_file_range")
    with open(src.shard, "rb") as f:
        offset, left = src.offset, src.nbytes
        while left:
            step = min(left, 8 * CHUNK_BYTES)  # also the progress granularity
            n = 0
            if kernel:
                try:
                    n = os.copy_file_range(f.fileno(), fd, step, offset)
                except OSError:  # e.g. EXDEV on old kernels, some network filesystems
                    kernel = False
            if not kernel:
                data = os.pread(f.fileno(), min(step, CHUNK_BYTES), offset)
                _write_all(fd, data)
                n = len(data)
            if n <= 0:
                raise src.truncated()
            offset, left = offset + n, left - n
            on_bytes(n)


def _nonfinite_error(plan: TensorPlan) -> CheckpointError:
    name = plan.src.raw_name if plan.src else plan.name
    return CheckpointError(f"tensor {name} contains NaN or Inf values; the checkpoint is corrupt "
                           "(re-download it)")


def _write_tensor(plan: TensorPlan, fd: int, pool: ThreadPoolExecutor, workers: int,
                  block: tuple[int, int], on_bytes: Callable[[int], None]) -> None:
    if plan.data is not None:
        _write_all(fd, _encode(plan.data, plan.qtype))
        on_bytes(plan.src_nbytes)
        return
    if plan.passthrough:
        scan = pool.submit(_has_nonfinite_raw, plan.src)
        _copy_range(plan.src, fd, on_bytes)
        if scan.result():
            raise _nonfinite_error(plan)
        return
    fp8_scales = None
    if plan.scale is not None:
        fp8_scales = plan.scale.array().reshape(-1, *fp8_scale_shape(plan.shape, block)[-2:])
    # chunks are read, decoded and encoded on all workers; this thread writes them in order,
    # keeping at most two per worker in flight so memory stays bounded
    inflight: deque[Future] = deque()
    try:
        for spec in _chunks(plan, block):
            inflight.append(pool.submit(_encode_chunk, plan, *spec, block, fp8_scales))
            while len(inflight) >= 2 * workers or (inflight and inflight[0].done()):
                data, nread = inflight.popleft().result()
                _write_all(fd, data)
                on_bytes(nread)
        while inflight:
            data, nread = inflight.popleft().result()
            _write_all(fd, data)
            on_bytes(nread)
    finally:
        for f in inflight:
            f.cancel()


def _header(plans: list[TensorPlan], write_kv: Callable[[gguf.GGUFWriter], None] | None,
            scratch: Path, *, model_plans: list[TensorPlan] | None = None,
            split: tuple[int, int, int] | None = None, pad: bool = True) -> bytes:
    """The file's bytes before its first tensor (metadata, tensor infos, alignment padding).

    A shard of a split output (`split`: its number from 0, the shard count, the tensors of all
    shards) gets llama.cpp's split keys after the metadata, and its file type is that of
    `model_plans`, the whole model. Only the first shard has metadata: the others (`write_kv`
    None) hold the three split keys alone, as llama.cpp's gguf-split writes them."""
    w = gguf.GGUFWriter(None, ARCH)
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


def _write_partial(partial: Partial, header: bytes, plans: list[TensorPlan], resume: bool,
                   on_bytes: Callable[[int], None], fp8_block: tuple[int, int], workers: int) -> None:
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
            _write_all(fd, header)
        else:
            os.ftruncate(fd, offset)
            os.lseek(fd, offset, os.SEEK_SET)
            on_bytes(sum(p.src_nbytes for p in plans[:done]))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for i, p in enumerate(plans[done:], start=done):
                _write_tensor(p, fd, pool, workers, fp8_block, on_bytes)
                _write_all(fd, bytes(-p.nbytes % ALIGN))
                size = p.nbytes + -p.nbytes % ALIGN
                offset += size
                partial.record(fd, fingerprint, i + 1, offset, size)
    finally:
        os.close(fd)


def write_shape_only(out: Path, plans: list[TensorPlan],
                     write_kv: Callable[[gguf.GGUFWriter], None]) -> None:
    """A GGUF with the real header and a sparse (unwritten) data region: enough for tools that
    plan from shapes, such as llama.cpp's quantizer in dry-run mode, on a model of any size."""
    head = _header(plans, write_kv, out.with_name(out.name + ".header"))
    with open(out, "wb") as f:
        f.write(head)
        f.truncate(len(head) + sum(p.nbytes + -p.nbytes % ALIGN for p in plans))


@dataclass(frozen=True)
class SplitLimits:
    """Limits per file of a split output, after llama.cpp's gguf-split (--split-max-size,
    --split-max-tensors); 0 is no limit. `max_bytes` bounds the whole file, header included."""

    max_bytes: int = 0
    max_tensors: int = 0

    def __bool__(self) -> bool:
        return bool(self.max_bytes or self.max_tensors)


_SPLIT_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(i?)B?|B)?\s*$", re.I)


def parse_split_size(text: str) -> int:
    """A --split-max-size: '50G' -> 50 * 10**9 bytes and '500M' -> 500 * 10**6, as llama.cpp's
    gguf-split and convert_hf_to_gguf.py read them (K, M, G, T and KB ... TB are powers of 1000);
    '48GiB' (KiB ... TiB: powers of 1024); a plain number is bytes."""
    m = _SPLIT_SIZE.match(text)
    value = 0
    if m:
        unit = m.group(2)
        base = 1 if unit is None else (1024 if m.group(3) else 1000) ** ("KMGT".index(unit.upper()) + 1)
        value = int(float(m.group(1)) * base)
    if value <= 0:
        raise StepGGUFError(f"split size {text!r} is not a size such as 50G (50 * 10^9 bytes, as "
                            "llama.cpp's gguf-split reads it), 500M, 48GiB or a number of bytes")
    return value


def _tensor_info_bytes(p: TensorPlan) -> int:
    """Header bytes of one tensor's info: name (u64 length, UTF-8), n_dims, dims, type, offset."""
    return 8 + len(p.name.encode()) + 4 + 8 * len(p.shape) + 4 + 8


def _padded(n: int) -> int:
    return n + -n % ALIGN


def split_shards(plans: list[TensorPlan], limits: SplitLimits, first_kv: int,
                 later_kv: int) -> list[list[TensorPlan]]:
    """The tensors of each shard, in order, cut as llama.cpp's gguf-split cuts them: a new shard
    starts when this one holds `max_tensors`, or when the next tensor would take its file past
    `max_bytes` (a tensor larger than that gets a shard of its own). Unlike gguf-split, which
    counts tensor data only, the file is counted whole: `first_kv` and `later_kv` are the
    header bytes before the tensor infos of the first shard (the metadata) and of the others."""
    shards: list[list[TensorPlan]] = [[]]
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
    plans: list[TensorPlan]
    write_kv: Callable[[gguf.GGUFWriter], None]
    # write PATH-00001-of-0000N.gguf ... (llama.cpp's gguf-split layout) within these limits
    split: SplitLimits | None = None


@dataclass(frozen=True)
class _File:
    """One file an output job writes: the job's GGUF, or one shard of it."""

    path: Path
    plans: list[TensorPlan]
    header: bytes


def _job_files(job: OutputJob, scratch: Path) -> list[_File]:
    """The files of `job`: its GGUF, or its shards under its split limits."""
    def whole() -> list[_File]:
        return [_File(job.path, job.plans, _header(job.plans, job.write_kv, scratch))]

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
        if stale.path.exists() or stale.journal.exists():
            log.warning("removing %s: a partial output of other split limits", stale.path)
            stale.discard()
        stale.unlock()  # removes the lock file a killed run left too


@dataclass(frozen=True)
class Written:
    paths: tuple[Path, ...]     # every file written, each shard of a split output
    source_bytes: int


def write_outputs(jobs: list[OutputJob], on_start: Callable[[int], None],
                  on_bytes: Callable[[int], None], *, fp8_block: tuple[int, int] = (128, 128),
                  threads: int | None = None, resume: bool = True) -> Written:
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
                _write_partial(partial, f.header, f.plans, resume, on_bytes, fp8_block, workers)
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
    need = sum(len(f.header) + sum(_padded(p.nbytes) for p in f.plans) for f in files)
    need -= sum(partial.existing_bytes for partial in partials)  # reused, or removed first
    folder = files[0].path.parent
    free = shutil.disk_usage(folder).free
    if need > free:
        what = ", ".join(str(f.path) for f in files[:2]) + (f" and {len(files) - 2} more files"
                                                           if len(files) > 2 else "")
        raise StepGGUFError(f"{what} need{'s' if len(files) == 1 else ''} {need / 2**30:.2f} GiB "
                            f"({need} bytes) more, but {folder} has {free / 2**30:.2f} GiB ({free} "
                            "bytes) free; free some space or write elsewhere")


@dataclass(frozen=True)
class ConvertResult:
    outputs: tuple[Path, ...]
    n_tensors: int
    source_bytes: int


@dataclass(frozen=True)
class OpenedCheckpoint:
    cfg: Step35Config
    plans: list[TensorPlan]
    vocab: Vocab
    card: Metadata


def open_checkpoint(src: str | os.PathLike, recipe: Recipe, *, mtp: str = "keep",
                    tokenizer_pre: str | None = None,
                    card: CardOverrides | None = None) -> OpenedCheckpoint:
    """Read and validate a checkpoint folder and plan its tensors under `recipe` (no weight read)."""
    src = Path(src)
    if mtp not in MTP_MODES:
        raise StepGGUFError(f"unknown MTP mode {mtp!r}; choose one of {', '.join(MTP_MODES)}")
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a folder; point to the checkpoint directory")
    cfg = Step35Config.from_dir(src)
    plans = plan_tensors(cfg, Checkpoint(src), recipe, with_mtp=mtp != "drop")
    return OpenedCheckpoint(cfg, plans, load_vocab(src, cfg.vocab_size, tokenizer_pre),
                            load_card(src, cfg, card))


def checkpoint_jobs(opened: OpenedCheckpoint, out: Path, *, mtp: str = "keep",
                    draft_out: Path | None = None,
                    extra_kv: Callable[[gguf.GGUFWriter], None] = lambda w: None) -> list[OutputJob]:
    """The output files of a checkpoint conversion: one GGUF, or trunk + draft for mtp="split"."""
    if (mtp == "split") != (draft_out is not None):
        raise StepGGUFError("a separate draft GGUF needs both mtp='split' and a draft output path")
    cfg, plans = opened.cfg, opened.plans

    def job(path: Path, ps: list[TensorPlan], with_nextn: bool) -> OutputJob:
        def write_kv(w: gguf.GGUFWriter) -> None:
            write_metadata(w, cfg, opened.vocab, with_nextn, opened.card)
            extra_kv(w)
        return OutputJob(path, ps, write_kv)

    if mtp == "keep" or not cfg.n_nextn:
        return [job(out, plans, True)]
    if mtp == "drop":
        return [job(out, plans, False)]
    trunk, draft = split_mtp(plans, cfg)
    return [job(out, trunk, True), job(Path(draft_out), draft, True)]


def convert(src: str | os.PathLike, out: str | os.PathLike, *, outtype: str = "bf16",
            mtp: str = "keep", draft_out: str | os.PathLike | None = None,
            tokenizer_pre: str | None = None, threads: int | None = None, resume: bool = True,
            card: CardOverrides | None = None, split: SplitLimits | None = None,
            on_start: Callable[[int], None] = lambda total: None,
            on_bytes: Callable[[int], None] = lambda n: None) -> ConvertResult:
    """Convert the checkpoint folder `src` to `out` (and, with mtp="split", `draft_out`).

    With `split` limits, `out` is written as llama.cpp's gguf-split shards OUT-00001-of-0000N.gguf
    ... (the draft GGUF of mtp="split" stays one file).

    on_start(total_source_bytes) is called once validation passed, then on_bytes(n) as
    source bytes are consumed: enough for a byte-counting progress bar. An interrupted run of
    the same conversion is continued unless `resume` is false. `card` overrides the model
    card's name, basename or license.
    """
    if outtype not in OUTTYPES:
        raise StepGGUFError(f"unknown outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    opened = open_checkpoint(src, Recipe.single(OUTTYPES[outtype]), mtp=mtp, tokenizer_pre=tokenizer_pre,
                             card=card)
    jobs = checkpoint_jobs(opened, Path(out), mtp=mtp,
                           draft_out=Path(draft_out) if draft_out is not None else None)
    jobs[0] = replace(jobs[0], split=split)
    written = write_outputs(jobs, on_start, on_bytes, fp8_block=opened.cfg.fp8_block,
                            threads=threads, resume=resume)
    return ConvertResult(written.paths, sum(len(j.plans) for j in jobs), written.source_bytes)
