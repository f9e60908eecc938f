"""The llama.cpp patch series, shipped as package data (``step_gguf.patches``); see ``series``."""
