"""Checkpoint and GGUF to GGUF: the output tensors, their data, conversion, measurement of
quantization error, equalization, budget mode and quantization."""
