"""A bitshift trellis code for the deep part of a row (measured in bench/trellis_sim.py; not in
the file format yet).

A row of T values is coded as a walk through S = 2^b states (b = `state_bits`). The state
after step i is the last b bits of the row's bit stream; each step shifts in `rate` new bits
and emits the new state's entry of a value table (S values). The stream is the first state's b
bits, then `rate` bits a step: b + (T - 1) * rate bits a row. Viterbi finds the walk of least
weighted squared error.

Why: a level of K = 16 in d = 8 buys less each time it is added (on Gaussian data, six levels
sit 3.4 dB above the rate-distortion bound), while a trellis of 1024 states at 1 bit a value,
or 4096 at 2 bits, comes within about half a dB of it (docs/RESULTS.md, session 27). The
states' values are fitted to the data by Lloyd steps (each value the weighted mean of the
targets its state was chosen for).

Written here rather than taken from a library: no maintained PyTorch or NumPy package offers a
batched weighted Viterbi over a shift-register trellis (the ones that exist decode
convolutional codes over bits).
"""
from __future__ import annotations

import numpy as np
import torch

# rows a Viterbi block holds: its back pointers are T x rows x S / 2^rate bytes
ENCODE_ROWS = 1024


def check(state_bits: int, rate: int) -> None:
    if not 1 <= rate <= 8 or not rate < state_bits <= 16:
        raise ValueError(f"a trellis of {state_bits} state bits at {rate} bits a step: need 1 <= rate < state_bits <= 16")


def stream_bits(T: int, state_bits: int, rate: int) -> int:
    """Bits of one row's stream: the first state, then `rate` bits for each later step."""
    return state_bits + (T - 1) * rate


def _viterbi_block(X: torch.Tensor, W: torch.Tensor, values: torch.Tensor, state_bits: int, rate: int) -> torch.Tensor:
    B, T = X.shape
    S, J = 1 << state_bits, 1 << rate
    back = torch.empty(T, B, S // J, dtype=torch.uint8)
    cost = W[:, :1] * (X[:, :1] - values.view(1, S)) ** 2
    for i in range(1, T):
        # the predecessors of state s are (s >> rate) | (j << (state_bits - rate)), j < 2^rate:
        # viewed as (B, J, S / J), dimension 1 is j and dimension 2 is s >> rate
        best, j = cost.view(B, J, S // J).min(dim=1)
        back[i] = j.to(torch.uint8)
        cost = best.repeat_interleave(J, dim=1) + W[:, i:i + 1] * (X[:, i:i + 1] - values.view(1, S)) ** 2
    states = torch.empty(B, T, dtype=torch.long)
    s = cost.argmin(dim=1)
    states[:, T - 1] = s
    rows = torch.arange(B)
    for i in range(T - 1, 0, -1):
        u = s >> rate
        s = u | (back[i][rows, u].long() << (state_bits - rate))
        states[:, i - 1] = s
    return states


def encode(X: torch.Tensor, weights: torch.Tensor, values: torch.Tensor, state_bits: int, rate: int,
           rows: int = ENCODE_ROWS) -> torch.Tensor:
    """The walk (B, T) of states that minimises sum_i weights_i (X_i - values[state_i])^2 for
    each row of X (B, T); weights is (T,) or (B, T)."""
    check(state_bits, rate)
    X = X.float()
    values = values.float()
    W = weights.float().expand(X.shape).contiguous() if weights.dim() == 1 else weights.float()
    out = [_viterbi_block(X[a:a + rows], W[a:a + rows], values, state_bits, rate) for a in range(0, X.shape[0], rows)]
    return torch.cat(out) if out else torch.empty(0, X.shape[1], dtype=torch.long)


def is_walk(states: torch.Tensor, state_bits: int, rate: int) -> bool:
    """Every step keeps the state's low state_bits - rate bits as the next state's high ones."""
    low = (1 << (state_bits - rate)) - 1
    return bool(((states[:, 1:] >> rate) == (states[:, :-1] & low)).all())


def fit_values(X: torch.Tensor, row_weights: torch.Tensor, dim_weights: torch.Tensor, state_bits: int, rate: int,
               iters: int, gen: torch.Generator) -> torch.Tensor:
    """A value table for X (B, T) (rows scaled to about unit variance): Gaussian draws, then
    `iters` Lloyd steps of encode and weighted means. States no row visits keep their value."""
    S = 1 << state_bits
    values = torch.randn(S, generator=gen)
    wts = row_weights.double().view(-1, 1) * dim_weights.double().view(1, -1)
    for _ in range(iters):
        states = encode(X, dim_weights, values, state_bits, rate).reshape(-1)
        num = torch.zeros(S, dtype=torch.float64).index_add_(0, states, (wts * X.double()).reshape(-1))
        den = torch.zeros(S, dtype=torch.float64).index_add_(0, states, wts.expand(X.shape).reshape(-1))
        values = torch.where(den > 0, num / den.clamp_min(1e-300), values.double()).float()
    return values


def pack(states: np.ndarray, state_bits: int, rate: int) -> np.ndarray:
    """The rows' bit streams (B, ceil(stream_bits / 8)) uint8, least significant bit first: the
    first state's state_bits bits (its low bit first), then each later state's new low `rate` bits."""
    B, T = states.shape
    nbits = stream_bits(T, state_bits, rate)
    bits = np.zeros((B, nbits), np.uint8)
    for b in range(state_bits):
        bits[:, b] = (states[:, 0] >> b) & 1
    for i in range(1, T):
        for b in range(rate):
            bits[:, state_bits + (i - 1) * rate + b] = (states[:, i] >> b) & 1
    return np.packbits(bits, axis=1, bitorder="little")


def unpack(streams: np.ndarray, T: int, state_bits: int, rate: int) -> np.ndarray:
    """The inverse of pack: the walk (B, T) of states."""
    bits = np.unpackbits(streams, axis=1, bitorder="little").astype(np.int64)
    mask = (1 << state_bits) - 1
    states = np.zeros((streams.shape[0], T), np.int64)
    s = np.zeros(streams.shape[0], np.int64)
    for b in range(state_bits):
        s |= bits[:, b] << b
    states[:, 0] = s
    for i in range(1, T):
        new = np.zeros_like(s)
        for b in range(rate):
            new |= bits[:, state_bits + (i - 1) * rate + b] << b
        s = ((s << rate) | new) & mask
        states[:, i] = s
    return states
