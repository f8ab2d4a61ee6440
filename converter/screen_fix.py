"""The screen correction (FORMAT.md "Screen correction", format v5): what the screened head's
scan misses of each head row, along the direction in which the hidden states vary most.

The scan approximates logit_v = h . E_v by h . Ê_v, where Ê_v is what the scan reads of the
lookup (its shared levels and first hot tier). The error h . (E_v - Ê_v) is far from noise: the
final hidden states are very anisotropic (SmolLM2's top direction carries 49 % of E[h h^T],
Gemma-3's 42 %), so a large part of every row's error is (u . h) (u . (E_v - Ê_v)) for the top
eigenvector u. One int8 coefficient a row stores u . (E_v - Ê_v); the scan adds it times u . h.
Measured in NumPy (512 positions of the Britannica text, directions from 4096 positions of the
calibration text, float scores): at k = 4096 the dense top-40 set inside the candidates 98.0 ->
99.8 % and KLD 0.0119 -> 0.0083 on Gemma-3, 94.9 -> 98.4 % and 0.0150 -> 0.0105 on SmolLM2, for
one byte a row (0.0125 / 0.0139 bpw). The default is rank 4, four bytes a row (0.050 / 0.058 bpw):
on SmolLM2 at k = 2048 the top-40 set is inside at 97.4 % (rank 1: 92.2 %), at 4096 at 99.6 %
(rank 1: 99.0 %, and 99.7 % at 6144), so its files screen 4096 rows instead of 6144 (docs/RESULTS.md,
session 20); rank 8 adds little more.
"""
from __future__ import annotations

import time

import numpy as np

from carvq import reference, screen
from carvq.format import CarvqTensors, ScreenFix
from carvq.gguf_io import row_chunks

RANK = 4  # with it the default k comes down to V/12 (screen_index.default_k)
SEQUENCE_TOKENS = 512  # of the calibration text, per sequence
SEQUENCES = 4  # ... and how many (2048 positions, about what the model's own 8 documents give)


def hidden_states(gguf_path, sequences: list[list[int]]) -> np.ndarray:
    """The source model's final hidden states ("result_norm", what its head multiplies) over
    `sequences` of token ids, each from position 0: (positions, n) float32."""
    from carvq.runtime.model import Model

    n_ctx = max(len(s) for s in sequences) + 8
    with Model(gguf_path, n_ctx=n_ctx, n_batch=n_ctx) as m:
        return np.concatenate([m.hidden_states(list(s)) for s in sequences if s])


def calibration_sequences(ids: np.ndarray, opening: list[int]) -> list[list[int]]:
    """Up to SEQUENCES sequences of the calibration text's ids, each opened as llama.cpp opens a context."""
    body = SEQUENCE_TOKENS - len(opening)
    return [opening + ids[a:a + body].tolist() for a in range(0, min(len(ids), SEQUENCES * body), body)
            if len(ids[a:a + body]) >= 16]


def directions(states: np.ndarray, rank: int) -> np.ndarray:
    """The top `rank` eigenvectors of the hidden states' second moment E[h h^T], (n, rank) float64."""
    h = np.asarray(states, np.float64)
    w, U = np.linalg.eigh(h.T @ h / len(h))
    return U[:, np.argsort(w)[::-1][:rank]]


def fit(t: CarvqTensors, head_rows, states: np.ndarray, rank: int = RANK) -> tuple[ScreenFix, str]:
    """The correction of what the scan reads of lookup `t` (screen.lookup_as_index) towards the
    head's rows (head_rows(a, b): rows a..b-1 as float32, the head exactly as the file stores it),
    and a note for the report."""
    start = time.perf_counter()
    scanned = screen.lookup_as_index(t)
    V = scanned.layout.n_vocab
    U = directions(states, rank)
    coef = np.empty((V, rank), np.float64)
    for a, b in row_chunks(V):  # no V x n float copy beside the caller's
        residual = head_rows(a, b).astype(np.float32) - reference.decode_codes(scanned, np.arange(a, b))
        coef[a:b] = residual.astype(np.float64) @ U
    scale = np.abs(coef).max(axis=0) / 127.0
    scale = np.where(scale > 0, scale, 1.0)
    fix = np.ascontiguousarray(np.clip(np.rint(coef / scale), -127, 127).astype(np.int8).T)  # (rank, V)
    dirs = (U * scale).T.astype(np.float32)
    out = ScreenFix(fix, dirs)
    return out, (f"screen correction: the scan's error along the top {rank} direction(s) of {len(states):,} hidden "
                 f"states, {rank} int8 a row ({out.nbytes:,} bytes = {8 * out.nbytes / (V * t.layout.n_embd):.4f} bpw), "
                 f"{time.perf_counter() - start:.0f} s")
