"""CARVQ fitting: RVQ and the corrective adaptor, alternated while the weighted error falls."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

from carvq import reference
from carvq.format import CarvqTensors, Layout, pack_codes
from carvq.gguf_io import row_chunks
from carvq.converter import adaptor as adaptor_mod
from carvq.converter import memory, rvq
from carvq.converter.config import Config

KMEANS_ITERS = 12
REFINE_ROUNDS = 3
ADAPTOR_STEPS = 300
ADAPTOR_BATCH = 2048
ADAPTOR_LR = 1e-2
PROXY_ROWS = 8192
# Paths kept by the beam-search encoder (1 = greedy); see rvq.encode. 8 since the search is C
# (session 31): SmolLM2's default file (3.0 bpw, coded head) KLD 0.0672 -> 0.0613 (beam 16:
# 0.0599), 94 -> 97 s; the 128256 x 2048 synthetic 208 -> 215 s.
ENCODE_BEAM = 8


@dataclass
class Fit:
    tensors: CarvqTensors
    rounds: int


def weighted_error(M: torch.Tensor, R: torch.Tensor, w: torch.Tensor) -> float:
    """sum_t w_t ||M_t - R_t||^2 / sum_t w_t ||M_t||^2."""
    num = (((M - R) ** 2).sum(1) * w).sum()
    den = ((M**2).sum(1) * w).sum()
    return float(num / den.clamp_min(1e-30))


def _round_codebooks(cb: torch.Tensor, cfg: Config) -> torch.Tensor:
    return cb.half().float() if cfg.codebook_type == "F16" else cb


def _fit_rvq(target: torch.Tensor, w: torch.Tensor, cfg: Config, gen: torch.Generator, bar,
             init: torch.Tensor | None = None) -> rvq.RVQ:
    cb = rvq.fit(target, w, cfg.group_size, cfg.levels, cfg.codebook_size, KMEANS_ITERS, REFINE_ROUNDS, gen, bar,
                 init=init, beam=ENCODE_BEAM)
    # The stored codebooks may be F16: encode against exactly what the decoder will see.
    cb = _round_codebooks(cb, cfg)
    memory.trim()
    codes = rvq.encode(target, cb, beam=ENCODE_BEAM)
    memory.trim()
    return rvq.RVQ(cb, codes)


def _residual(M: torch.Tensor, q: rvq.RVQ) -> torch.Tensor:
    """M minus its RVQ reconstruction, decoded a chunk of rows at a time (one (V, n) array)."""
    from carvq.reference import sum_levels

    out = torch.empty_like(M)
    cb = q.codebooks.numpy()
    for a, b in row_chunks(M.shape[0]):
        out[a:b] = M[a:b] - torch.from_numpy(sum_levels(cb, q.codes[a:b].numpy()).reshape(b - a, -1))
    return out


def _error_of_residual(E: torch.Tensor, C: torch.Tensor, M: torch.Tensor, w: torch.Tensor) -> float:
    """weighted_error(M, M - E + C), by chunks: E = M - RVQ, C the adaptor's correction."""
    num = sum(float((((E[a:b] - C[a:b]) ** 2).sum(1) * w[a:b]).sum()) for a, b in row_chunks(M.shape[0]))
    den = sum(float(((M[a:b] ** 2).sum(1) * w[a:b]).sum()) for a, b in row_chunks(M.shape[0]))
    return num / max(den, 1e-30)


def compress(M_np: np.ndarray, w_np: np.ndarray, cfg: Config, iters: int, seed: int, progress: bool = True) -> Fit:
    """Fit CARVQ to M (V, n) under token weights w (V,).

    Memory: M itself (not copied when it is a writable float32 array) and, with an adaptor,
    at most two more (V, n) arrays (the RVQ residual and the adaptor's correction); every
    other step works on a sample of rows or a chunk of them (MEMORY in docs/RESULTS.md)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    M_np = np.asarray(M_np)
    if not (M_np.dtype == np.float32 and M_np.flags.c_contiguous and M_np.flags.writeable):
        M_np = np.array(M_np, dtype=np.float32, order="C")  # torch wants a writable float32 array
    M = torch.from_numpy(M_np)  # shared with the caller: never written to
    w_full = torch.from_numpy(np.asarray(w_np, np.float64)).float()
    w = _base_weights(w_full, cfg)
    V, n = M.shape
    # Without an adaptor there is nothing to alternate with: a second round only re-ran the
    # refinement (Gemma-3, 2.1 bpw: weighted error 0.0768 -> 0.0769 with one round, 133 -> 89 s).
    rounds = max(1, iters) if cfg.adaptor_rank else 1
    per_round = cfg.levels + REFINE_ROUNDS + (ADAPTOR_STEPS if cfg.adaptor_rank else 0)
    hot_steps = cfg.hot_levels + REFINE_ROUNDS if cfg.hot_rows else 0
    bar = tqdm(total=rounds * per_round + hot_steps, desc="carvq fit", unit="step", disable=not progress, leave=False)

    best = None
    correction = None
    for r in range(rounds):
        # later rounds refine the previous codebooks against the new target (warm start)
        target = M if correction is None else M - correction
        q = _fit_rvq(target, w, cfg, gen, bar, init=None if best is None else best[1].codebooks)
        del target
        adaptor = None
        if cfg.adaptor_rank:
            residual = _residual(M, q)
            adaptor = adaptor_mod.Adaptor(V, n, cfg.adaptor_rank, cfg.adaptor_hidden, cfg.activation, gen)
            adaptor_mod.train(adaptor, residual, w, ADAPTOR_STEPS, ADAPTOR_BATCH, ADAPTOR_LR, gen, bar)
            correction = None  # the previous round's, before the new one is made
            with torch.no_grad():
                correction = adaptor()
            err = _error_of_residual(residual, correction, M, w)
            del residual
        else:
            err = None  # one round: nothing to compare
        if best is not None and err >= best[0]:
            break  # alternation stopped helping
        best = (err, q, adaptor, r + 1)
    del correction
    _, q, adaptor, used = best
    tensors = _to_tensors(q, adaptor, cfg, V, n)
    if cfg.hot_rows:
        _fit_hot(tensors, M_np, w_full, cfg, gen, bar)
    bar.close()
    return Fit(tensors, used)


def _base_weights(w: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Token weights for the levels every row has. Hot rows get their own levels later, so
    the shared codebooks should serve the other rows: a hot row weighs no more here than
    the heaviest row that is not hot."""

    if not cfg.hot_rows or cfg.hot_rows >= w.numel():
        return w
    cap = torch.sort(w, descending=True).values[cfg.hot_rows]
    return torch.minimum(w, cap)


def hot_row_ids(w: torch.Tensor, count: int) -> np.ndarray:
    """The `count` heaviest tokens (ties: lower id first), in increasing id order."""
    order = np.argsort(-w.double().numpy(), kind="stable")[:count]
    return np.sort(order).astype(np.int32)


def _fit_hot(tensors: CarvqTensors, M: np.ndarray, w: torch.Tensor, cfg: Config, gen: torch.Generator, bar) -> None:
    """Extra residual levels for the most frequent rows, fitted to what the rest of the
    decode (RVQ + adaptor) leaves of them, weighted by their frequency. Frequent tokens
    dominate the model's behaviour on text (KLD), and a few thousand of them cost little."""
    ids = hot_row_ids(w, cfg.hot_rows)
    residual = reference.decode(tensors, ids)
    np.subtract(M[ids], residual, out=residual)  # in place: the hot rows are held twice at most
    target = torch.from_numpy(residual)
    hot_cfg = replace(cfg, levels=cfg.hot_levels)
    q = _fit_rvq(target, w[torch.from_numpy(ids.astype(np.int64))], hot_cfg, gen, bar)
    layout = replace(tensors.layout, hot_rows=cfg.hot_rows, hot_levels=cfg.hot_levels)
    tensors.layout = layout
    tensors.hot_ids = ids
    tensors.hot_codes = pack_codes(q.codes.numpy())
    tensors.hot_codebooks = q.codebooks.numpy().astype({"F16": np.float16, "F32": np.float32}[cfg.codebook_type])


def _to_tensors(q: rvq.RVQ, adaptor, cfg: Config, V: int, n: int) -> CarvqTensors:
    """The stored form: numpy arrays in FORMAT.md's shapes and types."""
    layout = Layout(V, n, cfg.group_size, cfg.levels, cfg.codebook_size,
                    cfg.adaptor_rank, cfg.adaptor_hidden, cfg.activation if cfg.adaptor_rank else "none")
    np_type = {"F16": np.float16, "F32": np.float32}
    codes = pack_codes(q.codes.numpy())
    codebooks = q.codebooks.numpy().astype(np_type[cfg.codebook_type])
    if not cfg.adaptor_rank:
        return CarvqTensors(layout, codes, codebooks)
    with torch.no_grad():
        return CarvqTensors(
            layout, codes, codebooks,
            sigma0=adaptor.sigma0.numpy().astype(np_type[cfg.sigma0_type]),
            up_w=adaptor.up.weight.numpy().astype(np_type[cfg.mlp_type]),
            up_b=adaptor.up.bias.numpy().astype(np.float32),
            down_w=adaptor.down.weight.numpy().astype(np_type[cfg.mlp_type]),
            down_b=adaptor.down.bias.numpy().astype(np.float32),
        )


def proxy_error(M_np: np.ndarray, w_np: np.ndarray, cfg: Config, seed: int) -> float:
    """Cheap estimate of a configuration's weighted error: RVQ alone on rows drawn by weight."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.from_numpy(np.asarray(w_np, np.float64)).float()
    rows = min(PROXY_ROWS, M_np.shape[0])
    ids = torch.multinomial(w / w.sum(), rows, replacement=False, generator=gen)
    M = torch.from_numpy(np.ascontiguousarray(np.asarray(M_np)[ids.numpy()], np.float32))  # a writable copy
    ones = torch.ones(rows)
    cb = rvq.fit(M, ones, cfg.group_size, cfg.levels, cfg.codebook_size, 8, 1, gen)
    return weighted_error(M, rvq.RVQ(cb, rvq.encode(M, cb)).reconstruct(), ones)
