"""The runtime: a GGUF loaded in this process, llama-server and RPC hosts, each placed by the
planner, and what llama.cpp says it allocated."""
