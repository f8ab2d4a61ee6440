"""The output head a tied model gains: llama.cpp reads a tied model's logits from
token_embd.weight, which a CARVQ file no longer has, so the converter writes output.weight."""
from __future__ import annotations

import numpy as np

from carvq.errors import CarvqError

# The head a tied model gains, unless --head-type says otherwise. Measured (bench/quality.py,
# README): on SmolLM2 a Q5_0 head costs KLD 0.027 for 10 MiB saved, five times less KLD per
# MiB than compressing the embedding; a byte copy of a Q8_0 source makes the file larger
# than the stock one. Q5_0 is also what llama-quantize stores for a Q4_K head at widths
# that are not a multiple of 256.
DEFAULT_HEAD_TYPE = "Q5_0"
# --head-type codes: no head copy at all; the tied head is the lookup's own rows, its logits
# computed from the codes by the patched llama.cpp (format v8, FORMAT.md "Coded head")
CODED_HEAD = "codes"


def default_head_type(embd, n_embd: int) -> str:
    """DEFAULT_HEAD_TYPE, unless the source embedding is already as small (then a byte copy)
    or the width does not fit its 32-blocks."""
    import gguf

    default = gguf.GGMLQuantizationType[DEFAULT_HEAD_TYPE]
    block, size = gguf.GGML_QUANT_SIZES[default]
    src_block, src_size = gguf.GGML_QUANT_SIZES[embd.tensor_type]
    if n_embd % block or src_size / src_block <= size / block:
        return embd.tensor_type.name
    return DEFAULT_HEAD_TYPE


def _quantize_rows(M: np.ndarray, qtype) -> np.ndarray:
    """gguf-py's quantize, a chunk of rows at a time into one output array: blocks never
    span rows, so the bytes are the same as one call's, at a fraction of its peak memory."""
    import gguf

    from carvq.gguf_io import CHUNK_ROWS

    first = gguf.quants.quantize(M[:CHUNK_ROWS], qtype)
    out = np.empty((M.shape[0], first.shape[1]), first.dtype)
    out[: first.shape[0]] = first
    for a in range(CHUNK_ROWS, M.shape[0], CHUNK_ROWS):
        out[a : a + CHUNK_ROWS] = gguf.quants.quantize(M[a : a + CHUNK_ROWS], qtype)
    return out


def head_tensor(embd, M: np.ndarray, head_type: str):
    """(data, ggml type) of the output.weight to add: a byte copy when the type is the
    source's, else the dequantized embedding `M` quantized by gguf-py."""
    import gguf

    try:
        qtype = gguf.GGMLQuantizationType[head_type.upper()]
    except KeyError:
        raise CarvqError(f"--head-type {head_type}: not a ggml type name") from None
    if qtype == embd.tensor_type:
        return np.asarray(embd.data), qtype  # byte copy: the head stays exactly as it was
    if qtype == gguf.GGMLQuantizationType.F32:
        return M, qtype
    try:
        return _quantize_rows(M, qtype), qtype
    except (NotImplementedError, gguf.quants.QuantError, AssertionError, ValueError):
        raise CarvqError(f"--head-type {head_type}: gguf-py cannot write this type for a "
                         f"{M.shape[0]}x{M.shape[1]} matrix; use the source type ({embd.tensor_type.name}), F16, Q8_0 or Q4_0") from None
