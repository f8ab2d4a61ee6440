"""CARVQ configurations and their exact byte cost (docs/FORMAT.md, "Bits per weight")."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from carvq import format as fmt
from carvq.errors import CarvqError

TYPE_BYTES = {"F32": 4, "F16": 2}
# Alternation rounds of RVQ and adaptor at most (one fit without an adaptor, see train.py).
DEFAULT_ITERS = 2
# Hidden width of the adaptor MLP when --adaptor-rank turns it on.
DEFAULT_ADAPTOR_HIDDEN = 64


@dataclass(frozen=True)
class Config:
    group_size: int = 8
    levels: int = 3
    codebook_size: int = 16
    # Defaults measured on SmolLM2 (docs/RESULTS.md): at equal bits, hot rows buy far more
    # than the adaptor, so the adaptor is off unless asked for (--adaptor-rank 4).
    adaptor_rank: int = 0
    adaptor_hidden: int = 0
    activation: str = "gelu"
    codebook_type: str = "F16"
    sigma0_type: str = "F16"
    mlp_type: str = "F16"
    hot_rows: int = 0  # the N most frequent tokens get hot_levels extra residual levels
    hot_levels: int = 2  # (only used when hot_rows > 0); 2 measured best at 1.6 bpw
    hot_bpw: float = 0.08  # > 0: hot_rows is whatever this many bpw buy (see with_hot_budget)

    def without_adaptor(self) -> "Config":
        return replace(self, adaptor_rank=0, adaptor_hidden=0)

    def as_dict(self) -> dict:
        return asdict(self)

    def check(self, n_embd: int) -> None:
        if self.group_size < 1 or n_embd % self.group_size:
            raise CarvqError(f"--group-size {self.group_size} does not divide the embedding width {n_embd}")
        if not 1 <= self.levels <= fmt.MAX_LEVELS:
            raise CarvqError(f"--levels {self.levels} outside 1..{fmt.MAX_LEVELS}")
        if not fmt.MIN_CODEBOOK_SIZE <= self.codebook_size <= fmt.MAX_CODEBOOK_SIZE:
            raise CarvqError(f"codebook size {self.codebook_size} outside {fmt.MIN_CODEBOOK_SIZE}..{fmt.MAX_CODEBOOK_SIZE} "
                             "(codes are 4-bit)")
        if self.adaptor_rank < 0 or self.adaptor_hidden < 0 or (self.adaptor_rank > 0) != (self.adaptor_hidden > 0):
            raise CarvqError("--adaptor-rank and --adaptor-hidden must both be 0 or both positive")
        if self.adaptor_rank > fmt.MAX_ADAPTOR_RANK or self.adaptor_hidden > fmt.MAX_ADAPTOR_HIDDEN:
            raise CarvqError(f"--adaptor-rank at most {fmt.MAX_ADAPTOR_RANK}, --adaptor-hidden at most {fmt.MAX_ADAPTOR_HIDDEN}")
        if self.activation not in fmt.ACTIVATIONS:
            raise CarvqError(f"--activation {self.activation}: one of {', '.join(fmt.ACTIVATIONS)}")
        if self.hot_rows < 0 or self.hot_bpw < 0:
            raise CarvqError("--hot-rows and --hot-bpw must not be negative")
        if not 1 <= self.hot_levels <= fmt.MAX_LEVELS and (self.hot_rows or self.hot_bpw):
            raise CarvqError(f"--hot-levels {self.hot_levels} outside 1..{fmt.MAX_LEVELS}")

    @property
    def stored_hot_levels(self) -> int:
        """carvq.hot_levels as written: 0 when there are no hot rows."""
        return self.hot_levels if self.hot_rows else 0

    @property
    def hot_from_budget(self) -> bool:
        """True when the hot rows come from hot_bpw; an explicit hot_rows > 0 wins."""
        return self.hot_rows == 0 and self.hot_bpw > 0

    def resolve_hot(self, n_vocab: int, n_embd: int) -> "Config":
        """hot_rows from the hot_bpw budget unless given, clamped to the vocabulary."""
        cfg = with_hot_budget(self, n_vocab, n_embd, self.hot_bpw) if self.hot_from_budget else self
        return replace(cfg, hot_rows=min(cfg.hot_rows, n_vocab))


# The head's screen index (carvq convert --screen-index): the lookup's default configuration
# (d = 8, L = 3, hot rows for 0.08 bpw), no adaptor; docs/RESULTS.md (session 7) has the cheaper
# ones measured. Here, not in screen_index.py, so that the CLI reads it without torch.
SCREEN_DEFAULT = Config(group_size=8, levels=3, adaptor_rank=0, hot_bpw=0.08)


def part_bytes(cfg: Config, n_vocab: int, n_embd: int) -> dict[str, int]:
    """Bytes of each CARVQ tensor group, exactly as written (no alignment padding)."""
    G = n_embd // cfg.group_size
    m, h = cfg.adaptor_rank, cfg.adaptor_hidden
    parts = {
        "codes": n_vocab * ((G * cfg.levels + 1) // 2),
        "codebooks": G * cfg.levels * cfg.codebook_size * cfg.group_size * TYPE_BYTES[cfg.codebook_type],
        "sigma0": n_vocab * m * TYPE_BYTES[cfg.sigma0_type],
        "mlp": (h * m + n_embd * h) * TYPE_BYTES[cfg.mlp_type] + (h + n_embd) * 4 if m else 0,
        "hot": cfg.hot_rows * hot_row_bytes(cfg, n_embd) + hot_codebook_bytes(cfg, n_embd) if cfg.hot_rows else 0,
    }
    return parts


def hot_row_bytes(cfg: Config, n_embd: int) -> int:
    """A hot row's id (I32) and its packed codes."""
    return 4 + (n_embd // cfg.group_size * cfg.hot_levels + 1) // 2


def hot_codebook_bytes(cfg: Config, n_embd: int) -> int:
    return n_embd // cfg.group_size * cfg.hot_levels * cfg.codebook_size * cfg.group_size * TYPE_BYTES[cfg.codebook_type]


def with_hot_budget(cfg: Config, n_vocab: int, n_embd: int, budget_bpw: float) -> Config:
    """As many hot rows (at most V) as `budget_bpw` bits per embedding weight pay for,
    their codebooks included; none when the budget does not cover the codebooks."""
    avail = budget_bpw * n_vocab * n_embd / 8 - hot_codebook_bytes(cfg, n_embd)
    rows = int(max(0.0, avail) // hot_row_bytes(cfg, n_embd))
    return replace(cfg, hot_rows=min(rows, n_vocab))


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
            cfg = replace(base, group_size=d, levels=levels).resolve_hot(n_vocab, n_embd)
            if bpw(cfg, n_vocab, n_embd) <= target_bpw:
                best = cfg
        if best is not None:
            out.append(best)
    return out
