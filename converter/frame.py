"""The lookup's frame (format v6, `--transform`): the codes are fitted, and decode, in the
principal axes of the embedding, and an n x n matrix maps a decoded row back.

Why: group RVQ quantizes each group of d columns on its own, so whatever the columns share
across groups is paid for in every group. In the fit's metric and token weights the embedding
is far from isotropic: on SmolLM2 the 8 leading principal axes hold 72 % of the token-weighted
energy (the frequent tokens are atypical rows, and they dominate the weights). Rotated to those
axes, dealt to the groups back and forth (every group gets one strong axis per pass, and the
groups stay balanced), plain RVQ's weighted error fell by 27 to 34 % at 3 to 6
levels; with hot tiers and polish, SmolLM2 at 3.0 bpw, by 15 % (KLD 0.0241 -> 0.0217) (docs/RESULTS.md,
session 22). Axes in order (the strongest in group 0) measured far worse than dealt, and the
model's full Fisher matrix as the metric gave nothing on top of its diagonal.

The price is the matrix: n * n values, 16 n / V bits per weight in F16 (Gemma-3-270M 0.04,
SmolLM2 0.19, LLaMA-3.2-1B 0.26), taken out of the same budget as the codes. On SmolLM2 it costs
more than it buys (below); a vocabulary 5x larger pays a fifth of it.
"""
from __future__ import annotations

import numpy as np

from carvq import gguf_io as gio

# --transform auto uses the frame where the matrix costs at most this many bits per weight (F16):
# Gemma-3-270M's 0.039 yes (not yet scored), SmolLM2's 0.19 no: there the price outweighs the gain
# (3.0 bpw, 3 seeds: KLD 0.0236 with the frame paid from the budget, 0.0219 without)
AUTO_MAX_BPW = 0.1
MODES = ("auto", "pca", "none")


def matrix_bpw(n_vocab: int, n_embd: int, itemsize: int = 2) -> float:
    return 8.0 * itemsize * n_embd / n_vocab


def wanted(mode: str, n_vocab: int, n_embd: int, itemsize: int = 2) -> bool:
    return mode == "pca" or (mode == "auto" and matrix_bpw(n_vocab, n_embd, itemsize) <= AUTO_MAX_BPW)


def weighted_covariance(M: np.ndarray, w: np.ndarray) -> np.ndarray:
    """sum_t w_t (M_t - mu)(M_t - mu)' / sum w, mu the weighted mean; float64, a chunk of rows at a time."""
    w = np.asarray(w, np.float64)
    total = float(w.sum())
    n = M.shape[1]
    second, first = np.zeros((n, n)), np.zeros(n)
    for a, b in gio.row_chunks(M.shape[0]):
        x = np.asarray(M[a:b], np.float64)
        second += (x * w[a:b, None]).T @ x
        first += w[a:b] @ x
    mu = first / total
    return second / total - np.outer(mu, mu)


def principal_frame(M: np.ndarray, w: np.ndarray, group_size: int) -> np.ndarray:
    """Q (n, n) orthogonal, float64: column c is a principal axis of the token-weighted rows of
    M, the i-th strongest in group g's column i // G, g going 0..G-1 then back G-1..0 on every pass;
    fit-space rows are M @ Q."""
    n = M.shape[1]
    G = n // group_size
    _, axes = np.linalg.eigh(weighted_covariance(M, w))
    axes = axes[:, ::-1]  # strongest first
    # a deterministic sign per axis (eigh's is the LAPACK build's): its largest entry positive
    axes = axes * np.where(axes[np.abs(axes).argmax(axis=0), np.arange(n)] < 0, -1.0, 1.0)
    rank, place = np.divmod(np.arange(n), G)
    group = np.where(rank % 2 == 0, place, G - 1 - place)  # back and forth: every group one axis per pass
    columns = group * group_size + rank
    Q = np.empty((n, n))
    Q[:, columns] = axes
    return Q


def rotate_rows(M: np.ndarray, Q: np.ndarray) -> None:
    """M = M @ Q in place, a chunk of rows at a time (no second (V, n) array)."""
    for a, b in gio.row_chunks(M.shape[0]):
        M[a:b] = (np.asarray(M[a:b], np.float64) @ Q).astype(M.dtype)


def transform(Q: np.ndarray, inverse_scale: np.ndarray | None, dtype) -> np.ndarray:
    """The file's transform W (FORMAT.md "Lookup transform"): row = W @ (the codes' sum). A fit-space
    row y is M's row scaled by the metric and rotated, x = (y @ Q') * inverse_scale, so
    W[i, j] = inverse_scale[i] * Q[i, j]."""
    W = Q if inverse_scale is None else np.asarray(inverse_scale, np.float64)[:, None] * Q
    return W.astype(dtype)
