"""The converter's hot loops in C (converter/csrc/carvq-encode.c, through cffi): the residual
encoder's beam search of every sub-vector through its group's levels (nearest-centroid
assignment is its one-level, beam-1 case), and the polish's decode and k-means statistics over
rows of varying depth. Work is split between threads (rows for the search, groups for the
polish); a C call releases the GIL."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from carvq.converter._encode_cffi import ffi, lib

_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _run(spans, fn) -> None:
    """fn(a, b) for every span, on the threads of one pool kept for the process (the fit calls
    the search about a thousand times)."""
    global _pool, _pool_size
    if len(spans) == 1:
        fn(*spans[0])
        return
    if _pool is None or _pool_size < len(spans):
        _pool_size = max(len(spans), _threads())
        _pool = ThreadPoolExecutor(_pool_size, thread_name_prefix="carvq-encode")
    for f in [_pool.submit(fn, a, b) for a, b in spans]:
        f.result()


def search(x: torch.Tensor, codebooks: torch.Tensor, beam: int, out: torch.Tensor) -> None:
    """Codes of x (R, G, d) float32, any row and group strides, components contiguous) through
    codebooks (G, L, K, d) by beam search (beam 1: greedy) into out (R, G, L) uint8, any row and
    group strides, levels contiguous. The rule is carvq-encode.h's."""
    R, G, d = x.shape
    Gc, L, K, dc = codebooks.shape
    if (Gc, dc) != (G, d) or tuple(out.shape) != (R, G, L):
        raise ValueError(f"encoder shapes: x {tuple(x.shape)}, codebooks {tuple(codebooks.shape)}, out {tuple(out.shape)}")
    if x.dtype != torch.float32 or out.dtype != torch.uint8 or (d > 1 and x.stride(2) != 1) or (L > 1 and out.stride(2) != 1):
        raise ValueError("encoder: x must be float32 with contiguous components, out uint8 with contiguous levels")
    if not (1 <= beam <= lib.CARVQ_ENCODE_MAX_BEAM and L <= lib.CARVQ_ENCODE_MAX_LEVELS and K <= lib.CARVQ_ENCODE_MAX_K
            and d <= lib.CARVQ_ENCODE_MAX_D):
        raise ValueError(f"encoder: beam {beam}, L {L}, K {K}, d {d} out of range")
    if R == 0:
        return
    cb = codebooks.to(torch.float32).contiguous()
    cb_ptr = ffi.cast("const float *", cb.data_ptr())
    xs, os_ = x.stride(), out.stride()
    x_ptr, o_ptr = x.data_ptr(), out.data_ptr()

    def run(a: int, b: int) -> None:
        status = lib.carvq_rows_encode(ffi.cast("const float *", x_ptr + 4 * a * xs[0]), b - a, xs[0], xs[1], cb_ptr,
                                       G, L, K, d, beam, ffi.cast("uint8_t *", o_ptr + a * os_[0]), os_[0], os_[1])
        if status != 0:
            raise MemoryError("carvq encoder: out of memory")

    _run(_spans(R), run)


def _spans(total: int) -> list[tuple[int, int]]:
    """[0, total) in one nonempty span a thread: rows for the search; groups for the polish's
    passes, so that no two threads write one output."""
    n = min(total, _threads())
    return [(total * i // n, total * (i + 1) // n) for i in range(n)]


def _polish_args(codes: np.ndarray, depth: np.ndarray, cb: np.ndarray):
    R, G, D = codes.shape
    Gc, Dc, K, d = cb.shape
    if (Gc, Dc) != (G, D) or depth.shape != (R,):
        raise ValueError(f"polish shapes: codes {codes.shape}, depth {depth.shape}, codebooks {cb.shape}")
    if not (K <= lib.CARVQ_ENCODE_MAX_K and d <= lib.CARVQ_ENCODE_MAX_D):
        raise ValueError(f"polish: K {K}, d {d} out of range")
    return (np.ascontiguousarray(depth, np.int32), np.ascontiguousarray(cb, np.float32))


def levels_sum(codes: np.ndarray, depth: np.ndarray, cb: np.ndarray, skip: int = -1) -> np.ndarray:
    """(R, G, d) float32: each row's first depth[r] levels summed in order, level `skip` left out.
    codes (R, G, D) uint8, depth (R,), cb (G, D, K, d)."""
    R, G, D = codes.shape
    depth32, cb32 = _polish_args(codes, depth, cb)
    codes = np.ascontiguousarray(codes, np.uint8)
    K, d = cb32.shape[2], cb32.shape[3]
    out = np.empty((R, G, d), np.float32)
    if R == 0:
        return out
    c_ptr, dp, cbp, op = (ffi.from_buffer("uint8_t[]", codes), ffi.from_buffer("int32_t[]", depth32),
                          ffi.from_buffer("float[]", cb32), ffi.from_buffer("float[]", out))
    _run(_spans(G), lambda g0, g1: lib.carvq_rows_levels_sum(c_ptr, dp, R, cbp, G, D, K, d, skip, g0, g1, op))
    return out


def level_refit(x: np.ndarray, codes: np.ndarray, depth: np.ndarray, w: np.ndarray, cb: np.ndarray, level: int,
                reassign: bool) -> tuple[np.ndarray, np.ndarray]:
    """Level `level`'s k-means statistics over the rows keeping it (carvq-encode.h's
    carvq_level_refit): (num (G, K, d), mass (G, K)) float64. With reassign, the rows' codes of
    the level are first set to the nearest centroid, in place: codes must be C-contiguous
    uint8 (R, G, D); x (R, G*d) float32 C-contiguous, w (R,)."""
    R, G, D = codes.shape
    depth32, cb32 = _polish_args(codes, depth, cb)
    K, d = cb32.shape[2], cb32.shape[3]
    if not (codes.dtype == np.uint8 and codes.flags.c_contiguous and codes.flags.writeable):
        raise ValueError("level_refit writes the codes in place: a C-contiguous, writable uint8 array")
    x = np.ascontiguousarray(x, np.float32)
    if x.shape != (R, G * d):
        raise ValueError(f"level_refit: x {x.shape}, codes {codes.shape}, d {d}")
    w = np.ascontiguousarray(w, np.float64)
    num, mass = np.zeros((G, K, d)), np.zeros((G, K))
    if R == 0:
        return num, mass
    ptrs = (ffi.from_buffer("float[]", x), ffi.from_buffer("uint8_t[]", codes), ffi.from_buffer("int32_t[]", depth32),
            ffi.from_buffer("double[]", w))
    cbp, nump, massp = ffi.from_buffer("float[]", cb32), ffi.from_buffer("double[]", num), ffi.from_buffer("double[]", mass)
    _run(_spans(G), lambda g0, g1: lib.carvq_level_refit(*ptrs, R, cbp, G, D, K, d, level, int(reassign), g0, g1,
                                                              nump, massp))
    return num, mass
