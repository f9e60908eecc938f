"""Byte-level BPE tokenizer -> GGUF vocabulary, with the pre-tokenizer found from its structure.

llama.cpp's own converter recognises a tokenizer by hashing the token ids it produces for a
fixed text and refuses any hash it has not registered. We read the pre-tokenizer's split
regexes instead: a tokenizer whose regexes match a known llama.cpp pre-tokenizer is mapped to
it, whatever its vocabulary.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import TokenizerError, describe, malformed
from ..core.hub_layout import checkpoint_file

# llama.cpp pre-tokenizer name -> the split regexes of tokenizer.json's pre_tokenizer, in order.
# Escapes are compared in normalised form (see `_norm`).
KNOWN_PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "deepseek-v3": (
        r"\p{N}{1,3}",
        "[一-龥\u3040-ゟ゠-ヿ]+",
        r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    ),
    "llama-bpe": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
    "qwen2": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
}

# GGUF token types
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def _norm(regex: str) -> str:
    # tokenizer.json spells CR/LF either as the characters or as `\r`/`\n` escapes
    return regex.replace("\r", r"\r").replace("\n", r"\n")


def split_regexes(pre_tokenizer: dict | None) -> tuple[str, ...]:
    """The Split regexes of a pre_tokenizer (a Sequence or a single Split), in order."""
    if not pre_tokenizer:
        return ()
    steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer]) if pre_tokenizer.get("type") == "Sequence" \
        else [pre_tokenizer]
    return tuple(_norm(s["pattern"]["Regex"]) for s in steps
                 if s.get("type") == "Split" and "Regex" in s.get("pattern", {}))


def detect_pre_tokenizer(tokenizer_json: dict) -> str:
    found = split_regexes(tokenizer_json.get("pre_tokenizer"))
    for name, regexes in KNOWN_PRE_TOKENIZERS.items():
        if found == tuple(_norm(r) for r in regexes):
            return name
    raise TokenizerError(
        f"unknown pre-tokenizer ({len(found)} split regex(es), first {found[:1]}); pass "
        f"--tokenizer-pre with a llama.cpp name (known here: {', '.join(KNOWN_PRE_TOKENIZERS)})"
    )


@dataclass
class Vocab:
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    add_bos: bool
    chat_template: str | None


def _token_content(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise TokenizerError(f"{path} is not valid JSON ({describe(exc)})") from None


def load_vocab(src: Path, n_rows: int, pre_override: str | None = None) -> Vocab:
    """Read tokenizer.json + tokenizer_config.json and pad the vocabulary to `n_rows`."""
    tok_path = checkpoint_file(src, "tokenizer.json")
    if not tok_path.is_file():
        raise TokenizerError(f"{tok_path} not found; a byte-level BPE tokenizer.json is required")
    tok = _read_json(tok_path)
    with malformed(tok_path, TokenizerError):
        vocab, added, pre, merges = _read_tokenizer(tok, tok_path, pre_override)
    tokens = [f"[PAD{i}]" for i in range(n_rows)]
    types = [UNUSED] * n_rows  # ids the tokenizer never produces pad the embedding rows
    size = max(vocab.values(), default=-1) + 1
    if size > n_rows:
        raise TokenizerError(f"tokenizer has {size} tokens but the embedding has only {n_rows} rows")
    for content, i in vocab.items():
        tokens[i] = content
        if content in added:
            types[i] = CONTROL if added[content].get("special") else USER_DEFINED
        else:
            types[i] = NORMAL

    cfg_path = checkpoint_file(src, "tokenizer_config.json")
    cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
    with malformed(cfg_path, TokenizerError):
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: keep the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is not None and not isinstance(template, str):
            raise TokenizerError(f"{cfg_path} chat_template is not a string")
        jinja = checkpoint_file(src, "chat_template.jinja")
        if template is None and jinja.is_file():
            template = jinja.read_text(encoding="utf-8")

        def token_id(key: str) -> int | None:
            content = _token_content(cfg.get(key))
            if content is None:
                return None
            if content not in vocab:
                raise TokenizerError(f"tokenizer_config.json {key} {content!r} is not in the vocabulary")
            return vocab[content]

        return Vocab(pre=pre, tokens=tokens, token_types=types, merges=merges,
                     bos_id=token_id("bos_token"), eos_id=token_id("eos_token"),
                     pad_id=token_id("pad_token"), add_bos=bool(cfg.get("add_bos_token", False)),
                     chat_template=template)


def _read_tokenizer(tok: dict, path: Path, pre_override: str | None):
    """(token -> id, added tokens by content, pre-tokenizer name, merges) of a tokenizer.json."""
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerError(f"tokenizer model {model.get('type')!r} is not BPE; step-gguf "
                             "handles Step 3.5's byte-level BPE tokenizer")
    pre = pre_override or detect_pre_tokenizer(tok)
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in tok.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    for content, i in vocab.items():
        if not isinstance(content, str) or not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < 2**31:
            raise TokenizerError(f"{path} maps {str(content)[:40]!r} to {str(i)[:40]!r}; token ids "
                                 "must be non-negative integers")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not all(isinstance(m, str) for m in merges):
        raise TokenizerError(f"{path} has merges that are not strings or pairs of strings")
    return vocab, added, pre, merges
