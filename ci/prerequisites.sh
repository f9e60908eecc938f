#!/usr/bin/env bash
# Tools the runtime build needs (cmake, a C++ compiler, patch; node and npm for the chat page)
# plus ccache to make rebuilds cheap, and chromium for the chat page's browser test. Installs
# only what is missing, and only where apt-get is available.
set -euo pipefail
missing=()
for tool in cmake g++ patch ccache ninja npm chromium; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})) && command -v apt-get >/dev/null 2>&1; then
    pkgs=()
    for tool in "${missing[@]}"; do
        case $tool in g++) pkgs+=(g++) ;; ninja) pkgs+=(ninja-build) ;; npm) pkgs+=(nodejs npm) ;; *) pkgs+=("$tool") ;; esac
    done
    echo "installing ${pkgs[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
fi
