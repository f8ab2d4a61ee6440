"""The screened head's scan (patches/src/carvq-screen.c) against its NumPy reference
(src/carvq/screen.py): tables, scores and top-k bit for bit, on every SIMD path built here."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from carvq import format as fmt
from carvq import screen
from conftest import PI_PROFILES

cffi = pytest.importorskip("cffi")

ROOT = Path(__file__).resolve().parents[1]
SRC = [ROOT / "patches" / "src" / "carvq.c", ROOT / "patches" / "src" / "carvq-screen.c"]
CC = os.environ.get("CC", "cc")
FLAGS = ["-std=c11", "-O2", "-ffp-contract=off", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror", "-lm"]


def _header_cdef() -> str:
    from test_c_decoder import header_cdef

    return header_cdef(ROOT / "patches" / "src" / "carvq.h") + "\n" + header_cdef(ROOT / "patches" / "src" / "carvq-screen.h")


def _cpu_has(*flags: str) -> bool:
    try:
        words = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return all(f in words for f in flags)


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    if shutil.which(CC) is None:
        pytest.skip(f"no C compiler {CC!r}")
    out = tmp_path_factory.mktemp("screen")
    variants = {"scalar": ["-DCARVQ_NO_SIMD"], "default": []}
    if _cpu_has("avx2"):
        variants["avx2"] = ["-mavx2"]
    cdef = _header_cdef()
    built = {}
    for name, extra in variants.items():
        so = out / f"libscreen_{name}.so"
        subprocess.run([CC, *extra, "-o", str(so), *map(str, SRC), *FLAGS], check=True)
        ffi = cffi.FFI()
        ffi.cdef(cdef)
        built[name] = (ffi, ffi.dlopen(str(so)))
    return built


@pytest.fixture(params=["scalar", "default", "avx2"])
def lib(request, libs):
    if request.param not in libs:
        pytest.skip(f"build {request.param} not available here")
    return libs[request.param]


def test_simd_names(libs):
    ffi, lib = libs["scalar"]
    assert ffi.string(lib.carvq_screen_simd_name()) == b"scalar"
    if "avx2" in libs:
        ffi, lib = libs["avx2"]
        assert ffi.string(lib.carvq_screen_simd_name()) == b"avx2"


def _case(rng, V=None, d=None, L=None, K=None, N=None, Lh=None, f16=False, wild=False, zero_h=False):
    d = d or int(rng.choice([1, 2, 3, 4, 5, 8, 16]))
    G = int(rng.integers(1, 30))
    L = L or int(rng.choice([1, 2, 3, 4, 6]))
    K = K or int(rng.integers(2, 17))
    V = V or int(rng.integers(1, 300))
    N = int(rng.integers(0, V + 1)) if N is None else N
    Lh = (int(rng.integers(1, 5)) if N else 0) if Lh is None else Lh
    layout = fmt.Layout(V, G * d, d, L, K, hot_rows=N, hot_levels=Lh)
    codes = fmt.pack_codes(rng.integers(0, K, size=(V, G, L), dtype=np.uint8))
    dtype = np.float16 if f16 else np.float32
    cb = (rng.standard_normal((G, L, K, d)) * rng.choice([1e-3, 1.0, 30.0])).astype(dtype)
    hot_cb = (rng.standard_normal((G, max(Lh, 1), K, d)) * 0.1).astype(dtype)[:, :Lh]
    hot_ids = np.sort(rng.choice(V, size=N, replace=False)).astype(np.int32)
    hot_codes = fmt.pack_codes(rng.integers(0, K, size=(N, G, Lh), dtype=np.uint8)) if N else np.zeros((0, 1), np.uint8)
    h = (rng.standard_normal(G * d) * rng.choice([0.1, 1.0, 10.0])).astype(np.float32)
    if zero_h:  # every table constant: R = 0, all scores tie
        h[:] = 0.0
    if wild:  # ties, exact zeros and negative zeros
        h[rng.random(h.size) < 0.3] = 0.0
        h[rng.random(h.size) < 0.1] = -0.0
        cb[..., : max(1, d // 2)] = np.round(cb[..., : max(1, d // 2)])
    return layout, codes, cb, hot_ids, hot_codes, np.ascontiguousarray(hot_cb), h


def _layout_c(ffi, lo: fmt.Layout):
    lay = ffi.new("struct carvq_layout *")
    lay.n_vocab, lay.n_embd, lay.format_version = lo.n_vocab, lo.n_embd, 2
    lay.group_size, lay.levels, lay.codebook_size = lo.group_size, lo.levels, lo.codebook_size
    lay.hot_rows, lay.hot_levels = lo.hot_rows, lo.hot_levels
    return lay


def _ptr(ffi, ctype, arr):
    assert arr.flags.c_contiguous
    return ffi.cast(ctype, arr.ctypes.data)


def _run_c(lib_pair, layout, codes, cb, hot_ids, hot_codes, hot_cb, h, k):
    ffi, lib = lib_pair
    lay = _layout_c(ffi, layout)
    assert lib.carvq_layout_check(lay, ffi.NULL, 0) == 0
    nbytes = lib.carvq_screen_blocks_nbytes(lay)
    blocks = np.empty(nbytes, np.uint8)
    lib.carvq_screen_relayout(lay, _ptr(ffi, "uint8_t *", np.ascontiguousarray(codes)), _ptr(ffi, "uint8_t *", blocks))
    G = layout.n_groups
    GL = G * layout.levels
    q = np.full((GL + GL % 2) * 16, 0xAB, np.uint8)  # garbage: the build must overwrite all of it
    GLh = G * layout.hot_levels
    qh = np.full(max(2, GLh + GLh % 2) * 16, 0xAB, np.uint8)
    work = np.empty(lib.carvq_screen_work_floats(lay), np.float32)
    t = ffi.new("struct carvq_screen_tables *")
    cb_type = 1 if cb.dtype == np.float16 else 0
    hot_cb_arr = hot_cb if layout.hot_rows else np.zeros(1, cb.dtype)
    lib.carvq_screen_tables_build(lay, _ptr(ffi, "void *", cb), _ptr(ffi, "void *", hot_cb_arr), cb_type,
                                  _ptr(ffi, "float *", h), _ptr(ffi, "float *", work), _ptr(ffi, "uint8_t *", q),
                                  _ptr(ffi, "uint8_t *", qh), t)
    V = layout.n_vocab
    scores = np.full(V + 8, -7, np.int32)  # sentinels past V: the last partial block writes none
    n_blocks = -(-V // screen.BLOCK)
    cut = n_blocks // 2  # two calls, as two threads would make them
    for b0, b1 in ((0, cut), (cut, n_blocks)):
        lib.carvq_screen_scan(lay, _ptr(ffi, "uint8_t *", blocks), _ptr(ffi, "uint8_t *", q), b0, b1,
                              _ptr(ffi, "int32_t *", scores))
    assert (scores[V:] == -7).all(), "the scan wrote past the last row"
    if layout.hot_rows:
        shared = scores.copy()
        lib.carvq_screen_hot_add(lay, _ptr(ffi, "int32_t *", hot_ids), _ptr(ffi, "uint8_t *", np.ascontiguousarray(hot_codes)),
                                 _ptr(ffi, "uint8_t *", qh), t.hot_offset, 0, layout.hot_rows, _ptr(ffi, "int32_t *", scores))
        # the block path, in two pieces as two threads take them, gives the same scores
        hot_blocks = np.empty(lib.carvq_screen_hot_blocks_nbytes(lay), np.uint8)
        lib.carvq_screen_hot_relayout(lay, _ptr(ffi, "uint8_t *", np.ascontiguousarray(hot_codes)),
                                      _ptr(ffi, "uint8_t *", hot_blocks))
        cut = layout.hot_rows // 3
        for j0, j1 in ((0, cut), (cut, layout.hot_rows)):
            lib.carvq_screen_hot_scan(lay, _ptr(ffi, "uint8_t *", hot_blocks), _ptr(ffi, "uint8_t *", qh), t.hot_offset,
                                      _ptr(ffi, "int32_t *", hot_ids), j0, j1, _ptr(ffi, "int32_t *", shared))
        assert np.array_equal(shared, scores), "hot_scan differs from hot_add"
    ids = np.full(max(k, 1), -1, np.int32)
    hist = np.empty(65536, np.uint32)
    keys = np.empty(max(k, 1), np.int64)
    n = lib.carvq_screen_topk(_ptr(ffi, "int32_t *", scores), V, k, _ptr(ffi, "int32_t *", ids),
                              _ptr(ffi, "uint32_t *", hist), _ptr(ffi, "int64_t *", keys))
    sel = np.full(max(k, 1), -1, np.int32)
    m = lib.carvq_screen_select(_ptr(ffi, "int32_t *", scores), V, k, _ptr(ffi, "int32_t *", sel),
                                _ptr(ffi, "uint32_t *", hist))
    return dict(blocks=blocks, q=q.reshape(-1, 16), qh=qh.reshape(-1, 16), t=t, scores=scores[:V], top=ids[:n],
                selected=sel[:m])


def _check(lib_pair, rng, k=None, **kw):
    layout, codes, cb, hot_ids, hot_codes, hot_cb, h = _case(rng, **kw)
    k = int(rng.integers(0, layout.n_vocab + 5)) if k is None else k
    got = _run_c(lib_pair, layout, codes, cb, hot_ids, hot_codes, hot_cb, h, k)
    want_t = screen.tables(layout, cb, hot_cb, h)
    GL = layout.n_groups * layout.levels
    case = f"{layout} f16={cb.dtype == np.float16} k={k}"
    assert np.array_equal(got["blocks"], screen.relayout(layout, codes)), case
    assert np.array_equal(got["q"][:GL], want_t.q), case
    assert (got["q"][GL:] == 0).all(), case  # the padding table
    if layout.hot_rows:
        assert np.array_equal(got["qh"][: len(want_t.qh)], want_t.qh), case
    t = got["t"]
    assert (t.qmax, t.hot_offset) == (want_t.qmax, want_t.hot_offset), case
    assert np.float32(t.scale).tobytes() == np.float32(want_t.scale).tobytes(), case
    assert np.float32(t.bias).tobytes() == np.float32(want_t.bias).tobytes(), case
    want_scores = screen.scores(layout, codes, want_t, hot_ids, hot_codes)
    assert np.array_equal(got["scores"], want_scores), case
    want_top = screen.topk(want_scores, k)
    assert np.array_equal(got["top"], want_top), case
    assert np.array_equal(got["selected"], np.sort(want_top)), case  # the same set, in id order
    return layout, got, want_t


def test_row_codes_read_back_from_the_blocks(lib):
    """carvq_screen_row_codes inverts the relayout row by row: the lookup decodes from the blocks
    (odd G*L, V not a multiple of the block, one row) and needs the file's packed row exactly."""
    ffi, clib = lib
    rng = np.random.default_rng(5)
    for V, d, L in ((1, 4, 3), (33, 2, 1), (70, 8, 3), (96, 1, 5)):
        layout, codes, *_ = _case(rng, V=V, d=d, L=L, N=0)
        codes = np.ascontiguousarray(codes)
        lay = _layout_c(ffi, layout)
        blocks = np.empty(clib.carvq_screen_blocks_nbytes(lay), np.uint8)
        clib.carvq_screen_relayout(lay, _ptr(ffi, "uint8_t *", codes), _ptr(ffi, "uint8_t *", blocks))
        row = np.empty(codes.shape[1], np.uint8)
        for r in range(V):
            row[:] = 0xEE  # garbage: every byte must be written
            clib.carvq_screen_row_codes(lay, _ptr(ffi, "uint8_t *", blocks), r, _ptr(ffi, "uint8_t *", row))
            assert np.array_equal(row, codes[r]), f"{layout} row {r}"


def test_relayout_by_slices_is_the_whole_relayout(lib):
    """carvq_screen_relayout_rows over slices that split blocks (the loader re-lays a mapped table
    a slice at a time, releasing each) writes the same blocks as one carvq_screen_relayout."""
    ffi, clib = lib
    rng = np.random.default_rng(8)
    for V, d, L in ((1, 4, 3), (70, 8, 3), (257, 2, 5)):
        layout, codes, *_ = _case(rng, V=V, d=d, L=L, N=0)
        codes = np.ascontiguousarray(codes)
        lay = _layout_c(ffi, layout)
        blocks = np.zeros(clib.carvq_screen_blocks_nbytes(lay), np.uint8)
        cuts = [0, *sorted(rng.choice(np.arange(1, V + 1), size=min(V, 4), replace=False)), V]
        for r0, r1 in zip(cuts, cuts[1:]):
            clib.carvq_screen_relayout_rows(lay, _ptr(ffi, "uint8_t *", codes), int(r0), int(r1),
                                            _ptr(ffi, "uint8_t *", blocks))
        assert np.array_equal(blocks, screen.relayout(layout, codes)), layout


def test_coded_rows_sum_matches_reference(lib):
    """A coded head's exact logits from the blocks (carvq_screen_rows_sum) are the NumPy
    reference's bit for bit: odd G*L, K < 16, V not a multiple of the block, repeated rows."""
    ffi, clib = lib
    rng = np.random.default_rng(9)
    for _ in range(20):
        layout, codes, cb, *_rest, h = _case(rng, N=0)
        codes = np.ascontiguousarray(codes)
        lay = _layout_c(ffi, layout)
        blocks = np.ascontiguousarray(screen.relayout(layout, codes))
        tables = np.ascontiguousarray(screen.coded_tables(layout, cb, h))
        rows = rng.integers(0, layout.n_vocab, size=int(rng.integers(1, 50))).astype(np.int32)
        got = np.empty(len(rows), np.float32)
        clib.carvq_screen_rows_sum(lay, _ptr(ffi, "uint8_t *", blocks), _ptr(ffi, "int32_t *", rows), len(rows),
                                   _ptr(ffi, "float *", tables), _ptr(ffi, "float *", got))
        want = screen.rows_sum(layout, codes, rows, tables)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), layout


@pytest.mark.parametrize("f16", [False, True], ids=["f32", "f16"])
def test_scan_matches_reference(lib, f16):
    rng = np.random.default_rng(11 + f16)
    for _ in range(60):
        _check(lib, rng, f16=f16)


@pytest.mark.parametrize("n", [1, 7, 64, 640])
def test_projection_matches_reference(lib, n):
    """A screen index's projection h @ P (carvq_screen_project) is the NumPy reference's, bit for
    bit: every output sums its terms in order, whatever the compiler vectorizes."""
    ffi, clib = lib
    rng = np.random.default_rng(n)
    P = (rng.standard_normal((n, n)) * rng.choice([1e-3, 1.0, 50.0])).astype(np.float32)
    h = rng.standard_normal(n).astype(np.float32)
    h[rng.random(n) < 0.2] = 0.0
    out = np.full(n, np.nan, np.float32)
    clib.carvq_screen_project(n, _ptr(ffi, "float *", P), _ptr(ffi, "float *", h), _ptr(ffi, "float *", out))
    assert np.array_equal(out.view(np.uint32), screen.project(P, h).view(np.uint32))


@pytest.mark.parametrize("rank", [1, 2, 3, 8])
def test_screen_fix_matches_reference(lib, rank):
    """The screen correction (format v5): its integer weights and the per-row add are the NumPy
    reference's bit for bit, in two row ranges as two threads take them; weights clamp at
    +-FIX_MAX, a zero scale or a NaN dot product gives weight 0, negative sums floor."""
    ffi, clib = lib
    rng = np.random.default_rng(40 + rank)
    assert clib.CARVQ_SCREEN_FIX_MAX == screen.FIX_MAX
    for case in range(30):
        n, V = int(rng.integers(1, 700)), int(rng.integers(1, 300))
        dirs = (rng.standard_normal((rank, n)) * rng.choice([1e-4, 1.0, 1e3])).astype(np.float32)
        h = rng.standard_normal(n).astype(np.float32)
        if case == 1:
            dirs[0, 0] = np.nan
        scale = float(np.float32(rng.choice([0.0, 1e-6, 0.004, 0.3]) if case > 1 else 0.01))
        fix = rng.integers(-128, 128, (rank, V)).astype(np.int8)
        m = np.full(rank, 12345, np.int32)
        clib.carvq_screen_fix_weights(rank, n, _ptr(ffi, "float *", dirs), _ptr(ffi, "float *", h), scale,
                                      _ptr(ffi, "int32_t *", m))
        want_m = screen.fix_weights(dirs, h, scale)
        assert np.array_equal(m, want_m), (case, m, want_m)
        assert (np.abs(m) <= screen.FIX_MAX).all()
        if case == 1:
            assert m[0] == 0
        base = rng.integers(-50000, 50000, V + 4).astype(np.int32)
        got = base.copy()
        cut = V // 3
        for v0, v1 in ((0, cut), (cut, V)):
            clib.carvq_screen_fix_add(rank, V, _ptr(ffi, "int8_t *", fix), _ptr(ffi, "int32_t *", m), v0, v1,
                                      _ptr(ffi, "int32_t *", got))
        assert np.array_equal(got[:V], screen.fix_add(base[:V], fix, m)), case
        assert np.array_equal(got[V:], base[V:]), "the add wrote past v1"


def test_ties_zeros_and_k_at_least_v(lib):
    rng = np.random.default_rng(5)
    for _ in range(30):
        _check(lib, rng, wild=True, K=2, d=1)
    layout, got, t = _check(lib, rng, zero_h=True, V=100, k=10)
    assert t.scale == 0 and (got["scores"] == got["scores"][0]).all()
    assert got["top"].tolist() == list(range(10))  # all tied: the lowest ids
    for k in (0, 1, 299, 300, 1000):
        _check(lib, rng, V=300, k=k)


def test_block_edges(lib):
    """V around multiples of the block size, one row, odd G*L (a padding table)."""
    rng = np.random.default_rng(9)
    for V in (1, 31, 32, 33, 63, 64, 65, 97):
        _check(lib, rng, V=V, L=3, d=1, N=0)
        _check(lib, rng, V=V, L=1, N=V // 2)


def test_select_wide_score_ranges(libs):
    """Scores spread over more than CARVQ_SCREEN_HIST values take the two-level histogram."""
    ffi, lib = libs["default"]
    rng = np.random.default_rng(21)
    for spread, n in ((10, 1000), (70000, 5000), (2**30, 3000), (2**31 - 1, 100)):
        s = rng.integers(-spread // 2, spread // 2 + 1, size=n).astype(np.int32)
        s[rng.integers(0, n, size=n // 4)] = s[0]  # many ties
        for k in (1, 7, n // 3, n - 1, n):
            ids = np.empty(k, np.int32)
            keys = np.empty(k, np.int64)
            hist = np.empty(65536, np.uint32)
            got = lib.carvq_screen_topk(_ptr(ffi, "int32_t *", s), n, k, _ptr(ffi, "int32_t *", ids),
                                        _ptr(ffi, "uint32_t *", hist), _ptr(ffi, "int64_t *", keys))
            assert got == k and np.array_equal(ids, screen.topk(s, k)), (spread, n, k)


def test_select_on_vocabulary_sized_scores(lib):
    """Vocabulary-sized inputs take the fast path (a cut from every 64th row, then the exact
    threshold among the rows above it); ties, an all-equal vector, extremes the sample does not
    see and a cut the sample misjudges fall back to the full histogram or are collected anyway.
    Either way: exactly the reference's rows, in id order."""
    ffi, clib = lib
    rng = np.random.default_rng(5)
    n_cases = 0
    for n in (49152, 262144):
        normal = (20000 + rng.normal(0, 3000, n)).astype(np.int32)
        frequent_first = normal.copy()
        frequent_first[: n // 16] += 4000  # low ids score high, as frequent tokens do
        coarse = rng.integers(0, 40, n).astype(np.int32)  # every score shared by thousands of rows
        # extremes between the sampled rows (every 64th): the cut's span comes from the sample
        outliers = normal.copy()
        outliers[1::997] = np.iinfo(np.int32).max
        outliers[2::991] = np.iinfo(np.int32).min
        for s in (normal, frequent_first, coarse, np.full(n, 7, np.int32), outliers):
            for k in (1, 40, 1024, 8192, 16384, 30000):
                sel = np.full(k, -1, np.int32)
                hist = np.empty(65536, np.uint32)
                m = clib.carvq_screen_select(_ptr(ffi, "int32_t *", s), n, k, _ptr(ffi, "int32_t *", sel),
                                             _ptr(ffi, "uint32_t *", hist))
                assert m == k and np.array_equal(sel, np.sort(screen.topk(s, k))), (n, k, s[:4])
                n_cases += 1
    assert n_cases == 60


def test_scores_approximate_the_logits(libs):
    """score * scale + bias is the codes' logit h . row, up to the table rounding."""
    rng = np.random.default_rng(3)
    layout, codes, cb, hot_ids, hot_codes, hot_cb, h = _case(rng, V=200, N=50, Lh=2)
    got = _run_c(libs["scalar"], layout, codes, cb, hot_ids, hot_codes, hot_cb, h, 5)
    tensors = fmt.CarvqTensors(layout, codes, cb, hot_ids=hot_ids, hot_codes=hot_codes, hot_codebooks=hot_cb)
    from carvq.reference import decode

    exact = decode(tensors, np.arange(layout.n_vocab)) @ h
    t = got["t"]
    approx = got["scores"] * np.float64(t.scale) + t.bias
    tables = layout.n_groups * (layout.levels + layout.hot_levels)
    assert np.abs(approx - exact).max() <= tables * t.scale  # at most half a unit per table, twice over


# ---- tests/fuzz/screen_check.c: the SIMD scan against the scalar one, natively and as a
# static aarch64 binary under qemu (the NEON path)

CHECK = ROOT / "tests" / "fuzz" / "screen_check.c"


def _check_flags() -> list[str]:
    return ["-std=c11", "-O2", "-ffp-contract=off", f"-I{ROOT / 'patches' / 'src'}", str(CHECK), *map(str, SRC), "-lm"]


def test_scan_check_native(tmp_path):
    if shutil.which(CC) is None:
        pytest.skip("no C compiler")
    exe = tmp_path / "screen_check"
    native = ["-mavx2"] if _cpu_has("avx2") else []
    subprocess.run([CC, *native, *_check_flags(), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe), "400", "3"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "400 passed, 0 failed" in out.stdout


@pytest.mark.parametrize("profile", PI_PROFILES, ids=lambda p: p.name)
def test_scan_check_neon_under_qemu(tmp_path, profile):
    """The NEON scan, built for each Raspberry Pi profile and run on that profile's core."""
    cross, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if not cross or not qemu:
        pytest.skip("needs aarch64-linux-gnu-gcc and qemu-aarch64 (Debian: gcc-aarch64-linux-gnu qemu-user)")
    exe = tmp_path / "screen_check_neon"
    subprocess.run([cross, "-static", f"-march={profile.march}", *_check_flags(), "-o", str(exe)], check=True)
    out = subprocess.run([qemu, "-cpu", profile.qemu_cpu, str(exe), "200", "5"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "scan=neon" in out.stdout and "200 passed, 0 failed" in out.stdout
