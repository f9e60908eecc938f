"""The vision tower of a synthetic Step 3.7 checkpoint, named, shaped and configured as
transformers' `Step3p7ForConditionalGeneration` saves it (and llama.cpp's converter reads it):
a patch convolution, a pre-norm and a positional table, transformer blocks with layer scales,
two downsampling convolutions, and the projector into the text model's width."""

from __future__ import annotations

# every key transformers writes for the vision tower, so that nothing is read from a default
VISION_CONFIG = {
    "attention_dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 64, "image_size": 112,
    "layer_norm_eps": 1e-5, "layer_scale_init_value": 0.1, "max_position_embeddings": 2704,
    "mlp_ratio": 8960 / 1536, "model_type": "step3p5_vision", "num_attention_heads": 4,
    "num_channels": 3, "num_hidden_layers": 2, "patch_size": 14,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "axial"},
}
VISION_CONFIG["intermediate_size"] = int(VISION_CONFIG["hidden_size"] * VISION_CONFIG["mlp_ratio"])

# the image's text around its features, as Step 3.7's processor and llama.cpp's mtmd write it:
# <im_start> features <im_end> (crops between <patch_start> and <patch_end>, rows ended by
# <patch_newline>); <im_patch> holds a feature's place in the text transformers reads
IMAGE_PLACEHOLDER = "<im_patch>"
VISION_TOKENS = (IMAGE_PLACEHOLDER, "<im_start>", "<im_end>", "<patch_start>", "<patch_end>", "<patch_newline>")


def projector_config(image_token_id: int) -> dict:
    """The keys beside vision_config in the top-level config."""
    return {"projector_bias": False, "image_token_id": image_token_id}


def vision_tensors(v: dict, text_hidden: int) -> dict[str, tuple[tuple[int, ...], float, float]]:
    """name -> (shape, spread, centre) of every vision tensor: norms and layer scales sit at
    their initial values (1, the config's layer scale) with a little noise."""
    w, f, c, p = v["hidden_size"], v["intermediate_size"], v["num_channels"], v["patch_size"]
    grid = v["image_size"] // p
    weight, norm, scale = 0.02, (0.02, 1.0), (0.01, v["layer_scale_init_value"])
    out = {"vision_model.conv1.weight": ((w, c, p, p), weight, 0.0),
           "vision_model.ln_pre.weight": ((w,), *norm), "vision_model.ln_pre.bias": ((w,), weight, 0.0),
           "vision_model.positional_embedding": ((grid * grid, w), weight, 0.0)}
    for i in range(v["num_hidden_layers"]):
        b = f"vision_model.transformer.resblocks.{i}."
        out |= {b + "attn.in_proj_weight": ((3 * w, w), weight, 0.0), b + "attn.in_proj_bias": ((3 * w,), weight, 0.0),
                b + "attn.out_proj.weight": ((w, w), weight, 0.0), b + "attn.out_proj.bias": ((w,), weight, 0.0),
                b + "ln_1.weight": ((w,), *norm), b + "ln_1.bias": ((w,), weight, 0.0),
                b + "ln_2.weight": ((w,), *norm), b + "ln_2.bias": ((w,), weight, 0.0),
                b + "ls_1.gamma": ((w,), *scale), b + "ls_2.gamma": ((w,), *scale),
                b + "mlp.c_fc.weight": ((f, w), weight, 0.0), b + "mlp.c_fc.bias": ((f,), weight, 0.0),
                b + "mlp.c_proj.weight": ((w, f), weight, 0.0), b + "mlp.c_proj.bias": ((w,), weight, 0.0)}
    out |= {"vision_model.vit_downsampler1.weight": ((2 * w, w, 3, 3), weight, 0.0),
            "vision_model.vit_downsampler1.bias": ((2 * w,), weight, 0.0),
            "vision_model.vit_downsampler2.weight": ((4 * w, 2 * w, 3, 3), weight, 0.0),
            "vision_model.vit_downsampler2.bias": ((4 * w,), weight, 0.0),
            "vit_large_projector.weight": ((text_hidden, 4 * w), weight, 0.0)}
    return out
