"""NumPy reference decoder of CARVQ-GGUF (docs/FORMAT.md, versions 1 and 2).

This module is the executable form of the format text: it favours clarity over speed
and needs only NumPy (plus gguf-py to open files). The C decoder and the converter's
in-memory reconstruction are tested against it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from carvq.errors import CarvqError

FORMAT_VERSION = 2  # what the writer writes
READABLE_VERSIONS = (1, 2)  # version 1 is version 2 without hot rows
PREFIX = "token_embd.carvq."
ACTIVATIONS = ("relu", "silu", "gelu")


@dataclass(frozen=True)
class Layout:
    """The shape parameters of a CARVQ embedding (FORMAT.md, Notation)."""

    n_vocab: int
    n_embd: int
    group_size: int
    levels: int
    codebook_size: int
    adaptor_rank: int = 0
    adaptor_hidden: int = 0
    activation: str = "none"
    hot_rows: int = 0  # N: rows with extra residual levels (version 2)
    hot_levels: int = 0  # Lh

    @property
    def hot_code_row_bytes(self) -> int:
        return (self.n_groups * self.hot_levels + 1) // 2

    def hot_layout(self) -> "Layout":
        """The hot levels seen as an RVQ of their own over the N hot rows (for packing)."""
        return Layout(self.hot_rows, self.n_embd, self.group_size, self.hot_levels, self.codebook_size)

    @property
    def n_groups(self) -> int:
        return self.n_embd // self.group_size

    @property
    def codes_per_row(self) -> int:
        return self.n_groups * self.levels

    @property
    def code_row_bytes(self) -> int:
        return (self.codes_per_row + 1) // 2

    def check(self) -> None:
        """Raise CarvqError when the parameters contradict FORMAT.md."""
        if self.n_vocab < 1 or self.n_embd < 1:
            raise CarvqError(f"empty embedding {self.n_vocab}x{self.n_embd}")
        if self.group_size < 1 or self.n_embd % self.group_size:
            raise CarvqError(f"group size {self.group_size} does not divide width {self.n_embd}")
        if not 1 <= self.levels <= 16:
            raise CarvqError(f"levels {self.levels} outside 1..16")
        if not 2 <= self.codebook_size <= 16:
            raise CarvqError(f"codebook size {self.codebook_size} outside 2..16")
        if not 0 <= self.adaptor_rank <= 1024 or not 0 <= self.adaptor_hidden <= 65536:
            raise CarvqError("adaptor rank or hidden width out of range")
        if (self.adaptor_rank == 0) != (self.adaptor_hidden == 0):
            raise CarvqError("adaptor rank and hidden width must both be zero or both non-zero")
        if self.adaptor_rank and self.activation not in ACTIVATIONS:
            raise CarvqError(f"unknown adaptor activation {self.activation!r}")
        if not 0 <= self.hot_rows <= self.n_vocab or not 0 <= self.hot_levels <= 16:
            raise CarvqError(f"hot rows {self.hot_rows} or hot levels {self.hot_levels} out of range")
        if (self.hot_rows == 0) != (self.hot_levels == 0):
            raise CarvqError("hot rows and hot levels must both be zero or both non-zero")


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """(V, G, L) codes in 0..15 -> (V, ceil(G*L/2)) uint8, low nibble = even index."""
    v = codes.shape[0]
    flat = codes.reshape(v, -1).astype(np.uint8)
    if flat.shape[1] % 2:
        flat = np.concatenate([flat, np.zeros((v, 1), np.uint8)], axis=1)
    return (flat[:, 0::2] | (flat[:, 1::2] << 4)).astype(np.uint8)


def unpack_codes(packed: np.ndarray, layout: Layout) -> np.ndarray:
    """(V', B) bytes -> (V', G, L) codes as uint8."""
    packed = np.asarray(packed).view(np.uint8)
    both = np.empty((packed.shape[0], packed.shape[1] * 2), np.uint8)
    both[:, 0::2] = packed & 0x0F
    both[:, 1::2] = packed >> 4
    return both[:, : layout.codes_per_row].reshape(-1, layout.n_groups, layout.levels)


def activation(name: str, x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    if name == "relu":
        return np.maximum(x, np.float32(0))
    if name == "silu":
        return (x / (np.float32(1) + np.exp(-x))).astype(np.float32)
    if name == "gelu":
        c = np.float32(np.sqrt(2.0 / np.pi))
        return (np.float32(0.5) * x * (np.float32(1) + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))).astype(np.float32)
    raise CarvqError(f"unknown adaptor activation {name!r}")


def decode_rvq(layout: Layout, codes_packed: np.ndarray, codebooks: np.ndarray, token_ids) -> np.ndarray:
    """RVQ part of the decode: (len(ids), n) float32, summed level 0 first (bit-exact contract)."""
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= layout.n_vocab):
        raise CarvqError(f"token id outside 0..{layout.n_vocab - 1}")
    codes = unpack_codes(np.asarray(codes_packed).view(np.uint8)[ids], layout)
    if codes.size and codes.max() >= layout.codebook_size:
        raise CarvqError("code outside the codebook")
    acc = np.zeros((ids.size, layout.n_groups, layout.group_size), np.float32)
    _add_levels(acc, codebooks, codes)
    return acc.reshape(ids.size, layout.n_embd)


def _add_levels(acc: np.ndarray, codebooks, codes: np.ndarray) -> None:
    """acc (T, G, d) += the codebook vectors `codes` (T, G, levels) select, level 0 first."""
    cb = np.asarray(codebooks, dtype=np.float32)  # (G, levels, K, d)
    g_idx = np.arange(cb.shape[0])[None, :]
    for level in range(cb.shape[1]):
        acc += cb[g_idx, level, codes[:, :, level]]


def add_hot(layout: Layout, hot_ids, hot_codes_packed, hot_codebooks, token_ids, out: np.ndarray) -> None:
    """Hot part of the decode, in place: for each id that is a hot row, continue the RVQ sum
    in `out` with its hot levels, level 0 first (bit-exact contract)."""
    if not layout.hot_rows:
        return
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    hot_ids = np.asarray(hot_ids, dtype=np.int64)
    pos = np.searchsorted(hot_ids, ids)
    found = (pos < hot_ids.size) & (hot_ids[np.minimum(pos, hot_ids.size - 1)] == ids)
    if not found.any():
        return
    hot = layout.hot_layout()
    codes = unpack_codes(np.asarray(hot_codes_packed).view(np.uint8)[pos[found]], hot)
    if codes.max() >= layout.codebook_size:
        raise CarvqError("hot code outside the codebook")
    acc = out[found].reshape(-1, layout.n_groups, layout.group_size).astype(np.float32)
    _add_levels(acc, hot_codebooks, codes)
    out[found] = acc.reshape(-1, layout.n_embd)


def decode_adaptor(layout: Layout, sigma0, up_w, up_b, down_w, down_b, token_ids) -> np.ndarray:
    """Adaptor part of the decode: (len(ids), n) float32."""
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    z = np.asarray(sigma0, dtype=np.float32)[ids]
    u = activation(layout.activation, z @ np.asarray(up_w, np.float32).T + np.asarray(up_b, np.float32))
    return (u @ np.asarray(down_w, np.float32).T + np.asarray(down_b, np.float32)).astype(np.float32)


class CarvqTensors:
    """The CARVQ tensors of a file, as NumPy arrays in the shapes of FORMAT.md."""

    def __init__(self, layout: Layout, codes, codebooks, sigma0=None, up_w=None, up_b=None, down_w=None, down_b=None,
                 hot_ids=None, hot_codes=None, hot_codebooks=None):
        self.layout = layout
        self.codes = codes
        self.codebooks = codebooks
        self.sigma0, self.up_w, self.up_b, self.down_w, self.down_b = sigma0, up_w, up_b, down_w, down_b
        self.hot_ids, self.hot_codes, self.hot_codebooks = hot_ids, hot_codes, hot_codebooks

    def decode(self, token_ids) -> np.ndarray:
        out = decode_rvq(self.layout, self.codes, self.codebooks, token_ids)
        add_hot(self.layout, self.hot_ids, self.hot_codes, self.hot_codebooks, token_ids, out)
        if self.layout.adaptor_rank:
            out = out + decode_adaptor(self.layout, self.sigma0, self.up_w, self.up_b, self.down_w, self.down_b, token_ids)
        return out.astype(np.float32)


def read_tensors(path_or_reader) -> CarvqTensors:
    """Open a CARVQ-GGUF (path or gguf.GGUFReader) and validate it against FORMAT.md."""
    from carvq.gguf_io import open_gguf, read_carvq_tensors

    reader = open_gguf(path_or_reader) if isinstance(path_or_reader, (str, os.PathLike)) else path_or_reader
    return read_carvq_tensors(reader)


def decode_rows(path_or_reader, token_ids) -> np.ndarray:
    """Decode embedding rows of `token_ids` from a CARVQ-GGUF: (len(ids), n) float32."""
    return read_tensors(path_or_reader).decode(token_ids)
