#!/usr/bin/env bash
# libFuzzer through the patched loader (issue 12, item 10), two targets:
#   whole   tests/fuzz/gguf_load_fuzz.cpp: whole GGUF files, seeded with SEED_DIR (the hostile
#           corpus and good files); findings in llama.cpp's own parsers are upstream's
#   carvq   tests/fuzz/carvq_load_fuzz.cpp: edits of carvq's keys and tensors in BASE
#   tests/fuzz/run_gguf_fuzz.sh whole SEED_DIR [SECONDS]
#   tests/fuzz/run_gguf_fuzz.sh carvq BASE.carvq.gguf [SECONDS]
# Needs clang; building libllama with -fsanitize=address,fuzzer-no-link into build/fuzz takes
# about 10 min on 2 cores. Crash files land in build/fuzz/findings-TARGET/.
set -eu
root=$(cd "$(dirname "$0")/../.." && pwd)
target=$1
input=$2
seconds=${3:-60}
build="$root/build/fuzz"
flags="-fsanitize=address,fuzzer-no-link -fno-omit-frame-pointer"
CC=clang CXX=clang++ cmake -G Ninja -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_EXE_LINKER_FLAGS=-fsanitize=address \
    -DCMAKE_SHARED_LINKER_FLAGS=-fsanitize=address -DGGML_OPENMP=OFF >/dev/null
cmake --build "$build" --target llama >/dev/null
tree="$build/llama.cpp"
src=$([ "$target" = whole ] && echo gguf_load_fuzz || echo carvq_load_fuzz)
clang++ -O1 -g -fsanitize=fuzzer,address -I"$tree/include" -I"$tree/ggml/include" \
    "$root/tests/fuzz/$src.cpp" -L"$build/bin" -lllama -lggml -lggml-base \
    -Wl,-rpath,"$build/bin" -o "$build/$src"
corpus="$build/corpus-$target"
findings="$build/findings-$target"
mkdir -p "$corpus" "$findings"
seeds=()
if [ "$target" = whole ]; then seeds=("$input"); else export CARVQ_FUZZ_BASE="$input"; fi
# fork mode keeps going after a finding (each is saved), so one upstream abort does not end the run
# leaks off: llama.cpp's loader leaks its metadata context when it refuses a file whose
# general.architecture has the wrong type (llama_model_loader's constructor throws before it
# owns the context); every input would report it. tests/asan/run.sh checks leaks on its own.
ASAN_OPTIONS=detect_leaks=0 "$build/$src" "$corpus" "${seeds[@]}" -fork=1 -ignore_crashes=1 -detect_leaks=0 \
    -max_total_time="$seconds" -rss_limit_mb=4096 -timeout=30 -artifact_prefix="$findings/" \
    >"$build/fuzz-$target.log" 2>&1 || true
grep -E "^#[0-9]+: cov|INFO: fuzzed for|crash|DEADLYSIGNAL|ERROR" "$build/fuzz-$target.log" | tail -5
echo "findings: $(ls "$findings" | wc -l) in $findings"
