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

The hidden states come from the calibration text when there is one, else from text the source
model writes itself (sampled at temperature 1): no data to download, and on SmolLM2 the
index fitted on that is as good as one fitted on Britannica text (KLD at k = 4096: 0.0087).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from carvq import format as fmt
from carvq.errors import CarvqError
from carvq.gguf_io import row_chunks

from carvq.converter import memory, train
from carvq.converter.config import Config

# S + RIDGE * trace(S)/n * I: the sample is a few thousand states, and whitening its smallest
# directions fits noise. Measured (SmolLM2, KLD at k = 4096, self-written text): 1e-4 0.20,
# 1e-2 0.023, 0.1 0.0095, 0.3 0.0087.
RIDGE = 0.3
SAMPLE_TOKENS = 2048  # hidden states the metric is estimated from
SEQUENCE_TOKENS = 512  # per context window of calibration text; self-written sequences are half as long,
                       # twice as many, written side by side (Model.sample_sequences)
# The index's own configuration: the lookup's default (d = 8, L = 3, hot rows for 0.08 bpw);
# see docs/RESULTS.md for the cheaper ones measured.
DEFAULT_CONFIG = Config(group_size=8, levels=3, adaptor_rank=0, hot_bpw=0.08)


def hidden_states(gguf_path: Path, calibration: Path | None, seed: int, progress: bool) -> tuple[np.ndarray, str]:
    """(T, n) final hidden states of the source model, as its output head sees them (llama.cpp's
    "result_norm"), and where they came from."""
    from carvq.runtime.model import Model

    try:
        model = Model(gguf_path, n_ctx=SEQUENCE_TOKENS, n_batch=SEQUENCE_TOKENS)
    except CarvqError as exc:
        raise CarvqError(f"the head's screen index is fitted to the model's own hidden states, but {exc}; "
                         "convert with --no-screen-index") from None
    with model as m:
        rows: list[np.ndarray] = []
        if calibration is not None:
            try:
                text = Path(calibration).read_text(encoding="utf-8", errors="replace")
            except OSError as exc:
                raise CarvqError(f"{calibration}: cannot read calibration text ({exc.strerror})") from None
            tokens = m.tokenize(text[: SAMPLE_TOKENS * 16], add_special=False)[:SAMPLE_TOKENS]
            for a in range(0, len(tokens), SEQUENCE_TOKENS):
                if len(tokens) - a >= 16:
                    rows.append(m.hidden_states(tokens[a : a + SEQUENCE_TOKENS]))
            how = f"{sum(len(r) for r in rows)} tokens of {calibration}"
        else:
            start = m.tokenize("", add_special=True) or m.tokenize("\n", add_special=False)
            bar = tqdm(total=SAMPLE_TOKENS, desc="carvq screen: self-written text", unit="tok", disable=not progress,
                       leave=False)
            seqs = m.sample_sequences(start, SAMPLE_TOKENS // SEQUENCE_TOKENS * 2, SEQUENCE_TOKENS // 2 - len(start),
                                      seed=seed, progress=bar.update)
            bar.close()
            for seq in seqs:
                if len(seq) >= 16:  # a sequence that ended at once says little
                    rows.append(m.hidden_states(seq))
            how = f"{sum(len(r) for r in rows)} tokens of text the model wrote itself (temperature 1)"
    if not rows:
        raise CarvqError("the screen index needs the model's hidden states, and none could be sampled "
                         "(calibration text too short?); use --no-screen-index")
    H = np.concatenate(rows).astype(np.float32)
    if not np.isfinite(H).all():
        raise CarvqError("the source model's hidden states hold non-finite values; use --no-screen-index")
    return H, how


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
    cfg = replace(cfg.without_adaptor()).resolve_hot(V, n)
    cfg.check(n)
    result = train.compress(E, w, cfg, 1, seed, progress)
    return fmt.ScreenIndex(result.tensors, np.ascontiguousarray(inv_sqrt_s.astype(np.float32)))
