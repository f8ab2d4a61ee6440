"""ik_llama.cpp's trellis (KT) and non-linear (K, KS) types, simulated through ik's own libggml.

ik_llama.cpp's IQ1_KT ... IQ4_KT, IQ2_KS, IQ3_KS and IQ2_K are the strongest low-bit GGUF
types, and, like mainline's K and IQ types, use 256-element super-blocks: they cannot store
SmolLM2's n = 576 or Gemma-3's n = 640 rows either (and mainline llama.cpp cannot read them at
all). As in bench/simulate.py, the matrix is quantized and dequantized by the type's own code
and written as an F32 token_embd.

Source: the ik_llama.cpp tree vendored in the ik-llama-cpp-python sdist below, fetched from the
package index by name, version and sha256 (carvq.llama_source's fetcher) into
~/.cache/carvq/ik_llama. Only its ggml is built (CPU, Release, Ninja, ccache; no llama, no
tools, no OpenMP), once. ik's ggml does not compile without its iqk matrix-multiplication
kernels, nor load without its flash-attention kernels, so both come along (the latter for
F16/Q8_0 caches only).

Rows: the KT and KS types keep per-row metadata (a float or fp16 row scale) besides their
256-blocks. The flattened matrix is quantized in rows of ROWS_PER_CHUNK = 4 original rows
(4 x 576 = 2304 = 9 x 256, 4 x 640 = 2560 = 10 x 256), so that metadata is paid once per 4 rows,
close to what a real row of a 256-multiple width would pay. bpw is ik's own
ggml_row_size(type, 4 n) * 8 / (4 n): every byte, metadata included.

Importance: ik's ggml_quantize_requires_imatrix is false for all of these, so by default no
importance vector is passed and each quantizer uses its own default weighting (like a
llama-quantize run without --imatrix); `uniform=True` passes an all-ones vector instead
(what bench/simulate.py passes mainline's types), and that is what the quality bench uses:
without it SmolLM2's IQ2_KT scored KLD 0.207 instead of 0.143 (docs/RESULTS.md).

Isolation: ik's libggml has the SONAME libggml.so, like mainline's. Loaded first, it would be
taken for the libggml that carvq's libllama needs (and lacks mainline's symbols), so a process
that uses carvq's runtime calls simulate_file(), which runs the simulation in a child process.

    python bench/ik_ggml.py                       # fetch, build; print the library path and build time
    python bench/ik_ggml.py IQ2_KT IQ3_KS ...     # simulate on SmolLM2's embedding: bpw, relative error
    python bench/ik_ggml.py --write REF.gguf TYPE OUT.gguf [--uniform]   # what simulate_file runs
"""
from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "ik-llama-cpp-python"
VERSION = "0.1.5"
SHA256 = "33c67eb99e4dcab5e611050433243815709b8b3067753f9ce18375013cf002ad"
VENDOR_DIR = "ik_llama_cpp_python-0.1.5/vendor/ik_llama.cpp"
# enum ggml_type values in that tree's ggml/include/ggml.h; checked against the type traits' names
TYPES = {"IQ1_KT": 158, "IQ2_KT": 153, "IQ2_KS": 145, "IQ2_K": 137, "IQ3_KT": 154, "IQ3_KS": 156, "IQ4_KT": 155}
ROWS_PER_CHUNK = 4
CMAKE_ARGS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=ON", "-DGGML_CCACHE=ON",
              "-DGGML_OPENMP=OFF", "-DGGML_IQK_MUL_MAT=ON", "-DGGML_IQK_FLASH_ATTENTION=ON", "-DGGML_IQK_FA_ALL_QUANTS=OFF",
              "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_CURL=OFF"]


def _llama_source():
    """The repository's src/carvq/llama_source.py (standard library only; its sdist fetcher)."""
    spec = importlib.util.spec_from_file_location("carvq_llama_source", REPO / "src" / "carvq" / "llama_source.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def root() -> Path:
    return _llama_source().cache_dir() / "ik_llama"


def source_tree() -> Path:
    return _llama_source().fetch_tree(PACKAGE, VERSION, SHA256, VENDOR_DIR, root() / f"src-{VERSION}")


def library() -> Path:
    """ik's libggml.so, built once (configure + `ninja ggml`, -j2); the build time is kept
    beside it in build-seconds.txt."""
    build = root() / f"build-{VERSION}"
    lib = build / "ggml" / "src" / "libggml.so"
    if lib.exists():
        return lib
    src = source_tree()
    start = time.perf_counter()
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja", *CMAKE_ARGS], check=True,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["ninja", "-C", str(build), "-j2", "ggml"], check=True)
    seconds = time.perf_counter() - start
    (build / "build-seconds.txt").write_text(f"{seconds:.0f}\n")
    print(f"ik_llama.cpp ggml built in {seconds:.0f} s: {lib}", file=sys.stderr)
    return lib


class _Traits(ctypes.Structure):
    """ggml_type_traits_t of ik's ggml.h."""
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p),
                ("from_float_to_mat", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int),
                ("nrows", ctypes.c_int64), ("ncols", ctypes.c_int64), ("gemv", ctypes.c_void_p),
                ("gemm", ctypes.c_void_p), ("row_meta_size", ctypes.c_int64)]


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
_LIB = None


def _ggml():
    """ik's libggml, loaded with RTLD_DEEPBIND: its calls into itself must not resolve to the
    mainline libggml that carvq's runtime (or bench/simulate.py) may have loaded."""
    global _LIB
    if _LIB is None:
        lib = ctypes.CDLL(str(library()), mode=os.RTLD_LOCAL | getattr(os, "RTLD_DEEPBIND", 0))
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_internal_get_type_traits.restype = _Traits
        lib.ggml_internal_get_type_traits.argtypes = [ctypes.c_int]
        # ggml_init fills the fp16 -> fp32 table that the dequantizers of the fp16-scaled
        # types (IQ2_K, IQ2_KS, IQ3_KS) read; without it they return zeros
        lib.ggml_init.restype = ctypes.c_void_p
        lib.ggml_init.argtypes = [_InitParams]
        lib.ggml_free.argtypes = [ctypes.c_void_p]
        lib.ggml_free(lib.ggml_init(_InitParams(1024, None, True)))
        _LIB = lib
    return _LIB


def row_bpw(type_name: str, n_per_row: int) -> float:
    """Bits per weight of one row of n_per_row weights, row metadata included (ik's ggml_row_size)."""
    return 8.0 * _ggml().ggml_row_size(TYPES[type_name], n_per_row) / n_per_row


def simulate(matrix: np.ndarray, type_name: str, uniform: bool = False,
             rows_per_chunk: int = ROWS_PER_CHUNK) -> tuple[np.ndarray, float]:
    """(dequantized matrix, bits per weight) of `matrix` stored as ik's `type_name`, in rows
    of `rows_per_chunk` original rows. uniform: pass an all-ones importance vector instead of
    none (a type that requires one always gets the all-ones vector)."""
    lib = _ggml()
    qtype = TYPES[type_name]
    traits = lib.ggml_internal_get_type_traits(qtype)
    if traits.type_name.decode() != type_name.lower():
        raise SystemExit(f"ik's ggml type {qtype} is {traits.type_name.decode()}, not {type_name}")
    V, n = matrix.shape
    width = rows_per_chunk * n
    if V % rows_per_chunk or width % traits.blck_size:
        raise SystemExit(f"{V} x {n} cannot be cut into rows of {rows_per_chunk} x {n} in blocks of {traits.blck_size}")
    rows = V // rows_per_chunk
    flat = np.ascontiguousarray(matrix, np.float32).reshape(rows, width)
    row_size = lib.ggml_row_size(qtype, width)
    out = np.zeros((rows, row_size), np.uint8)
    lib.ggml_quantize_init(qtype)
    weights = np.ones(width, np.float32) if uniform or lib.ggml_quantize_requires_imatrix(qtype) else None

    def quantize(span: tuple[int, int]) -> int:  # ctypes drops the GIL: one span per core
        a, b = span
        return lib.ggml_quantize_chunk(qtype, flat[a].ctypes.data, out[a].ctypes.data, 0, b - a, width,
                                       weights.ctypes.data if weights is not None else None)

    spans = _spans(rows, os.cpu_count() or 1)
    with ThreadPoolExecutor(len(spans)) as pool:
        written = sum(pool.map(quantize, spans))
    if written != out.nbytes:
        raise SystemExit(f"ik's ggml_quantize_chunk wrote {written} bytes for {type_name}, expected {out.nbytes}")
    to_float = _TO_FLOAT(traits.to_float)  # dequantizes one row (its metadata first)
    deq = np.empty((rows, width), np.float32)
    for r in range(rows):
        to_float(out[r].ctypes.data, deq[r].ctypes.data, width)
    return deq.reshape(V, n), 8.0 * out.nbytes / matrix.size


def _spans(rows: int, parts: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, rows, max(1, min(parts, rows)) + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def check(matrix: np.ndarray, deq: np.ndarray, type_name: str, bpw: float, limit: float = 0.6) -> float:
    """Relative Frobenius error of a dequantized matrix; refuses NaN/inf and errors above
    `limit` (a 1.75-bpw type is near 0.4 on these embeddings; garbage is near or above 1)."""
    if not np.isfinite(deq).all():
        raise SystemExit(f"ik {type_name}: the dequantized matrix has non-finite values")
    err = float(np.linalg.norm(deq - matrix) / np.linalg.norm(matrix))
    if not err < limit:
        raise SystemExit(f"ik {type_name} ({bpw:.3f} bpw): relative error {err:.3f} is not sane (limit {limit})")
    return err


def sidecar(out: Path) -> Path:
    return out.with_name(out.name + ".ik.json")


def write_simulated(ref: Path, type_name: str, out: Path, uniform: bool = False) -> dict:
    """`ref` with its token_embd replaced by the F32 dequantization of `type_name`, written to
    `out`, and `out`'s sidecar JSON: bpw, relative error, importance, rows per chunk."""
    from carvq import gguf_io as gio
    from carvq.dense import write_dense_embedding

    reader = gio.open_gguf(ref)
    matrix = gio.dequantize(gio.tensor_by_name(reader, gio.EMBD))
    deq, bpw = simulate(matrix, type_name, uniform=uniform)
    err = check(matrix, deq, type_name, bpw)
    write_dense_embedding(reader, out, deq)
    info = {"type": type_name, "bpw": bpw, "rel_error": err, "rows_per_chunk": ROWS_PER_CHUNK,
            "importance": "all-ones" if uniform or _ggml().ggml_quantize_requires_imatrix(TYPES[type_name]) else "none",
            "ik": f"{PACKAGE}=={VERSION}"}
    sidecar(out).write_text(json.dumps(info, indent=1))
    return info


def simulate_file(ref: Path, type_name: str, out: Path, uniform: bool = False) -> dict:
    """write_simulated() in a child process (see Isolation above); its sidecar, once made."""
    if not (out.exists() and sidecar(out).exists()):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--write", str(ref), type_name, str(out)]
        subprocess.run(cmd + (["--uniform"] if uniform else []), check=True, stdout=subprocess.DEVNULL)
    return json.loads(sidecar(out).read_text())


def main() -> None:
    if sys.argv[1:2] == ["--write"]:
        ref, type_name, out = sys.argv[2:5]
        print(json.dumps(write_simulated(Path(ref), type_name, Path(out), "--uniform" in sys.argv[5:])))
        return
    lib = library()
    seconds = root() / f"build-{VERSION}" / "build-seconds.txt"
    print(f"{lib} (built in {seconds.read_text().strip() if seconds.exists() else '?'} s)")
    if len(sys.argv) < 2:
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import models

    from carvq import gguf_io as gio

    M = gio.dequantize(gio.tensor_by_name(gio.open_gguf(models.smollm2()), gio.EMBD))
    for name in sys.argv[1:]:
        for uniform in (False, True):
            start = time.perf_counter()
            deq, bpw = simulate(M, name.upper(), uniform=uniform)
            err = check(M, deq, name.upper(), bpw)
            print(f"{name.upper()} ({'all-ones' if uniform else 'no'} importance): {bpw:.4f} bpw, relative error "
                  f"{err:.4f}, {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
