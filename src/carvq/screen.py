"""NumPy reference of the screened head's arithmetic (docs/SCREEN.md, patches/src/carvq-screen.h).

The C scan (scalar, AVX2, NEON) must give exactly these integer scores and this top-k. The
tables are float32 arithmetic in a fixed order, so NumPy reproduces them bit for bit: each
dot product is summed i = 0, 1, ..., d-1 with one rounding per multiply and per add.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from carvq.format import CarvqTensors, Layout, unpack_codes

BLOCK = 32  # rows per interleaved block (CARVQ_SCREEN_BLOCK)


def lookup_as_index(t: CarvqTensors) -> CarvqTensors:
    """What the screened head scans where it reads the lookup's own codes (a tied head without
    an index of its own): the lookup itself, but of hot tiers (format v4) only the first, since
    the scan reads one sorted hot set (FORMAT.md, Versioning; llama-carvq.cpp does the same)."""
    from dataclasses import replace

    lo = t.layout
    if len(lo.tier_rows) <= 1:
        return t
    first = lo.tier_rows[0]
    return CarvqTensors(replace(lo, hot_rows=first, hot_tiers=(), hot_map=False), t.codes, t.codebooks, hot_ids=t.hot_ids[:first],
                        hot_codes=t.hot_codes[:first], hot_codebooks=t.hot_codebooks[:lo.n_groups],
                        transform=t.transform)


@dataclass(frozen=True)
class Tables:
    q: np.ndarray  # (G*L, 16) uint8, entries >= K zero
    qh: np.ndarray  # (G*Lh, 16) uint8
    scale: float  # logits per score unit (float32)
    bias: float  # approximate logit = score * scale + bias
    hot_offset: int
    qmax: int


def _dots(codebooks, h: np.ndarray, d: int) -> np.ndarray:
    """t[g, l, k] = sum_i h[g*d + i] * C[g, l, k, i], summed in order of i, float32."""
    cb = np.asarray(codebooks).astype(np.float32)  # (G, levels, K, d); F16 converts exactly
    hg = np.asarray(h, np.float32).reshape(cb.shape[0], 1, 1, d)
    acc = np.zeros(cb.shape[:3], np.float32)
    for i in range(d):
        acc = acc + hg[..., i] * cb[..., i]
    return acc.reshape(-1, cb.shape[2])  # (G*levels, K), row j = g*levels + l


def project(projection, h) -> np.ndarray:
    """h' = h @ projection for a screen index (carvq_screen_project): h'[i] = sum over j, in order
    of j, of projection[j, i] * h[j], float32, one rounding per multiply and per add."""
    P = np.asarray(projection, np.float32)
    h = np.asarray(h, np.float32)
    acc = np.zeros(P.shape[1], np.float32)
    for j in range(P.shape[0]):
        acc = acc + P[j] * h[j]
    return acc


def _sequential_sum(x: np.ndarray) -> np.float32:
    s = np.float32(0)
    for v in x.astype(np.float32):
        s = np.float32(s + v)
    return s


def tables(layout: Layout, codebooks, hot_codebooks, h) -> Tables:
    G, K = layout.n_groups, layout.codebook_size
    GL = G * layout.levels
    GLp = GL + GL % 2
    ts = _dots(codebooks, h, layout.group_size)
    th = _dots(hot_codebooks, h, layout.group_size) if layout.hot_rows else np.zeros((0, K), np.float32)
    both = np.concatenate([ts, th])
    lo = both.min(axis=1)
    ranges = both.max(axis=1) - lo
    # the largest range; a NaN range never wins (carvq_screen_ranges starts from 0)
    finite = ranges[~np.isnan(ranges)]
    R = np.float32(max(np.float32(0), finite.max())) if finite.size else np.float32(0)
    qmax = min(255, 65535 // GLp)
    inv = np.float32(qmax) / R if R > 0 and np.isfinite(R) else np.float32(0)
    with np.errstate(invalid="ignore"):
        v = np.rint((both - lo[:, None]) * inv)
    v = np.where(v > 0, v, 0)  # negative, zero or NaN
    v = np.minimum(v, qmax).astype(np.uint8)
    q = np.zeros((GL, 16), np.uint8)
    q[:, :K] = v[:GL]
    qh = np.zeros((len(th), 16), np.uint8)
    qh[:, :K] = v[GL:]
    scale = np.float32(R / np.float32(qmax)) if inv > 0 else np.float32(0)
    off = np.rint(np.float32(_sequential_sum(lo[GL:]) * inv))
    off = 0 if np.isnan(off) else int(min(max(off, -1e9), 1e9))
    return Tables(q, qh, float(scale), float(_sequential_sum(lo[:GL])), off, qmax)


def scores(layout: Layout, codes_packed, t: Tables, hot_ids=None, hot_codes_packed=None) -> np.ndarray:
    """Integer score of every row: the sum of its codes' table bytes (plus hot levels)."""
    codes = unpack_codes(codes_packed, layout).reshape(layout.n_vocab, -1)  # (V, G*L)
    j = np.arange(codes.shape[1])
    s = t.q[j[None, :], codes].astype(np.int64).sum(axis=1)
    if layout.hot_rows:
        hc = unpack_codes(hot_codes_packed, layout.hot_layout()).reshape(layout.hot_rows, -1)
        jh = np.arange(hc.shape[1])
        s[np.asarray(hot_ids, np.int64)] += t.qh[jh[None, :], hc].astype(np.int64).sum(axis=1) + t.hot_offset
    return s.astype(np.int32)


FIX_MAX = 1 << 20  # CARVQ_SCREEN_FIX_MAX: a weight's clamp, so that 8 * 127 * FIX_MAX fits int32


def fix_weights(dirs, h, scale: float) -> np.ndarray:
    """The screen correction's integer weights (carvq_screen_fix_weights): a_j = dirs[j] . h summed
    in order of i (float32, one rounding per multiply and per add), m_j = rint(a_j / scale * 256)
    clamped to +-FIX_MAX; 0 where scale is 0 or a_j is not finite."""
    D = np.asarray(dirs, np.float32)
    h = np.asarray(h, np.float32)
    a = np.zeros(D.shape[0], np.float32)
    for i in range(D.shape[1]):
        a = a + D[:, i] * h[i]
    if not np.float32(scale) > 0:
        return np.zeros(D.shape[0], np.int32)
    with np.errstate(invalid="ignore", over="ignore"):
        v = np.rint(a / np.float32(scale) * np.float32(256))
    v = np.where(np.isnan(v), 0, np.clip(v, -FIX_MAX, FIX_MAX))
    return v.astype(np.int32)


def fix_add(s: np.ndarray, fix, m: np.ndarray) -> np.ndarray:
    """scores + (m @ fix) >> 8 for fix (r, V) (carvq_screen_fix_add; the shift floors), int32."""
    corr = (np.asarray(m, np.int64) @ np.asarray(fix, np.int64)) >> 8
    return (np.asarray(s, np.int64) + corr).astype(np.int32)


def topk(s: np.ndarray, k: int) -> np.ndarray:
    """The min(k, n) best rows: highest score first, ties by lower id (a stable sort)."""
    order = np.argsort(-np.asarray(s, np.int64), kind="stable")
    return order[: max(0, min(k, len(order)))].astype(np.int32)


def relayout(layout: Layout, codes_packed) -> np.ndarray:
    """The interleaved block layout of carvq_screen_relayout, as bytes."""
    codes = unpack_codes(codes_packed, layout).reshape(layout.n_vocab, -1)
    GL = codes.shape[1]
    GLp = GL + GL % 2
    n_blocks = -(-layout.n_vocab // BLOCK)
    padded = np.zeros((n_blocks * BLOCK, GLp), np.uint8)
    padded[: layout.n_vocab, :GL] = codes
    blk = padded.reshape(n_blocks, 2, BLOCK // 2, GLp)  # rows i and i + 16 share a byte
    out = blk[:, 0] | (blk[:, 1] << 4)  # (n_blocks, 16, GLp)
    return np.ascontiguousarray(out.transpose(0, 2, 1)).reshape(-1)


def coded_tables(layout: Layout, codebooks, h) -> np.ndarray:
    """A coded head's float tables (llama-carvq.cpp's carvq_coded_tables_single): t[j, c] =
    h_g . C[g][l][c] for code position j = g*L + l, 16 entries a position (c >= K zero)."""
    t = _dots(codebooks, h, layout.group_size)
    out = np.zeros((t.shape[0], 16), np.float32)
    out[:, : t.shape[1]] = t
    return out


def rows_sum(layout: Layout, codes_packed, rows, tables) -> np.ndarray:
    """carvq_screen_rows_sum: each row's sum over j of tables[j, code(row, j)], as two partial
    sums s[j % 2] in order of j, then s0 + s1, float32."""
    codes = unpack_codes(codes_packed, layout).reshape(layout.n_vocab, -1)[np.asarray(rows, np.int64)]
    t = np.asarray(tables, np.float32).reshape(-1, 16)
    picked = t[np.arange(codes.shape[1]), codes]  # (rows, GL)
    s = np.zeros((len(codes), 2), np.float32)
    for j in range(codes.shape[1]):
        s[:, j % 2] = s[:, j % 2] + picked[:, j]
    return s[:, 0] + s[:, 1]
