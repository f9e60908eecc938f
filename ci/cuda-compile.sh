#!/usr/bin/env bash
# Compile our patched llama.cpp with the CUDA backend where no system CUDA exists, with the
# toolkit from PyPI's wheels (CUDA 13: the CUDA 12 nvcc wheels carry ptxas but no nvcc), for
# the architectures given (default 89: RTX 4090; 121 is DGX Spark's GB10). Too long for CI on
# 2 cores (ggml-cuda's kernels): run by hand; it prints the time it took.
#   bash ci/cuda-compile.sh [ARCHS]      e.g. bash ci/cuda-compile.sh 89,121
set -euo pipefail
archs=${1:-89}
cd "$(dirname "$0")/.."
venv=${STEP_GGUF_CUDA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/step-gguf/cuda-venv}
[[ -x $venv/bin/python ]] || python3 -m venv "$venv"
"$venv/bin/pip" install -q -e . "nvidia-cuda-nvcc>=13,<14" "nvidia-cuda-runtime>=13,<14" \
    "nvidia-cublas>=13,<14" "nvidia-cuda-cccl>=13,<14" "nvidia-cuda-crt>=13,<14"
root=$("$venv/bin/python" -c 'import nvidia, pathlib; print(pathlib.Path(nvidia.__path__[0]) / "cu13")')
# the wheels ship versioned libraries only; CMake's FindCUDAToolkit and the linker want the bare names
for lib in "$root"/lib/lib*.so.[0-9]*; do
    bare=${lib%%.so.*}.so
    [[ -e $bare ]] || ln -s "$(basename "$lib")" "$bare"
done
[[ -e $root/lib64 ]] || ln -s lib "$root/lib64"
start=$(date +%s)
# step-gguf takes the wheels' toolkit, installed in its environment, before a system one
"$venv/bin/step-gguf" runtime build --backend cuda --cuda-arch "$archs" --no-install
echo "CUDA build for sm_${archs} took $(( ($(date +%s) - start) / 60 )) min"
