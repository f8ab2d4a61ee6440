"""What `carvq convert` prints: the all-inclusive byte and bpw breakdown, and how far the
decoded embedding is from the source. Only summary numbers are kept, never the matrices."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from carvq.gguf_io import row_chunks

from carvq.converter.config import Config
from carvq.converter.head import CODED_HEAD


@dataclass(frozen=True)
class ErrorStats:
    rel_error: float  # ||M - R||_F / ||M||_F
    weighted_rel_error: float  # the same with each row weighted by its token weight
    mean_cos: float  # row cosine similarity of M and R
    worst_cos: float

    @classmethod
    def measure(cls, M: np.ndarray, tensors, w: np.ndarray) -> "ErrorStats":
        """M against the stored tensors as the reference decoder decodes them, a chunk of rows
        at a time (never a whole decoded copy of M)."""
        from carvq.reference import decode

        wn = w / w.sum()
        err2 = m2 = werr2 = wm2 = 0.0
        cos_sum, cos_min = 0.0, np.inf
        for a, b in row_chunks(M.shape[0]):
            m, r = M[a:b], decode(tensors, np.arange(a, b))
            e_rows, m_rows = ((m - r) ** 2).sum(1, dtype=np.float64), (m * m).sum(1, dtype=np.float64)
            err2, m2 = err2 + e_rows.sum(), m2 + m_rows.sum()
            werr2, wm2 = werr2 + (e_rows * wn[a:b]).sum(), wm2 + (m_rows * wn[a:b]).sum()
            cos = (m * r).sum(1) / np.maximum(np.linalg.norm(m, axis=1) * np.linalg.norm(r, axis=1), 1e-30)
            cos_sum, cos_min = cos_sum + float(cos.sum()), min(cos_min, float(cos.min()))
        return cls(rel_error=float(np.sqrt(err2 / max(m2, 1e-30))),
                   weighted_rel_error=float(np.sqrt(werr2 / max(wm2, 1e-30))),
                   mean_cos=cos_sum / M.shape[0], worst_cos=cos_min)


@dataclass
class Report:
    input: str
    output: str
    arch: str
    n_vocab: int
    n_embd: int
    source_type: str
    config: Config
    weights_from: str
    parts: dict[str, int]
    head_bytes: int
    head_type: str
    head_copied: bool
    errors: "ErrorStats"
    seconds: float
    rounds: int
    source_bytes: int = 0
    screen_bytes: int = 0  # the output head's screen index and correction (output.carvq.*), 0 without either
    trimmed_to: float | None = None  # the lookup bpw the fit (config) was trimmed to in hot tiers, if it was
    peak_rss: int | None = None  # the converting process's peak resident memory, bytes (None: unknown)
    notes: list[str] = field(default_factory=list)

    @property
    def n_weights(self) -> int:
        return self.n_vocab * self.n_embd

    def bpw(self, nbytes: int) -> float:
        return 8.0 * nbytes / self.n_weights

    @property
    def lookup_bytes(self) -> int:
        return sum(self.parts.values())

    def format(self) -> str:
        c = self.config
        rows = [(name, nbytes, self.bpw(nbytes)) for name, nbytes in self.parts.items()]
        rows.append(("lookup total", self.lookup_bytes, self.bpw(self.lookup_bytes)))
        if self.head_copied:
            rows.append((f"head copy ({self.head_type})", self.head_bytes, self.bpw(self.head_bytes)))
            total = self.lookup_bytes + self.head_bytes
            rows.append(("lookup + head copy", total, self.bpw(total)))
        if self.screen_bytes:
            rows.append(("head screen (index, correction)", self.screen_bytes, self.bpw(self.screen_bytes)))
            total = self.lookup_bytes + self.head_bytes + self.screen_bytes
            rows.append(("everything CARVQ adds", total, self.bpw(total)))
        lines = [
            f"carvq convert: {self.input} -> {self.output}",
            f"  model: {self.arch}, embedding {self.n_vocab} x {self.n_embd}, source type {self.source_type} "
            f"({self.source_bytes / 2**20:.2f} MiB, {self.bpw(self.source_bytes):.3f} bpw)",
            ("  config: " if self.trimmed_to is None else f"  fit (then trimmed to {self.trimmed_to:.3f} bpw in hot tiers): ")
            + f"group size {c.group_size}, levels {c.levels}, codebook {c.codebook_size} ({c.codebook_type}), "
            f"adaptor rank {c.adaptor_rank}, hidden {c.adaptor_hidden}, {c.activation if c.adaptor_rank else 'no adaptor'}, "
            + (f"{c.hot_rows} hot rows with {c.hot_levels} more levels" if c.hot_rows else "no hot rows"),
            f"  token weights: {self.weights_from}",
            "",
            f"  {'part':<26}{'bytes':>14}{'bpw':>9}",
        ]
        lines += [f"  {name:<26}{nbytes:>14,}{b:>9.4f}" for name, nbytes, b in rows]
        lines += [
            "",
            f"  relative error (Frobenius)     {self.errors.rel_error:.4f}",
            f"  relative error (token-weighted) {self.errors.weighted_rel_error:.4f}",
            f"  row cosine similarity          mean {self.errors.mean_cos:.4f}, worst {self.errors.worst_cos:.4f}",
            f"  fit rounds used                {self.rounds}",
            f"  time                           {self.seconds:.1f} s ({self.n_vocab / max(self.seconds, 1e-9):,.0f} rows/s)",
        ]
        if self.peak_rss:  # issue 14 bounds it at 3x the float32 embedding
            lines.append(f"  peak memory (RSS)              {self.peak_rss / 2**30:.2f} GiB "
                         f"({self.peak_rss / (4 * self.n_weights):.1f}x the float32 embedding)")
        if self.head_copied:
            lines.append(f"  note: the source ties its output head to the embedding; the head copy costs "
                         f"{self.head_bytes / 2**20:.2f} MiB ({self.bpw(self.head_bytes):.3f} bpw)")
        elif self.head_type == CODED_HEAD:
            lines.append("  note: coded head (format v8): the tied head is the lookup's own rows, no head copy; "
                         "lookup + head = the lookup's bpw")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)
