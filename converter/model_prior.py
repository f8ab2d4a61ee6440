"""Token weights without a calibration text: how often the source model itself expects each token.

The model writes a few documents of its own (sampled at temperature 1 from the start of a
document), and every position's next-token distribution is averaged: p(t) = mean softmax. That
is the model's unigram distribution on text like what it was trained on, a smooth estimate (every
position spreads its probability over all plausible tokens), not counts of a few thousand words.

Why not the tokenizer: a vocabulary's order is a poor frequency rank where the tokenizer appends
its single characters after the merges (SentencePiece BPE: Gemma-3's ',', '.', digits and '▁'
rank about 236 000th of 262 144, '\n' is a user-defined token of no rank at all). The most
frequent tokens of any text then got the floor weight, and Gemma-3's default conversion reached
perplexity 57.1 on the Britannica text (stock 23.4); weighted by this prior, 28.7, and by half
this prior and half the tokenizer's (the default, converter/convert.py), 28.0 (docs/RESULTS.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from carvq.errors import CarvqError

DOCUMENTS = 8  # measured on Gemma-3-270M: 8 x 256 tokens cover 85 % of the Britannica text's tokens in the top 19 485
DOCUMENT_TOKENS = 256


def document_start(model) -> list[int]:
    """The tokens a document of the model's training text starts with: BOS where the model adds
    one, else the token that separated its documents (EOS, e.g. SmolLM2's <|endoftext|>)."""
    start = model.tokenize("", add_special=True)
    if start:
        return start
    meta = model.metadata()
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id"):
        value = meta.get(key)
        if value is not None and value.lstrip("-").isdigit() and 0 <= int(value) < model.n_vocab:
            return [int(value)]
    raise CarvqError("the model names neither a BOS nor an EOS token to start a document with")


def softmax_sum(logits: np.ndarray, rows: int = 32) -> np.ndarray:
    """Sum over rows of softmax(rows), float64; `rows` at a time (a float64 copy of all 257
    positions of Gemma-3's 262 144 logits would be 0.5 GB)."""
    total = np.zeros(logits.shape[1], np.float64)
    for a in range(0, len(logits), rows):
        z = logits[a : a + rows].astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        total += z.sum(axis=0)
    return total


@dataclass
class ModelPrior:
    p: np.ndarray  # the mean next-token distribution; sums to 1 over the vocabulary
    how: str  # what it is, for the report
    start: list[int]  # the tokens every document opens with (document_start)
    documents: list[list[int]]  # what the model wrote after `start`, one list a document


def predicted_unigram(gguf_path: Path, seed: int, progress: bool, documents: int = DOCUMENTS) -> ModelPrior:
    """The source model's mean next-token distribution over `documents` documents it writes
    itself, and those documents (end-to-end tuning without a text trains on them)."""
    from carvq.runtime.model import Model

    with Model(gguf_path, n_ctx=DOCUMENT_TOKENS + 8, n_batch=DOCUMENT_TOKENS + 8) as m:
        start = document_start(m)
        total = np.zeros(m.n_vocab, np.float64)
        positions = written = 0
        kept: list[list[int]] = []
        bar = tqdm(total=documents, desc="carvq: documents the model writes", unit="doc", disable=not progress, leave=False)
        for attempt in range(4 * documents):  # a document that ends at once is written again
            if written == documents:
                break
            text = m.generate_tokens(start, DOCUMENT_TOKENS, temperature=1.0, top_p=1.0, seed=seed * 1_000_003 + attempt)
            tokens = start + list(text)
            if len(tokens) - len(start) < 8:
                continue
            total += softmax_sum(m.logits(tokens)[len(start) - 1 :])
            positions += len(tokens) - len(start) + 1
            written += 1
            kept.append(tokens[len(start):])
            bar.update()
        bar.close()
    if written == 0 or not np.isfinite(total).all():
        raise CarvqError("the source model wrote no usable text to weight its tokens by")
    return ModelPrior(total / positions,
                      f"the model's own next-token distribution over {positions:,} positions of {written} documents it wrote",
                      start, kept)
