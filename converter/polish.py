"""Polishing a trimmed fit: each level's codebooks refitted on the rows that keep it, each row
re-encoded for the depth it keeps.

The trim (converter/tiers.py) cuts every row of a deeper fit to a prefix of its levels. The fit
made those levels for other rows and other depths: level k's codebooks are the centroids of
the residuals of every row that had level k in the fit (the hot rows' levels those of the fit's
hot set), and a row's codes are the beam search's best path through all of the fit's levels,
of which the row now keeps only the first few. After the trim both can be made for what is
kept, with the file's layout, byte count and decoder unchanged:

- levels in turn, ROUNDS times, a k-means step on each: the rows keeping level k take the
  vector of level k nearest to what their other levels leave, then each vector becomes the
  token-weighted mean of that, over the rows that chose it (with the codes fixed, the
  least-squares optimum of that vector), rounded to the stored type at once;
- then every row beam-searched (the converter's beam, train.ENCODE_BEAM) through exactly its own levels, the new
  codes kept where they lower that row's error, and the vectors refitted once more for them.

No step can raise the token-weighted error (in the fit's metric). Measured (docs/RESULTS.md,
session 16): SmolLM2 at 1.6 bpw KLD 0.1246 -> 0.104, the default conversion 0.152 -> 0.130;
Gemma-3 at 1.6 bpw 0.0768 -> 0.0718 (its default 0.085 -> 0.077 with the first form, see there).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from carvq.converter import encoder, rvq, tiers
from carvq.errors import CarvqError
from carvq.format import CarvqTensors
from carvq.gguf_io import row_chunks

# k-means steps on every level before the one beam search (session 16). On random data (tests'
# fixture): two rounds of refit + beam -10.8 % weighted error; two k-means rounds, one beam and a
# refit -11.2 % for half the beam work (the beam search of every row is the dear part: at
# SmolLM2's shape with 8 levels, 23 s against 1.8 s for refitting every level, on a busy machine).
ROUNDS = 2


def weighted_error(M: np.ndarray, w: np.ndarray, codes: np.ndarray, cb: np.ndarray, depth: np.ndarray) -> float:
    """sum_r w_r ||M_r - decode_r||^2."""
    G, d = cb.shape[0], cb.shape[3]
    total = 0.0
    for a, b in row_chunks(M.shape[0]):
        diff = np.asarray(M[a:b], np.float32).reshape(b - a, G, d) - encoder.levels_sum(codes[a:b], depth[a:b], cb)
        total += float(np.dot(w[a:b], (diff * diff).sum((1, 2), dtype=np.float64)))
    return total


def _refit_level(M, w, codes, cb, depth, k: int, dtype, reassign: bool = False) -> None:
    """Level k's codebooks: each vector the weighted mean of what the other levels leave, over
    the rows keeping level k that chose it; a vector no such row chose keeps its value.
    reassign: first each such row's level-k code becomes the vector nearest to what the other
    levels leave (a k-means step on that level: neither half raises the error). One pass over
    the rows in C (converter/encoder.py), without a decoded copy of them."""
    num, mass = encoder.level_refit(M, codes, depth, w, cb, k, reassign)
    chosen = mass > 0
    level = cb[:, k].copy()  # (G, K, d); written back below
    level[chosen] = (num[chosen] / mass[chosen, None]).astype(dtype).astype(np.float32)
    cb[:, k] = level


def _reencode(M, codes, cb, depth, beam: int) -> None:
    """Each row beam-searched through its own levels; kept where its error drops."""
    G, d = cb.shape[0], cb.shape[3]
    for D in np.unique(depth).tolist():
        rows = np.nonzero(depth == D)[0]
        for a, b in row_chunks(rows.size):
            r = rows[a:b]
            x = np.ascontiguousarray(M[r], np.float32)
            new = rvq.encode(torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(cb[:, :D])), beam=beam).numpy()
            x = x.reshape(-1, G, d)
            full = np.full(r.size, D)
            old_err = ((x - encoder.levels_sum(codes[r, :, :D], full, cb[:, :D])) ** 2).sum((1, 2))
            new_err = ((x - encoder.levels_sum(new, full, cb[:, :D])) ** 2).sum((1, 2))
            better = r[new_err < old_err]
            codes[better, :, :D] = new[new_err < old_err]


def polish(t: CarvqTensors, M: np.ndarray, w: np.ndarray, rounds: int = ROUNDS, progress: bool = False
           ) -> tuple[CarvqTensors, str]:
    """The trimmed fit `t` of M (in the fit's metric) with its codebooks and codes made for the
    levels each row keeps (see the module's docstring); and a line saying what it gained."""
    from tqdm import tqdm

    from carvq.converter.train import ENCODE_BEAM

    start = time.perf_counter()
    lo = t.layout
    if lo.hot_rows and lo.hot_levels != 1:
        raise CarvqError("polishing works on trimmed fits (tiers of one level each)")
    codes, cb, depth = tiers.all_levels(t)  # the stored values, as float32
    M = np.ascontiguousarray(M, np.float32)  # the C passes read its rows in place (a copy only if it is not)
    w = np.asarray(w, np.float64)
    dtype = np.asarray(t.codebooks).dtype
    before = weighted_error(M, w, codes, cb, depth)
    D = codes.shape[2]
    with tqdm(total=(rounds + 1) * D + 1, desc="carvq: polishing the trimmed fit", unit="step", disable=not progress,
              leave=False) as bar:
        for _ in range(rounds):  # cheap: a k-means step on each level in turn
            for k in range(D):
                _refit_level(M, w, codes, cb, depth, k, dtype, reassign=True)
                bar.update()
        _reencode(M, codes, cb, depth, ENCODE_BEAM)  # dear (a beam search of every row): once
        bar.update()
        for k in range(D):  # the vectors for the codes the beam chose
            _refit_level(M, w, codes, cb, depth, k, dtype)
            bar.update()
    after = weighted_error(M, w, codes, cb, depth)
    out = tiers.pack(lo, codes, cb, depth, lo.levels, dtype)  # the same tiers: the rows with each level, sorted
    return out, (f"polished for the levels each row keeps ({rounds} k-means rounds per level, a beam "
                                 f"search of every row through its own levels): weighted error {before:.4g} -> {after:.4g} "
                                 f"({100 * (after / before - 1):+.1f} %), {time.perf_counter() - start:.0f} s")
