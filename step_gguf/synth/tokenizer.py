"""The tokenizer files and model card of a synthetic checkpoint: a byte-level BPE learnt from a
small corpus with Step 3.5's pre-tokenizer split, its special tokens and chat template, and
each script piece as one added token."""

from __future__ import annotations

from typing import Sequence

from ..core.errors import StepGGUFError

BASE_MODEL = "stepfun-ai/Step-3.5-Flash"  # the model whose layout the synthetic ones copy


CORPUS = """\
Step three point five Flash is a sparse mixture of experts language model. Each token is routed
to eight of two hundred and eighty eight experts, and a shared expert always runs beside them.
Three sliding window layers are followed by one layer of full attention, so the cache stays small
at long context. The model also predicts the next three tokens with its multi token prediction
heads, which lets a runtime draft tokens and verify them in one pass. People run it on their own
machines: a graphics card with twelve to twenty four gigabytes of memory holds the attention and
the shared experts, while the routed experts stay in system memory. The conversion must stream
tensors one at a time, keep memory bounded, and never leave a broken file behind. Numbers like
128, 4096 and 262144 appear in its configuration; code such as `x = f(y) + 1;` appears in its data.
"""


SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>",
                  "<think>", "</think>")


CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


DEEPSEEK_V3_SPLITS = (
    r"\p{N}{1,3}",
    "[一-龥\u3040-ゟ゠-ヿ]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
)


def byte_symbols() -> list[str]:
    """Byte -> printable symbol of byte-level BPE: printable Latin-1 bytes stand for
    themselves, the rest are shifted above U+0100 in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, shift = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + shift)
            shift += 1
    return [symbols[b] for b in range(256)]


def learn_merges(text: str, n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training on whitespace-split words (ties broken by symbol order)."""
    sym = byte_symbols()
    words: dict[tuple[str, ...], int] = {}
    for i, word in enumerate(text.split()):
        key = tuple(sym[b] for b in ((" " if i else "") + word).encode())
        words[key] = words.get(key, 0) + 1
    merges = []
    for _ in range(n_merges):
        pairs: dict[tuple[str, str], int] = {}
        for w, c in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] = pairs.get(pair, 0) + c
        if not pairs:
            break
        best = min(pairs, key=lambda pr: (-pairs[pr], pr))
        if pairs[best] < 2:
            break
        merges.append(best)
        merged = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + c
        words = merged
    return merges


def model_card(preset: str) -> str:
    """README.md with the YAML front matter the hub's model cards carry: the source of the
    GGUF's general.* keys (name, license, base model, languages, tags)."""
    return f"""---
license: mit
base_model: {BASE_MODEL}
model_name: Step 3.5 Flash Synthetic {preset.title()}
language:
- en
- zh
pipeline_tag: text-generation
tags:
- synthetic
- step-gguf
---
# Step 3.5 Flash, synthetic ({preset})

Random weights in the layout of [{BASE_MODEL}](https://huggingface.co/{BASE_MODEL}), written
by `step-gguf synth` for tests: it has every architectural feature and no knowledge.
"""


def tokenizer_files(vocab_rows: int, script: Sequence[str] = (),
                    chat_template: str | None = None, specials: Sequence[str] = ()) -> dict[str, dict]:
    """tokenizer.json and tokenizer_config.json, with `specials` among the special tokens. Each
    `script` piece becomes one added token that detokenizes as written (not special), so a
    scripted model emits it whole."""
    merges = learn_merges(CORPUS, n_merges=min(400, vocab_rows // 2))
    vocab = {s: i for i, s in enumerate(byte_symbols())}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    added = [{"id": len(vocab) + i, "content": t, "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": True}
             for i, t in enumerate((*SPECIAL_TOKENS, *specials))]
    added += [{"id": len(vocab) + len(added) + i, "content": t, "single_word": False,
               "lstrip": False, "rstrip": False, "normalized": False, "special": False}
              for i, t in enumerate(script)]
    if len(vocab) + len(added) > vocab_rows:
        raise StepGGUFError(f"vocab_size {vocab_rows} is too small for the synthetic tokenizer")
    split = [{"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False}
             for r in DEEPSEEK_V3_SPLITS]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": split + [
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": [f"{a} {b}" for a, b in merges]},
    }
    config = {"add_bos_token": False, "add_eos_token": False, "bos_token": "<|startoftext|>",
              "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "model_max_length": 1 << 18,
              "tokenizer_class": "PreTrainedTokenizerFast",
              "chat_template": chat_template or CHAT_TEMPLATE,
              "clean_up_tokenization_spaces": False}
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": config}
