"""Native code and child processes: the runtime build and its CPU variants, llama.cpp's tools,
ggml through ctypes, the chat page build and this machine's measured figures."""
