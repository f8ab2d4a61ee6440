#!/usr/bin/env bash
# Install carvq and everything it needs, on a fresh machine (see scripts/python-env.sh for
# which Python: the active venv/conda environment, else the project venv .venv).
#   scripts/setup.sh            runtime + converter (torch, transformers)
#   scripts/setup.sh --test     plus the test tools
# Safe to re-run: pip's cache, the llama.cpp source cache and ccache make a second run fast.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/python-env.sh
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
extras="convert"
[[ "${1:-}" == "--test" ]] && extras="convert,test"

step() { printf '\n== %s\n' "$*"; }
step "Python: $PY ($("$PY" --version 2>&1))"

missing=()
command -v git >/dev/null 2>&1 || missing+=(git)
command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || command -v clang++ >/dev/null 2>&1 || missing+=("a C/C++ compiler (g++)")
"$PY" -c 'import os, sysconfig, sys; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")) else 1)' \
    || missing+=("Python's headers (python3-dev)")
if [ ${#missing[@]} -gt 0 ]; then
    echo "carvq: missing: ${missing[*]}. On Debian, Ubuntu or Raspberry Pi OS: sudo apt install git g++ python3-dev python3-venv" >&2
    exit 1
fi

if ! command -v ccache >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    step "ccache (makes llama.cpp rebuilds cheap)"
    (apt-get update -qq && apt-get install -y -qq ccache) >/dev/null 2>&1 || echo "ccache not installed; building without it"
fi
command -v ccache >/dev/null 2>&1 || echo "note: no ccache: every fresh build compiles llama.cpp in full (about 15 min on 2 cores)"

if [[ "$extras" == *test* ]] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
   && ! { command -v aarch64-linux-gnu-g++ && command -v qemu-aarch64 && command -v debootstrap; } >/dev/null 2>&1; then
    step "aarch64 cross compilers, qemu-user, debootstrap (the tests build the Raspberry Pi wheels and run them emulated)"
    pkgs="gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user debootstrap"
    (apt-get install -y -qq $pkgs || (apt-get update -qq && apt-get install -y -qq $pkgs)) \
        >/dev/null 2>&1 || echo "not installed: the Raspberry Pi and NEON tests will be skipped (CI fails instead)"
fi

if [[ "$extras" == *test* ]] && ! command -v clang >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    step "clang (the tests run the decoder's libFuzzer harness for 60 s)"
    (apt-get install -y -qq clang || (apt-get update -qq && apt-get install -y -qq clang)) \
        >/dev/null 2>&1 || echo "not installed: the libFuzzer smoke will be skipped"
fi

step "torch 2.13.0, CPU build (pinned: an unpinned torch pulls a multi-GB CUDA build)"
"$PY" -m pip install -q "torch==2.13.0"

step "pinned llama.cpp source (llama-cpp-python 0.3.36 sdist from the package index, sha256-checked) and its gguf-py"
tree=$("$PY" src/carvq/llama_source.py)
echo "$tree"
"$PY" -m pip install -q "$tree/gguf-py"
if [[ "$extras" == *test* ]]; then
    step "llama-cpp-python 0.3.36's bindings, without a llama.cpp of their own (tests run them on carvq's library)"
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$PY" -m pip install -q "$("$PY" src/carvq/llama_source.py --sdist)"
fi

step "carvq[$extras]: builds the patched llama.cpp (first time: ~15 min on 2 cores; then seconds)"
"$PY" -m pip install -q ".[$extras]"
carvq tools
