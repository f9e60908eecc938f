"""step-gguf: Step 3.5 Flash -> GGUF conversion and a patched llama.cpp runtime."""

__version__ = "0.1.0"
