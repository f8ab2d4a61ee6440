"""NumPy reference decoder of CARVQ-GGUF (docs/FORMAT.md, "Decoding token t").

The one decoder of record: it favours clarity over speed and needs only NumPy. The C
decoder (patches/src/carvq.c) is tested bit for bit against it, and the converter builds
its in-memory reconstruction with it (`sum_levels`), so a file decodes exactly as the
converter measured it.
"""
from __future__ import annotations

import numpy as np

from carvq.errors import CarvqError
from carvq.format import CarvqTensors, Layout, read_tensors, unpack_codes


def activation(name: str, x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    if name == "relu":
        return np.maximum(x, np.float32(0))
    if name == "silu":
        return (x / (np.float32(1) + np.exp(-x))).astype(np.float32)
    if name == "gelu":
        c = np.float32(np.sqrt(2.0 / np.pi))
        return (np.float32(0.5) * x * (np.float32(1) + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))).astype(np.float32)
    raise CarvqError(f"unknown adaptor activation {name!r}")


def sum_levels(codebooks, codes: np.ndarray, acc: np.ndarray | None = None) -> np.ndarray:
    """acc (T, G, d) + the codebook vectors `codes` (T, G, levels) select, added one level
    at a time, level 0 first, in float32: the bit-exact order of FORMAT.md. A new zero
    accumulator when `acc` is None; returns the accumulator."""
    cb = np.asarray(codebooks, dtype=np.float32)  # (G, levels, K, d)
    if acc is None:
        acc = np.zeros((codes.shape[0], cb.shape[0], cb.shape[3]), np.float32)
    g_idx = np.arange(cb.shape[0])[None, :]
    for level in range(cb.shape[1]):
        acc += cb[g_idx, level, codes[:, :, level]]
    return acc


def _checked_ids(layout: Layout, token_ids) -> np.ndarray:
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= layout.n_vocab):
        raise CarvqError(f"token id outside 0..{layout.n_vocab - 1}")
    return ids


def decode_rvq(layout: Layout, codes_packed: np.ndarray, codebooks: np.ndarray, token_ids) -> np.ndarray:
    """RVQ part of the decode: (len(ids), n) float32."""
    ids = _checked_ids(layout, token_ids)
    codes = unpack_codes(np.asarray(codes_packed).view(np.uint8)[ids], layout)
    if codes.size and codes.max() >= layout.codebook_size:
        raise CarvqError("code outside the codebook")
    return sum_levels(codebooks, codes).reshape(ids.size, layout.n_embd)


def add_hot(layout: Layout, hot_ids, hot_codes_packed, hot_codebooks, token_ids, out: np.ndarray) -> None:
    """Hot part of the decode, in place: for each tier in order, each id that is one of the
    tier's rows continues the RVQ sum in `out` with the tier's levels, level 0 first."""
    if not layout.hot_rows:
        return
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    all_ids = np.asarray(hot_ids, dtype=np.int64)
    G = layout.n_groups
    for t, (start, rows) in enumerate(zip(layout.tier_starts(), layout.tier_rows)):
        tier = all_ids[start:start + rows]
        pos = np.searchsorted(tier, ids)
        found = (pos < tier.size) & (tier[np.minimum(pos, tier.size - 1)] == ids)
        if not found.any():
            continue
        codes = unpack_codes(np.asarray(hot_codes_packed).view(np.uint8)[start + pos[found]], layout.hot_layout())
        if codes.max() >= layout.codebook_size:
            raise CarvqError("hot code outside the codebook")
        acc = out[found].reshape(-1, G, layout.group_size).astype(np.float32)
        out[found] = sum_levels(np.asarray(hot_codebooks)[t * G:(t + 1) * G], codes, acc).reshape(-1, layout.n_embd)


def decode_adaptor(layout: Layout, sigma0, up_w, up_b, down_w, down_b, token_ids) -> np.ndarray:
    """Adaptor part of the decode: (len(ids), n) float32."""
    ids = _checked_ids(layout, token_ids)
    z = np.asarray(sigma0, dtype=np.float32)[ids]
    u = activation(layout.activation, z @ np.asarray(up_w, np.float32).T + np.asarray(up_b, np.float32))
    return (u @ np.asarray(down_w, np.float32).T + np.asarray(down_b, np.float32)).astype(np.float32)


def decode_codes(tensors: CarvqTensors, token_ids) -> np.ndarray:
    """What the codes alone decode to (RVQ and hot levels, no adaptor): (len(ids), n) float32.
    It is also what the screened head's scan approximates logits with."""
    out = decode_rvq(tensors.layout, tensors.codes, tensors.codebooks, token_ids)
    add_hot(tensors.layout, tensors.hot_ids, tensors.hot_codes, tensors.hot_codebooks, token_ids, out)
    if tensors.layout.transform:
        out = transform_rows(tensors.transform, out)
    return out


def transform_rows(transform, rows: np.ndarray) -> np.ndarray:
    """FORMAT.md "Lookup transform": row[i] = sum_j transform[i, j] * row_codes[j], in float32
    (a matrix product: its summation order is the implementation's, as the adaptor's)."""
    return rows @ np.asarray(transform, np.float32).T


def decode(tensors: CarvqTensors, token_ids) -> np.ndarray:
    """Embedding rows of `token_ids`: (len(ids), n) float32 (RVQ, hot levels, adaptor)."""
    lo = tensors.layout
    out = decode_codes(tensors, token_ids)
    if lo.adaptor_rank:
        out += decode_adaptor(lo, tensors.sigma0, tensors.up_w, tensors.up_b, tensors.down_w, tensors.down_b, token_ids)
    return out


def decode_rows(source, token_ids) -> np.ndarray:
    """Decode embedding rows of `token_ids` from a CARVQ-GGUF (path or gguf.GGUFReader)."""
    return decode(read_tensors(source), token_ids)


def decode_all(source) -> np.ndarray:
    """Every row of a CARVQ-GGUF's embedding: (V, n) float32."""
    tensors = read_tensors(source)
    return decode(tensors, np.arange(tensors.layout.n_vocab))
