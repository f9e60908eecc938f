"""Quantization data: built-in recipes (*.toml) and the calibration text, packaged as step_gguf.recipes."""
