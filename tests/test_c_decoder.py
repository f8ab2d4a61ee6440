"""The C decoder (patches/src/carvq.c) against the NumPy reference (src/carvq/reference.py).

carvq.c is built into throw-away shared libraries (portable default flags, -march=native when
the CPU has AVX2+F16C, and a scalar-only build) and loaded with cffi in ABI mode. The RVQ
decode must match reference.decode_rvq bit for bit on every path.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import subprocess
import re
from pathlib import Path

import numpy as np
import pytest

cffi = pytest.importorskip("cffi")

from carvq import format as fmt
from carvq import reference
from carvq.errors import CarvqError
from conftest import PI_PROFILES

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "patches" / "src" / "carvq.c"
HEADER = ROOT / "patches" / "src" / "carvq.h"
CC = os.environ.get("CC", "cc")
BASE_FLAGS = ["-std=c11", "-O2", "-ffp-contract=off", "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror"]


def header_cdef(path: Path) -> str:
    """carvq.h as cffi's cdef reads it: the header itself, not a copy of its declarations.
    Comments, the C++ guards and every preprocessor line but integer #defines are dropped."""
    text = re.sub(r"//[^\n]*", "", path.read_text())
    text = re.sub(r"#ifdef __cplusplus.*?#endif", "", text, flags=re.S)
    keep = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#") or re.match(r"\s*#define \w+\s+\d+\s*$", ln)]
    return "\n".join(keep)


CDEF = header_cdef(HEADER)


def _cpu_has(*flags: str) -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    words = set(text.split())
    return all(f in words for f in flags)


class Lib:
    def __init__(self, name: str, path: Path):
        self.name = name
        self.ffi = cffi.FFI()
        self.ffi.cdef(CDEF)
        self.lib = self.ffi.dlopen(str(path))

    def simd(self, cb_type: int) -> str:
        return self.ffi.string(self.lib.carvq_simd_name(cb_type)).decode()


@pytest.fixture(scope="module")
def libs(tmp_path_factory) -> dict[str, Lib]:
    if shutil.which(CC) is None:
        pytest.skip(f"no C compiler {CC!r}")
    out = tmp_path_factory.mktemp("carvq_c")
    variants = {"default": [], "scalar": ["-DCARVQ_NO_SIMD"]}
    if _cpu_has("avx2", "f16c"):
        variants["native"] = ["-march=native"]
    built = {}
    for name, extra in variants.items():  # one compile at a time
        so = out / f"libcarvq_{name}.so"
        subprocess.run([CC, *BASE_FLAGS, *extra, "-o", str(so), str(SRC)], check=True)
        built[name] = Lib(name, so)
    return built


VARIANTS = ["default", "native", "scalar"]


@pytest.fixture(params=VARIANTS)
def lib(request, libs) -> Lib:
    if request.param not in libs:
        pytest.skip(f"build {request.param} not available on this machine")
    return libs[request.param]


def make_layout(lib: Lib, V, n, d, L, K, m=0, h=0, version=1, N=0, Lh=0, tiers=()):
    lay = lib.ffi.new("struct carvq_layout *")
    lay.n_vocab, lay.n_embd, lay.format_version = V, n, version
    lay.group_size, lay.levels, lay.codebook_size = d, L, K
    lay.adaptor_rank, lay.adaptor_hidden = m, h
    lay.hot_rows, lay.hot_levels = N, Lh
    lay.hot_tiers = len(tiers)  # may exceed the array, for the check that refuses it
    for t, rows in enumerate(tiers[:fmt.MAX_HOT_TIERS]):
        lay.hot_tier_rows[t] = rows
    return lay


def check_msg(lib: Lib, fn, *args) -> tuple[int, str]:
    err = lib.ffi.new("char[]", 256)
    rc = fn(*args, err, 256)
    return rc, lib.ffi.string(err).decode()


def ptr(lib: Lib, ctype: str, arr: np.ndarray):
    assert arr.flags.c_contiguous
    return lib.ffi.cast(ctype, arr.ctypes.data)


# ---- buffers that end at a PROT_NONE page: an over-read or over-write past them faults ----

_PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_keep: list = []  # guarded mappings stay mapped for the whole session


def guarded(shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    data_pages = (nbytes + _PAGE - 1) // _PAGE
    mm = mmap.mmap(-1, (data_pages + 1) * _PAGE)
    base = np.frombuffer(mm, np.uint8)
    addr = base.ctypes.data
    if _libc.mprotect(ctypes.c_void_p(addr + data_pages * _PAGE), _PAGE, 0) != 0:
        raise OSError(ctypes.get_errno(), "mprotect")
    start = data_pages * _PAGE - nbytes
    _keep.append(mm)
    return base[start:start + nbytes].view(dtype).reshape(shape)


# ---- random cases -----------------------------------------------------------------------

SPECIAL_F32 = np.array([0.0, -0.0, 1e-45, -1e-45, 1.17549435e-38, 3.4e38, -3.4e38, np.inf, -np.inf, 1.0, -1.0],
                       np.float32)


def random_codebooks(rng, shape, f16: bool) -> np.ndarray:
    if f16:
        cb = rng.standard_normal(shape).astype(np.float16)
        bits = cb.view(np.uint16)
        wild = rng.random(shape) < 0.1  # arbitrary half bit patterns: subnormals, +-0, inf, huge
        raw = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
        raw = np.where((raw & 0x7C00) == 0x7C00, raw & 0x83FF, raw)  # NaN/inf -> subnormal or zero
        raw[rng.random(shape) < 0.01] = 0x7C00  # a few infs
        bits[wild] = raw[wild]
        return cb
    cb = (rng.standard_normal(shape) * rng.choice([1e-3, 1.0, 1e3])).astype(np.float32)
    wild = rng.random(shape) < 0.05
    cb[wild] = rng.choice(SPECIAL_F32, size=int(wild.sum()))
    return cb


def random_case(rng, d=None, L=None, K=None):
    d = d if d is not None else int(rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 15, 16, 17, 20, 24, 32, 33]))
    G = int(rng.integers(1, 14)) if rng.random() < 0.8 else int(rng.integers(14, 80))
    L = L if L is not None else int(rng.choice([1, 2, 3, 4, 5, 7, 8, 16]))
    K = K if K is not None else int(rng.integers(2, 17))
    V = int(rng.integers(1, 40))
    return V, G * d, d, L, K


def run_decode(lib: Lib, scalar: bool, V, n, d, L, K, f16: bool, rng):
    G = n // d
    codes = rng.integers(0, K, size=(V, G, L), dtype=np.uint8)
    packed_np = fmt.pack_codes(codes)
    packed = guarded(packed_np.shape, np.uint8)
    packed[...] = packed_np
    cb_np = random_codebooks(rng, (G, L, K, d), f16)
    cb = guarded(cb_np.shape, cb_np.dtype)
    cb[...] = cb_np

    n_ids = int(rng.integers(0, 50))
    ids_np = rng.integers(0, V, size=n_ids).astype(np.int32)  # with replacement: repeats
    if n_ids > 3:
        ids_np[1] = ids_np[0]
    ids = guarded(ids_np.shape, np.int32)
    ids[...] = ids_np
    first = int(rng.integers(0, n_ids + 1))
    last = int(rng.integers(first, n_ids + 1))
    stride = n + int(rng.choice([0, 0, 1, 3, 8]))
    sentinel = np.uint32(0x7FBADBAD)
    out = guarded((max(n_ids, 1), stride), np.float32)
    out.view(np.uint32)[...] = sentinel

    lay = make_layout(lib, V, n, d, L, K)
    assert lib.lib.carvq_layout_check(lay, lib.ffi.NULL, 0) == 0
    fn = lib.lib.carvq_rows_decode_scalar if scalar else lib.lib.carvq_rows_decode
    fn(lay, ptr(lib, "uint8_t *", packed), ptr(lib, "void *", cb), 1 if f16 else 0,
       ptr(lib, "int32_t *", ids), n_ids, ptr(lib, "float *", out), stride, first, last)

    layout = fmt.Layout(n_vocab=V, n_embd=n, group_size=d, levels=L, codebook_size=K)
    with np.errstate(over="ignore", invalid="ignore"):  # inf/huge codebook values on purpose
        want = reference.decode_rvq(layout, packed_np, cb_np, ids_np[first:last])
    got = out[first:last, :n]
    case = f"V={V} n={n} d={d} L={L} K={K} f16={f16} ids={n_ids} [{first},{last}) stride={stride}"
    assert got.dtype == want.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), case
    untouched = np.ones(out.shape, bool)
    untouched[first:last, :n] = False
    assert np.all(out.view(np.uint32)[untouched] == sentinel), "wrote outside its rows: " + case


@pytest.mark.parametrize("f16", [False, True], ids=["f32", "f16"])
@pytest.mark.parametrize("scalar", [False, True], ids=["dispatch", "scalar"])
def test_decode_random_layouts(lib, scalar, f16):
    rng = np.random.default_rng(1234 + 2 * scalar + f16)
    for _ in range(250):
        run_decode(lib, scalar, *random_case(rng), f16, rng)


def run_hot_decode(lib: Lib, V, n, d, L, K, f16: bool, rng):
    """carvq_rows_decode then carvq_rows_hot_add against decode_rvq then add_hot, bit for bit;
    half the cases with hot tiers (version 4), whose id sets may overlap."""
    G = n // d
    Lh = int(rng.choice([1, 2, 3, 4, 7, 16]))
    tiers = ()
    if rng.random() < 0.5:
        tiers = tuple(int(x) for x in rng.integers(1, V + 1, size=int(rng.integers(2, fmt.MAX_HOT_TIERS + 1))))
        hot_ids_np = np.concatenate([np.sort(rng.choice(V, size=r, replace=False)) for r in tiers]).astype(np.int32)
    else:
        hot_ids_np = np.sort(rng.choice(V, size=int(rng.integers(1, V + 1)), replace=False)).astype(np.int32)
    N = hot_ids_np.size
    layout = fmt.Layout(n_vocab=V, n_embd=n, group_size=d, levels=L, codebook_size=K, hot_rows=N, hot_levels=Lh,
                        hot_tiers=tiers)
    codes_np = fmt.pack_codes(rng.integers(0, K, size=(V, G, L), dtype=np.uint8))
    cb_np = random_codebooks(rng, (G, L, K, d), f16)
    hot_codes_np = fmt.pack_codes(rng.integers(0, K, size=(N, G, Lh), dtype=np.uint8))
    hot_cb_np = random_codebooks(rng, (max(len(tiers), 1) * G, Lh, K, d), f16)
    arrays = {}
    for name, arr in dict(codes=codes_np, cb=cb_np, hot_ids=hot_ids_np, hot_codes=hot_codes_np, hot_cb=hot_cb_np).items():
        arrays[name] = guarded(arr.shape, arr.dtype)  # reads past any of them fault
        arrays[name][...] = arr
    n_ids = int(rng.integers(0, 50))
    ids_np = rng.integers(0, V, size=n_ids).astype(np.int32)
    ids = guarded(ids_np.shape, np.int32)
    ids[...] = ids_np
    first = int(rng.integers(0, n_ids + 1))
    last = int(rng.integers(first, n_ids + 1))
    stride = n + int(rng.choice([0, 0, 1, 3, 8]))
    sentinel = np.uint32(0x7FBADBAD)
    out = guarded((max(n_ids, 1), stride), np.float32)
    out.view(np.uint32)[...] = sentinel

    lay = make_layout(lib, V, n, d, L, K, version=4 if tiers else 2, N=N, Lh=Lh, tiers=tiers)
    assert lib.lib.carvq_layout_check(lay, lib.ffi.NULL, 0) == 0
    assert lib.lib.carvq_hot_check(lay, ptr(lib, "int32_t *", arrays["hot_ids"]), ptr(lib, "uint8_t *", arrays["hot_codes"]),
                                   lib.ffi.NULL, 0) == 0
    cb_type = 1 if f16 else 0
    lib.lib.carvq_rows_decode(lay, ptr(lib, "uint8_t *", arrays["codes"]), ptr(lib, "void *", arrays["cb"]), cb_type,
                              ptr(lib, "int32_t *", ids), n_ids, ptr(lib, "float *", out), stride, first, last)
    lib.lib.carvq_rows_hot_add(lay, ptr(lib, "int32_t *", arrays["hot_ids"]), ptr(lib, "uint8_t *", arrays["hot_codes"]),
                               ptr(lib, "void *", arrays["hot_cb"]), cb_type, ptr(lib, "int32_t *", ids), n_ids,
                               ptr(lib, "float *", out), stride, first, last)
    with np.errstate(over="ignore", invalid="ignore"):
        want = reference.decode_rvq(layout, codes_np, cb_np, ids_np[first:last])
        reference.add_hot(layout, hot_ids_np, hot_codes_np, hot_cb_np, ids_np[first:last], want)
    case = f"V={V} n={n} d={d} L={L} K={K} N={N} Lh={Lh} tiers={tiers} f16={f16} ids={n_ids} [{first},{last}) stride={stride}"
    assert np.array_equal(out[first:last, :n].view(np.uint32), want.view(np.uint32)), case
    untouched = np.ones(out.shape, bool)
    untouched[first:last, :n] = False
    assert np.all(out.view(np.uint32)[untouched] == sentinel), "wrote outside its rows: " + case
    # carvq_hot_row_add, given each row's place in each tier, continues the same sums
    alone = np.empty((max(last - first, 1), n), np.float32)
    lib.lib.carvq_rows_decode(lay, ptr(lib, "uint8_t *", arrays["codes"]), ptr(lib, "void *", arrays["cb"]), cb_type,
                              ptr(lib, "int32_t *", ids), n_ids, ptr(lib, "float *", alone) - first * n, n, first, last)
    for t, start in enumerate(np.cumsum((0, *(tiers or (N,))))[:-1]):
        tier_ids = hot_ids_np[start : start + (tiers[t] if tiers else N)]
        for r in range(first, last):
            at = int(np.searchsorted(tier_ids, ids_np[r]))
            if at < tier_ids.size and tier_ids[at] == ids_np[r]:
                lib.lib.carvq_hot_row_add(lay, t, int(start) + at, ptr(lib, "uint8_t *", arrays["hot_codes"]),
                                          ptr(lib, "void *", arrays["hot_cb"]), cb_type, ptr(lib, "float *", alone[r - first]))
    assert np.array_equal(alone[: last - first].view(np.uint32), want.view(np.uint32)), "carvq_hot_row_add: " + case


@pytest.mark.parametrize("f16", [False, True], ids=["f32", "f16"])
def test_decode_hot_rows(lib, f16):
    rng = np.random.default_rng(777 + f16)
    for _ in range(150):
        run_hot_decode(lib, *random_case(rng), f16, rng)


@pytest.mark.parametrize("n", [1, 7, 8, 13, 64, 576])
def test_rows_dot_against_numpy(lib, n):
    """carvq_rows_dot (the dense coded head's products) against float64 NumPy, over shapes that
    leave partial tiles (rows not a multiple of 4, states not of 3, n not of the vector width),
    and each product the same bits as the same pair alone (a logit does not depend on its batch)."""
    rng = np.random.default_rng(n)
    for n_rows, n_states in [(1, 1), (3, 2), (4, 3), (9, 5), (13, 7), (64, 10)]:
        rows = rng.standard_normal((n_rows, n)).astype(np.float32)
        hs = rng.standard_normal((n_states, n)).astype(np.float32)
        ld = n_rows + 2
        out = np.full((n_states, ld), 7.0, np.float32)
        lib.lib.carvq_rows_dot(ptr(lib, "float *", rows), n_rows, ptr(lib, "float *", hs), n_states, n,
                               ptr(lib, "float *", out), ld)
        want = hs.astype(np.float64) @ rows.astype(np.float64).T
        np.testing.assert_allclose(out[:, :n_rows], want, rtol=1e-5, atol=1e-5 * np.sqrt(n))
        assert np.all(out[:, n_rows:] == 7.0), "wrote past its rows"
        one = np.zeros(1, np.float32)
        for s_, r in [(0, 0), (n_states - 1, n_rows - 1), (n_states // 2, n_rows // 2)]:
            row, h = rows[r].copy(), hs[s_].copy()  # kept alive through the call
            lib.lib.carvq_rows_dot(ptr(lib, "float *", row), 1, ptr(lib, "float *", h), 1, n, ptr(lib, "float *", one), 1)
            assert one.view(np.uint32)[0] == out[s_, r:r + 1].view(np.uint32)[0]


def test_hot_check(libs):
    lib = libs["default"]
    V, n, d, L, K, N, Lh = 50, 16, 8, 2, 5, 4, 3
    lay = make_layout(lib, V, n, d, L, K, version=2, N=N, Lh=Lh)
    ne = lib.ffi.new("int64_t[4]")
    assert lib.lib.carvq_layout_hot_codes_ne(lay, ne) == 0 and list(ne)[:2] == [3, N]  # ceil(2*3/2)
    assert lib.lib.carvq_layout_hot_codebooks_ne(lay, ne) == 0 and list(ne) == [d, K, Lh, 2]
    good_codes = fmt.pack_codes(np.zeros((N, 2, Lh), np.uint8))

    def check(ids, codes):
        return check_msg(lib, lib.lib.carvq_hot_check, lay, lib.ffi.from_buffer("int32_t[]", np.asarray(ids, np.int32)),
                         lib.ffi.from_buffer("uint8_t[]", np.ascontiguousarray(codes, np.uint8)))

    assert check([1, 5, 7, 49], good_codes) == (0, "")
    for ids, needle in [([1, 5, 5, 9], "hot_ids[2] = 5"), ([3, 2, 7, 9], "hot_ids[1] = 2"),
                        ([1, 5, 7, 50], "hot_ids[3] = 50"), ([-1, 5, 7, 9], "hot_ids[0] = -1")]:
        rc, msg = check(ids, good_codes)
        assert rc != 0 and needle in msg, (ids, msg)
    bad = good_codes.copy()
    bad[2, 1] = 0x06  # code 2 of hot row 2 is 6 >= K
    rc, msg = check([1, 5, 7, 9], bad)
    assert rc != 0 and "hot_codes row 2" in msg, msg

    # two tiers (version 4): sorted within each, not across; codebooks one set per tier
    lay = make_layout(lib, V, n, d, L, K, version=4, N=N, Lh=Lh, tiers=(3, 1))
    assert lib.lib.carvq_layout_hot_codebooks_ne(lay, ne) == 0 and list(ne) == [d, K, Lh, 2 * 2]
    assert check([1, 5, 7, 2], good_codes) == (0, "")
    rc, msg = check([5, 1, 7, 2], good_codes)
    assert rc != 0 and "hot_ids[1] = 1" in msg and "each tier" in msg, msg


def _nested_tiers(rng, V: int, T: int) -> tuple[tuple[int, ...], np.ndarray]:
    """Random nested tiers (each within the one before it) and their ids, tier after tier."""
    tiers, ids, parent = [], [], np.arange(V)
    for _ in range(T):
        tier = np.sort(rng.choice(parent, size=int(rng.integers(1, parent.size + 1)), replace=False))
        tiers.append(int(tier.size))
        ids.append(tier)
        parent = tier
    return tuple(tiers), np.concatenate(ids).astype(np.int32)


def test_hot_map_expand_matches_the_reference(libs):
    """carvq_hot_map_expand == format.unpack_hot_map on random nested tiers (V not a multiple of
    8, one tier to eight), the map in a buffer that ends at a guarded page; and a wrong map
    (a row too many or too few, a padding bit, a wrong size) is refused with a message."""
    lib = libs["default"]
    rng = np.random.default_rng(7)
    for case in range(60):
        V = int(rng.integers(1, 300))
        tiers, ids = _nested_tiers(rng, V, int(rng.integers(1, fmt.MAX_HOT_TIERS + 1)))
        lo = fmt.Layout(V, 8, 8, 1, 16, hot_rows=int(ids.size), hot_levels=1,
                        hot_tiers=tiers if len(tiers) > 1 else (), hot_map=True)
        packed = fmt.pack_hot_map(lo, ids)
        assert np.array_equal(fmt.unpack_hot_map(lo, packed), ids)
        lay = make_layout(lib, V, 8, 8, 1, 16, version=7, N=lo.hot_rows, Lh=1, tiers=lo.hot_tiers)
        assert lib.lib.carvq_layout_hot_map_nbytes(lay) == lo.hot_map_bytes == packed.size
        buf = guarded(packed.shape, np.uint8)
        buf[:] = packed
        out = guarded((lo.hot_rows,), np.int32)
        rc, msg = check_msg(lib, lib.lib.carvq_hot_map_expand, lay, ptr(lib, "uint8_t *", buf), packed.size,
                            ptr(lib, "int32_t *", out))
        assert (rc, msg) == (0, "") and np.array_equal(out, ids), case
        # one bit flipped anywhere: a tier's count or a padding bit is wrong, and both readers say so
        bit = int(rng.integers(0, 8 * packed.size))
        buf[:] = packed
        buf[bit >> 3] ^= 1 << (bit & 7)
        rc, msg = check_msg(lib, lib.lib.carvq_hot_map_expand, lay, ptr(lib, "uint8_t *", buf), packed.size,
                            ptr(lib, "int32_t *", out))
        assert rc != 0 and "hot_map" in msg, (case, bit)
        with pytest.raises(CarvqError):
            fmt.unpack_hot_map(lo, buf)
    rc, msg = check_msg(lib, lib.lib.carvq_hot_map_expand, lay, ptr(lib, "uint8_t *", buf), packed.size - 1,
                        ptr(lib, "int32_t *", out))
    assert rc != 0 and "bytes" in msg, msg
    assert lib.lib.carvq_layout_hot_map_nbytes(make_layout(lib, 10, 8, 8, 1, 16, version=7)) == -1  # no hot rows


@pytest.mark.parametrize("f16", [False, True], ids=["f32", "f16"])
@pytest.mark.parametrize("d", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 16, 24])
def test_decode_every_small_group_size(lib, d, f16):
    # the SIMD paths branch on d (over-read prefix, overlapping tail): cover each d with
    # minimal codebooks (L=1, K=2), where the over-read guard matters most, and typical ones
    rng = np.random.default_rng(77 + d + 100 * f16)
    for L, K in [(1, 2), (1, 16), (2, 3), (3, 16), (16, 16)]:
        for G in [1, 2, 3, 5, 8]:
            run_decode(lib, False, int(rng.integers(1, 6)), G * d, d, L, K, f16, rng)


def test_limits_are_the_headers(libs):
    """carvq.format's limits are carvq.h's CARVQ_* constants."""
    lib = libs["default"].lib
    assert lib.CARVQ_FORMAT_VERSION == max(fmt.READABLE_VERSIONS) == fmt.HEAD_CODES_FORMAT_VERSION
    assert lib.CARVQ_MAX_HOT_TIERS == fmt.MAX_HOT_TIERS
    assert lib.CARVQ_MIN_FORMAT_VERSION == min(fmt.READABLE_VERSIONS)
    assert lib.CARVQ_MAX_LEVELS == fmt.MAX_LEVELS
    assert lib.CARVQ_MIN_CODEBOOK_SIZE == fmt.MIN_CODEBOOK_SIZE
    assert lib.CARVQ_MAX_CODEBOOK_SIZE == fmt.MAX_CODEBOOK_SIZE
    assert lib.CARVQ_MAX_ADAPTOR_RANK == fmt.MAX_ADAPTOR_RANK
    assert lib.CARVQ_MAX_ADAPTOR_HIDDEN == fmt.MAX_ADAPTOR_HIDDEN


def test_simd_names(libs):
    assert libs["scalar"].simd(0) == "scalar" and libs["scalar"].simd(1) == "scalar"
    if "native" in libs:
        assert libs["native"].simd(0) == "avx"
        assert libs["native"].simd(1) == "f16c"


def test_fp16_to_fp32_all_values(libs):
    lib = libs["scalar"]
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    want = bits.view(np.float16).astype(np.float32)
    got = np.array([lib.lib.carvq_fp16_to_fp32(int(b)) for b in bits], np.float32)
    finite = ~np.isnan(want)
    assert np.array_equal(got[finite].view(np.uint32), want[finite].view(np.uint32))
    assert np.all(np.isnan(got[~finite]))


def test_decode_zero_ids_and_empty_slice(lib):
    lay = make_layout(lib, 4, 8, 4, 2, 4)
    out = np.full((2, 8), 7.0, np.float32)
    codes = np.zeros((4, 2), np.uint8)
    cb = np.zeros((2, 2, 4, 4), np.float32)
    ids = np.array([1, 2], np.int32)
    for first, last in [(0, 0), (2, 2), (1, 0), (-5, -1), (3, 9)]:
        lib.lib.carvq_rows_decode(lay, ptr(lib, "uint8_t *", codes), ptr(lib, "void *", cb), 0,
                                  ptr(lib, "int32_t *", ids), 2, ptr(lib, "float *", out), 8, first, last)
    assert np.all(out == 7.0)
    # out-of-range slice bounds are clamped to [0, n_ids)
    lib.lib.carvq_rows_decode(lay, ptr(lib, "uint8_t *", codes), ptr(lib, "void *", cb), 0,
                              ptr(lib, "int32_t *", ids), 2, ptr(lib, "float *", out), 8, -3, 99)
    assert np.all(out == 0.0)


# ---- validation -------------------------------------------------------------------------

def test_layout_check_accepts_valid(libs):
    lib = libs["default"]
    for args in [(1, 1, 1, 1, 2), (151936, 896, 8, 3, 16), (32000, 4096, 4, 16, 16, 1024, 65536), (5, 6, 6, 2, 7, 8, 16)]:
        rc, msg = check_msg(lib, lib.lib.carvq_layout_check, make_layout(lib, *args))
        assert rc == 0 and msg == "", (args, msg)


@pytest.mark.parametrize("args, needle", [
    (dict(version=9), "format_version 9"),
    (dict(version=3, N=5, Lh=1, tiers=(2, 3)), "need carvq.format_version 4"),
    (dict(version=4, N=5, Lh=1, tiers=(2, 2)), "sum to 4 rows"),
    (dict(version=4, N=5, Lh=1, tiers=(5, 0)), "hot_tiers[1] = 0"),
    (dict(version=4, N=9, Lh=1, tiers=(1,) * 9), "9 entries"),
    (dict(N=5, Lh=2), "need carvq.format_version 2"),
    (dict(version=2, N=101, Lh=2), "hot_rows 101"),
    (dict(version=2, N=-1, Lh=2), "hot_rows -1"),
    (dict(version=2, N=5, Lh=17), "hot_levels 17"),
    (dict(version=2, N=5, Lh=0), "both be zero"),
    (dict(version=2, N=0, Lh=3), "both be zero"),
    (dict(version=2, V=2**62, n=8, d=1, L=1, K=2, N=2**62, Lh=16), "overflows"),  # hot codes
    (dict(version=0), "format_version 0"),
    (dict(n=10, d=4), "does not divide"),
    (dict(d=0), "does not divide"),
    (dict(d=-2), "does not divide"),
    (dict(V=0), "empty"),
    (dict(n=0), "empty"),
    (dict(V=-1), "empty"),
    (dict(L=0), "levels 0"),
    (dict(L=17), "levels 17"),
    (dict(K=17), "codebook_size 17"),
    (dict(K=1), "codebook_size 1"),
    (dict(K=0), "codebook_size 0"),
    (dict(m=1025, h=8), "adaptor_rank 1025"),
    (dict(m=8, h=65537), "adaptor_hidden 65537"),
    (dict(m=8, h=0), "both be zero"),
    (dict(m=0, h=8), "both be zero"),
    (dict(m=-1, h=8), "adaptor_rank -1"),
    (dict(V=2**62, n=8, d=1, L=16, K=16), "overflows"),        # codes V*B
    (dict(V=1, n=2**60, d=1, L=16, K=16), "overflows"),        # G*L
    (dict(V=1, n=2**58, d=2**20, L=16, K=16), "overflows"),    # codebooks G*L*K*d*4
    (dict(V=2**40, n=2**30, d=2**30, L=1, K=2), "overflows"),  # dense V*n*4
    (dict(V=2**60, n=1, d=1, L=1, K=2, m=1024, h=1), "overflows"),  # sigma0
    (dict(V=1, n=2**50, d=2**25, L=1, K=2, m=1, h=65536), "overflows"),  # down.weight
])
def test_layout_check_rejects(libs, args, needle):
    lib = libs["default"]
    full = dict(V=100, n=64, d=8, L=3, K=16, m=0, h=0, version=1, N=0, Lh=0, tiers=())
    full.update(args)
    lay = make_layout(lib, full["V"], full["n"], full["d"], full["L"], full["K"], full["m"], full["h"], full["version"],
                      full["N"], full["Lh"], full["tiers"])
    rc, msg = check_msg(lib, lib.lib.carvq_layout_check, lay)
    assert rc != 0
    assert needle in msg and "\n" not in msg
    assert lib.lib.carvq_layout_codes_nbytes(lay) == -1
    assert lib.lib.carvq_layout_codebooks_nbytes(lay, 0) == -1
    assert lib.lib.carvq_layout_code_row_bytes(lay) == -1
    ne = lib.ffi.new("int64_t[4]", [11, 12, 13, 14])
    assert lib.lib.carvq_layout_codebooks_ne(lay, ne) == -1 and list(ne) == [11, 12, 13, 14]
    # the data checks refuse an invalid layout instead of reading
    rc, msg2 = check_msg(lib, lib.lib.carvq_codes_check, lay, lib.ffi.NULL)
    assert rc != 0 and msg2 == msg
    rc, msg3 = check_msg(lib, lib.lib.carvq_ids_check, lay, lib.ffi.NULL, 0)
    assert rc != 0 and msg3 == msg


def test_layout_check_null_err_and_truncation(libs):
    lib = libs["default"]
    lay = make_layout(lib, 10, 10, 4, 1, 2)
    assert lib.lib.carvq_layout_check(lay, lib.ffi.NULL, 0) != 0
    err = lib.ffi.new("char[]", b"x" * 8)
    assert lib.lib.carvq_layout_check(lay, err, 8) != 0
    assert len(lib.ffi.string(err)) == 7


def test_layout_sizes_match_reference(libs):
    lib = libs["default"]
    rng = np.random.default_rng(5)
    for _ in range(200):
        V, n, d, L, K = random_case(rng)
        lay = make_layout(lib, V, n, d, L, K)
        ref = fmt.Layout(n_vocab=V, n_embd=n, group_size=d, levels=L, codebook_size=K)
        B = ref.code_row_bytes
        assert lib.lib.carvq_layout_n_groups(lay) == ref.n_groups
        assert lib.lib.carvq_layout_code_row_bytes(lay) == B
        assert lib.lib.carvq_layout_codes_nbytes(lay) == fmt.pack_codes(np.zeros((V, ref.n_groups, L))).nbytes == V * B
        assert lib.lib.carvq_layout_codebooks_nelements(lay) == ref.n_groups * L * K * d
        assert lib.lib.carvq_layout_codebooks_nbytes(lay, 0) == 4 * ref.n_groups * L * K * d
        assert lib.lib.carvq_layout_codebooks_nbytes(lay, 1) == 2 * ref.n_groups * L * K * d
        ne2 = lib.ffi.new("int64_t[2]")
        ne4 = lib.ffi.new("int64_t[4]")
        assert lib.lib.carvq_layout_codes_ne(lay, ne2) == 0 and list(ne2) == [B, V]
        assert lib.lib.carvq_layout_codebooks_ne(lay, ne4) == 0 and list(ne4) == [d, K, L, ref.n_groups]


def test_codes_check(libs):
    lib = libs["default"]
    rng = np.random.default_rng(9)
    for _ in range(150):
        V, n, d, L, K = random_case(rng)
        G = n // d
        codes = rng.integers(0, K, size=(V, G, L), dtype=np.uint8)
        lay = make_layout(lib, V, n, d, L, K)
        packed = fmt.pack_codes(codes)
        rc, msg = check_msg(lib, lib.lib.carvq_codes_check, lay, ptr(lib, "uint8_t *", packed))
        assert rc == 0 and msg == ""
        if K == 16:
            continue
        bad_rows = sorted(rng.choice(V, size=min(V, int(rng.integers(1, 4))), replace=False))
        for r in bad_rows:
            codes[r, rng.integers(G), rng.integers(L)] = rng.integers(K, 16)
        r0 = int(bad_rows[0])
        g0, l0 = [int(x[0]) for x in np.nonzero(codes[r0] >= K)]
        packed = fmt.pack_codes(codes)
        rc, msg = check_msg(lib, lib.lib.carvq_codes_check, lay, ptr(lib, "uint8_t *", packed))
        assert rc != 0
        assert msg.startswith(f"codes row {r0}: code {g0 * L + l0} (group {g0}, level {l0}) is {codes[r0, g0, l0]},"), msg
        with pytest.raises(CarvqError):
            reference.decode_rvq(fmt.Layout(V, n, d, L, K), packed, np.zeros((G, L, K, d), np.float32), [r0])


def test_codes_check_padding_nibble(libs):
    lib = libs["default"]
    for K in (16, 5):
        V, n, d, L = 7, 12, 4, 3  # G*L = 9, odd: 5 bytes per row, last high nibble is padding
        lay = make_layout(lib, V, n, d, L, K)
        packed = fmt.pack_codes(np.ones((V, 3, L), np.uint8))
        assert packed.shape == (V, 5)
        assert lib.lib.carvq_codes_check(lay, ptr(lib, "uint8_t *", packed), lib.ffi.NULL, 0) == 0
        packed[4, 4] |= 0x10
        packed[6, 4] |= 0x30
        rc, msg = check_msg(lib, lib.lib.carvq_codes_check, lay, ptr(lib, "uint8_t *", packed))
        assert rc != 0 and msg.startswith("codes row 4: padding nibble"), msg


def test_codes_check_k16_even_accepts_everything(libs):
    lib = libs["default"]
    lay = make_layout(lib, 256, 8, 4, 2, 16)
    packed = np.arange(256, dtype=np.uint8).reshape(256, 1)
    assert lib.lib.carvq_codes_check(lay, ptr(lib, "uint8_t *", packed), lib.ffi.NULL, 0) == 0


def test_ids_check(libs):
    lib = libs["default"]
    lay = make_layout(lib, 50, 8, 4, 2, 4)
    ok = np.array([0, 49, 3, 3, 0], np.int32)
    rc, msg = check_msg(lib, lib.lib.carvq_ids_check, lay, ptr(lib, "int32_t *", ok), len(ok))
    assert rc == 0 and msg == ""
    rc, _ = check_msg(lib, lib.lib.carvq_ids_check, lay, lib.ffi.NULL, 0)
    assert rc == 0
    for bad, pos in [([0, 50, -1], 1), ([-1], 0), ([1, 2, 3, 2**31 - 1], 3), ([-2**31], 0)]:
        arr = np.array(bad, np.int32)
        rc, msg = check_msg(lib, lib.lib.carvq_ids_check, lay, ptr(lib, "int32_t *", arr), len(arr))
        assert rc != 0
        assert msg == f"token id {bad[pos]} at position {pos} outside 0..49", msg


# ---- the C harness tests/fuzz/carvq_fuzz.c in standalone mode --------------------------------
# It decodes random (mostly valid) inputs, hot rows included, through the dispatched path and
# the scalar reference (tested against NumPy above) from exactly-sized heap buffers; under ASan/UBSan that also proves the SIMD over-read/over-write
# tricks stay inside the buffers. Under qemu-aarch64 it checks the NEON path.

FUZZ_SRC = ROOT / "tests" / "fuzz" / "carvq_fuzz.c"


def _run_harness(cmd_build: list[str], cmd_run: list[str]) -> str:
    subprocess.run(cmd_build, check=True)
    res = subprocess.run(cmd_run, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def _harness_flags() -> list[str]:
    return ["-std=c11", "-O1", "-g", "-ffp-contract=off", "-DCARVQ_FUZZ_STANDALONE", f"-I{ROOT / 'patches' / 'src'}",
            str(FUZZ_SRC), str(SRC)]


def test_harness_asan_native(tmp_path):
    if shutil.which(CC) is None:
        pytest.skip("no C compiler")
    exe = tmp_path / "carvq_fuzz_asan"
    san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
    native = ["-march=native"] if _cpu_has("avx2", "f16c") else []
    probe = subprocess.run([CC, *san, "-x", "c", "-", "-o", str(tmp_path / "probe")], input="int main(void){return 0;}",
                           text=True, capture_output=True)
    if probe.returncode != 0:
        pytest.skip("compiler has no ASan/UBSan runtime")
    out = _run_harness([CC, *san, *native, *_harness_flags(), "-o", str(exe)], [str(exe), "1500", "11"])
    assert "1500 passed, 0 failed" in out


@pytest.mark.parametrize("profile", PI_PROFILES, ids=lambda p: p.name)
def test_harness_neon_under_qemu(tmp_path, profile):
    """The NEON path, built for each Raspberry Pi profile and run on that profile's core."""
    cross, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if not cross or not qemu:
        pytest.skip("needs aarch64-linux-gnu-gcc and qemu-aarch64 (Debian: gcc-aarch64-linux-gnu qemu-user)")
    exe = tmp_path / "carvq_fuzz_neon"
    out = _run_harness([cross, "-static", f"-march={profile.march}", *_harness_flags(), "-o", str(exe)],
                       [qemu, "-cpu", profile.qemu_cpu, str(exe), "600", "5"])
    assert "simd=neon/neon" in out and "600 passed, 0 failed" in out


def test_libfuzzer_smoke(tmp_path):
    """The same harness under libFuzzer for 60 s (CI's smoke; docs/RESULTS.md has the long runs)."""
    clang = shutil.which("clang")
    if clang is None:
        pytest.skip("no clang (Debian: apt install clang)")
    exe = tmp_path / "carvq_fuzz"
    native = ["-march=native"] if _cpu_has("avx2", "f16c") else []
    build = subprocess.run([clang, "-O1", "-g", "-ffp-contract=off", "-fsanitize=fuzzer,address,undefined",
                            "-fno-sanitize-recover=all", *native, f"-I{ROOT / 'patches' / 'src'}", str(FUZZ_SRC), str(SRC),
                            "-o", str(exe)], capture_output=True, text=True)
    if build.returncode != 0 and "fuzzer" in build.stderr:
        pytest.skip(f"clang without libFuzzer: {build.stderr.strip().splitlines()[-1]}")
    assert build.returncode == 0, build.stderr
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    res = subprocess.run([str(exe), str(corpus), "-max_total_time=60", "-print_final_stats=1"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Done" in res.stderr and "stat::number_of_executed_units" in res.stderr

