"""Group RVQ building blocks (converter/rvq.py) on small random data."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from carvq.converter import rvq  # noqa: E402


def _data(rows=3000, groups=4, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(rows, 1, generator=gen) * 2  # rows of unequal norm, like embeddings
    M = torch.randn(rows, groups * d, generator=gen) * scale
    w = torch.rand(rows, generator=gen) ** 4 * 100 + 1
    return M, w


def _weighted_error(M, w, codebooks, codes):
    R = rvq.RVQ(codebooks, codes).reconstruct()
    return float((((M - R) ** 2).sum(1) * w).sum() / ((M**2).sum(1) * w).sum())


def test_assign_picks_the_nearest_centroid():
    M, _ = _data(rows=500)
    x = M.reshape(500, 4, 8).permute(1, 0, 2).contiguous()
    cb = torch.randn(4, 16, 8)
    brute = ((x.unsqueeze(2) - cb.unsqueeze(1)) ** 2).sum(-1).argmin(-1)
    assert torch.equal(rvq.assign(x, cb), brute)


def test_beam_of_one_is_greedy():
    M, w = _data()
    cb = rvq.fit(M, w, 8, 3, 16, 6, 1, torch.Generator().manual_seed(0))
    x = M.reshape(M.shape[0], 4, 8).permute(1, 0, 2).contiguous()
    assert torch.equal(rvq._beam_codes(x, cb, 1).permute(1, 0, 2), rvq.encode(M, cb))


def test_beam_search_lowers_the_error_of_the_same_codebooks():
    M, w = _data()
    cb = rvq.fit(M, w, 8, 3, 16, 6, 1, torch.Generator().manual_seed(0))
    greedy = _weighted_error(M, w, cb, rvq.encode(M, cb))
    beam = _weighted_error(M, w, cb, rvq.encode(M, cb, beam=4))
    assert beam < 0.95 * greedy


def test_beam_codes_decode_to_their_own_search_error():
    """The path returned is the one whose error the search ranked first: decoding it gives
    back a residual no larger than any other path's, checked against brute force on 2 levels."""
    M, _ = _data(rows=200, groups=2)
    cb = torch.randn(2, 2, 4, 8)
    codes = rvq.encode(M, cb, beam=16)  # 16 >= K: the search is exhaustive over 2 levels
    x = M.reshape(200, 2, 8)
    pairs = cb[:, 0].unsqueeze(2) + cb[:, 1].unsqueeze(1)  # (G, K, K, d)
    best = ((x[:, :, None, None] - pairs.unsqueeze(0)) ** 2).sum(-1).flatten(2).min(-1).values
    got = ((x - rvq.RVQ(cb, codes).reconstruct().reshape(200, 2, 8)) ** 2).sum(-1)
    assert torch.allclose(got, best, atol=1e-5)


def test_beam_fit_beats_greedy_fit():
    M, w = _data()
    scores = []
    for beam in (1, 4):
        cb = rvq.fit(M, w, 8, 3, 16, 6, 2, torch.Generator().manual_seed(0), beam=beam)
        scores.append(_weighted_error(M, w, cb, rvq.encode(M, cb, beam=beam)))
    assert scores[1] < scores[0]
