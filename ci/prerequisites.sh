#!/usr/bin/env bash
# Tools the runtime build needs (cmake, a C++ compiler, patch) plus ccache to make rebuilds
# cheap. Installs only what is missing, and only where apt-get is available.
set -euo pipefail
missing=()
for tool in cmake g++ patch ccache ninja; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})) && command -v apt-get >/dev/null 2>&1; then
    pkgs=()
    for tool in "${missing[@]}"; do
        case $tool in g++) pkgs+=(g++) ;; ninja) pkgs+=(ninja-build) ;; *) pkgs+=("$tool") ;; esac
    done
    echo "installing ${pkgs[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi
