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
decoder would apply) reached 0.131 there; with tiers at 3.0 bpw it gave nothing on top of the
diagonal in the principal frame (KLD 0.0226 against 0.0217, session 22), and without that
frame it was far worse (0.0359). The frame itself is converter/frame.py (format v6).

F is estimated as the true Fisher: labels sampled from the model's own distribution at each
position, gradients of their log-probabilities with respect to the input embeddings,
E[g_j^2]; on sequences of the calibration text, or of the documents the model wrote for the
token prior. The first position (BOS, or the document's opening token) is left out: its
gradients are those of one special row, weighted as the heaviest token anyway.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np
import torch

from carvq.errors import CarvqError

# Sequences of a calibration text the Fisher diagonal averages (a sequence of 256 tokens: about
# 2 s on SmolLM2, 6 s on Gemma-3, on 2 cores). SmolLM2 L3 +2 at 1.6 bpw: KLD 0.1585 with 8
# sequences, 0.1544 with 32 (docs/RESULTS.md, session 13).
SEQUENCES = 16
# The Fisher pass's memory (converter/torch_model.py loads one copy of the model). Issue 14 bounds a
# conversion's peak at 3x the float32 embedding; a small model's fixed costs (Python, PyTorch,
# llama.cpp: about 0.4 GB) exceed that whatever it does, so the bound is at least FIXED_BUDGET.
# Where float32 would pass the bound the model runs in bfloat16 (SmolLM2: the diagonal's log
# correlates 0.999 with float32's, the same 2 % spread as another seed; Gemma-3's float32 pass
# measured 2.0 GB, right at its bound of 3 x 0.67 GB), and where that would too, in the uniform metric.
BOUND_X_EMBEDDING = 3.0
FIXED_BUDGET = 1.5 * 2**30
FIXED_COSTS = 0.45e9  # the converter's RSS before the pass: Gemma-3 0.35 GB, SmolLM2 0.28 GB
# transformers parses the file's metadata itself while it loads (gguf-py keeps a NumPy view per
# vocabulary entry: Gemma-3's 262144 tokens took 0.7 GB), beside the blocks' tensors
PARSE_BYTES_PER_TOKEN = 2800
# activations: per position and layer ACTIVATION_VALUES x (12 n + 4 ffn) values of the pass's
# dtype, the decoder's saved tensors with a margin, and HEAD_COPIES float32 copies of a chunk's logits
# (Gemma-3 measured 0.63 GB over its float32 parameters, SmolLM2 about 0.5 GB)
ACTIVATION_VALUES = 1.3
HEAD_COPIES = 6
# positions whose logits the Fisher pass holds at once (see _label_gradient)
HEAD_CHUNK = 32
# Floor of a dimension's weight, relative to the mean: a dimension no sequence moved still counts
FLOOR = 0.05
# Per-token sensitivity: a token's weight in the fit times (its positions' mean ||g||^2 / all
# positions' mean) ** TOKEN_POWER, each token's mean shrunk toward the overall one by TOKEN_PRIOR
# pseudo-positions (most tokens occur a few times or never in the pass's few thousand positions).
# 0 turns it off. Off: at power 1, SmolLM2 3.0 bpw over three seeds, KL on the calibration text -6 %,
# KLD on the evaluation text -2 %, inside one fit's seed-to-seed spread (docs/RESULTS.md, session 21).
TOKEN_POWER = 0.0
TOKEN_PRIOR = 8.0


@dataclass
class Metric:
    scale: np.ndarray  # (n,) float32: sqrt of each dimension's weight (mean weight 1)
    how: str  # for the report
    token_factor: np.ndarray | None = None  # (V,) float64: what each token's fit weight is multiplied by


@dataclass
class Sensitivity:
    diagonal: np.ndarray  # (n,) E[g_j^2] over every position used
    positions: int
    token_energy: np.ndarray  # (V,) sum of ||g||^2 over the positions of each input token
    token_count: np.ndarray  # (V,) those positions


def fisher_diagonal(gguf_path, seqs, seed: int, progress: bool, reader=None,
                    dtype: torch.dtype = torch.float32) -> Sensitivity:
    """E[g_j^2] over the positions of `seqs` (a list of 1-D token tensors), and ||g||^2 by token."""
    from tqdm import tqdm

    from carvq.converter import torch_model

    model = torch_model.load_frozen(gguf_path, progress, dtype=dtype, reader=reader)
    torch_model.check_head_logits(model, seqs[0])
    embed, decoder = model.get_input_embeddings(), model.get_decoder()
    gen = torch.Generator().manual_seed(seed)
    total = None
    positions = 0
    V = embed.num_embeddings
    token_energy, token_count = np.zeros(V), np.zeros(V)
    for tokens in tqdm(seqs, desc="carvq: the model's sensitivity", unit="seq", disable=not progress, leave=False):
        if tokens.numel() < 3:
            continue
        with torch.no_grad():
            x = embed(tokens.unsqueeze(0))  # Gemma's layer scales by sqrt(n): a constant factor of g
        x.requires_grad_(True)
        hidden = decoder(inputs_embeds=x).last_hidden_state[0]
        hidden.backward(_label_gradient(model, hidden.detach(), gen))
        # position 0 (BOS): see the module's docstring; the last one has no label, no gradient
        g = x.grad[0, 1:-1].double()  # bfloat16 too: its squares summed in float64
        g2 = g * g
        total = g2.sum(0) if total is None else total + g2.sum(0)
        positions += g.shape[0]
        ids = tokens[1:-1].numpy()
        np.add.at(token_energy, ids, g2.sum(1).numpy())
        np.add.at(token_count, ids, 1.0)
    del model
    if total is None or not torch.isfinite(total).all() or float(total.sum()) <= 0:
        raise CarvqError("the model's gradients gave no usable sensitivity")
    return Sensitivity((total / positions).numpy(), positions, token_energy, token_count)


def token_factor(s: Sensitivity, power: float | None = None, prior: float | None = None) -> np.ndarray | None:
    """(V,) each token's relative sensitivity, shrunk toward 1, to the power `power`; None at power 0."""
    power = TOKEN_POWER if power is None else power
    prior = TOKEN_PRIOR if prior is None else prior
    if power == 0:
        return None
    mean = float(s.token_energy.sum() / max(s.token_count.sum(), 1.0))
    rel = (s.token_energy / mean + prior) / (s.token_count + prior)
    return rel ** power


def _label_gradient(model, hidden: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """d/d hidden of the sum over positions (all but the last) of -log p(label), each label drawn
    from the model's own distribution there; HEAD_CHUNK positions at a time, so that no more than
    HEAD_CHUNK x V logits exist at once (Gemma-3: 255 positions of 262144 logits were 0.27 GB a
    copy, and the loss's backward makes several)."""
    from carvq.converter.torch_model import head_logits

    grad = torch.zeros_like(hidden)
    for a in range(0, hidden.shape[0] - 1, HEAD_CHUNK):
        b = min(hidden.shape[0] - 1, a + HEAD_CHUNK)
        h = hidden[a:b].clone().requires_grad_(True)
        with torch.enable_grad():
            logits = head_logits(model, h).float()
            with torch.no_grad():
                labels = torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(1)
            torch.nn.functional.cross_entropy(logits, labels, reduction="sum").backward()
        grad[a:b] = h.grad
    return grad


# bfloat16 matrix products are fast only where the CPU has bfloat16 units: on an AVX2 EPYC they
# ran at 0.3 GFLOP/s against float32's 36, and Gemma-3's bfloat16 pass took over an hour there
# instead of a minute (docs/RESULTS.md, session 22). Slower than this many times float32 per
# product: the pass runs in float32 on shorter sequences instead (down to MIN_PASS_TOKENS)
BF16_SLOWDOWN_MAX = 4.0
MIN_PASS_TOKENS = 64


@functools.cache
def bfloat16_is_fast() -> bool:
    """Whether this CPU multiplies bfloat16 matrices at least 1/BF16_SLOWDOWN_MAX as fast as
    float32 ones (a probe of under a second, once per process)."""
    def best(dtype) -> float:
        # large enough that the products' own time, not a thread pool's start, is measured
        a, b = torch.ones(256, 512, dtype=dtype), torch.ones(512, 512, dtype=dtype)
        a @ b
        times = []
        for _ in range(3):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.bfloat16) <= BF16_SLOWDOWN_MAX * best(torch.float32)


def pass_plan(reader, seq_tokens: int, available: int | None = None,
              bfloat16_fast: bool | None = None) -> tuple[torch.dtype, int]:
    """(dtype, tokens per sequence) of the Fisher pass within the conversion's memory bound and
    `available` bytes: float32 on whole sequences, else bfloat16 where this CPU multiplies it
    fast (bfloat16_fast; None: probe it), else float32 on sequences cut to fewer tokens (halved
    down to MIN_PASS_TOKENS). CarvqError (the conversion then goes on in the uniform metric)
    where none fits."""
    import gguf

    from carvq import gguf_io as gio
    from carvq.converter.torch_model import OWN_TENSORS
    from carvq.runtime import model as runtime_model  # the runtime's own check before it loads a model

    embd = gio.tensor_by_name(reader, gio.EMBD)
    n, V = (int(x) for x in embd.shape[:2])
    arch = gio.field_value(reader, gguf.Keys.General.ARCHITECTURE)
    layers = int(gio.field_value(reader, f"{arch}.block_count", 1))
    ffn = gio.field_value(reader, f"{arch}.feed_forward_length", 4 * n)
    ffn = int(max(ffn)) if isinstance(ffn, list) else int(ffn)
    elements = sum(int(t.n_elements) for t in reader.tensors)
    block_elements = elements - sum(int(t.n_elements) for t in reader.tensors if t.name in OWN_TENSORS)
    rss = FIXED_COSTS  # not this process's RSS: the same input must give the same file (--seed)
    available = runtime_model._available_memory() if available is None else available
    bound = max(BOUND_X_EMBEDDING * 4 * V * n, FIXED_BUDGET)

    def extra_bytes(size: int, tokens: int) -> float:
        loading = PARSE_BYTES_PER_TOKEN * V + size * block_elements
        running = size * (elements + ACTIVATION_VALUES * tokens * layers * (12 * n + 4 * ffn)) + \
            4 * HEAD_COPIES * HEAD_CHUNK * V  # the logits are float32 in either dtype
        return max(loading, running)

    def fits(extra: float) -> bool:
        return rss + extra <= bound and (available is None or extra <= available)

    extra = extra_bytes(4, seq_tokens)
    if fits(extra):
        return torch.float32, seq_tokens
    plans = []  # float32 on whole sequences did not fit (just above)
    if bfloat16_fast if bfloat16_fast is not None else bfloat16_is_fast():  # probed only when needed
        plans.append((torch.bfloat16, 2, seq_tokens))
    else:
        tokens = seq_tokens // 2
        while tokens >= MIN_PASS_TOKENS:
            plans.append((torch.float32, 4, tokens))
            tokens //= 2
    for dtype, size, tokens in plans:
        extra = extra_bytes(size, tokens)
        if fits(extra):
            return dtype, tokens
    dtype, size, tokens = plans[-1] if plans else (torch.float32, 4, seq_tokens)
    why = (f"{(rss + extra) / 2**30:.1f} GiB in all, above the conversion's bound of {bound / 2**30:.1f} GiB "
           f"(3x the float32 embedding, at least {FIXED_BUDGET / 2**30:.1f})" if rss + extra > bound
           else f"{available / 2**30:.1f} GiB are available")
    least = "even in bfloat16" if dtype == torch.bfloat16 else f"even in float32 on {tokens} tokens a sequence"
    raise CarvqError(f"running the model in PyTorch would take about {extra / 2**30:.1f} GiB more {least}: {why}")


def from_model(gguf_path, seqs, what: str, seed: int, progress: bool, n_embd: int, reader=None,
               dtype: torch.dtype = torch.float32) -> Metric:
    """The metric of the Fisher diagonal over `seqs` (1-D token tensors; SEQUENCES of a text
    spread over it are enough, see above)."""
    start = time.perf_counter()
    sens = fisher_diagonal(gguf_path, seqs, seed, progress, reader, dtype)
    diag, positions = sens.diagonal, sens.positions
    if diag.shape != (n_embd,):
        raise CarvqError(f"the model's input has {diag.shape[0]} dimensions, the embedding {n_embd}")
    weight = np.maximum(diag / diag.mean(), FLOOR)
    weight /= weight.mean()
    factor = token_factor(sens)
    return Metric(np.sqrt(weight).astype(np.float32),
                  f"each dimension weighted by the model's Fisher information ({positions:,} positions of {len(seqs)} "
                  f"{what} sequences, weights {weight.min():.2f}..{weight.max():.2f} x the mean, "
                  f"{'the model in bfloat16 for memory, ' if dtype == torch.bfloat16 else ''}"
                  f"{time.perf_counter() - start:.0f} s)", factor)


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
