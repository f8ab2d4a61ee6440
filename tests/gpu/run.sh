#!/usr/bin/env bash
# The GPU check of issue 12, item 3, on a machine with CUDA (see docs/RESULTS.md):
#   .gpu/llama.cpp  the patched llama.cpp tree (made by patches/apply.py; trimmed to what libllama needs)
#   .gpu/models     tiny CARVQ models from the test suite, and a stock one as the control
# Builds libllama with CUDA for one architecture, then runs carvq_gpu_check in its three modes.
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${OUT:-/tmp/carvq-gpu}
mkdir -p "$out"
build=/tmp/carvq-gpu-build
t0=$(date +%s)
cmake -S "$root/.gpu/llama.cpp" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_FA=OFF -DGGML_CUDA_NCCL=OFF -DGGML_NATIVE=OFF -DGGML_AVX2=ON \
    -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_COMMIT=0c1e57098 >"$out/configure.log" 2>&1 || { tail -30 "$out/configure.log"; exit 1; }
cmake --build "$build" --target llama -j "$(nproc)" >"$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
lib=$(dirname "$(find "$build" -name 'libllama.so' | head -1)")
gcc -O2 -I "$root/.gpu/llama.cpp/include" -I "$root/.gpu/llama.cpp/ggml/include" "$here/carvq_gpu_check.c" \
    -L "$lib" -lllama -lggml -lggml-base -Wl,-rpath,"$lib" -o "$build/carvq_gpu_check" || exit 1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for m in llama.carvq llama gemma3.carvq; do
    for mode in cpu gpu override; do
        for head in dense screened; do
            [ "$mode" = cpu ] || [ "$head" = dense ] || continue
            log="$out/$m.$mode.$head.log"
            CARVQ_HEAD=$head timeout 120 "$build/carvq_gpu_check" "$root/.gpu/models/$m.gguf" "$mode" \
                "$out/$m.$mode.$head.f32" >"$log.out" 2>"$log"
            rc=$?
            echo "$m $mode head=$head rc=$rc $(cat "$log.out") | $(grep -a -E 'CARVQ:|error|refused|offloaded|lazy read' "$log" | tr '\n' ' ' | cut -c1-400)"
        done
    done
done
python3 - "$out" <<'PY'
import sys, numpy as np, pathlib
out = pathlib.Path(sys.argv[1])
for m in ("llama.carvq", "llama", "gemma3.carvq"):
    ref = out / f"{m}.cpu.dense.f32"
    for other in (f"{m}.cpu.screened.f32", f"{m}.gpu.dense.f32"):
        o = out / other
        if ref.exists() and o.exists():
            a, b = np.fromfile(ref, np.float32), np.fromfile(o, np.float32)
            print(f"{other} vs {ref.name}: max |diff| {np.abs(a - b).max():.3g}, argmax {a.argmax()} / {b.argmax()}")
PY
