"""DeepSeek-V3's pre-tokenizer split (Step 3.5's) in our series against stock llama.cpp's
std::regex path, on the same function of each tree (tests/native/pretokenize.cpp).

Stock recurses once per character of a run and overflows the stack at ~50,000 letters; ours
scans. The split must be the same piece for piece on everything stock can split: llama.cpp's own
tokenizer test inputs, prose, code, maths, CJK, emoji, every category the regexes name, numbers of
every length, whitespace runs in every position, Step 3.5's chat template rendered, and
thousands of random strings over all of those and over every plane of codepoints. Piece boundaries are compared directly (not
token ids, which a small vocabulary would make blind to most boundaries).
"""

from __future__ import annotations

import random
import resource
import subprocess
from pathlib import Path

import pytest

from native_build import compile_native, stock_build
from step_gguf.native import build as b
from step_gguf.synth.tokenizer import DEEPSEEK_V3_SPLITS

UNICODE_SOURCES = ("src/unicode.cpp", "src/unicode-data.cpp")

# one character of every class the regexes tell apart, ASCII and not
CLASSES = {
    "ascii letter": "a", "letter": "é", "greek": "λ", "cyrillic": "ж", "han": "中", "kana": "カ",
    "hangul": "한", "mark": "\u0301", "devanagari mark": "\u093f", "digit": "7", "other number": "²",
    "fullwidth digit": "３", "ascii punctuation": "!", "punctuation": "。", "symbol": "€",
    "ascii symbol": "^", "emoji": "😀", "space": " ", "tab": "\t", "newline": "\n", "carriage return": "\r",
    "vertical tab": "\v", "form feed": "\f", "no-break space": "\u00a0", "em space": "\u2003",
    "ideographic space": "\u3000", "next line": "\u0085", "line separator": "\u2028",
    "zero-width joiner": "\u200d", "control": "\x01", "delete": "\x7f", "private use": "\ue000",
    "unassigned": "\u0378", "byte order mark": "\ufeff",
}

CORPUS = (
    "Hello world", " Hello world", "Hello World", " Hello World", " Hello World!", "Hello, world!",
    " this is 🦙.cpp", "w048 7tuijk dsdfhu", "нещо на Български", "កាន់តែពិសេសអាចខលចេញ",
    "🚀 (normal) 😶‍🌫️ (multiple emojis concatenated) ✅ (only emoji that has its own token)",
    "I've been 'told' he's there, I'M sure we'll DO it", "  \n\t\n\r\n  \n\n\n\t\t x  \r",
    "3333333333 33 333 3.3 3,333,333 0.000001 1e-10 -42 +7 ½ ١٢٣ ٤٥٦ 一二三 ⅷ",
    "def f(x):\n    return x**2 + 1  # square\n\n\tprint(f'{x!r}')\r\n",
    "if (a<=b && c!=d) { x->y = *p++; } // done\n/* block */",
    "∫₀^∞ e^{-x²} dx = √π/2; ∀ε>0 ∃δ: |f(x)−L|<ε, α+β=γ",
    "中文测试：你好，世界！日本語のテキスト、カタカナとひらがな。한국어 문장입니다.",
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.",
    "e\u0301e\u0301 \u0301\u0301x a\u0300b \u0915\u093f\u0924\u093e\u092c मराठी العَرَبِيَّة",
    "base64: QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=/+aGVsbG8=", "AAAA....!!!!????\n\n\n",
    "...abc", "'s 't 're", "--flag=value", "$HOME/path_to/file.txt", "a\u00a0b\u2003c\u3000d",
    "\u0085x\u2028y\ufeffz\u200dw", "x  ", "x \n", "x\n ", " \n x", "\n", " ", "\t", "", "!\n\r\n",
    "@user #tag $5 %d ^_^ `code` |pipe| ~tilde~", "١٢٣٤٥ ۱۲۳ ߁߂", "ﾃｽﾄ ＡＢＣ　１２３",
)


def _numbers() -> list[str]:
    digits = "1234567890" * 3
    return [digits[:n] for n in range(1, 26)] + [f"x{digits[:n]}y" for n in range(1, 9)] + \
           [f"{digits[:n]}.{digits[:m]}" for n in (1, 4, 7) for m in (1, 3, 5)]


def _whitespace() -> list[str]:
    runs = [" " * n for n in range(1, 5)] + ["\t\t", " \t ", "\n\n", " \n ", "\r\n", " \r\n\t", "\u3000 ", "\n\u00a0"]
    return [w for r in runs for w in (r, f"{r}a", f"a{r}", f"a{r}b", f"a{r}!", f"!{r}a", f"1{r}2", f"中{r}中")]


def _llama_test_inputs(tree: Path) -> list[str]:
    out = []
    for inp in sorted((tree / "models").glob("ggml-vocab-*.gguf.inp")):
        out += inp.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    return out


def _template_rendered(tree: Path) -> list[str]:
    from transformers.utils.chat_template_utils import render_jinja_template

    template = (tree / "models" / "templates" / "StepFun3.5-Flash.jinja").read_text(encoding="utf-8")
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    chat = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What's the weather in 北京 at 10:30?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}]},
            {"role": "tool", "content": "{\"temp_c\": 21.5, \"sky\": \"clear\"}"},
            {"role": "assistant", "content": "<think>\nIt is clear.\n</think>\nClear, 21.5 °C."}]
    return [render_jinja_template([chat], tools=tools, chat_template=template, add_generation_prompt=True,
                                  bos_token="<|begin▁of▁sentence|>", eos_token="<|im_end|>")[0][0]
            for tools in (None, [tool])]


def _random_strings(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = list(CLASSES.values()) + list("aZ09 .,;:'\"-_()[]{}<>") + ["\r\n", "  ", "\n\n"]
    snippets = alphabet + ["abc", " abc", "123", "1234567", "。", "中文", "カナ", "é\u0301", " !", "!a", "\t\n"]
    return ["".join(rng.choice(snippets if i % 2 else alphabet) for _ in range(rng.randint(1, 40)))
            for i in range(n)]


def _random_codepoints(n: int, seed: int) -> list[str]:
    """Strings of codepoints drawn from the whole range (every plane, unassigned ones too)."""
    rng = random.Random(seed)
    draw = (lambda: rng.randint(0, 0x7F), lambda: rng.randint(0x80, 0x2FFF), lambda: rng.randint(0x3000, 0xD7FF),
            lambda: rng.randint(0xE000, 0xFFFF), lambda: rng.randint(0x10000, 0x10FFFF))
    return ["".join(chr(rng.choice(draw)()) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def _split(exe: Path, texts: list[str]) -> list[str]:
    records = [str(len(DEEPSEEK_V3_SPLITS)).encode() + b"\n"]
    for s in (*DEEPSEEK_V3_SPLITS, *texts):
        data = s.encode("utf-8", "surrogatepass")
        records.append(b"%d\n%s" % (len(data), data))
    out = subprocess.run([str(exe)], input=b"".join(records), capture_output=True, check=True).stdout
    return out.decode().splitlines()


@pytest.fixture(scope="module")
def stock(runtime) -> b.RuntimeBuild:
    return stock_build()


@pytest.fixture(scope="module")
def splitters(runtime, stock):
    """(ours, stock): the pretokenize program built with each tree's unicode.cpp."""
    ours = b.RuntimeBuild(runtime.bin_dir.parent.parent)
    return compile_native("pretokenize", ours, UNICODE_SOURCES), compile_native("pretokenize", stock, UNICODE_SOURCES)


def test_same_pieces_as_the_regex_path(splitters, stock):
    ours, stock_exe = splitters
    tree = stock.src
    texts = [*CORPUS, *CLASSES.values(), *_numbers(), *_whitespace(), *_llama_test_inputs(tree),
             *_template_rendered(tree), *_random_strings(4000, seed=35), *_random_codepoints(2000, seed=35)]
    assert len(texts) > 6500
    mine, theirs = _split(ours, texts), _split(stock_exe, texts)
    assert len(mine) == len(theirs) == len(texts)
    differ = [(t, m, s) for t, m, s in zip(texts, mine, theirs) if m != s]
    assert not differ, f"{len(differ)} texts split differently, first: {differ[0]!r}"
    # the comparison sees boundaries: most texts split into several pieces
    assert sum(" " in line for line in mine) > 0.8 * len(texts)


def test_invalid_utf8_fails_as_the_regex_path_does(splitters):
    bad = ["abc\udcff", "\udce9t\udce9", "x\udcc3"]  # lone bytes 0xFF, 0xE9, truncated 0xC3
    mine, theirs = (_split(exe, bad) for exe in splitters)
    assert mine == theirs


@pytest.mark.parametrize("name", ["ascii letter", "letter", "digit", "space", "newline", "carriage return",
                                  "ascii punctuation", "punctuation", "han", "kana", "mark", "emoji", "control"])
def test_a_megabyte_run_splits_in_linear_time(splitters, name):
    """A run of one character 1 MB long (stock: SIGSEGV from ~50,000): split, in time that
    grows linearly (4x the run within 10x the time; a quadratic scan would take 16x). The time
    is the splitter's CPU time, which other work on the machine does not stretch as it does
    the wall clock."""
    ours, _ = splitters
    ch = CLASSES[name]
    reps = (1 << 20) // len(ch.encode())

    def timed(n: int) -> tuple[float, list[int]]:
        best, pieces = float("inf"), []
        for _ in range(2):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            [line] = _split(ours, [ch * n])
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            best = min(best, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
            pieces = [int(x) for x in line.split()]
        return best, pieces

    t1, pieces = timed(reps)
    assert sum(pieces) == reps * len(ch.encode())
    t4, _ = timed(4 * reps)
    assert t4 < 10 * max(t1, 0.02), f"1 MB: {t1:.3f} s, 4 MB: {t4:.3f} s"
