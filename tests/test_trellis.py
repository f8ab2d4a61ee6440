"""The bitshift trellis code (converter/trellis.py) on small random data."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from carvq.converter import trellis  # noqa: E402


def _cost(X, W, values, states):
    return ((W * (X - values[states]) ** 2).sum(1))


def test_viterbi_finds_the_cheapest_walk_of_every_stream():
    """Every stream of 3 + 4 * 1 bits, decoded, against the walk Viterbi picks: T = 5 steps."""
    gen = torch.Generator().manual_seed(0)
    T, b, r = 5, 3, 1
    X = torch.randn(6, T, generator=gen)
    W = torch.rand(6, T, generator=gen) + 0.1
    values = torch.randn(1 << b, generator=gen)
    found = trellis.encode(X, W, values, b, r)
    assert trellis.is_walk(found, b, r)
    streams = np.array(list(itertools.product([0, 1], repeat=trellis.stream_bits(T, b, r))), np.uint8)
    walks = torch.from_numpy(trellis.unpack(np.packbits(streams, axis=1, bitorder="little"), T, b, r))
    for row in range(X.shape[0]):
        every = _cost(X[row:row + 1], W[row:row + 1], values, walks)
        assert float(_cost(X[row:row + 1], W[row:row + 1], values, found[row:row + 1])) == pytest.approx(
            float(every.min()), rel=1e-6)


@pytest.mark.parametrize("b, r, T", [(8, 1, 37), (10, 2, 64), (6, 3, 9)])
def test_streams_pack_and_unpack_to_the_same_walk(b, r, T):
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(20, T, generator=gen)
    states = trellis.encode(X, torch.ones(T), torch.randn(1 << b, generator=gen), b, r, rows=7)
    packed = trellis.pack(states.numpy(), b, r)
    assert packed.shape == (20, (trellis.stream_bits(T, b, r) + 7) // 8)
    assert np.array_equal(trellis.unpack(packed, T, b, r), states.numpy())


def test_a_fitted_trellis_beats_the_best_scalar_quantizer_at_one_bit():
    """Gaussian data at 1 bit a value: the best 1-bit scalar quantizer's error is 0.363 of the
    variance, the rate-distortion bound 0.25; 256 states with fitted values land in between."""
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(256, 96, generator=gen)
    ones = torch.ones(96)
    values = trellis.fit_values(X, torch.ones(256), ones, 8, 1, 3, gen)
    mse = float(((X - values[trellis.encode(X, ones, values, 8, 1)]) ** 2).mean())
    assert 0.25 < mse < 0.33


def test_bad_shapes_of_the_trellis_are_refused():
    with pytest.raises(ValueError):
        trellis.check(4, 4)
    with pytest.raises(ValueError):
        trellis.check(17, 2)
