"""Recipes: the built-in ones resolve as their rules say and round-trip, layer spans, and bad
recipe files refused in one line (priced against the real config, no weights)."""

from __future__ import annotations

import pytest
from gguf import GGMLQuantizationType as Q

from step_gguf.core.recipe import Recipe, RecipeError, load_recipe
from step_gguf.pipeline.quantize import dry_run


def test_builtin_recipes_resolve_and_round_trip():
    for name in ("int8", "int4-mixed", "int3-mixed", "int2-mixed"):
        recipe = load_recipe(name)
        assert Recipe.from_toml(recipe.to_toml(), "x") == recipe
    int4 = load_recipe("int4-mixed")
    # layer spans: 45 trunk layers; the down experts of outer layers get one step more
    assert int4.resolve("blk.3.ffn_down_exps.weight", (288, 4096, 1280), 45).qtype == Q.Q5_K
    assert int4.resolve("blk.20.ffn_down_exps.weight", (288, 4096, 1280), 45).qtype == Q.Q4_K
    assert int4.resolve("blk.44.ffn_down_exps.weight", (288, 4096, 1280), 45).qtype == Q.Q5_K
    assert int4.resolve("blk.20.ffn_up_exps.weight", (288, 1280, 4096), 45).qtype == Q.Q4_K
    # pinned: 1-D tensors and the router stay F32 whatever the recipe says
    assert int4.resolve("blk.3.ffn_gate_inp.weight", (288, 4096), 45).qtype == Q.F32
    assert int4.resolve("blk.3.attn_norm.weight", (4096,), 45).qtype == Q.F32
    # row-size fallbacks: a K-quant needs rows of 256, Q8_0 rows of 32
    assert int4.resolve("blk.20.ffn_up_exps.weight", (8, 48, 64), 45).qtype == Q.Q5_0
    assert Recipe.single(Q.Q8_0).resolve("blk.0.attn_q.weight", (64, 48), 4).qtype == Q.F16


def test_layer_spans():
    recipe = Recipe.from_toml('[[rule]]\nmatch = "x"\nlayers = "1, -2--1, 50%-75%, mtp"\ntype = "Q8_0"\n'
                              '[[rule]]\nmatch = "."\ntype = "Q4_0"\n', "spans.toml")
    chosen = [i for i in range(12) if recipe.resolve(f"blk.{i}.x.weight", (32, 32), 8).qtype == Q.Q8_0]
    assert chosen == [1, 4, 5, 6, 7, 8, 9, 10, 11]  # 1; 6, 7 (last two); 4, 5 (half-open 50-75%); MTP 8+


@pytest.mark.parametrize("text, message", [
    ("not toml = [", "is not valid TOML"),
    ('name = "x"\n', "has no [[rule]] entries"),
    ('[[rule]]\nmatch = "("\ntype = "Q8_0"\n', "is not a valid regex"),
    ('[[rule]]\nmatch = "."\ntype = "Q9_9"\n', "unknown type 'Q9_9'"),
    ('[[rule]]\nmatch = "."\ntype = "Q8_0"\nlayers = "first"\n', "is not N, A-B, P%-Q% or mtp"),
    ('[[rule]]\nmatch = "."\ntype = "Q8_0"\ncolour = 1\n', "unknown key 'colour'"),
    ('[[rule]]\nmatch = "attn"\ntype = "Q8_0"\n', "has no rule for tensor"),
])
def test_bad_recipe_files(text, message, tmp_path, real_config):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("(", r"\(")):
        dry_run(real_config, load_recipe(path=path))
