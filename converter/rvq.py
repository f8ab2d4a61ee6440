"""Group residual vector quantization with token-frequency weights, in PyTorch, its searches in
C (converter/encoder.py: nearest-centroid assignment and the beam-search encoder).

Rows of the embedding M (V x n) are cut into G = n/d sub-vectors; each group has L
levels of K centroids. All groups are processed together as a batch (G, V, d).

Every fit minimises the *weighted* squared error sum_t w_t ||x_t - x^_t||^2: frequent
tokens are atypical rows, and plain k-means sacrifices exactly them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from carvq.converter import encoder, memory
from carvq.gguf_io import row_chunks

# Codebooks are learnt on at most this many rows; every row is encoded at the end.
MAX_FIT_ROWS = 65536
# Sample values (rows x columns) one block of groups holds while it is fitted (64 MiB as
# float32; the fit holds about four such arrays): SmolLM2's whole sample (49152 x 576) is one
# block, Gemma-3's (65536 x 640) three, LLaMA-3.2-1B's (65536 x 2048) eight
FIT_BLOCK_ELEMENTS = 1 << 23


@dataclass
class RVQ:
    codebooks: torch.Tensor  # (G, L, K, d) float32
    codes: torch.Tensor  # (V, G, L) uint8

    def reconstruct(self) -> torch.Tensor:
        """(V, n) float32, decoded by the NumPy reference decoder (the one decoder of record;
        no gradient flows through a reconstruction)."""
        from carvq.reference import sum_levels

        V = self.codes.shape[0]
        return torch.from_numpy(sum_levels(self.codebooks.numpy(), self.codes.numpy()).reshape(V, -1))


def _pick(cb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The chosen centroid of every row: cb (G, K, d), idx (G, V) -> (G, V, d)."""
    return torch.gather(cb, 1, idx.unsqueeze(-1).expand(-1, -1, cb.shape[2]))


def assign(x: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """Nearest centroid per group: x (G, V, d), cb (G, K, d) -> (G, V) int64. In C
    (converter/encoder.py): PyTorch's argmin over a small last dimension ran at a few GB/s."""
    G, V, _ = x.shape
    out = torch.empty(G, V, 1, dtype=torch.uint8)
    encoder.search(x.permute(1, 0, 2), cb.unsqueeze(1), 1, out.permute(1, 0, 2))
    return out.squeeze(2).long()


def _weighted_means(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, K: int):
    """Per group: sum_t w_t x_t and sum_t w_t over each cluster."""
    G, V, d = x.shape
    sums = torch.zeros(G, K, d)
    sums.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, d), x * w.view(1, V, 1))
    mass = torch.zeros(G, K)
    mass.scatter_add_(1, idx, w.view(1, V).expand(G, -1).contiguous())
    return sums, mass


def _draw(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One index per row of p (G, V), drawn with probability proportional to p: by inverting the
    cumulative sum (torch.multinomial took 30x as long: 17 s of a 110 s conversion)."""
    cdf = p.double().cumsum(1)
    u = torch.rand(p.shape[0], 1, generator=gen, dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).squeeze(1).clamp_max(p.shape[1] - 1)


def _kmeanspp(x: torch.Tensor, w: torch.Tensor, K: int, gen: torch.Generator) -> torch.Tensor:
    """Weighted k-means++ seeding, batched over groups: x (G, V, d) -> (G, K, d). Distances as
    ||x||^2 - 2 x.c + ||c||^2 (a batched matrix-vector product per seed): the direct
    ((x - c)**2).sum(-1) made a (G, V, d) temporary per seed, a quarter of a 3.0 bpw fit."""
    G, V, d = x.shape
    first = torch.multinomial(w, G, replacement=True, generator=gen)  # one seed row per group
    cb = torch.empty(G, K, d)
    cb[:, 0] = x[torch.arange(G), first]
    norms = (x * x).sum(-1)  # (G, V)

    def dist(c: torch.Tensor) -> torch.Tensor:  # (G, d) -> (G, V)
        return torch.baddbmm(norms.unsqueeze(-1), x, c.unsqueeze(-1), alpha=-2).squeeze(-1).add_(
            (c * c).sum(-1, keepdim=True)).clamp_min_(0)

    best = dist(cb[:, 0])
    for k in range(1, K):
        pick = _draw(best * w.view(1, V) + 1e-30, gen)
        cb[:, k] = x[torch.arange(G), pick]
        torch.minimum(best, dist(cb[:, k]), out=best)
    return cb


def kmeans(x: torch.Tensor, w: torch.Tensor, K: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Weighted Lloyd iterations from k-means++ seeds; empty clusters are re-seeded at
    the worst-served row of their group. x (G, V, d), w (V,) -> codebooks (G, K, d)."""
    G, V, d = x.shape
    cb = _kmeanspp(x, w, K, gen)
    for _ in range(iters):
        idx = assign(x, cb)
        sums, mass = _weighted_means(x, w, idx, K)
        empty = mass <= 0
        cb = torch.where(empty.unsqueeze(-1), cb, sums / mass.clamp_min(1e-30).unsqueeze(-1))
        if empty.any():
            err = ((x - _pick(cb, idx)) ** 2).sum(-1) * w
            for g, k in empty.nonzero().tolist():
                cb[g, k] = x[g, err[g].argmax()]
                err[g, err[g].argmax()] = 0
    return cb


def fit_rows(w: torch.Tensor, max_rows: int, gen: torch.Generator):
    """Rows to learn codebooks on, with weights that keep the objective unbiased: the
    heaviest quarter of the budget exactly, a uniform sample of the rest scaled by
    1/sampling rate. None when every row fits the budget."""
    V = w.numel()
    if V <= max_rows:
        return None, w
    n_heavy = max_rows // 4
    heavy = torch.topk(w, n_heavy).indices
    rest_mask = torch.ones(V, dtype=torch.bool)
    rest_mask[heavy] = False
    rest = rest_mask.nonzero().squeeze(1)
    pick = rest[torch.randperm(rest.numel(), generator=gen)[: max_rows - n_heavy]]
    rate = (max_rows - n_heavy) / rest.numel()
    ids = torch.cat([heavy, pick]).sort().values
    ws = w.clone()
    ws[pick] = w[pick] / rate
    return ids, ws[ids]


def fit(M: torch.Tensor, w: torch.Tensor, d: int, L: int, K: int, iters: int, refine: int,
        gen: torch.Generator, progress=None, init: torch.Tensor | None = None, beam: int = 1) -> torch.Tensor:
    """Greedy residual fit (level by level; or start from `init` codebooks), then `refine`
    rounds in which each level's codebook is refitted against what the other levels leave.
    With beam > 1 the last refine round first re-encodes the rows by beam search and then
    refits every level's codebook to those codes (least squares: weighted means), so the
    codebooks are made for the codes `encode(..., beam)` will choose.
    Codebooks are learnt on at most MAX_FIT_ROWS rows (see fit_rows), and the groups, which
    are independent, a block of at most FIT_BLOCK_ELEMENTS sample values at a time: the fit's
    memory is bounded whatever the model's width. Returns the codebooks (G, L, K, d);
    `encode` gives every row's codes."""
    V, n = M.shape
    G = n // d
    ids, w_fit = fit_rows(w, MAX_FIT_ROWS, gen)
    n_rows = V if ids is None else ids.numel()
    per_block = max(1, min(G, FIT_BLOCK_ELEMENTS // (n_rows * d)))
    blocks = range(0, G, per_block)
    cbs = []
    for g0 in blocks:
        g1 = min(G, g0 + per_block)
        cols = M[:, g0 * d : g1 * d]  # a view; only the sampled rows of it are copied
        rows = cols if ids is None else cols[ids]
        x = rows.reshape(n_rows, g1 - g0, d).permute(1, 0, 2).contiguous()  # (groups, V', d)
        del rows
        cbs.append(_fit_groups(x, w_fit, L, K, iters, refine, gen, beam, None if init is None else init[g0:g1],
                               progress, 1.0 / len(blocks)))
        del x
        memory.trim()
    return torch.cat(cbs, dim=0)  # (G, L, K, d)


def _fit_groups(x: torch.Tensor, w_fit: torch.Tensor, L: int, K: int, iters: int, refine: int, gen: torch.Generator,
                beam: int, init: torch.Tensor | None, progress, step: float) -> torch.Tensor:
    """fit() on one block of groups x (g, V', d) -> codebooks (g, L, K, d). The residual is
    updated in place, so the block is held about three times at most."""
    residual = x.clone()
    cbs, idxs = [], []
    for level in range(L):
        cb = kmeans(residual, w_fit, K, iters, gen) if init is None else init[:, level].clone()
        idx = assign(residual, cb)
        residual -= _pick(cb, idx)
        cbs.append(cb)
        idxs.append(idx)
        if progress:
            progress.update(step)
    for round_ in range(refine):
        searched = beam > 1 and round_ == refine - 1  # this round keeps beam-searched codes
        if searched:
            codes = _beam_codes(x, torch.stack(cbs, dim=1), beam)
            idxs = [codes[:, :, level].long() for level in range(L)]
            del codes
            residual.copy_(x)
            for level in range(L):
                residual -= _pick(cbs[level], idxs[level])
        for level in range(L):
            residual += _pick(cbs[level], idxs[level])  # now what this level should explain
            idx = idxs[level] if searched else assign(residual, cbs[level])
            sums, mass = _weighted_means(residual, w_fit, idx, K)
            keep = (mass <= 0).unsqueeze(-1)
            cbs[level] = torch.where(keep, cbs[level], sums / mass.clamp_min(1e-30).unsqueeze(-1))
            if not searched:  # the nearest centroid again; searched codes are kept as found
                idxs[level] = assign(residual, cbs[level])
            residual -= _pick(cbs[level], idxs[level])
        if progress:
            progress.update(step)
    return torch.stack(cbs, dim=1)


def encode(M: torch.Tensor, codebooks: torch.Tensor, beam: int = 1) -> torch.Tensor:
    """Residual encoding of M with fixed codebooks (G, L, K, d) -> codes (V, G, L).

    beam = 1 is greedy: each level takes the centroid nearest to what the levels before it
    left. beam > 1 keeps the `beam` best partial code paths of every sub-vector through
    the levels and returns the path with the least final error, which greedy misses when
    an early choice that is not the nearest leaves a residual the later levels fit better.
    The decoder is the same; only the chosen codes differ. The search is C's
    (converter/csrc/carvq-encode.h), on M's rows in place: no copy of M."""
    G, L, K, d = codebooks.shape
    V = M.shape[0]
    codes = torch.empty(V, G, L, dtype=torch.uint8)
    for a, b in row_chunks(V):  # a chunk at a time: a non-contiguous M is copied a chunk at a time
        encoder.search(M[a:b].reshape(b - a, G, d), codebooks, beam, codes[a:b])
    return codes


def _beam_codes(x: torch.Tensor, codebooks: torch.Tensor, beam: int) -> torch.Tensor:
    """Beam-searched codes of x (G, V, d): (G, V, L) uint8."""
    G, L, K, d = codebooks.shape
    codes = torch.empty(G, x.shape[1], L, dtype=torch.uint8)
    encoder.search(x.permute(1, 0, 2), codebooks, beam, codes.permute(1, 0, 2))
    return codes
