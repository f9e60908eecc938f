"""Quantization recipes: ordered `pattern (+ layers) -> ggml type` rules, each with a why.

Recipes are data (TOML files in the top-level `quant/` folder, or a user's own file); this
module loads them and resolves a tensor's type from its GGUF name, layer and shape alone, so
a plan can be priced without reading a weight. The first rule that matches wins.

What no recipe decides: 1-D tensors (norms, biases, rope factors) and the MoE router stay
F32, as llama.cpp's own quantizer keeps them; in an mmproj, the vision position table stays F32
and convolution kernels F16 (or F32), all mtmd's graph runs. And a type whose block does not
divide a row falls back to one that does, along the chain llama.cpp's quantizer uses (Q4_K ->
Q5_0, ...).
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import gguf
from gguf import GGMLQuantizationType as Q

from .errors import StepGGUFError
from .gguf_names import layer_of_gguf
from .vision import POSITIONS

RECIPES = "step_gguf.recipes"  # the top-level quant/ folder, as packaged


class RecipeError(StepGGUFError):
    """A recipe file or scheme name that cannot be used."""


# ggml types stock llama.cpp can store and run; recipes name them as ggml prints them
TYPES: dict[str, Q] = {t.name: t for t in (
    Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q6_K, Q.Q5_K, Q.Q4_K, Q.Q3_K, Q.Q2_K, Q.Q5_0, Q.Q5_1,
    Q.Q4_0, Q.Q4_1, Q.IQ4_XS, Q.IQ4_NL, Q.IQ3_S, Q.IQ3_XXS, Q.IQ2_S, Q.IQ2_XS, Q.IQ2_XXS,
    Q.IQ1_M, Q.IQ1_S)}

# a row width the type's block does not divide -> the type llama.cpp's quantizer uses instead
FALLBACK: dict[Q, Q] = {
    **{t: Q.IQ4_NL for t in (Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS,
                             Q.IQ3_S, Q.IQ4_XS)},
    Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0,
}

# ggml cannot quantize these without importance data (ggml_quantize_requires_imatrix)
NEEDS_IMATRIX = frozenset({Q.IQ2_XXS, Q.IQ2_XS, Q.IQ1_S, Q.IQ1_M})


def type_name(qtype: Q) -> str:
    return qtype.name


def parse_type(name: str, where: str) -> Q:
    try:
        return TYPES[name.upper()]
    except (KeyError, AttributeError):
        raise RecipeError(f"{where}: unknown type {name!r}; use one of {', '.join(TYPES)}") from None


def tensor_bytes(shape: tuple[int, ...], qtype: Q) -> int:
    """Bytes of a tensor with PyTorch-order `shape` (rows along the last dim) stored as `qtype`."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape[:-1]) * (shape[-1] // block) * size


def fits(qtype: Q, ncols: int) -> bool:
    return ncols % gguf.GGML_QUANT_SIZES[qtype][0] == 0


def fallback(qtype: Q, ncols: int) -> Q:
    """`qtype`, or what llama.cpp stores instead when its block does not divide `ncols`."""
    if fits(qtype, ncols):
        return qtype
    alt = FALLBACK.get(qtype, qtype)
    return alt if fits(alt, ncols) else Q.F16


# ---------------------------------------------------------------- layer selectors

@dataclass(frozen=True)
class LayerSpan:
    """`layers = "..."` of a rule: comma-separated items, each
    `N` or `A-B` (trunk layer indices; negative counts from the last trunk layer),
    `P%-Q%` (a slice of the trunk's depth, half-open), or `mtp` (the MTP blocks)."""

    text: str

    def covers(self, layer: int, n_layer: int) -> bool:
        for item in (i.strip() for i in self.text.split(",")):
            if item == "mtp":
                if layer >= n_layer:
                    return True
            elif layer < n_layer and self._item_covers(item, layer, n_layer):
                return True
        return False

    @staticmethod
    def _item_covers(item: str, layer: int, n_layer: int) -> bool:
        if item.endswith("%"):
            lo, _, hi = item.partition("-")
            a, b = float(lo.rstrip("%")), float(hi.rstrip("%"))
            return a * n_layer / 100 <= layer < b * n_layer / 100
        m = re.fullmatch(r"(-?\d+)(?:\s*-\s*(-?\d+))?", item)
        assert m, item  # validated when the recipe was loaded
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        lo, hi = (v + n_layer if v < 0 else v for v in (lo, hi))
        return lo <= layer <= hi

    @classmethod
    def parse(cls, text: str, where: str) -> "LayerSpan":
        for item in (i.strip() for i in text.split(",")):
            ok = (item == "mtp" or re.fullmatch(r"-?\d+(\s*-\s*-?\d+)?", item)
                  or re.fullmatch(r"\d+(\.\d+)?%-\d+(\.\d+)?%", item))
            if not ok:
                raise RecipeError(f"{where}: layers item {item!r} is not N, A-B, P%-Q% or mtp")
        return cls(text)


# ---------------------------------------------------------------- recipes

@dataclass(frozen=True)
class Rule:
    pattern: str                 # regex searched in the GGUF tensor name
    qtype: Q
    why: str
    layers: LayerSpan | None = None

    def matches(self, name: str, layer: int | None, n_layer: int) -> bool:
        if not re.search(self.pattern, name):
            return False
        return self.layers is None or (layer is not None and self.layers.covers(layer, n_layer))


PINNED_1D = Rule("", Q.F32, "1-D (norm, bias, rope factors): tiny, and precision matters")
PINNED_ROUTER = Rule("", Q.F32, "router: picks top-k experts by small margins; llama.cpp never "
                     "quantizes it")
PINNED_POSITIONS = Rule("", Q.F32, "vision positions: mtmd resizes the table to each image's grid, in F32 only")
PINNED_CONV = Rule("", Q.F16, "convolution kernel: mtmd convolves by im2col, which takes F16 or F32 kernels only")


@dataclass(frozen=True)
class Choice:
    qtype: Q
    rule: Rule

    @property
    def fell_back(self) -> bool:
        return self.qtype != self.rule.qtype


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    rules: tuple[Rule, ...]
    needs_imatrix: bool = False  # the recipe's quality depends on importance data

    def resolve(self, name: str, shape: tuple[int, ...], n_layer: int) -> "Choice":
        """The type of GGUF tensor `name` (PyTorch-order `shape`) in a model of `n_layer`
        trunk layers, and the rule that chose it."""
        if len(shape) == 1:
            return Choice(Q.F32, PINNED_1D)
        if ".ffn_gate_inp." in name:
            return Choice(Q.F32, PINNED_ROUTER)
        if name == POSITIONS:
            return Choice(Q.F32, PINNED_POSITIONS)
        layer = layer_of_gguf(name)
        for rule in self.rules:
            if rule.matches(name, layer, n_layer):
                if len(shape) == 4 and rule.qtype != Q.F32:
                    return Choice(Q.F16, PINNED_CONV)
                return Choice(fallback(rule.qtype, shape[-1]), rule)
        raise RecipeError(f"recipe {self.name!r} has no rule for tensor {name}; end it with a "
                          "catch-all rule (match = \".\")")

    def to_toml(self) -> str:
        """The recipe as a file `--recipe` reads back."""
        def q(text: str) -> str:
            return json.dumps(text, ensure_ascii=False)  # a JSON string is a TOML basic string

        lines = [f"name = {q(self.name)}", f"summary = {q(self.summary)}"]
        if self.needs_imatrix:
            lines.append("needs_imatrix = true")
        for r in self.rules:
            lines += ["", "[[rule]]", f"match = {q(r.pattern)}"]
            if r.layers is not None:
                lines.append(f"layers = {q(r.layers.text)}")
            lines += [f"type = {q(r.qtype.name)}", f"why = {q(r.why)}"]
        return "\n".join(lines) + "\n"

    @classmethod
    def single(cls, qtype: Q) -> "Recipe":
        """Every weight matrix as `qtype`: what `convert --outtype` means."""
        return cls(qtype.name.lower(), f"every weight matrix {qtype.name}",
                   (Rule(".", qtype, "one type for everything"),))

    @classmethod
    def from_toml(cls, text: str, origin: str) -> "Recipe":
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise RecipeError(f"{origin} is not valid TOML ({exc})") from None
        rules_raw = raw.get("rule")
        if not isinstance(rules_raw, list) or not rules_raw:
            raise RecipeError(f"{origin} has no [[rule]] entries")
        rules = []
        for i, r in enumerate(rules_raw, 1):
            where = f"{origin} rule {i}"
            if not isinstance(r, dict) or not isinstance(r.get("match"), str) or not isinstance(r.get("type"), str):
                raise RecipeError(f"{where} needs `match` (a regex) and `type` (a ggml type name)")
            try:
                re.compile(r["match"])
            except re.error as exc:
                raise RecipeError(f"{where}: match {r['match']!r} is not a valid regex ({exc})") from None
            layers = r.get("layers")
            if layers is not None and not isinstance(layers, str):
                raise RecipeError(f"{where}: layers must be a string such as \"0-2, -2--1, mtp\"")
            unknown = set(r) - {"match", "type", "why", "layers"}
            if unknown:
                raise RecipeError(f"{where}: unknown key {sorted(unknown)[0]!r}")
            rules.append(Rule(r["match"], parse_type(r["type"], where), str(r.get("why", "")),
                              LayerSpan.parse(layers, where) if layers else None))
        name = raw.get("name", Path(origin).stem)
        return cls(str(name), str(raw.get("summary", "")), tuple(rules),
                   bool(raw.get("needs_imatrix", False)))


def builtin_names() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in resources.files(RECIPES).iterdir()
                  if p.name.endswith(".toml"))


def load_recipe(scheme: str | None = None, path: str | Path | None = None) -> Recipe:
    """A built-in scheme by name, or a user's recipe file."""
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise RecipeError(f"cannot read recipe {path}: {exc}") from None
        return Recipe.from_toml(text, str(path))
    scheme = scheme or "int4-mixed"
    if scheme.lower() in (t.lower() for t in TYPES):
        return Recipe.single(parse_type(scheme, "scheme"))
    names = builtin_names()
    if scheme not in names:
        raise RecipeError(f"unknown scheme {scheme!r}; built in: {', '.join(names)}, or any "
                          "single ggml type (e.g. Q8_0), or --recipe FILE")
    return Recipe.from_toml((resources.files(RECIPES) / f"{scheme}.toml").read_text(),
                            f"{scheme}.toml")
