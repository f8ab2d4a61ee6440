"""The output head's screen index (docs/SCREEN.md, format version 3).

The screened head ranks every row of the head by an approximate logit and computes only the
best k exactly. What matters is the error of h . E_v over the hidden states h the head really
sees, and those are very anisotropic (SmolLM2: condition number about 1e5). So the index is
fitted in their metric: with S = E[h h^T] (plus a ridge), rows E_v S^(1/2) are compressed by
the lookup's own machinery (group RVQ with hot rows, frequency weights), and a hidden state is
mapped by S^(-1/2) before its tables are built; the product is unchanged, and squared error
in that space is the expected squared logit error.

Measured on SmolLM2-135M (512 positions of the Britannica text; docs/RESULTS.md, session 7):
at k = 2048 the index keeps the dense top-40 set inside the candidates at 99.6 % of positions
(KLD 0.010) where the lookup's own codes manage 87 % (KLD 0.050) with as many bytes.

The hidden states come from the calibration text, which a screen index requires: text the
model wrote itself (sampled at temperature 1 from BOS) served SmolLM2 well, but on Gemma-3 it
gave an index that screens Britannica text far worse than the lookup's codes (KLD 0.086
against 0.018 at k = 4096) while a held-out part of that same self-written text judged it
better; with calibration text the same check drops Gemma's index and keeps SmolLM2's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from carvq import format as fmt
from carvq import screen
from carvq.errors import CarvqError
from carvq.gguf_io import row_chunks

from carvq.converter import memory, train
from carvq.converter.config import Config

# S + RIDGE * trace(S)/n * I: the sample is a few thousand states, and whitening its smallest
# directions fits noise. Measured (SmolLM2, KLD at k = 4096, self-written text): 1e-4 0.20,
# 1e-2 0.023, 0.1 0.0095, 0.3 0.0087.
RIDGE = 0.3
SAMPLE_TOKENS = 2048  # hidden states the metric is estimated from
HELD_OUT_TOKENS = 512  # and more, held out, to choose between the index and the lookup's codes
SEQUENCE_TOKENS = 512  # per context window of calibration text


def hidden_states(gguf_path: Path, calibration: Path, progress: bool) -> tuple[np.ndarray, np.ndarray, str]:
    """Final hidden states of the source model on the calibration text, as its output head sees
    them (llama.cpp's "result_norm"): (T, n) to fit the metric to, (T', n) held out to judge the
    index by (`choose`), and where they came from."""
    from carvq.runtime.model import Model

    try:
        text = Path(calibration).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise CarvqError(f"{calibration}: cannot read calibration text ({exc.strerror})") from None
    try:
        model = Model(gguf_path, n_ctx=SEQUENCE_TOKENS, n_batch=SEQUENCE_TOKENS)
    except CarvqError as exc:
        raise CarvqError(f"the head's screen index is fitted to the model's own hidden states, but {exc}; "
                         "convert without --screen-index") from None
    rows: list[np.ndarray] = []
    with model as m:
        tokens = m.tokenize(text[: (SAMPLE_TOKENS + HELD_OUT_TOKENS) * 16], add_special=False)
        tokens = tokens[: SAMPLE_TOKENS + HELD_OUT_TOKENS]
        for a in tqdm(range(0, len(tokens), SEQUENCE_TOKENS), desc="carvq screen: hidden states", unit="window",
                      disable=not progress, leave=False):
            if len(tokens) - a >= 16:
                rows.append(m.hidden_states(tokens[a : a + SEQUENCE_TOKENS]))
    how = f"{sum(len(r) for r in rows)} tokens of {calibration}"
    if not rows:
        raise CarvqError("the screen index needs the model's hidden states, and none could be sampled "
                         "(calibration text too short?); convert without --screen-index")
    H = np.concatenate(rows).astype(np.float32)
    if not np.isfinite(H).all():
        raise CarvqError("the source model's hidden states hold non-finite values; convert without --screen-index")
    # the last sequences are held out: judged on the states it was fitted to, the metric looks
    # far better than it is (SmolLM2, in-sample S: KLD 0.0076 at k = 2048; held out: 0.019)
    held = HELD_OUT_TOKENS * len(H) // (SAMPLE_TOKENS + HELD_OUT_TOKENS)
    return H[: len(H) - held], H[len(H) - held :], how


def metric(H: np.ndarray, ridge: float = RIDGE) -> tuple[np.ndarray, np.ndarray]:
    """(S^(1/2), S^(-1/2)) of S = H^T H / T + ridge * trace / n * I, float64."""
    S = H.T.astype(np.float64) @ H.astype(np.float64) / len(H)
    n = S.shape[0]
    S += ridge * max(float(np.trace(S)) / n, 1e-30) * np.eye(n)
    ev, U = np.linalg.eigh(S)
    ev = np.maximum(ev, 1e-30)
    return (U * np.sqrt(ev)) @ U.T, (U / np.sqrt(ev)) @ U.T


def fit(E: np.ndarray, w: np.ndarray, H: np.ndarray, cfg: Config, seed: int, progress: bool) -> fmt.ScreenIndex:
    """The screen index of head rows E (V, n), float32 and writable: E is overwritten with its
    rows in the hidden states' metric (no second copy of the matrix)."""
    V, n = E.shape
    sqrt_s, inv_sqrt_s = metric(H)
    sqrt_s = sqrt_s.astype(np.float32)
    for a, b in row_chunks(V):
        E[a:b] = E[a:b] @ sqrt_s
    memory.trim()
    cfg = cfg.without_adaptor().resolve_hot(V, n)
    cfg.check(n)
    result = train.compress(E, w, cfg, 1, seed, progress)
    return fmt.ScreenIndex(result.tensors, np.ascontiguousarray(inv_sqrt_s.astype(np.float32)))


FIX_RANK_SMALL_K = 4  # LLAMA_CARVQ_SCREEN_FIX_RANK_K
TOP = 40  # llama.cpp's default sampler draws from the 40 best tokens


CODED_HEAD_K = 2048  # LLAMA_CARVQ_CODED_HEAD_K


def default_k(n_vocab: int, own_index: bool, fix_rank: int = 0, coded_head: bool = False) -> int:
    """llama_carvq_screen_default_k (patches/src/llama-carvq.cpp); fix_rank: the rank of the
    file's screen correction (format v5), 0 without one; coded_head: the file's head is the
    lookup's codes (format v8)."""
    if coded_head:
        return min(n_vocab, CODED_HEAD_K)
    if own_index:
        return min(n_vocab, max(2048, min(4096, n_vocab // 16)))
    if fix_rank >= FIX_RANK_SMALL_K:
        return min(n_vocab, max(4096, min(6144, n_vocab // 12)))
    return min(n_vocab, max(4096, min(6144 if fix_rank > 0 else 8192, n_vocab // 4)))


def _running_top(vals: np.ndarray | None, ids: np.ndarray | None, chunk: np.ndarray, a: int, k: int):
    """Merge a (P, rows) block of scores starting at row a into the running (P, k) best."""
    cids = np.broadcast_to(np.arange(a, a + chunk.shape[1]), chunk.shape)
    if vals is not None:
        chunk, cids = np.concatenate([vals, chunk], axis=1), np.concatenate([ids, cids], axis=1)
    if chunk.shape[1] <= k:
        return chunk, cids
    part = np.argpartition(-chunk, k - 1, axis=1)[:, :k]
    return np.take_along_axis(chunk, part, 1), np.take_along_axis(cids, part, 1)


def top_rows(H: np.ndarray, rows, V: int, k: int) -> np.ndarray:
    """(P, k) ids of the k largest h . r over rows r = rows(a, b) (a chunk of the matrix), per h."""
    vals = ids = None
    for a, b in row_chunks(V):
        vals, ids = _running_top(vals, ids, H @ rows(a, b).T, a, k)
    return ids


def recall(exact_top: np.ndarray, candidates: np.ndarray) -> float:
    """Share of positions whose exact top set lies entirely inside the candidates."""
    return float(np.mean([np.isin(t, c).all() for t, c in zip(exact_top, candidates)]))


def choose(index: fmt.ScreenIndex, lookup: fmt.CarvqTensors, exact_top: np.ndarray, H_held: np.ndarray) -> tuple[bool, str]:
    """Keep the index only if, on held-out hidden states, its default k holds the exact top-40
    at least as often as the lookup's codes at theirs: it then screens with fewer exact rows at
    no loss. Measured (issue 11): SmolLM2-135M keeps it (KLD 0.014 at k = 3072 against 0.016 at
    8192); Gemma-3-270M does not (its index needed k = 8192 for the codes' KLD at k = 8192)."""
    from carvq.reference import decode_codes

    V = lookup.layout.n_vocab

    def rows(t: fmt.CarvqTensors):
        return lambda a, b: decode_codes(t, np.arange(a, b))  # what the scan approximates: no adaptor

    k_index, k_codes = default_k(V, True), default_k(V, False)
    r_index = recall(exact_top, top_rows(H_held @ index.projection, rows(index.rvq), V, k_index))
    r_codes = recall(exact_top, top_rows(H_held, rows(screen.lookup_as_index(lookup)), V, k_codes))
    keep = r_index >= r_codes
    how = (f"screen index {'kept' if keep else 'dropped'}: on {len(H_held)} held-out positions its k = {k_index} "
           f"candidates hold the exact top-{TOP} at {100 * r_index:.1f} %, the lookup's codes' k = {k_codes} at "
           f"{100 * r_codes:.1f} %")
    return keep, how
