"""Token weights for the training objective: how often each token is looked up.

Sources:
- a calibration text, tokenized by llama.cpp with the model's own vocabulary: w_t = count_t + 1,
  plus a prior of the same mass;
- the prior, scaled as if from PRIOR_TOKENS tokens of text: by default half the source model's
  own next-token distribution (converter/model_prior.py), half the tokenizer's Zipf prior; or
  (--prior tokenizer, and where the model cannot run) the tokenizer's alone: a Zipf prior over
  a frequency rank read from the tokenizer itself
  (SentencePiece: higher score = more frequent; BPE: lower id = earlier merge = more frequent).
  The Zipf prior gives tokens that are not ordinary text (control, unused, byte tokens) the floor
  weight 1.
The special tokens a model really reads (BOS, EOS, chat-template markers) are then raised to
the heaviest weight by with_special_tokens.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from carvq.errors import CarvqError
from carvq.gguf_io import field_value

PRIOR_TOKENS = 10_000_000  # measured on SmolLM2: 1e5 -> KLD 0.82, 1e6 0.64, 1e7 0.62, 1e8 0.64 (docs/RESULTS.md)
ZIPF_OFFSET = 10.0
TOKEN_TYPE_NORMAL = 1


def from_distribution(p: np.ndarray) -> np.ndarray:
    """w = 1 + PRIOR_TOKENS * p: a token distribution as pseudo-counts of PRIOR_TOKENS tokens."""
    p = np.asarray(p, np.float64)
    return 1.0 + PRIOR_TOKENS * p / max(float(p.sum()), 1e-30)


def zipf_distribution(rank: np.ndarray, ordinary: np.ndarray) -> np.ndarray:
    """Zipf over the ordinary tokens only; sums to 1."""
    p = np.where(ordinary, 1.0 / (rank + ZIPF_OFFSET), 0.0)
    return p / max(float(p.sum()), 1e-30)


def prior_from_gguf(reader, n_vocab: int) -> tuple[np.ndarray, str]:
    """Zipf prior from the GGUF tokenizer metadata, as pseudo-counts; returns (weights, description)."""
    p, how = tokenizer_distribution(reader, n_vocab)
    return from_distribution(p), how


def tokenizer_distribution(reader, n_vocab: int) -> tuple[np.ndarray, str]:
    """Zipf distribution over a frequency rank read from the GGUF tokenizer metadata."""
    model = field_value(reader, "tokenizer.ggml.model", "")
    types = field_value(reader, "tokenizer.ggml.token_type")
    ordinary = np.ones(n_vocab, bool)
    if types is not None and len(types) == n_vocab:
        ordinary = np.asarray(types) == TOKEN_TYPE_NORMAL
    scores = field_value(reader, "tokenizer.ggml.scores")
    if model == "llama" and scores is not None and len(scores) == n_vocab:
        score = np.where(ordinary, np.asarray(scores, np.float64), -np.inf)
        order = np.argsort(-score, kind="stable")
        how = "SentencePiece score rank"
    else:
        order = np.arange(n_vocab)
        how = "token id rank (BPE merge order)"
    rank = np.empty(n_vocab, np.float64)
    rank[order] = np.cumsum(ordinary[order]) - 1  # rank among ordinary tokens only
    return zipf_distribution(rank, ordinary), f"Zipf prior over {how}"


TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4


def special_token_ids(reader, n_vocab: int) -> np.ndarray:
    """The special tokens a model actually reads: those the tokenizer metadata names
    (tokenizer.ggml.bos_token_id, eos, padding, ...) and the control or user-defined tokens
    the chat template writes. Not every control token: Gemma-3 has 6 249, nearly all
    <unusedN>, which would take a quarter of the hot rows at 1.6 bpw."""
    ids = set()
    for key in reader.fields:
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id"):
            value = field_value(reader, key)
            if isinstance(value, (int, np.integer)) and 0 <= int(value) < n_vocab:
                ids.add(int(value))
    template = field_value(reader, "tokenizer.chat_template")
    types = field_value(reader, "tokenizer.ggml.token_type")
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    if isinstance(template, str) and types is not None and tokens is not None and len(types) == len(tokens) == n_vocab:
        marked = np.nonzero(np.isin(np.asarray(types), [TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED]))[0]
        ids.update(int(t) for t in marked if tokens[t] and tokens[t] in template)
    return np.array(sorted(ids), np.int64)


def with_special_tokens(w: np.ndarray, reader, n_vocab: int) -> np.ndarray:
    """Special tokens (BOS, EOS, chat-template markers) weigh as much as the most frequent
    token. Text counts never see them, yet every sequence starts with BOS: on Gemma-3 its
    row alone, reconstructed at 0.78 relative error, took the KLD from 0.131 to 0.654
    (docs/RESULTS.md)."""
    w = np.asarray(w, np.float64).copy()
    w[special_token_ids(reader, n_vocab)] = w.max()
    return w


def from_counts(counts: np.ndarray, prior: np.ndarray | None = None) -> np.ndarray:
    """counts + 1, plus the tokenizer prior scaled to as many pseudo-tokens as the text has:
    a calibration text of another domain than the user's misses many of the user's frequent
    tokens, and the prior still ranks them (docs/RESULTS.md)."""
    w = counts.astype(np.float64) + 1.0
    if prior is not None:
        extra = np.asarray(prior, np.float64) - 1.0  # the prior's floor of 1 is already in w
        w += extra * (counts.sum() / max(extra.sum(), 1e-30))
    return w


def text_tokens(encode, text_path: Path, n_vocab: int) -> np.ndarray:
    """The token ids of a text file (int64, in 0..n_vocab-1); `encode(str) -> ids` is the
    model's own tokenizer."""
    try:
        text = Path(text_path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise CarvqError(f"{text_path}: cannot read calibration text ({exc.strerror})") from None
    if not text.strip():
        raise CarvqError(f"{text_path}: calibration text is empty")
    # in pieces for bounded memory; a cut between paragraphs changes nothing
    arr = np.concatenate([np.asarray(encode(piece), np.int64) for piece in _paragraph_chunks(text, 1 << 16)])
    return arr[(arr >= 0) & (arr < n_vocab)]


def _paragraph_chunks(text: str, size: int):
    """Pieces of about `size` characters, cut after a newline where there is one."""
    start = 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        yield text[start:end]
        start = end
