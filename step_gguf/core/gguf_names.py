"""What a Step 3.5 tensor's GGUF name says (llama.cpp's names: blk.N.attn_q.weight, ...): its
block, whether it is a routed expert, a norm and the matrices that read it, the matrix that
writes an inner matrix's result into the residual stream, the heads. Every pattern over GGUF
tensor names lives here; the other modules ask."""

from __future__ import annotations

import re

_BLK = re.compile(r"^blk\.(\d+)\.")
_EXPERTS = re.compile(r"^blk\.\d+\.ffn_(gate|up|down)_exps\.")
# the norms that scale a block's inputs, and the matrices that read each norm's output, in the
# order their input statistics are preferred (a dense consumer has seen every token)
_NORM = re.compile(r"^blk\.(\d+)\.(attn_norm|ffn_norm)\.weight$")
_NORM_CONSUMERS = {
    "attn_norm": ("attn_q", "attn_k", "attn_v", "attn_gate"),
    "ffn_norm": ("ffn_gate_shexp", "ffn_up_shexp", "ffn_gate", "ffn_up", "ffn_gate_inp",
                 "ffn_gate_exps", "ffn_up_exps"),
}
# inner matrices and the matrix whose output carries their error into the residual stream
_DOWNSTREAM = [
    (re.compile(r"^(blk\.\d+\.)attn_(q|k|v|gate)\.weight$"), r"\1attn_output.weight"),
    (re.compile(r"^(blk\.\d+\.)ffn_(gate|up)_exps\.weight$"), r"\1ffn_down_exps.weight"),
    (re.compile(r"^(blk\.\d+\.)ffn_(gate|up)_shexp\.weight$"), r"\1ffn_down_shexp.weight"),
    (re.compile(r"^(blk\.\d+\.)ffn_(gate|up)\.weight$"), r"\1ffn_down.weight"),
]
_STREAM_WRITER = re.compile(r"^blk\.(\d+)\.(attn_output|ffn_down(_exps|_shexp)?)\.weight$")
_HEADS = re.compile(r"^output\.weight$|nextn\.shared_head_head\.weight$")
# an MTP block's required tensors (input projection, norms, attention), which llama.cpp skips
# when it does not draft; it still loads the optional ones, the experts among them
_MTP_REQUIRED = re.compile(r"\.(nextn\.(eh_proj|enorm|hnorm)|attn_(norm|q|k|v|qkv|output)|ffn_norm)\.weight$")


def layer_of_gguf(name: str) -> int | None:
    m = _BLK.match(name)
    return int(m.group(1)) if m else None


def is_routed(name: str) -> bool:
    """A routed expert tensor (the experts' stacked gate, up or down)."""
    return _EXPERTS.match(name) is not None


def is_head(name: str) -> bool:
    """The LM head, or an MTP block's shared head."""
    return _HEADS.search(name) is not None


def norm_consumers(name: str) -> list[str] | None:
    """The matrices reading the norm `name` (blk.N.attn_norm / ffn_norm), or None for another tensor."""
    m = _NORM.match(name)
    return [f"blk.{m.group(1)}.{c}.weight" for c in _NORM_CONSUMERS[m.group(2)]] if m else None


def writer(name: str) -> str:
    """The matrix that writes `name`'s result into the residual stream: itself, or for an inner
    matrix (q/k/v/gate, gate/up) its block's output matrix."""
    for rx, repl in _DOWNSTREAM:
        if rx.match(name):
            return rx.sub(repl, name)
    return name


def stream_writer(name: str) -> tuple[str, int] | None:
    """("attn" or "ffn", block) of a matrix writing into the residual stream, else None."""
    m = _STREAM_WRITER.match(name)
    return ("attn" if m.group(2) == "attn_output" else "ffn", int(m.group(1))) if m else None


def mtp_required(name: str) -> bool:
    """Of an MTP block's tensors, one llama.cpp loads only to draft (src/models/step35.cpp)."""
    return _MTP_REQUIRED.search(name) is not None
