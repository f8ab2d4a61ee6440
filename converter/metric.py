"""The fit's metric: how much an error in each embedding dimension costs the model.

The RVQ fit minimises sum_t w_t ||M_t - R_t||^2, an error that counts every dimension alike.
The model does not: to second order, the KL divergence an error d in an input embedding
causes is d' F d / 2, F the Fisher information of the model's next-token distribution with
respect to that input. F's diagonal is far from flat (SmolLM2: the 1 % most sensitive
dimensions weigh 6x the mean, the least 0.4x). Weighting each dimension j by F_jj costs
nothing in the file: a fit of the columns scaled by sqrt(F_jj), whose codebooks are scaled
back, is a fit in that metric (k-means' centroids are means whatever the diagonal metric; only
the assignments and the beam change), and decodes as any other.

Measured (docs/RESULTS.md, session 13): SmolLM2 L3 +2 (1.6 bpw, one hot set) KLD 0.1815 ->
0.153; with hot tiers 0.1656 -> 0.1217, Gemma-3 0.1326 -> 0.0956. The diagonal's power (0.5,
1, 1.5) moved it by less than 1 %. A full-matrix metric (a rotation the
decoder would apply) reached 0.131; that needs a format change, not made here.

F is estimated as the true Fisher: labels sampled from the model's own distribution at each
position, gradients of their log-probabilities with respect to the input embeddings,
E[g_j^2]; on sequences of the calibration text, or of the documents the model wrote for the
token prior. The first position (BOS, or the document's opening token) is left out: its
gradients are those of one special row, weighted as the heaviest token anyway.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from carvq.errors import CarvqError

# Sequences of a calibration text the Fisher diagonal averages (a sequence of 256 tokens: about
# 2 s on SmolLM2, 6 s on Gemma-3, on 2 cores). SmolLM2 L3 +2 at 1.6 bpw: KLD 0.1585 with 8
# sequences, 0.1544 with 32 (docs/RESULTS.md, session 13).
SEQUENCES = 16
# transformers' GGUF loader holds about two float32 copies of the model while it loads (Gemma-3-
# 270M: 2.5 GB peak, 1.5 GB after): the Fisher is skipped where that would not fit in memory
LOAD_COPIES = 2.5
# Floor of a dimension's weight, relative to the mean: a dimension no sequence moved still counts
FLOOR = 0.05


@dataclass
class Metric:
    scale: np.ndarray  # (n,) float32: sqrt of each dimension's weight (mean weight 1)
    how: str  # for the report


def fisher_diagonal(gguf_path, seqs, seed: int, progress: bool) -> tuple[np.ndarray, int]:
    """(E[g_j^2] over the positions of `seqs` (a list of 1-D token tensors), positions used)."""
    from tqdm import tqdm

    from carvq.converter.tune import load_frozen

    model = load_frozen(gguf_path, progress)
    embed = model.get_input_embeddings()
    gen = torch.Generator().manual_seed(seed)
    total = None
    positions = 0
    for tokens in tqdm(seqs, desc="carvq: the model's sensitivity", unit="seq", disable=not progress, leave=False):
        if tokens.numel() < 3:
            continue
        with torch.no_grad():
            x = embed(tokens.unsqueeze(0))  # Gemma's layer scales by sqrt(n): a constant factor of g
        x.requires_grad_(True)
        logits = model(inputs_embeds=x).logits[0, :-1].float()
        with torch.no_grad():
            labels = torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(1)
        torch.nn.functional.cross_entropy(logits, labels, reduction="sum").backward()
        # position 0 (BOS): see the module's docstring; the last one has no label, no gradient
        g = x.grad[0, 1:-1].double()
        total = (g * g).sum(0) if total is None else total + (g * g).sum(0)
        positions += g.shape[0]
    del model
    if total is None or not torch.isfinite(total).all() or float(total.sum()) <= 0:
        raise CarvqError("the model's gradients gave no usable sensitivity")
    return (total / positions).numpy(), positions


def check_memory(reader) -> None:
    """Refuse (CarvqError, the conversion then goes on in the uniform metric) a model whose float32
    copies in PyTorch would not fit in the memory available now."""
    from carvq.runtime import model as runtime_model  # the runtime's own check before it loads a model

    need = LOAD_COPIES * 4 * sum(int(t.n_elements) for t in reader.tensors)
    have = runtime_model._available_memory()
    if have is not None and need > have:
        raise CarvqError(f"running the model in PyTorch would take about {need / 2**30:.1f} GiB, "
                         f"{have / 2**30:.1f} GiB are available")


def from_model(gguf_path, seqs, what: str, seed: int, progress: bool, n_embd: int) -> Metric:
    """The metric of the Fisher diagonal over `seqs` (1-D token tensors; SEQUENCES of a text
    spread over it are enough, see above)."""
    start = time.perf_counter()
    diag, positions = fisher_diagonal(gguf_path, seqs, seed, progress)
    if diag.shape != (n_embd,):
        raise CarvqError(f"the model's input has {diag.shape[0]} dimensions, the embedding {n_embd}")
    weight = np.maximum(diag / diag.mean(), FLOOR)
    weight /= weight.mean()
    return Metric(np.sqrt(weight).astype(np.float32),
                  f"each dimension weighted by the model's Fisher information ({positions:,} positions of {len(seqs)} "
                  f"{what} sequences, weights {weight.min():.2f}..{weight.max():.2f} x the mean, "
                  f"{time.perf_counter() - start:.0f} s)")


def scale_rows(M: np.ndarray, scale: np.ndarray) -> None:
    """M *= scale, column-wise, in place (a chunk of rows at a time: no second (V, n) array)."""
    from carvq.gguf_io import row_chunks

    for a, b in row_chunks(M.shape[0]):
        M[a:b] *= scale


def scale_codebooks(cb: np.ndarray, n_groups: int, factor: np.ndarray) -> np.ndarray:
    """Codebooks (X*G, L, K, d), group g = row % G, each vector times factor's slice of its group,
    in the codebooks' own type (F16 rounding happens once, here)."""
    X, L, K, d = cb.shape
    f = factor.astype(np.float32).reshape(n_groups, 1, 1, d)
    x = cb.astype(np.float32).reshape(X // n_groups, n_groups, L, K, d) * f
    return x.reshape(cb.shape).astype(cb.dtype)


def unscale(t, factor: np.ndarray) -> None:
    """A fit made in the scaled space back to the embedding's, in place: every part of a row's
    decode that lands in the embedding's dimensions times `factor` (1 / the metric's scale), the
    codebooks, the hot tiers' and the adaptor's output layer (sigma0 and the first layer are
    internal to it and stay)."""
    G = t.layout.n_groups
    t.codebooks = scale_codebooks(np.asarray(t.codebooks), G, factor)
    if t.hot_codebooks is not None:
        t.hot_codebooks = scale_codebooks(np.asarray(t.hot_codebooks), G, factor)
    if t.down_w is not None:
        f = factor.astype(np.float32)
        t.down_w = (t.down_w.astype(np.float32) * f[:, None]).astype(t.down_w.dtype)
        t.down_b = (t.down_b.astype(np.float32) * f).astype(t.down_b.dtype)
