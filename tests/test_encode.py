"""The converter's C encoder (converter/csrc/carvq-encode.c) against a NumPy reference of the
same search: float32 distances summed component by component, candidates ordered path-major,
the B least kept by a stable sort. The codes must be identical, not just as good."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from carvq.converter import encoder, rvq  # noqa: E402


def reference_codes(x: np.ndarray, cb: np.ndarray, beam: int) -> np.ndarray:
    """x (R, G, d) float32, cb (G, L, K, d) float32 -> codes (R, G, L) by carvq-encode.h's rule."""
    R, G, d = x.shape
    _, L, K, _ = cb.shape
    out = np.empty((R, G, L), np.uint8)
    for g in range(G):
        res = x[:, g][:, None, :].copy()  # (R, paths, d)
        paths = np.zeros((R, 1, 0), np.uint8)
        for level in range(L):
            c = cb[g, level]  # (K, d)
            dist = np.zeros((R, res.shape[1], K), np.float32)
            for j in range(d):  # in order, float32: the C sums
                t = res[:, :, None, j] - c[None, None, :, j]
                dist += t * t
            flat = dist.reshape(R, -1)
            kept = min(beam, flat.shape[1])
            pick = np.argsort(flat, axis=1, kind="stable")[:, :kept]  # ties: the earlier candidate
            parent, code = pick // K, pick % K
            rows = np.arange(R)[:, None]
            res = res[rows, parent] - c[code]
            paths = np.concatenate([paths[rows, parent], code[:, :, None].astype(np.uint8)], axis=2)
        out[:, g] = paths[:, 0]
    return out


def _case(rows, groups, levels, k, d, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, groups, d)) * rng.uniform(0.2, 2, (rows, 1, 1))).astype(np.float32)
    scale = 0.6 ** np.arange(levels)  # each level finer than the last, as fitted codebooks are
    cb = (rng.standard_normal((groups, levels, k, d)) * scale[None, :, None, None]).astype(np.float32)
    return x, cb


@pytest.mark.parametrize("rows, groups, levels, k, d, beam", [
    (37, 3, 3, 16, 8, 4),    # the converter's shape; rows not a multiple of the 8 lanes
    (64, 2, 6, 16, 8, 1),    # greedy
    (21, 2, 5, 16, 4, 3),
    (16, 2, 3, 16, 16, 2),
    (19, 3, 4, 7, 5, 16),    # a shape without its own compiled loop; beam above K at the first level
    (9, 1, 1, 256, 3, 1),    # one level: nearest centroid of 256
])
def test_c_codes_equal_the_reference(rows, groups, levels, k, d, beam):
    x, cb = _case(rows, groups, levels, k, d)
    out = torch.empty(rows, groups, levels, dtype=torch.uint8)
    encoder.search(torch.from_numpy(x), torch.from_numpy(cb), beam, out)
    np.testing.assert_array_equal(out.numpy(), reference_codes(x, cb, beam))


def test_ties_keep_the_earlier_candidate():
    x = np.zeros((8, 1, 2), np.float32)
    cb = np.zeros((1, 2, 4, 2), np.float32)  # every centroid the same: every candidate ties
    cb[0, 1, 2] = 5.0  # except one, worse
    out = torch.empty(8, 1, 2, dtype=torch.uint8)
    encoder.search(torch.from_numpy(x), torch.from_numpy(cb), 3, out)
    assert (out.numpy() == 0).all()
    np.testing.assert_array_equal(out.numpy(), reference_codes(x, cb, 3))


def test_strided_layouts_give_the_same_codes():
    """The fit's (G, V, d) layout and the encoder's (V, n) rows are the same search."""
    x, cb = _case(50, 4, 3, 16, 8, seed=1)
    M = torch.from_numpy(x.reshape(50, -1).copy())
    by_rows = rvq.encode(M, torch.from_numpy(cb), beam=4)
    by_groups = rvq._beam_codes(torch.from_numpy(x.transpose(1, 0, 2).copy()), torch.from_numpy(cb), 4)
    assert torch.equal(by_rows, by_groups.permute(1, 0, 2))
    np.testing.assert_array_equal(by_rows.numpy(), reference_codes(x, cb, 4))


def test_many_rows_split_between_threads_agree():
    x, cb = _case(3000, 2, 3, 16, 8, seed=2)
    out = torch.empty(3000, 2, 3, dtype=torch.uint8)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # three threads, a third of the rows each
        encoder.search(torch.from_numpy(x), torch.from_numpy(cb), 4, out)
    finally:
        torch.set_num_threads(old)
    np.testing.assert_array_equal(out.numpy(), reference_codes(x, cb, 4))


@pytest.mark.parametrize("beam, k, d", [(0, 16, 8), (17, 16, 8), (1, 257, 8), (1, 16, 65)])
def test_sizes_out_of_range_are_refused(beam, k, d):
    x, cb = _case(4, 1, 1, k, d)
    with pytest.raises(ValueError, match="out of range"):
        encoder.search(torch.from_numpy(x), torch.from_numpy(cb), beam, torch.empty(4, 1, 1, dtype=torch.uint8))


# --- the polish's passes (converter/polish.py) against NumPy of the same arithmetic ---

def reference_levels_sum(codes, depth, cb, skip=-1):
    T, G, D = codes.shape
    K, d = cb.shape[2], cb.shape[3]
    acc = np.zeros((T, G, d), np.float32)
    for level in range(D):
        if level == skip:
            continue
        rows = depth > level
        picked = cb[np.arange(G)[None, :], level, codes[:, :, level]]  # (T, G, d)
        acc[rows] += picked[rows]
    return acc


def _polish_case(rows=45, groups=3, levels=6, k=16, d=8, seed=3):
    x, cb = _case(rows, groups, levels, k, d, seed)
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, k, (rows, groups, levels), dtype=np.uint8)
    depth = rng.integers(1, levels + 1, rows)
    w = rng.uniform(0.1, 5, rows)
    return x.reshape(rows, -1), codes, depth, w, cb


@pytest.mark.parametrize("skip", [-1, 0, 4])
def test_levels_sum_equals_the_reference(skip):
    _, codes, depth, _, cb = _polish_case()
    np.testing.assert_array_equal(encoder.levels_sum(codes, depth, cb, skip), reference_levels_sum(codes, depth, cb, skip))


@pytest.mark.parametrize("level, reassign", [(0, False), (2, True), (5, True)])
def test_level_refit_equals_the_reference(level, reassign):
    x, codes, depth, w, cb = _polish_case()
    G, D, K, d = cb.shape
    want_codes = codes.copy()
    keep = depth > level
    left = x.reshape(len(x), G, d) - reference_levels_sum(codes, depth, cb, skip=level)
    if reassign:  # nearest centroid of the level, the encoder's distance and tie rule
        for r in np.nonzero(keep)[0]:
            for g in range(G):
                dist = np.zeros(K, np.float32)
                for j in range(d):
                    t = left[r, g, j] - cb[g, level, :, j]
                    dist += t * t
                want_codes[r, g, level] = np.argmin(dist)
    num, mass = np.zeros((G, K, d)), np.zeros((G, K))
    for r in np.nonzero(keep)[0]:
        for g in range(G):
            c = want_codes[r, g, level]
            num[g, c] += w[r] * left[r, g].astype(np.float64)
            mass[g, c] += w[r]
    got_num, got_mass = encoder.level_refit(x, codes, depth, w, cb, level, reassign)
    np.testing.assert_array_equal(codes, want_codes)
    np.testing.assert_allclose(got_num, num, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got_mass, mass, rtol=1e-12)
