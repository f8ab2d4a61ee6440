"""Hot rows in tiers (format version 4; their ids as a hot map, version 7): each row keeps as
many levels of a deeper fit as it earns.

A fit gives every row L levels and its N hottest rows Lh more. Trimming keeps `floor` levels
for every row and hands out the rest one level at a time, to the rows where the level lowers
the token-weighted error most, until the byte budget is spent. Level k of the fit becomes hot
tier k - floor: the rows that kept it, with its codebook. Rows keep a prefix of their levels
and tiers are decoded in order, so a trimmed row decodes exactly as the fit's first levels.

Measured (docs/RESULTS.md, session 12): at 1.6 bpw on Gemma-3, trimming an L4 +2 fit to
floor 2 lowered KLD from 0.168 (L3 +2) to 0.124; at 2.1, an L5 +4 fit trimmed to floor 3
from 0.094 (L4 +2) to 0.058. Frequent rows earn deep levels and rare rows give theirs up.
"""
from __future__ import annotations

import heapq
from dataclasses import replace

import numpy as np

from carvq import format as fmt
from carvq.converter import config as cfgmod
from carvq.converter.config import Config
from carvq.errors import CarvqError
from carvq.format import CarvqTensors, pack_codes, unpack_codes
from carvq.gguf_io import row_chunks
from carvq.reference import sum_levels


def check(levels: int, adaptor_rank: int, floor: int) -> None:
    """A fit of `levels` levels (and adaptor rank) can be trimmed to `floor`: the converter asks
    before fitting, trim() again on the fit it is given."""
    if adaptor_rank:
        raise CarvqError("--trim-to works on fits without an adaptor (--adaptor-rank 0)")
    if not 1 <= floor < levels:
        raise CarvqError(f"--tier-floor {floor}: must be at least 1 and below the fit's {levels} levels")


def _fixed_bytes(V: int, G: int, floor: int, depth: int, K: int, d: int, cb_item: int) -> int:
    """What a trim to `floor` of a fit `depth` levels deep costs before any tier row: every
    row's floor levels of codes, and the codebooks of every level."""
    return V * ((G * floor + 1) // 2) + depth * G * K * d * cb_item


def all_levels(t: CarvqTensors) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes (V, G, D) with D = L + T*Lh, codebooks (G, D, K, d) float32, depth (V,)): every
    row's level sequence, each tier's hot levels after the shared ones; a row has depth levels.
    Tiers must be nested (each tier's rows in the tier before it, as trim() writes them), so
    that a row's levels are a prefix of the D."""
    lo = t.layout
    V, G, L, Lh = lo.n_vocab, lo.n_groups, lo.levels, lo.hot_levels
    sizes = lo.tier_rows if lo.hot_rows else ()
    codes = np.zeros((V, G, L + len(sizes) * Lh), np.uint8)
    codes[:, :, :L] = unpack_codes(t.codes, lo)
    depth = np.full(V, L, np.int64)
    cb = [np.asarray(t.codebooks, np.float32)]
    if sizes:
        hot = unpack_codes(t.hot_codes, lo.hot_layout())
        hot_cb = np.asarray(t.hot_codebooks, np.float32).reshape(len(sizes), G, Lh, lo.codebook_size, lo.group_size)
        for tier, (start, rows) in enumerate(zip(lo.tier_starts(), sizes)):
            ids = np.asarray(t.hot_ids[start:start + rows], np.int64)
            first = L + tier * Lh
            if not np.all(depth[ids] == first):
                raise CarvqError("hot tiers that are not nested (each tier's rows in the tier before it)")
            codes[ids, :, first:first + Lh] = hot[start:start + rows]
            depth[ids] += Lh
            cb.append(hot_cb[tier])
    return codes, np.concatenate(cb, axis=1), depth


def _prefix_errors(M: np.ndarray, codes: np.ndarray, cb: np.ndarray, depth: np.ndarray, floor: int) -> np.ndarray:
    """err[r, j] = ||M_r - (first floor + j levels of row r)||^2, inf past the row's depth."""
    V, G, D = codes.shape
    d = cb.shape[3]
    err = np.full((V, D - floor + 1), np.inf)
    for a, b in row_chunks(V):
        target = np.asarray(M[a:b], np.float32).reshape(b - a, G, d)
        acc = sum_levels(cb[:, :floor], codes[a:b, :, :floor])
        err[a:b, 0] = ((target - acc) ** 2).sum((1, 2))
        for k in range(floor, D):
            acc = sum_levels(cb[:, k:k + 1], codes[a:b, :, k:k + 1], acc)
            err[a:b, k - floor + 1] = np.where(depth[a:b] > k, ((target - acc) ** 2).sum((1, 2)), np.inf)
    return err


def allocate(err: np.ndarray, w: np.ndarray, increments: int) -> np.ndarray:
    """Extra levels per row (0..D-floor): `increments` levels in all, each to the row whose next
    level lowers w * error most (a row's levels stay a prefix). Rows gain only while it helps."""
    V = err.shape[0]
    extra = np.zeros(V, np.int64)
    gain = w * (err[:, 0] - err[:, 1]) if err.shape[1] > 1 else np.zeros(V)
    heap = [(-g, r) for r, g in enumerate(gain.tolist()) if g > 0]
    heapq.heapify(heap)
    while heap and increments > 0:
        _, r = heapq.heappop(heap)
        extra[r] += 1
        increments -= 1
        k = extra[r]
        if k + 1 < err.shape[1]:
            g = w[r] * (err[r, k] - err[r, k + 1])
            if g > 0:
                heapq.heappush(heap, (-g, r))
    return extra


def trim(t: CarvqTensors, M: np.ndarray, w: np.ndarray, floor: int, budget_bytes: float) -> tuple[CarvqTensors, str]:
    """The fit `t` with every row cut to between `floor` levels and its own depth, by measured
    gain, within `budget_bytes` of lookup tensors; and a line saying what it kept."""
    lo = t.layout
    check(lo.levels, lo.adaptor_rank, floor)
    if len(lo.tier_rows) > 1:
        raise CarvqError("the fit to trim already has hot tiers")
    codes, cb, depth = all_levels(t)
    V, G, D = codes.shape
    tiers = D - floor
    if tiers > fmt.MAX_HOT_TIERS:
        raise CarvqError(f"trimming {lo.levels} +{lo.hot_levels} levels to a floor of {floor} makes {tiers} hot tiers; "
                         f"a file holds at most {fmt.MAX_HOT_TIERS} (raise --tier-floor)")
    fixed = _fixed_bytes(V, G, floor, D, lo.codebook_size, lo.group_size, np.asarray(t.codebooks).dtype.itemsize)
    fixed += (V + 7) // 8 + tiers  # the hot map's first bitmap, and a padding byte per tier at most
    per_level = (G + 1) // 2 + 1 / 8  # a tier row: one level of codes, its bit in the next tier's bitmap
    increments = int((budget_bytes - fixed) // per_level)
    if increments < 0:
        raise CarvqError(f"--trim-to leaves {budget_bytes - fixed:.0f} bytes below the floor's {floor} levels: raise it "
                         "or lower --tier-floor")
    err = _prefix_errors(M, codes, cb, depth, floor)
    levels = floor + allocate(err, np.asarray(w, np.float64), increments)

    out = pack(lo, codes, cb, levels, floor, np.asarray(t.codebooks).dtype)
    hist = np.bincount(levels, minlength=D + 1)[floor:]
    kept = ", ".join(f"{n:,} with {floor + j}" for j, n in enumerate(hist.tolist()) if n)
    return out, (f"hot tiers: every row keeps {floor} to {D} of the fit's {lo.levels} +{lo.hot_levels} levels by "
                 f"measured gain ({kept} levels; {len(out.layout.tier_rows) if out.layout.hot_rows else 0} tiers)")


def pack(lo, codes: np.ndarray, cb: np.ndarray, levels: np.ndarray, floor: int, cb_type) -> CarvqTensors:
    """The tensors of rows with levels[r] levels of codes (V, G, D) and codebooks (G, D, K, d):
    `floor` shared levels, and level k > floor as hot tier k - floor (the rows that keep it, one
    level); `lo` the fit's layout (V, n, d, K)."""
    sizes, tier_ids, tier_codes, tier_cbs = [], [], [], []
    for k in range(floor, codes.shape[2]):
        rows = np.nonzero(levels > k)[0]
        if rows.size == 0:
            break  # levels are prefixes: every later tier is empty too
        sizes.append(int(rows.size))
        tier_ids.append(rows.astype(np.int32))
        tier_codes.append(pack_codes(codes[rows, :, k:k + 1]))
        tier_cbs.append(cb[:, k:k + 1])
    # the tiers nest (levels are prefixes): their ids are stored as nested bitmaps (format v7)
    layout = replace(lo, levels=floor, hot_rows=sum(sizes), hot_levels=1 if sizes else 0,
                     hot_tiers=tuple(sizes) if len(sizes) > 1 else (), hot_map=bool(sizes))
    out = CarvqTensors(layout, pack_codes(codes[:, :, :floor]), np.ascontiguousarray(cb[:, :floor]).astype(cb_type))
    if sizes:
        out.hot_ids = np.concatenate(tier_ids)
        out.hot_codes = np.concatenate(tier_codes)
        out.hot_codebooks = np.concatenate(tier_cbs).astype(cb_type)  # (T*G, 1, K, d): tier-major
    layout.check()
    return out


# The fit a tiered configuration trims is the bench's family at its bpw plus this much (where the
# family applies): deeper hot levels (4) on more rows give the trim more to choose from. Measured
# (docs/RESULTS.md, session 13): Gemma-3 1.6 bpw KLD 0.0956 -> 0.0773 (an L4 +4 fit instead of
# L4 +2), 2.1 bpw 0.0596 -> 0.0475 (L5 +4 instead of L5 +2); SmolLM2 the same within noise
# (0.1217 / 0.1246, 0.0559 / 0.0558; 3.0 bpw from L7 +4 0.0264 / 0.0262).
PARENT_EXTRA_BPW = 0.9


def deeper_fit(cfg: Config, n_vocab: int, n_embd: int) -> tuple[Config, int, float] | None:
    """The tiered form of configuration `cfg` (what carvq convert does by default): (the fit,
    the floor: one level fewer than cfg, two from 4 levels on, the bpw to trim to: cfg's own), or None where tiers do
    not apply (an adaptor, 16 levels, or codebooks that leave no bytes for tier rows). The fit
    is the bench's family at cfg's bpw + PARENT_EXTRA_BPW where cfg has its group size (d = 8)
    and that family has one level more than cfg, else cfg with one level more and its hot rows."""
    from carvq.converter.search import GROUP_SIZE, measured_point

    if cfg.adaptor_rank or cfg.levels >= fmt.MAX_LEVELS:
        return None
    target = cfgmod.bpw(cfg, n_vocab, n_embd)
    fit = None
    if cfg.group_size == GROUP_SIZE:
        # hot rows from a budget (any positive hot_bpw: measured_point sets the budget and the rows)
        fit = measured_point(replace(cfg, hot_rows=0, hot_bpw=1.0), n_vocab, n_embd, target + PARENT_EXTRA_BPW)
    if fit is None or fit.levels != cfg.levels + 1:
        # (3.0 and 4.0 bpw: the family is two levels deeper there, not measured better)
        fit = replace(cfg, levels=cfg.levels + 1)
    depth = fit.levels + (fit.hot_levels if fit.hot_rows else 0)
    # the floor: one level under cfg, two from 4 levels on. At 2.1 bpw floor 3 held half of
    # SmolLM2's rows (25.7k, the rare ones) at the floor; floor 2 lets the trim take 5.3k of
    # them down a level: KLD 0.0517 -> 0.0471 (two seeds; floor 1: 0.0477). At 3.0, floor 3
    # instead of 4: 0.0190 -> 0.0189, 24 rows below 4 (docs/RESULTS.md, session 29). At 1.6 the
    # floor stays 2: the screen of a tied model reads the floor's codes of every row.
    floor = max(1, cfg.levels - (2 if cfg.levels >= 4 else 1), depth - fmt.MAX_HOT_TIERS)
    fixed = _fixed_bytes(n_vocab, n_embd // cfg.group_size, floor, depth, cfg.codebook_size, cfg.group_size,
                         cfgmod.TYPE_BYTES[cfg.codebook_type])
    if floor >= fit.levels or fixed >= target * n_vocab * n_embd / 8:
        return None  # (a tiny vocabulary: the deeper fit's codebooks alone outweigh the configuration)
    return fit, floor, target


def _hot_id_bytes(t: CarvqTensors) -> int:
    """The hot rows' ids as written: the hot map (format v7) or 4 bytes a row."""
    if not t.layout.hot_rows:
        return 0
    return t.layout.hot_map_bytes if t.layout.hot_map else int(np.asarray(t.hot_ids).nbytes)


def part_bytes(t: CarvqTensors) -> dict[str, int]:
    """Bytes of each tensor group as written (the report's parts, from the tensors themselves)."""
    nb = lambda *arrs: sum(int(np.asarray(a).nbytes) for a in arrs if a is not None)  # noqa: E731
    return {"codes": nb(t.codes), "codebooks": nb(t.codebooks), "sigma0": nb(t.sigma0),
            "mlp": nb(t.up_w, t.up_b, t.down_w, t.down_b), "hot": nb(t.hot_codes, t.hot_codebooks) + _hot_id_bytes(t),
            **({"transform": nb(t.transform)} if t.transform is not None else {})}
