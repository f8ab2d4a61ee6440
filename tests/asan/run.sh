#!/usr/bin/env bash
# The hostile corpus through an AddressSanitizer + LeakSanitizer build of the patched
# llama.cpp (issue 12, item 9; results in docs/RESULTS.md). Not part of the CI suite: the
# sanitizer build takes about 7 minutes on 2 cores.
#
#   tests/asan/run.sh HOSTILE_DIR [MORE.gguf ...]    # HOSTILE_DIR from tests/hostile_corpus.py
set -u
root=$(cd "$(dirname "$0")/../.." && pwd)
build="$root/build/asan"
flags="-fsanitize=address -fno-omit-frame-pointer"
cmake -G Ninja -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_FLAGS="$flags" \
    -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_EXE_LINKER_FLAGS=-fsanitize=address \
    -DCMAKE_SHARED_LINKER_FLAGS=-fsanitize=address -DGGML_OPENMP=OFF >/dev/null || exit 1
cmake --build "$build" --target llama-completion >/dev/null || exit 1
export ASAN_OPTIONS=detect_leaks=1
dir=$1; shift
n=0; bad=0
for f in "$dir"/*.gguf "$@"; do
    n=$((n + 1))
    log=$(mktemp)
    timeout 300 "$build/bin/llama-completion" -m "$f" -p the -n 4 -no-cnv --no-warmup -c 64 -t 2 >"$log" 2>&1
    rc=$?
    if grep -q "ERROR: AddressSanitizer\|ERROR: LeakSanitizer" "$log" || [ $rc -ge 128 ]; then
        bad=$((bad + 1)); echo "== $f: exit $rc"; grep -A12 "ERROR:" "$log" | head -24
    fi
    rm -f "$log"
done
echo "files: $n, sanitizer reports or crashes: $bad"
[ "$bad" -eq 0 ]
