"""CARVQ configurations and their exact byte cost (docs/FORMAT.md, "Bits per weight")."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from carvq.errors import CarvqError

TYPE_BYTES = {"F32": 4, "F16": 2}


@dataclass(frozen=True)
class Config:
    group_size: int = 8
    levels: int = 3
    codebook_size: int = 16
    adaptor_rank: int = 4
    adaptor_hidden: int = 64
    activation: str = "gelu"
    codebook_type: str = "F16"
    sigma0_type: str = "F16"
    mlp_type: str = "F16"
    hot_rows: int = 0  # the N most frequent tokens get hot_levels extra residual levels
    hot_levels: int = 0

    def without_adaptor(self) -> "Config":
        return replace(self, adaptor_rank=0, adaptor_hidden=0)

    def as_dict(self) -> dict:
        return asdict(self)

    def check(self, n_embd: int) -> None:
        if self.group_size < 1 or n_embd % self.group_size:
            raise CarvqError(f"--group-size {self.group_size} does not divide the embedding width {n_embd}")
        if not 1 <= self.levels <= 16:
            raise CarvqError(f"--levels {self.levels} outside 1..16")
        if not 2 <= self.codebook_size <= 16:
            raise CarvqError(f"codebook size {self.codebook_size} outside 2..16 (codes are 4-bit)")
        if self.adaptor_rank < 0 or self.adaptor_hidden < 0 or (self.adaptor_rank > 0) != (self.adaptor_hidden > 0):
            raise CarvqError("--adaptor-rank and --adaptor-hidden must both be 0 or both positive")
        if self.hot_rows < 0 or not 0 <= self.hot_levels <= 16 or (self.hot_rows > 0) != (self.hot_levels > 0):
            raise CarvqError("--hot-rows and --hot-levels must both be 0 or both positive (hot levels 1..16)")

    def clamp_hot(self, n_vocab: int) -> "Config":
        return replace(self, hot_rows=min(self.hot_rows, n_vocab))


def part_bytes(cfg: Config, n_vocab: int, n_embd: int) -> dict[str, int]:
    """Bytes of each CARVQ tensor group, exactly as written (no alignment padding)."""
    G = n_embd // cfg.group_size
    m, h = cfg.adaptor_rank, cfg.adaptor_hidden
    parts = {
        "codes": n_vocab * ((G * cfg.levels + 1) // 2),
        "codebooks": G * cfg.levels * cfg.codebook_size * cfg.group_size * TYPE_BYTES[cfg.codebook_type],
        "sigma0": n_vocab * m * TYPE_BYTES[cfg.sigma0_type],
        "mlp": (h * m + n_embd * h) * TYPE_BYTES[cfg.mlp_type] + (h + n_embd) * 4 if m else 0,
        # ids (I32) + codes + codebooks of the hot levels
        "hot": (cfg.hot_rows * (4 + (G * cfg.hot_levels + 1) // 2)
                + G * cfg.hot_levels * cfg.codebook_size * cfg.group_size * TYPE_BYTES[cfg.codebook_type])
        if cfg.hot_rows else 0,
    }
    return parts


def bpw(cfg: Config, n_vocab: int, n_embd: int) -> float:
    return 8.0 * sum(part_bytes(cfg, n_vocab, n_embd).values()) / (n_vocab * n_embd)


def candidates(base: Config, n_vocab: int, n_embd: int, target_bpw: float) -> list[Config]:
    """For each group size dividing n (2..16), the most levels that fit under target_bpw."""
    out = []
    for d in range(2, 17):
        if n_embd % d:
            continue
        best = None
        for levels in range(1, 17):
            cfg = replace(base, group_size=d, levels=levels)
            if bpw(cfg, n_vocab, n_embd) <= target_bpw:
                best = cfg
        if best is not None:
            out.append(best)
    return out
