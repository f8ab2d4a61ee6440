"""`--target-bpw`: the group size and levels with the least weighted error under a bit budget."""
from __future__ import annotations

from dataclasses import replace

from carvq.converter import config as cfgmod
from carvq.converter import train
from carvq.converter.config import Config
from carvq.errors import CarvqError


def choose_config(M, w, base: Config, target_bpw: float, seed: int, progress: bool) -> tuple[Config, list[str]]:
    """The best candidate of config.candidates by train.proxy_error, and notes on the choice.
    What the chosen levels leave of the budget goes to hot rows (when they come from a budget)."""
    V, n = M.shape
    options = cfgmod.candidates(base, V, n, target_bpw)
    if not options and base.adaptor_rank:
        options = cfgmod.candidates(base.without_adaptor(), V, n, target_bpw)
    if not options:
        floor = cfgmod.bpw(replace(base.without_adaptor(), group_size=max(d for d in range(1, 17) if n % d == 0), levels=1), V, n)
        raise CarvqError(f"--target-bpw {target_bpw}: impossible for a {V}x{n} embedding (the smallest CARVQ is {floor:.3f} bpw)")
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
