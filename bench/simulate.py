"""llama.cpp's 256-block embedding types, simulated where llama.cpp cannot store them.

SmolLM2 (n=576) and Gemma-3-270M (n=640) have widths that are not a multiple of 256, so
`llama-quantize --token-embedding-type q2_k` refuses them. To measure what those types would
give, the flattened matrix is quantized in blocks of 256 by libggml's own ggml_quantize_chunk
(uniform importance vector where the type requires one: a lookup table gets no activations
from llama-imatrix), dequantized with gguf-py, and written as an F32 token_embd. The output
head stays a byte copy of the source embedding, as for every CARVQ variant.

    python bench/simulate.py TYPE [TYPE ...]      (e.g. IQ1_S IQ1_M IQ2_XXS Q2_K Q3_K)
"""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402

from carvq import gguf_io as gio  # noqa: E402
from carvq.dense import write_dense_embedding  # noqa: E402
from carvq.llama_source import cache_dir  # noqa: E402
from carvq.runtime import library_dir  # noqa: E402

BLOCK = 256


def _ggml():
    lib = ctypes.CDLL(str(library_dir() / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def simulate(matrix: np.ndarray, type_name: str, uniform_imatrix: bool = True) -> tuple[np.ndarray, float]:
    """(dequantized matrix, bits per weight) of `matrix` stored as `type_name` in 256-blocks.
    uniform_imatrix: pass an all-ones importance vector to every type (what a lookup table
    would get); False passes none where the type allows it (its own x^2 weighting)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    flat = np.ascontiguousarray(matrix, np.float32).reshape(-1)
    if flat.size % BLOCK:
        raise SystemExit(f"{flat.size} weights are not a multiple of {BLOCK}")
    rows = flat.size // BLOCK
    out = np.zeros(rows * BLOCK // block_size * type_size, np.uint8)
    lib = _ggml()
    lib.ggml_quantize_init(int(qtype))
    needs = uniform_imatrix or lib.ggml_quantize_requires_imatrix(int(qtype))
    imatrix = np.ones(BLOCK, np.float32) if needs else None
    lib.ggml_quantize_chunk(int(qtype), flat.ctypes.data, out.ctypes.data, 0, rows, BLOCK,
                            imatrix.ctypes.data if imatrix is not None else None)
    deq = gguf.quants.dequantize(out.reshape(rows, -1), qtype).reshape(matrix.shape)
    return deq.astype(np.float32), 8.0 * out.nbytes / flat.size


def main() -> None:
    src = models.smollm2()
    reader = gio.open_gguf(src)
    M = gio.dequantize(gio.tensor_by_name(reader, gio.EMBD))
    for name in sys.argv[1:]:
        deq, bpw = simulate(M, name.upper())
        out = cache_dir() / "bench" / f"{src.stem}.sim-{name.upper()}.gguf"
        write_dense_embedding(reader, out, deq, keep_head=True)
        print(f"{name.upper()}: {bpw:.4f} bpw, relative error {np.linalg.norm(deq - M) / np.linalg.norm(M):.4f} -> {out}")


if __name__ == "__main__":
    main()
