#!/usr/bin/env bash
# Tools the runtime build needs (cmake, a C++ compiler, patch; node and npm for the chat page)
# plus ccache to make rebuilds cheap, chromium for the chat page's browser test, and the Vulkan
# toolchain and Mesa's llvmpipe driver (a Vulkan device that runs on the CPU) for the GPU-offload
# tests. Installs only what is missing, and only where apt-get is available.
set -euo pipefail
missing=()
for tool in cmake g++ patch ccache ninja npm chromium glslc vulkaninfo; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[[ -f /usr/include/vulkan/vulkan.hpp ]] || missing+=(vulkan-headers)
[[ -d /usr/include/spirv ]] || missing+=(spirv-headers)
compgen -G "/usr/share/vulkan/icd.d/lvp_icd*.json" >/dev/null || missing+=(llvmpipe)
if ((${#missing[@]})) && command -v apt-get >/dev/null 2>&1; then
    pkgs=()
    for tool in "${missing[@]}"; do
        case $tool in
            g++) pkgs+=(g++) ;; ninja) pkgs+=(ninja-build) ;; npm) pkgs+=(nodejs npm) ;;
            vulkaninfo) pkgs+=(vulkan-tools) ;; vulkan-headers) pkgs+=(libvulkan-dev) ;;
            llvmpipe) pkgs+=(mesa-vulkan-drivers) ;; *) pkgs+=("$tool") ;;
        esac
    done
    echo "installing ${pkgs[*]}"
    apt-get update -qq
    # one at a time: a package held at another version (node from elsewhere, Mesa's other
    # libraries) then stops only itself, and apt may upgrade what Mesa's driver needs beside it
    for pkg in "${pkgs[@]}"; do
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null ||
            echo "could not install $pkg" >&2
    done
fi
