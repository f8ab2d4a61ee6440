#!/usr/bin/env bash
# Install carvq and everything it needs into the current Python, on a fresh machine.
#   scripts/setup.sh            runtime + converter (torch, transformers)
#   scripts/setup.sh --test     plus the test tools
# Safe to re-run: pip, the llama.cpp source cache and ccache make a second run fast.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
extras="convert"
[[ "${1:-}" == "--test" ]] && extras="convert,test"

step() { printf '\n== %s\n' "$*"; }

if ! command -v ccache >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    step "ccache (makes llama.cpp rebuilds cheap)"
    (apt-get update -qq && apt-get install -y -qq ccache) >/dev/null 2>&1 || echo "ccache not installed; building without it"
fi

step "torch 2.13.0, CPU build (pinned: an unpinned torch pulls a multi-GB CUDA build)"
$PY -m pip install -q "torch==2.13.0"

step "pinned llama.cpp source (llama-cpp-python 0.3.36 sdist from PyPI, sha256-checked) and its gguf-py"
tree=$($PY carvq/llama_source.py)
echo "$tree"
$PY -m pip install -q "$tree/gguf-py"

step "carvq[$extras]: builds the patched llama.cpp (first time: ~15 min on 2 cores; then seconds)"
$PY -m pip install -q ".[$extras]"
carvq tools
