"""`--target-bpw`: the operating point the quality bench measured for a bit budget.

Every CARVQ point that bench/quality.py scores by KLD through llama.cpp belongs to one family:
d = 8, L levels for every row, and the bits L leaves to hot rows with 2 more levels (4 where
that is a large budget). A budget gets the most levels that still leave hot rows for at least
1 % of the vocabulary; at the bench's budgets (1.1, 1.6, 2.1, 3.0, 4.0 bpw) that gives exactly
the points scored there (L2+2, L3+2, L4+2, L5+4, L7+4); up to 3.0 they measured best, on
SmolLM2 and Gemma-3 alike, of one hot set each. With hot tiers (the default) the converter then
fits one level deeper (up to 2.1 bpw the family's point at the budget + 0.9 bpw, wider hot
rows) and trims it back to the budget (converter/tiers.py, deeper_fit); the bench's "CARVQ
tiers" rows are exactly `--target-bpw X` as it is.

The older search ranked every (d, L) by a reconstruction proxy, and for Gemma-3 at 1.6 bpw it
chose d=16 L=6, which measured worse by KLD (docs/RESULTS.md, session 8): a matrix error does
not rank configurations the way the model's behaviour does. It remains for what the family
cannot serve: widths not divisible by 8, an adaptor, an explicit --hot-rows, and budgets too
small for two levels.
"""
from __future__ import annotations

from dataclasses import replace

from carvq.converter import config as cfgmod
from carvq.converter import train
from carvq.converter.config import Config
from carvq.errors import CarvqError


GROUP_SIZE = 8
MIN_HOT_SHARE = 0.01  # hot rows a level count must leave room for, as a share of the vocabulary
WIDE_HOT_BPW = 0.3  # from this hot budget on, hot rows get 4 more levels (3.0 bpw: L5+4 beat L4+6 on both models)


def measured_point(base: Config, V: int, n: int, target_bpw: float) -> Config | None:
    """The bench's family at this budget, or None where it does not apply."""
    if n % GROUP_SIZE or base.adaptor_rank or not base.hot_from_budget:
        return None
    for levels in range(16, 1, -1):
        cfg = replace(base, group_size=GROUP_SIZE, levels=levels, hot_rows=0)
        rest = target_bpw - cfgmod.bpw(cfg, V, n)
        hot = cfgmod.with_hot_budget(replace(cfg, hot_levels=4 if rest >= WIDE_HOT_BPW else 2), V, n, rest)
        if rest > 0 and hot.hot_rows >= MIN_HOT_SHARE * V:
            return replace(hot, hot_bpw=rest)
    return None


def _candidates(base: Config, V: int, n: int, target_bpw: float) -> list[Config]:
    options = cfgmod.candidates(base, V, n, target_bpw)
    if not options and base.adaptor_rank:
        options = cfgmod.candidates(base.without_adaptor(), V, n, target_bpw)
    if not options:
        floor = cfgmod.bpw(replace(base.without_adaptor(), group_size=max(d for d in range(1, 17) if n % d == 0), levels=1), V, n)
        raise CarvqError(f"--target-bpw {target_bpw}: impossible for a {V}x{n} embedding (the smallest CARVQ is {floor:.3f} bpw)")
    return options


def check_target(base: Config, V: int, n: int, target_bpw: float) -> None:
    """CarvqError where no configuration fits `target_bpw`: checked before any model runs (the
    prior's documents and the Fisher pass take half a minute on SmolLM2)."""
    if measured_point(base, V, n, target_bpw) is None:
        _candidates(base, V, n, target_bpw)


def choose_config(M, w, base: Config, target_bpw: float, seed: int, progress: bool) -> tuple[Config, list[str]]:
    """measured_point where it applies; otherwise the best candidate of config.candidates by train.proxy_error, and notes on the choice.
    What the chosen levels leave of the budget goes to hot rows (when they come from a budget)."""
    V, n = M.shape
    point = measured_point(base, V, n, target_bpw)
    if point is not None:
        return point, [f"--target-bpw {target_bpw}: the bench's measured family, d={point.group_size} L={point.levels}; "
                       f"the {point.hot_bpw:.3f} bpw the levels leave pay for {point.hot_rows} hot rows with "
                       f"{point.hot_levels} more levels"]
    options = _candidates(base, V, n, target_bpw)
    from tqdm import tqdm

    scored = []
    for cfg in tqdm(options, desc="choosing config", disable=not progress, leave=False):
        scored.append((train.proxy_error(M, w, cfg, seed), cfgmod.bpw(cfg, V, n), cfg))
    scored.sort(key=lambda s: (s[0], s[1]))
    notes = [f"--target-bpw {target_bpw}: tried " + ", ".join(
        f"d={c.group_size} L={c.levels} ({b:.3f} bpw, proxy err {e:.4f})" for e, b, c in scored)]
    best = scored[0][2]
    if base.hot_from_budget:
        rest = target_bpw - cfgmod.bpw(replace(best, hot_rows=0), V, n)
        best = cfgmod.with_hot_budget(best, V, n, rest)
        notes.append(f"--target-bpw {target_bpw}: the {rest:.3f} bpw the levels leave pay for {best.hot_rows} hot rows")
    return best, notes
