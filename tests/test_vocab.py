"""Tokenizer handling: pre-tokenizer detection, vocabulary padding, and tokenization parity
between the HF tokenizer and llama.cpp on the converted GGUF."""

from __future__ import annotations

import json

import pytest

from step_gguf.core.errors import TokenizerError
from step_gguf.files.vocab import CONTROL, NORMAL, UNUSED, detect_pre_tokenizer, load_vocab

TEXTS = [
    "Hello world! Step 3.5 Flash routes each token to 8 of 288 experts.",
    "  leading spaces, trailing tabs\t\t and\nnew\r\nlines\n\n",
    "digits 1234567 and 3.14159, code: `x = f(y) + 1;` {a: [1, 2]}",
    "ünïcödé, 中文字符, ひらがな and カタカナ, emoji 🚀",
    "<|im_start|>user\nhi<|im_end|>",
]


def test_synthetic_tokenizer_is_detected_as_deepseek_v3(checkpoint):
    tok = json.loads((checkpoint("tiny") / "tokenizer.json").read_text())
    assert detect_pre_tokenizer(tok) == "deepseek-v3"


def test_llama3_style_single_split_is_recognised():
    regex = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
             "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
    tok = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}}
    assert detect_pre_tokenizer(tok) == "llama-bpe"


def test_unknown_pre_tokenizer_names_the_override():
    tok = {"pre_tokenizer": {"type": "Split", "pattern": {"Regex": "\\w+"}}}
    with pytest.raises(TokenizerError, match="--tokenizer-pre"):
        detect_pre_tokenizer(tok)


def test_vocab_is_padded_to_the_embedding_rows(checkpoint):
    src = checkpoint("tiny")
    rows = json.loads((src / "config.json").read_text())["vocab_size"]
    v = load_vocab(src, rows)
    assert len(v.tokens) == len(v.token_types) == rows
    n_real = len(json.loads((src / "tokenizer.json").read_text())["model"]["vocab"])
    assert v.token_types[:n_real] == [NORMAL] * n_real
    assert v.tokens[v.eos_id] == "<|im_end|>" and v.token_types[v.eos_id] == CONTROL
    assert v.tokens[-1] == f"[PAD{rows - 1}]" and v.token_types[-1] == UNUSED
    assert "<|im_start|>" in v.chat_template


def test_vocab_larger_than_embedding_is_refused(checkpoint):
    with pytest.raises(TokenizerError, match="embedding has only 100 rows"):
        load_vocab(checkpoint("tiny"), 100)


@pytest.mark.parametrize("text", TEXTS)
def test_llama_cpp_tokenizes_like_the_hf_tokenizer(text, runtime, checkpoint, gguf_file):
    from tokenizers import Tokenizer

    from step_gguf.runtime import llama

    hf = Tokenizer.from_file(str(checkpoint("tiny") / "tokenizer.json"))
    want = hf.encode(text, add_special_tokens=False).ids
    with llama.load(gguf_file("tiny", "bf16"), n_ctx=64) as m:
        got = m.tokenize(text, special=True)
        assert got == want
        assert m.detokenize(got) == hf.decode(got)  # both drop special tokens
