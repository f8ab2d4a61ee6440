"""Hot rows in tiers (format version 4, converter/tiers.py): trimming a fit, the file, the readers."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from carvq import format as fmt
from carvq import gguf_io as gio
from carvq import reference
from carvq.errors import CarvqError


@pytest.fixture(scope="module")
def fit():
    """A fit with 4 levels and 300 hot rows with 2 more, of a random matrix, and its weights."""
    from carvq.converter import train
    from carvq.converter.config import Config

    rng = np.random.default_rng(3)
    V, n = 4000, 32
    M = rng.standard_normal((V, n)).astype(np.float32)
    w = 1.0 / (1.0 + rng.permutation(V)) ** 1.1  # Zipf-like, not in id order
    cfg = Config(group_size=8, levels=4, hot_rows=300, hot_levels=2, hot_bpw=0.0)
    return M, w, train.compress(M, w, cfg, 1, 0, progress=False).tensors


def _prefix_decode(t: fmt.CarvqTensors, levels: np.ndarray) -> np.ndarray:
    """Each row r as the sum of the first levels[r] levels of the untrimmed fit t."""
    from carvq.converter.tiers import all_levels

    codes, cb, _ = all_levels(t)
    V, G, D = codes.shape
    out = np.zeros((V, G, cb.shape[3]), np.float32)
    for k in range(D):
        rows = np.nonzero(levels > k)[0]
        out[rows] = reference.sum_levels(cb[:, k:k + 1], codes[rows, :, k:k + 1], out[rows])
    return out.reshape(V, -1)


def test_trimmed_rows_decode_as_the_fits_first_levels(fit):
    from carvq.converter import tiers

    M, w, t = fit
    V, n = M.shape
    trimmed, how = tiers.trim(t, M, w, 2, 2.4 * V * n / 8)
    lo = trimmed.layout
    assert lo.levels == 2 and lo.hot_levels == 1 and len(lo.tier_rows) == 4, how  # levels 3, 4 and the two hot ones
    assert "tiers" in how
    # tiers are nested: the rows of tier k + 1 are rows of tier k
    starts = lo.tier_starts()
    sets = [set(trimmed.hot_ids[s:s + r].tolist()) for s, r in zip(starts, lo.tier_rows)]
    assert all(b <= a for a, b in zip(sets, sets[1:]))
    levels = np.full(V, 2)
    for s in sets:
        levels[list(s)] += 1
    got = reference.decode(trimmed, np.arange(V))
    assert np.array_equal(got, _prefix_decode(t, levels)), "a trimmed row must decode bit for bit as its prefix"
    # within the budget, the bytes counted from the tensors
    parts = tiers.part_bytes(trimmed)
    assert 8 * sum(parts.values()) / (V * n) <= 2.4
    # frequent rows keep more levels than rare ones on average
    heavy = np.argsort(-w)[:300]
    assert levels[heavy].mean() > levels.mean() + 0.5


def test_more_budget_never_hurts_the_weighted_error(fit):
    from carvq.converter import tiers

    M, w, t = fit
    V, n = M.shape
    errs = []
    for bpw in (1.5, 2.0, 2.5, 3.0):
        trimmed, _ = tiers.trim(t, M, w, 2, bpw * V * n / 8)
        errs.append(float((w * ((M - reference.decode(trimmed, np.arange(V))) ** 2).sum(1)).sum()))
    assert errs == sorted(errs, reverse=True), errs


def test_trim_refuses_what_it_cannot_do(fit):
    from carvq.converter import tiers

    M, w, t = fit
    V, n = M.shape
    with pytest.raises(CarvqError, match="tier-floor 4"):
        tiers.trim(t, M, w, 4, 2.0 * V * n / 8)
    with pytest.raises(CarvqError, match="below the floor"):
        tiers.trim(t, M, w, 3, 1.0 * V * n / 8)
    # 12 levels trimmed to a floor of 2 would be 10 tiers: more than a file holds
    lo = fmt.Layout(V, n, 8, 12, 16)
    deep = fmt.CarvqTensors(lo, fmt.pack_codes(np.zeros((V, n // 8, 12), np.uint8)), np.zeros((n // 8, 12, 16, 8), np.float32))
    with pytest.raises(CarvqError, match="at most 8"):
        tiers.trim(deep, M, w, 2, 9.0 * V * n / 8)


def test_tiered_file_round_trip_and_version(fit, tmp_path):
    from carvq.converter import tiers

    M, w, t = fit
    V, n = M.shape
    trimmed, _ = tiers.trim(t, M, w, 2, 2.4 * V * n / 8)
    assert trimmed.layout.hot_map, "a trim's nested tiers store their ids as a hot map"
    # the same tensors with the ids as a hot map (version 7, what the converter writes) and as
    # int32 ids (version 4, what earlier writers wrote): both read back to the same rows
    as_ids = dataclasses.replace(trimmed, layout=dataclasses.replace(trimmed.layout, hot_map=False))
    for tensors, version, present, absent in [(trimmed, fmt.HOT_MAP_FORMAT_VERSION, fmt.Tensor.HOT_MAP, fmt.Tensor.HOT_IDS),
                                              (as_ids, fmt.TIERS_FORMAT_VERSION, fmt.Tensor.HOT_IDS, fmt.Tensor.HOT_MAP)]:
        path = tmp_path / f"tiered-v{version}.gguf"
        _write_bare(path, tensors)
        reader = gio.open_gguf(path)
        assert gio.field_value(reader, fmt.Key.VERSION) == version
        assert gio.tensor_by_name(reader, present) is not None and gio.tensor_by_name(reader, absent) is None
        back = fmt.read_tensors(reader)
        assert back.layout == tensors.layout and np.array_equal(back.hot_ids, trimmed.hot_ids)
        assert np.array_equal(reference.decode(back, np.arange(V)), reference.decode(trimmed, np.arange(V)))
    # the map costs a bit a row of each tier's parent instead of 4 bytes a tier row
    lo = trimmed.layout
    assert lo.hot_map_bytes == sum((b + 7) // 8 for b in (V, *lo.tier_rows[:-1])) < 4 * lo.hot_rows


def test_hot_map_packs_nested_tiers_and_refuses_a_wrong_map():
    lo = fmt.Layout(20, 8, 8, 1, 16, hot_rows=9, hot_levels=1, hot_tiers=(6, 3), hot_map=True)
    ids = np.array([0, 3, 4, 9, 17, 19, 3, 9, 19], np.int32)
    packed = fmt.pack_hot_map(lo, ids)
    assert packed.tolist() == [0b00011001, 0b00000010, 0b00001010, 0b00101010]  # LSB first: tokens, then tier 0's rows
    assert np.array_equal(fmt.unpack_hot_map(lo, packed), ids)
    with pytest.raises(CarvqError, match="within the tier before"):
        fmt.pack_hot_map(lo, np.array([0, 3, 4, 9, 17, 19, 3, 10, 19], np.int32))  # 10 is not in tier 0
    bad = packed.copy()
    bad[0] |= 0b10  # token 1 marked too: 7 rows in tier 0
    with pytest.raises(CarvqError, match="tier 0's bitmap marks 7 rows"):
        fmt.unpack_hot_map(lo, bad)
    bad = packed.copy()
    bad[3] |= 0b01000000  # tier 1's bitmap covers tier 0's 6 rows: bit 6 is padding
    with pytest.raises(CarvqError, match="padding bit"):
        fmt.unpack_hot_map(lo, bad)
    with pytest.raises(CarvqError, match="bytes, expected 4"):
        fmt.unpack_hot_map(lo, packed[:3])


def _write_bare(path, tensors: fmt.CarvqTensors) -> None:
    """A minimal llama GGUF around `tensors` (enough for the format's reader)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.embedding_length", tensors.layout.n_embd)
    fmt.add_metadata(writer, tensors.layout, fmt.Provenance("F32", False, 0.0, 0.0))
    for name, arr in tensors.named():
        writer.add_tensor(name, arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_layout_checks_tiers():
    lo = fmt.Layout(10, 8, 8, 1, 16, hot_rows=15, hot_levels=1, hot_tiers=(10, 5))
    lo.check()  # a row may be in every tier
    for tiers_, why in [((10, 4), "together"), ((15, 0), "each needs"), ((1,) * 9 + (6,), "outside 1..8")]:
        with pytest.raises(CarvqError, match=why):
            fmt.Layout(10, 8, 8, 1, 16, hot_rows=15, hot_levels=1, hot_tiers=tiers_).check()


def test_converted_tiered_model_loads_and_decodes_exactly(tiered_tiny, workdir):
    """A tiered file (version 7: its ids as a hot map) whose rows the patched llama.cpp decodes
    bit for bit as the NumPy reference (no adaptor); and the same file with the ids as hot_ids
    (what versions 4 to 6 store) decodes to the same rows."""
    from conftest import rewrite_gguf

    from carvq.reference import decode_rows
    from carvq.runtime.model import Model

    out, report, target = tiered_tiny
    assert any("hot tiers" in note for note in report.notes), report.notes
    assert report.lookup_bytes * 8 / report.n_weights <= target
    t = fmt.read_tensors(out)
    assert len(t.layout.tier_rows) >= 2 and t.layout.levels == 2 and t.layout.hot_map
    as_ids = workdir / "llama.tiered.hot-ids.carvq.gguf"
    rewrite_gguf(out, as_ids, version=fmt.TRANSFORM_FORMAT_VERSION, drop_keys=[fmt.Key.HOT_MAP],
                 replace={fmt.Tensor.HOT_MAP: lambda _: t.hot_ids}, rename={fmt.Tensor.HOT_MAP: fmt.Tensor.HOT_IDS})
    assert not fmt.read_layout(gio.open_gguf(as_ids)).hot_map
    ids = np.unique(np.concatenate([t.hot_ids[:8], np.arange(0, t.layout.n_vocab, 7)]))
    expect = decode_rows(out, ids)
    for path in (out, as_ids):
        with Model(path, n_ctx=64) as model:
            got = model.embedding_rows(ids.tolist())
        assert np.array_equal(got, expect), f"the tiered decode must be bit-exact ({path.name})"


def test_a_tiered_lookup_screens_with_its_first_tier(tiered_tiny):
    """The screened head on a tied model without an index of its own scans the lookup's codes:
    of a tiered lookup, the shared levels and the first tier (screen.lookup_as_index); its
    candidates are exactly that reference's top-k, and exact."""
    from conftest import check_screened_candidates

    from test_screened_head import TEXT_IDS

    out, _, _ = tiered_tiny
    assert len(fmt.read_tensors(out).layout.tier_rows) >= 2
    assert fmt.read_tensors(out).screen is None
    check_screened_candidates(out, TEXT_IDS, k=24)


@pytest.mark.parametrize("V, n", [(49152, 576), (262144, 640)])  # SmolLM2's and Gemma-3's shapes
def test_the_tiered_default_trims_the_wider_fit_measured_best(V, n):
    """deeper_fit: at 1.6 and 2.1 bpw the bench's family at 2.5 and 3.0 bpw (4 hot levels on more
    rows; Gemma-3 KLD -19 % and -20 %), at 3.0 the point one level deeper; the floor one level
    under the configuration, two from 4 levels on (SmolLM2 at 2.1: KLD -9 %); an explicit group
    size keeps its own, one level deeper; an adaptor has no tiers."""
    from dataclasses import replace

    from carvq.converter import config as cfgmod
    from carvq.converter import search, tiers
    from carvq.converter.config import Config

    for target, (levels, hot_levels, floor) in {1.6: (4, 4, 2), 2.1: (5, 4, 2), 3.0: (6, 4, 3)}.items():
        cfg = search.measured_point(Config(), V, n, target)
        fit, got_floor, trim_to = tiers.deeper_fit(cfg, V, n)
        assert (fit.levels, fit.hot_levels, got_floor) == (levels, hot_levels, floor), target
        assert trim_to == pytest.approx(cfgmod.bpw(cfg, V, n)) and trim_to <= target
        assert cfgmod.bpw(fit, V, n) > target  # the fit is wider than the budget; the trim brings it back
    own = Config(group_size=4, levels=2, hot_bpw=0.1).resolve_hot(V, n)
    fit, got_floor, _ = tiers.deeper_fit(own, V, n)
    assert (fit.group_size, fit.levels, fit.hot_rows, got_floor) == (4, 3, own.hot_rows, 1)
    assert tiers.deeper_fit(replace(own, adaptor_rank=4, adaptor_hidden=64), V, n) is None


def _weighted_error(M, w, t: fmt.CarvqTensors) -> float:
    return float((w * ((M - reference.decode(t, np.arange(M.shape[0]))) ** 2).sum(1)).sum())


@pytest.mark.parametrize("codebook_type", [np.float32, np.float16])
def test_polish_lowers_the_error_and_keeps_the_layout(fit, tmp_path, codebook_type):
    from carvq.converter import polish, tiers

    M, w, t = fit
    V, n = M.shape
    t = fmt.CarvqTensors(t.layout, t.codes, t.codebooks.astype(codebook_type), hot_ids=t.hot_ids,
                         hot_codes=t.hot_codes, hot_codebooks=t.hot_codebooks.astype(codebook_type))
    trimmed, _ = tiers.trim(t, M, w, 2, 2.4 * V * n / 8)
    polished, how = polish.polish(trimmed, M, w)
    assert polished.layout == trimmed.layout and np.array_equal(polished.hot_ids, trimmed.hot_ids)
    assert tiers.part_bytes(polished) == tiers.part_bytes(trimmed)  # same bytes: the bpw does not move
    assert polished.codebooks.dtype == codebook_type and polished.hot_codebooks.dtype == codebook_type
    before, after = _weighted_error(M, w, trimmed), _weighted_error(M, w, polished)
    assert after < 0.97 * before, how  # random data: about -10 %
    assert how.startswith("polished")
    # the note's figures are the decoded file's (the stored codebook type included)
    assert f"{after:.4g}" in how
    path = tmp_path / "polished.gguf"
    _write_bare(path, polished)
    back = fmt.read_tensors(path)
    assert np.array_equal(reference.decode(back, np.arange(V)), reference.decode(polished, np.arange(V)))


def test_polish_never_raises_the_error(fit):
    """Every step of it is a descent step (a vector's least-squares value, a code nearer than the
    one it replaces, a beam path kept only where better), whatever the number of rounds."""
    from carvq.converter import polish, tiers

    M, w, t = fit
    V, n = M.shape
    trimmed, _ = tiers.trim(t, M, w, 2, 2.0 * V * n / 8)
    before = _weighted_error(M, w, trimmed)
    errs = [_weighted_error(M, w, polish.polish(trimmed, M, w, rounds=r)[0]) for r in range(4)]
    assert all(e < before for e in errs), (before, errs)
    assert errs[2] <= errs[0] * (1 + 1e-6), errs  # the k-means rounds before the beam help


def test_polish_refuses_tiers_that_are_not_nested(fit):
    from carvq.converter import polish, tiers

    M, w, t = fit
    V, n = M.shape
    trimmed, _ = tiers.trim(t, M, w, 2, 2.4 * V * n / 8)
    lo = trimmed.layout
    first, second = lo.tier_rows[0], lo.tier_rows[1]
    ids = trimmed.hot_ids.copy()
    outside = np.setdiff1d(np.arange(V), ids[:first])[:second].astype(np.int32)  # rows not in tier 0
    ids[first:first + outside.size] = outside
    ids[first:first + second].sort()
    bad = fmt.CarvqTensors(lo, trimmed.codes, trimmed.codebooks, hot_ids=ids, hot_codes=trimmed.hot_codes,
                           hot_codebooks=trimmed.hot_codebooks)
    with pytest.raises(CarvqError, match="nested"):
        polish.polish(bad, M, w)
