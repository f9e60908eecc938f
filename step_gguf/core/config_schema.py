"""Step's text config as transformers' `save_pretrained` writes it, in the keys of the config.json
the hub ships, which `model.Step35Config` reads. Every value is taken from one schema or the
other; nothing is guessed where the two differ."""

from __future__ import annotations

from .errors import CheckpointError


def hub_schema(c: dict) -> dict:
    """A text config in the keys the hub's config.json uses: transformers' `save_pretrained`
    writes its normalised schema instead (MoE layers as `mlp_layer_types`, the MTP blocks'
    attention types apart in `mtp_layer_types`, RoPE per attention type in `rope_parameters`,
    head counts per layer in `per_layer_config`, read by _parse). Keys the hub's schema has
    already are kept."""
    c = dict(c)
    n_layer = int(c["num_hidden_layers"])
    types = c.get("layer_types")
    if types and len(types) == n_layer and c.get("mtp_layer_types"):
        c["layer_types"] = list(types) + list(c["mtp_layer_types"])
    if "moe_layers_enum" not in c and c.get("mlp_layer_types"):
        unknown = set(c["mlp_layer_types"]) - {"dense", "sparse"}
        if unknown:
            raise CheckpointError(f"unsupported mlp_layer_types {sorted(unknown)}")
        c["moe_layers_enum"] = [i for i, t in enumerate(c["mlp_layer_types"]) if t == "sparse"]
    rope = c.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" not in c and c.get("layer_types"):
        by_type = rope if "rope_theta" not in rope else {t: rope for t in set(c["layer_types"])}
        missing = set(c["layer_types"]) - set(by_type)
        if missing:
            raise CheckpointError(f"rope_parameters has no entry for {sorted(missing)[0]}")
        c["rope_theta"] = [float(by_type[t]["rope_theta"]) for t in c["layer_types"]]
        c["partial_rotary_factors"] = [float(by_type[t].get("partial_rotary_factor", 1.0)) for t in c["layer_types"]]
        scaled = {t: p for t, p in by_type.items() if p.get("rope_type", "default") != "default"}
        if set(scaled) - {"full_attention"}:
            raise CheckpointError("RoPE scaling on sliding-window layers is not representable in llama.cpp's "
                                  "step35 (it scales the full-attention layers only)")
        if scaled:
            c["rope_scaling"] = {k: v for k, v in scaled["full_attention"].items()
                                 if k not in ("rope_theta", "partial_rotary_factor")}
    return c
