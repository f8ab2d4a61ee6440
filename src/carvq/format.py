"""docs/FORMAT.md in code: the CARVQ-GGUF format's names, limits and layout, and its
reader and writer side by side.

Everything the format text names lives here: the version, the `carvq.*` keys, the
`token_embd.carvq.*` tensors, the limits (the same numbers as CARVQ_MAX_* in
patches/src/carvq.h, checked by a test), `Layout`, the code packing, and the functions that
read those tensors from a GGUF and write them into one. The decode itself is
carvq.reference (NumPy) and patches/src/carvq.c (C).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from carvq import gguf_io as gio
from carvq.errors import CarvqError

FORMAT_VERSION = 2  # what the writer writes for a file without a screen index or hot tiers
SCREEN_FORMAT_VERSION = 3  # ... with a screen index (version 3 = version 2 + the optional screen index)
TIERS_FORMAT_VERSION = 4  # ... with hot rows in tiers (version 4 = version 3 + carvq.hot_tiers)
FIX_FORMAT_VERSION = 5  # ... with a screen correction (version 5 = version 4 + carvq.screen_fix.*)
TRANSFORM_FORMAT_VERSION = 6  # ... with a lookup transform (version 6 = version 5 + carvq.transform)
HOT_MAP_FORMAT_VERSION = 7  # ... with the hot rows' membership as a bitmap (version 7 = version 6 + carvq.hot_map)
HEAD_CODES_FORMAT_VERSION = 8  # ... with a coded head (version 8 = version 7 + carvq.head_codes)
# general.architecture values a CARVQ file may name (FORMAT.md "Architectures"; carvq.h's
# CARVQ_ARCHITECTURES): graphs that read the input embedding only through build_inp_embd
ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3", "phi3")
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6, 7, 8)  # version 1 is version 2 without hot rows

# limits (FORMAT.md "Metadata keys"; carvq.h CARVQ_MAX_*)
MAX_LEVELS = 16  # L and Lh
MIN_CODEBOOK_SIZE = 2
MAX_CODEBOOK_SIZE = 16  # K: codes are 4-bit
MAX_ADAPTOR_RANK = 1024
MAX_ADAPTOR_HIDDEN = 65536
ACTIVATIONS = ("relu", "silu", "gelu")
MAX_HOT_TIERS = 8
MAX_FIX_RANK = 8  # CARVQ_SCREEN_FIX_MAX_RANK

PREFIX = "token_embd.carvq."
SCREEN_PREFIX = "output.carvq."  # the screen index of the output head (version 3, docs/SCREEN.md)


class Key:
    """The carvq.* metadata keys."""

    VERSION = "carvq.format_version"
    GROUP_SIZE = "carvq.group_size"
    LEVELS = "carvq.levels"
    CODEBOOK_SIZE = "carvq.codebook_size"
    ADAPTOR_RANK = "carvq.adaptor_rank"
    ADAPTOR_HIDDEN = "carvq.adaptor_hidden"
    ACTIVATION = "carvq.adaptor_activation"
    SOURCE_TYPE = "carvq.source_type"
    HEAD_COPY = "carvq.head_copy"
    BPW = "carvq.bpw"
    HEAD_BPW = "carvq.head_bpw"
    HOT_ROWS = "carvq.hot_rows"
    HOT_LEVELS = "carvq.hot_levels"
    HOT_TIERS = "carvq.hot_tiers"
    TRANSFORM = "carvq.transform"
    HOT_MAP = "carvq.hot_map"
    HEAD_CODES = "carvq.head_codes"


class ScreenKey:
    """The carvq.screen.* keys of the output head's screen index (version 3)."""

    GROUP_SIZE = "carvq.screen.group_size"
    LEVELS = "carvq.screen.levels"
    CODEBOOK_SIZE = "carvq.screen.codebook_size"
    HOT_ROWS = "carvq.screen.hot_rows"
    HOT_LEVELS = "carvq.screen.hot_levels"
    BPW = "carvq.screen.bpw"  # descriptive: every output.carvq.* byte, per head weight
    ALL = (GROUP_SIZE, LEVELS, CODEBOOK_SIZE, HOT_ROWS, HOT_LEVELS, BPW)


class Tensor:
    """The token_embd.carvq.* tensor names."""

    CODES = PREFIX + "codes"
    CODEBOOKS = PREFIX + "codebooks"
    SIGMA0 = PREFIX + "sigma0"
    UP_W = PREFIX + "up.weight"
    UP_B = PREFIX + "up.bias"
    DOWN_W = PREFIX + "down.weight"
    DOWN_B = PREFIX + "down.bias"
    HOT_IDS = PREFIX + "hot_ids"
    HOT_CODES = PREFIX + "hot_codes"
    HOT_CODEBOOKS = PREFIX + "hot_codebooks"
    HOT_MAP = PREFIX + "hot_map"
    TRANSFORM = PREFIX + "transform"
    ADAPTOR = (SIGMA0, UP_W, UP_B, DOWN_W, DOWN_B)
    HOT = (HOT_IDS, HOT_CODES, HOT_CODEBOOKS)


def screen_name(name: str) -> str:
    """token_embd.carvq.X -> output.carvq.X: the screen index's tensor of the same role."""
    return SCREEN_PREFIX + name[len(PREFIX):]


SCREEN_PROJECTION = SCREEN_PREFIX + "projection"
# the screen correction (version 5): per-row int8 coefficients of a few hidden-state directions
FIX_RANK = "carvq.screen_fix.rank"
SCREEN_FIX = SCREEN_PREFIX + "fix"
SCREEN_FIX_DIRS = SCREEN_PREFIX + "fix_dirs"
SCREEN_TENSORS = (*(screen_name(n) for n in (Tensor.CODES, Tensor.CODEBOOKS, *Tensor.HOT)), SCREEN_PROJECTION)


@dataclass(frozen=True)
class Layout:
    """The shape parameters of a CARVQ embedding (FORMAT.md, Notation)."""

    n_vocab: int  # V
    n_embd: int  # n
    group_size: int  # d
    levels: int  # L
    codebook_size: int  # K
    adaptor_rank: int = 0  # m
    adaptor_hidden: int = 0  # h
    activation: str = "none"
    hot_rows: int = 0  # N: rows with extra residual levels (version 2)
    hot_levels: int = 0  # Lh
    # rows of each tier when the hot rows are T >= 2 consecutive tiers (version 4), else ()
    hot_tiers: tuple[int, ...] = ()
    # the codes decode in a frame of their own, mapped to the embedding's by an n x n matrix (version 6)
    transform: bool = False
    # the hot rows' ids are stored as nested bitmaps, token_embd.carvq.hot_map (version 7)
    hot_map: bool = False

    @property
    def n_groups(self) -> int:
        return self.n_embd // self.group_size

    @property
    def codes_per_row(self) -> int:
        return self.n_groups * self.levels

    @property
    def code_row_bytes(self) -> int:  # B
        return (self.codes_per_row + 1) // 2

    @property
    def hot_code_row_bytes(self) -> int:  # Bh
        return (self.n_groups * self.hot_levels + 1) // 2

    @property
    def tier_rows(self) -> tuple[int, ...]:
        """Rows of each hot tier: the one tier of N rows unless hot_tiers says otherwise."""
        return tuple(self.hot_tiers) if self.hot_tiers else ((self.hot_rows,) if self.hot_rows else ())

    def tier_starts(self) -> list[int]:
        """Index in hot_ids of each tier's first row."""
        return [sum(self.tier_rows[:t]) for t in range(len(self.tier_rows))]

    @property
    def hot_map_bytes(self) -> int:
        """Bytes of token_embd.carvq.hot_map: tier 0's bitmap over the V tokens, then each later
        tier's over the rows of the tier before it, each padded to whole bytes."""
        return sum((bits + 7) // 8 for bits in (self.n_vocab, *self.tier_rows[:-1]))

    def hot_layout(self) -> "Layout":
        """The hot levels seen as an RVQ of their own over the N hot rows (for packing)."""
        return Layout(self.hot_rows, self.n_embd, self.group_size, self.hot_levels, self.codebook_size)

    def check(self) -> None:
        """Raise CarvqError when the parameters contradict FORMAT.md."""
        if self.n_vocab < 1 or self.n_embd < 1:
            raise CarvqError(f"empty embedding {self.n_vocab}x{self.n_embd}")
        if self.group_size < 1 or self.n_embd % self.group_size:
            raise CarvqError(f"group size {self.group_size} does not divide width {self.n_embd}")
        if not 1 <= self.levels <= MAX_LEVELS:
            raise CarvqError(f"levels {self.levels} outside 1..{MAX_LEVELS}")
        if not MIN_CODEBOOK_SIZE <= self.codebook_size <= MAX_CODEBOOK_SIZE:
            raise CarvqError(f"codebook size {self.codebook_size} outside {MIN_CODEBOOK_SIZE}..{MAX_CODEBOOK_SIZE}")
        if not 0 <= self.adaptor_rank <= MAX_ADAPTOR_RANK or not 0 <= self.adaptor_hidden <= MAX_ADAPTOR_HIDDEN:
            raise CarvqError("adaptor rank or hidden width out of range")
        if (self.adaptor_rank == 0) != (self.adaptor_hidden == 0):
            raise CarvqError("adaptor rank and hidden width must both be zero or both non-zero")
        if self.adaptor_rank and self.activation not in ACTIVATIONS:
            raise CarvqError(f"unknown adaptor activation {self.activation!r}")
        # a row may be in every tier: N is at most T*V
        if not 0 <= self.hot_rows <= self.n_vocab * max(1, len(self.hot_tiers)) or not 0 <= self.hot_levels <= MAX_LEVELS:
            raise CarvqError(f"hot rows {self.hot_rows} or hot levels {self.hot_levels} out of range")
        if (self.hot_rows == 0) != (self.hot_levels == 0):
            raise CarvqError("hot rows and hot levels must both be zero or both non-zero")
        if self.hot_tiers:
            if not 1 <= len(self.hot_tiers) <= MAX_HOT_TIERS:
                raise CarvqError(f"{len(self.hot_tiers)} hot tiers, outside 1..{MAX_HOT_TIERS}")
            if min(self.hot_tiers) < 1 or sum(self.hot_tiers) != self.hot_rows:
                raise CarvqError(f"hot tiers {list(self.hot_tiers)}: each needs a row, and together the "
                                 f"{self.hot_rows} hot rows")
        if self.hot_map and not self.hot_rows:
            raise CarvqError("a hot map without hot rows")


@dataclass
class CarvqTensors:
    """The CARVQ tensors of one embedding, as NumPy arrays in FORMAT.md's shapes and types.
    The adaptor's five arrays are None when m == 0, the hot rows' three when N == 0."""

    layout: Layout
    codes: np.ndarray  # (V, B) uint8, packed
    codebooks: np.ndarray  # (G, L, K, d) float32 or float16
    sigma0: np.ndarray | None = None  # (V, m)
    up_w: np.ndarray | None = None  # (h, m)
    up_b: np.ndarray | None = None  # (h,) float32
    down_w: np.ndarray | None = None  # (n, h)
    down_b: np.ndarray | None = None  # (n,) float32
    hot_ids: np.ndarray | None = None  # (N,) int32, strictly increasing within each tier
    hot_codes: np.ndarray | None = None  # (N, Bh) uint8, packed
    hot_codebooks: np.ndarray | None = None  # (T*G, Lh, K, d), the codebooks' type; tier t's are rows t*G..
    transform: np.ndarray | None = None  # (n, n) float32 or float16: row = transform @ (what the codes sum to)

    screen: "ScreenIndex | None" = None  # the output head's own index (version 3)
    screen_fix: "ScreenFix | None" = None  # the screen correction (version 5)
    # the coded head (version 8): a tied source's head is these very rows, no output.weight
    head_codes: bool = False

    def named(self) -> list[tuple[str, np.ndarray]]:
        """(tensor name, array) in file order, packed codes as I8 as stored; the screen
        index's tensors are not among them (ScreenIndex.named)."""
        out = [(Tensor.CODES, self.codes.view(np.int8)), (Tensor.CODEBOOKS, self.codebooks)]
        if self.layout.adaptor_rank:
            out += list(zip(Tensor.ADAPTOR, (self.sigma0, self.up_w, self.up_b, self.down_w, self.down_b)))
        if self.layout.hot_rows:
            ids = ((Tensor.HOT_MAP, pack_hot_map(self.layout, self.hot_ids).view(np.int8)) if self.layout.hot_map
                   else (Tensor.HOT_IDS, self.hot_ids))
            out += [ids, (Tensor.HOT_CODES, self.hot_codes.view(np.int8)), (Tensor.HOT_CODEBOOKS, self.hot_codebooks)]
        if self.layout.transform:
            out.append((Tensor.TRANSFORM, self.transform))
        return out


@dataclass
class ScreenIndex:
    """The output head's screen index (docs/SCREEN.md): an RVQ with hot rows, like the lookup's
    but without adaptor, of the head's rows E_v mapped into the hidden states' metric, and the
    projection that maps a hidden state there: approximate logit_v = (h @ projection) . decoded_v."""

    rvq: CarvqTensors  # layout: the head's V and n; adaptor_rank 0
    projection: np.ndarray  # (n, n) float32

    def named(self) -> list[tuple[str, np.ndarray]]:
        return [(screen_name(name), arr) for name, arr in self.rvq.named()] + [(SCREEN_PROJECTION, self.projection)]

    @property
    def nbytes(self) -> int:
        return sum(int(arr.nbytes) for _, arr in self.named())


@dataclass
class ScreenFix:
    """The screen correction (FORMAT.md "Screen correction", version 5): what the screen scans
    (the lookup's codes or the head's own index) misses of each head row along a few directions
    of the hidden states; approximate logit_v += sum_j fix[j, v] * (dirs[j] . h)."""

    fix: np.ndarray  # (r, V) int8: a plane of coefficients per direction
    dirs: np.ndarray  # (r, n) float32, each direction times its coefficients' scale

    def named(self) -> list[tuple[str, np.ndarray]]:
        return [(SCREEN_FIX, self.fix), (SCREEN_FIX_DIRS, self.dirs)]

    @property
    def nbytes(self) -> int:
        return int(self.fix.nbytes + self.dirs.nbytes)

    @property
    def rank(self) -> int:
        return int(self.fix.shape[0])


# ---------------------------------------------------------------------------------------
# code packing (FORMAT.md "Code packing")

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


# ---------------------------------------------------------------------------------------
# reading (FORMAT.md "Validation")

def is_carvq(reader) -> bool:
    return reader.get_field(Key.VERSION) is not None


def _key(reader, key: str, kind: str, required: bool = True):
    """The value of metadata `key`, which must have GGUF type `kind` (UINT32, STRING, BOOL), as
    the C loader requires; None when absent and not required."""
    import gguf

    field = reader.get_field(key)
    if field is None:
        if required:
            raise CarvqError(f"CARVQ metadata key {key} is missing")
        return None
    got = field.types[0] if field.types else None
    if got != getattr(gguf.GGUFValueType, kind):
        raise CarvqError(f"CARVQ metadata key {key} is a {getattr(got, 'name', got)}, expected {kind}")
    return field.contents()


def read_layout(reader) -> Layout:
    """The Layout of a CARVQ file, from its metadata and tensor shapes, checked as the patched
    llama.cpp loader checks it (FORMAT.md "Validation")."""
    version = _key(reader, Key.VERSION, "UINT32", required=False)
    if version is None:
        raise CarvqError(f"not a CARVQ-GGUF: no {Key.VERSION} key")
    if version not in READABLE_VERSIONS:
        raise CarvqError(f"CARVQ format version {version} is not supported (this carvq reads versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))})")
    arch = gio.field_value(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise CarvqError(f"architecture {arch!r} is not supported with a CARVQ embedding "
                         f"(supported: {', '.join(ARCHITECTURES)})")
    codes = gio.tensor_by_name(reader, Tensor.CODES)
    if codes is None:
        raise CarvqError(f"CARVQ tensor {Tensor.CODES} is missing")
    if len(codes.shape) != 2:
        raise CarvqError(f"CARVQ tensor {Tensor.CODES} must have 2 dimensions (V, B), has {len(codes.shape)}")
    u32 = lambda key: int(_key(reader, key, "UINT32"))  # noqa: E731
    layout = Layout(
        n_vocab=int(codes.shape[1]),
        n_embd=_embedding_width(reader),
        group_size=u32(Key.GROUP_SIZE),
        levels=u32(Key.LEVELS),
        codebook_size=u32(Key.CODEBOOK_SIZE),
        adaptor_rank=u32(Key.ADAPTOR_RANK),
        adaptor_hidden=u32(Key.ADAPTOR_HIDDEN),
        activation=str(_key(reader, Key.ACTIVATION, "STRING")),
        hot_rows=u32(Key.HOT_ROWS) if version >= 2 else 0,  # required from version 2 on
        hot_levels=u32(Key.HOT_LEVELS) if version >= 2 else 0,
        hot_tiers=_hot_tiers(reader, version),
        transform=_flag(reader, Key.TRANSFORM, TRANSFORM_FORMAT_VERSION, version),
        hot_map=_flag(reader, Key.HOT_MAP, HOT_MAP_FORMAT_VERSION, version),
    )
    layout.check()
    _check_model_shape(reader, arch, layout)
    return layout


def _hot_tiers(reader, version: int) -> tuple[int, ...]:
    """carvq.hot_tiers (version 4, optional): an array of UINT32 tier sizes; () when absent."""
    import gguf

    field = reader.get_field(Key.HOT_TIERS)
    if field is None:
        return ()
    if version < TIERS_FORMAT_VERSION:
        raise CarvqError(f"CARVQ metadata key {Key.HOT_TIERS} needs carvq.format_version {TIERS_FORMAT_VERSION}, "
                         f"the file says {version}")
    if field.types[:2] != [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32]:
        raise CarvqError(f"CARVQ metadata key {Key.HOT_TIERS} is not an array of UINT32")
    rows = tuple(int(x) for x in field.contents())
    if not 1 <= len(rows) <= MAX_HOT_TIERS:
        raise CarvqError(f"CARVQ metadata key {Key.HOT_TIERS} has {len(rows)} entries, outside 1..{MAX_HOT_TIERS}")
    return rows


def _flag(reader, key: str, since: int, version: int) -> bool:
    """An optional BOOL key of format version `since` on (carvq_key_flag in the loader):
    carvq.transform (6: the codes decode in a frame of their own), carvq.hot_map (7: the hot
    rows' ids stored as nested bitmaps). False when absent."""
    value = _key(reader, key, "BOOL", required=False)
    if value is None:
        return False
    if version < since:
        raise CarvqError(f"CARVQ metadata key {key} needs carvq.format_version {since}, the file says {version}")
    return bool(value)


def pack_hot_map(lo: Layout, hot_ids: np.ndarray) -> np.ndarray:
    """FORMAT.md "Hot map": the hot rows' ids, tier after tier, as nested bitmaps (uint8, least
    significant bit first). Each tier's rows must be rows of the tier before it (the converter's
    tiers are): CarvqError otherwise."""
    ids = np.asarray(hot_ids, np.int64)
    parent = np.arange(lo.n_vocab)  # tier 0 is a subset of the tokens
    maps = []
    for start, rows in zip(lo.tier_starts(), lo.tier_rows):
        tier = ids[start:start + rows]
        pos = np.searchsorted(parent, tier)
        if (pos >= parent.size).any() or not np.array_equal(parent[np.minimum(pos, parent.size - 1)], tier) \
                or (np.diff(tier) <= 0).any():
            raise CarvqError("a hot map needs sorted tiers, each within the tier before it")
        bits = np.zeros(parent.size, np.uint8)
        bits[pos] = 1
        maps.append(np.packbits(bits, bitorder="little"))
        parent = tier
    return np.concatenate(maps)


def unpack_hot_map(lo: Layout, hot_map: np.ndarray, name: str = Tensor.HOT_MAP) -> np.ndarray:
    """The hot rows' ids (int32, tier after tier) of a hot map; CarvqError when a tier's bitmap
    does not hold exactly its carvq.hot_tiers rows or a padding bit is set (carvq_hot_map_expand)."""
    raw = np.asarray(hot_map).view(np.uint8).reshape(-1)
    if raw.size != lo.hot_map_bytes:
        raise CarvqError(f"CARVQ tensor {name} has {raw.size} bytes, expected {lo.hot_map_bytes}")
    parent = np.arange(lo.n_vocab)
    out, at = [], 0
    for t, rows in enumerate(lo.tier_rows):
        nbytes = (parent.size + 7) // 8
        bits = np.unpackbits(raw[at:at + nbytes], bitorder="little")
        if bits[parent.size:].any():
            raise CarvqError(f"CARVQ tensor {name}: tier {t}'s bitmap sets a padding bit")
        if int(bits.sum()) != rows:
            raise CarvqError(f"CARVQ tensor {name}: tier {t}'s bitmap marks {int(bits.sum())} rows, "
                             f"{Key.HOT_TIERS if lo.hot_tiers else Key.HOT_ROWS} says {rows}")
        parent = parent[np.nonzero(bits[:parent.size])[0]]
        out.append(parent)
        at += nbytes
    return np.concatenate(out).astype(np.int32)


def _check_model_shape(reader, arch: str, layout: Layout) -> None:
    """V and n must be the model's: its vocabulary size and its embedding width."""
    tokens = reader.get_field("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens.contents()) != layout.n_vocab:
        raise CarvqError(f"CARVQ tensor {Tensor.CODES} has {layout.n_vocab} rows, but the vocabulary has "
                         f"{len(tokens.contents())} tokens")
    width = gio.field_value(reader, f"{arch}.embedding_length")
    if width is not None and int(width) != layout.n_embd:
        raise CarvqError(f"CARVQ tensor {Tensor.CODEBOOKS} decodes rows of width {layout.n_embd}, but the model's "
                         f"embedding width is {width}")


def check_codes(packed: np.ndarray, codes_per_row: int, codebook_size: int, name: str) -> None:
    """Every code below K and the padding nibble of an odd row zero, in every row (carvq.c's
    carvq_codes_scan)."""
    packed = np.asarray(packed).view(np.uint8)
    full = codes_per_row // 2
    if codebook_size < 16 and full:
        body = packed[:, :full]
        bad = ((body & 0x0F) >= codebook_size) | ((body >> 4) >= codebook_size)
        if bad.any():
            row = int(np.nonzero(bad.any(axis=1))[0][0])
            raise CarvqError(f"CARVQ tensor {name} row {row}: a code is outside 0..{codebook_size - 1}")
    if codes_per_row % 2:
        last = packed[:, full]
        bad = ((last & 0x0F) >= codebook_size) | ((last >> 4) != 0)
        if bad.any():
            row = int(np.nonzero(bad)[0][0])
            raise CarvqError(f"CARVQ tensor {name} row {row}: a code is outside 0..{codebook_size - 1} "
                             "or the padding nibble is not zero")


def _embedding_width(reader) -> int:
    cb = gio.tensor_by_name(reader, Tensor.CODEBOOKS)
    if cb is None:
        raise CarvqError(f"CARVQ tensor {Tensor.CODEBOOKS} is missing")
    if len(cb.shape) != 4:
        raise CarvqError(f"CARVQ tensor {Tensor.CODEBOOKS} must have 4 dimensions (G, L, K, d), has {len(cb.shape)}")
    return int(cb.shape[0]) * int(cb.shape[3])  # ne = [d, K, L, G]


def _expect(reader, name: str, types: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
    t = gio.tensor_by_name(reader, name)
    if t is None:
        raise CarvqError(f"CARVQ tensor {name} is missing")
    if t.tensor_type.name not in types:
        raise CarvqError(f"CARVQ tensor {name} has type {t.tensor_type.name}, expected {' or '.join(types)}")
    got = tuple(int(x) for x in reversed(t.shape.tolist()))
    if got != shape:
        raise CarvqError(f"CARVQ tensor {name} has shape {got}, expected {shape}")
    return np.asarray(t.data).reshape(shape)


def _read_rvq(reader, lo: Layout, name, hot_key: str) -> CarvqTensors:
    """Codes, codebooks and hot rows of an RVQ of layout `lo`; name(role) gives the tensor
    name of each role (Tensor.* for the lookup, screen_name for the screen index)."""
    floats = ("F32", "F16")
    codes = _expect(reader, name(Tensor.CODES), ("I8",), (lo.n_vocab, lo.code_row_bytes)).view(np.uint8)
    check_codes(codes, lo.codes_per_row, lo.codebook_size, name(Tensor.CODES))
    codebooks = _expect(reader, name(Tensor.CODEBOOKS), floats, (lo.n_groups, lo.levels, lo.codebook_size, lo.group_size))
    found = CarvqTensors(lo, codes, codebooks)
    if lo.hot_rows:
        if lo.hot_map:  # (the screen index has no hot map: its layout never sets it)
            _refuse_stray(reader, [name(Tensor.HOT_IDS)], f"{Key.HOT_MAP} is true")
            found.hot_ids = unpack_hot_map(lo, _expect(reader, name(Tensor.HOT_MAP), ("I8",), (lo.hot_map_bytes,)))
        else:
            _refuse_stray(reader, [name(Tensor.HOT_MAP)], f"{Key.HOT_MAP} is not true")
            hot_ids = _expect(reader, name(Tensor.HOT_IDS), ("I32",), (lo.hot_rows,))
            check_hot_ids(hot_ids, lo, name(Tensor.HOT_IDS))
            found.hot_ids = hot_ids
        found.hot_codes = _expect(reader, name(Tensor.HOT_CODES), ("I8",), (lo.hot_rows, lo.hot_code_row_bytes)).view(np.uint8)
        check_codes(found.hot_codes, lo.n_groups * lo.hot_levels, lo.codebook_size, name(Tensor.HOT_CODES))
        found.hot_codebooks = _expect(reader, name(Tensor.HOT_CODEBOOKS),
                                      (gio.tensor_by_name(reader, name(Tensor.CODEBOOKS)).tensor_type.name,),
                                      (len(lo.tier_rows) * lo.n_groups, lo.hot_levels, lo.codebook_size, lo.group_size))
    else:
        _refuse_stray(reader, [name(t) for t in (*Tensor.HOT, Tensor.HOT_MAP)], f"{hot_key} is 0")
    return found


def check_hot_ids(hot_ids: np.ndarray, lo: Layout, name: str) -> None:
    """Each tier's slice of hot_ids strictly increasing, every id in 0..V-1 (carvq_hot_check)."""
    ids = np.asarray(hot_ids, np.int64)
    for start, rows in zip(lo.tier_starts(), lo.tier_rows):
        tier = ids[start:start + rows]
        if tier.min() < 0 or tier.max() >= lo.n_vocab or (np.diff(tier) <= 0).any():
            raise CarvqError(f"CARVQ tensor {name} must hold strictly increasing token ids in 0..{lo.n_vocab - 1}"
                             + (" within each tier" if len(lo.tier_rows) > 1 else ""))


def read_tensors(source) -> CarvqTensors:
    """The CARVQ tensors of a file (a path or a gguf.GGUFReader), checked against FORMAT.md,
    with its screen index (version 3) when it has one."""
    reader = source if hasattr(source, "tensors") else gio.open_gguf(source)
    lo = read_layout(reader)
    floats = ("F32", "F16")
    found = _read_rvq(reader, lo, lambda role: role, Key.HOT_ROWS)
    if lo.adaptor_rank:
        m, h, n = lo.adaptor_rank, lo.adaptor_hidden, lo.n_embd
        found.sigma0 = _expect(reader, Tensor.SIGMA0, floats, (lo.n_vocab, m))
        found.up_w = _expect(reader, Tensor.UP_W, floats, (h, m))
        found.up_b = _expect(reader, Tensor.UP_B, ("F32",), (h,))
        found.down_w = _expect(reader, Tensor.DOWN_W, floats, (n, h))
        found.down_b = _expect(reader, Tensor.DOWN_B, ("F32",), (n,))
    else:
        _refuse_stray(reader, Tensor.ADAPTOR, f"{Key.ADAPTOR_RANK} is 0")
    if lo.transform:
        found.transform = _expect(reader, Tensor.TRANSFORM, floats, (lo.n_embd, lo.n_embd))
    else:
        _refuse_stray(reader, (Tensor.TRANSFORM,), f"the file has no true {Key.TRANSFORM} key")
    bad = first_non_finite(found)
    if bad is not None:
        raise CarvqError(f"CARVQ tensor {bad} holds non-finite values")
    found.screen = read_screen_index(reader, lo)
    found.head_codes = read_head_codes(reader, lo, found.screen is not None)
    found.screen_fix = read_screen_fix(reader, lo, found.screen is not None, found.head_codes)
    return found


def read_head_codes(reader, lo: Layout, has_index: bool) -> bool:
    """carvq.head_codes (FORMAT.md "Coded head", version 8), checked as the loader checks it:
    the head is the lookup's rows, so the file has no output.weight, no head copy, no adaptor
    and no screen index of its own."""
    version = int(_key(reader, Key.VERSION, "UINT32"))
    if not _flag(reader, Key.HEAD_CODES, HEAD_CODES_FORMAT_VERSION, version):
        return False
    if bool(gio.field_value(reader, Key.HEAD_COPY, False)):
        raise CarvqError(f"CARVQ metadata keys {Key.HEAD_CODES} and {Key.HEAD_COPY} are both true: the head is "
                         f"either a copy in {gio.HEAD} or the codes")
    if gio.tensor_by_name(reader, gio.HEAD) is not None:
        raise CarvqError(f"CARVQ metadata key {Key.HEAD_CODES} says the head is read from the codes, but the file "
                         f"has an {gio.HEAD} too")
    if lo.adaptor_rank:
        raise CarvqError(f"CARVQ metadata key {Key.HEAD_CODES} needs {Key.ADAPTOR_RANK} 0 (the head's rows are the "
                         f"codes' sums), the file says {lo.adaptor_rank}")
    if has_index:
        raise CarvqError(f"CARVQ metadata key {Key.HEAD_CODES}: a coded head is screened by the lookup's own codes, "
                         "but the file has a screen index (output.carvq.*) too")
    return True


def read_screen_fix(reader, lo: Layout, has_index: bool, coded_head: bool = False) -> ScreenFix | None:
    """The screen correction (FORMAT.md "Screen correction", version 5), or None without one. It
    corrects a screen: the file must have a head copy or a screen index, and output.weight, or a
    coded head (read_head_codes; the lookup's codes screen the lookup's own rows)."""
    if reader.get_field(FIX_RANK) is None:
        _refuse_stray(reader, (SCREEN_FIX, SCREEN_FIX_DIRS), f"the file has no {FIX_RANK} key")
        return None
    version = int(_key(reader, Key.VERSION, "UINT32"))
    if version < FIX_FORMAT_VERSION:
        raise CarvqError(f"CARVQ key {FIX_RANK} needs carvq.format_version {FIX_FORMAT_VERSION}, the file says {version}")
    rank = int(_key(reader, FIX_RANK, "UINT32"))
    if not 1 <= rank <= MAX_FIX_RANK:
        raise CarvqError(f"CARVQ metadata key {FIX_RANK} is {rank}, expected 1..{MAX_FIX_RANK}")
    head = gio.tensor_by_name(reader, gio.HEAD)
    head_copy = bool(gio.field_value(reader, Key.HEAD_COPY)) if reader.get_field(Key.HEAD_COPY) is not None else False
    if not coded_head and (head is None or tuple(int(x) for x in head.shape[:2]) != (lo.n_embd, lo.n_vocab)
                           or not (head_copy or has_index)):
        raise CarvqError(f"CARVQ tensor {SCREEN_FIX} corrects a screen, but the file has none "
                         f"(a {lo.n_vocab} x {lo.n_embd} {gio.HEAD} with a head copy or a screen index)")

    def planes(name: str, types: tuple[str, ...], width: int) -> np.ndarray:
        # rank 1: llama-quantize writes a (1, width) tensor as (width,) (ggml drops trailing dimensions of 1)
        t = gio.tensor_by_name(reader, name)
        flat = rank == 1 and t is not None and len(t.shape) == 1
        return _expect(reader, name, types, (width,) if flat else (rank, width)).reshape(rank, width)

    fix = ScreenFix(planes(SCREEN_FIX, ("I8",), lo.n_vocab), planes(SCREEN_FIX_DIRS, ("F32",), lo.n_embd))
    bad = first_non_finite(fix)
    if bad is not None:
        raise CarvqError(f"CARVQ tensor {bad} holds non-finite values")
    return fix


def read_screen_index(reader, lo: Layout) -> ScreenIndex | None:
    """The output head's screen index (FORMAT.md "Screen index", version 3), or None when the
    file has none. Its V and n are the lookup's: it indexes output.weight, which must exist."""
    present = [k for k in ScreenKey.ALL if reader.get_field(k) is not None]
    stray = [n for n in SCREEN_TENSORS if gio.tensor_by_name(reader, n) is not None]
    if not present:
        if stray:
            raise CarvqError(f"CARVQ tensor {stray[0]} present but the file has no {ScreenKey.LEVELS} key")
        return None
    version = int(_key(reader, Key.VERSION, "UINT32"))
    if version < SCREEN_FORMAT_VERSION:
        raise CarvqError(f"CARVQ key {present[0]} needs carvq.format_version {SCREEN_FORMAT_VERSION}, the file says {version}")
    head = gio.tensor_by_name(reader, gio.HEAD)
    if head is None or tuple(int(x) for x in head.shape[:2]) != (lo.n_embd, lo.n_vocab):
        raise CarvqError(f"CARVQ screen index without a {lo.n_vocab} x {lo.n_embd} {gio.HEAD} to screen")
    u32 = lambda key: int(_key(reader, key, "UINT32"))  # noqa: E731
    layout = Layout(n_vocab=lo.n_vocab, n_embd=lo.n_embd, group_size=u32(ScreenKey.GROUP_SIZE),
                    levels=u32(ScreenKey.LEVELS), codebook_size=u32(ScreenKey.CODEBOOK_SIZE),
                    hot_rows=u32(ScreenKey.HOT_ROWS), hot_levels=u32(ScreenKey.HOT_LEVELS))
    try:
        layout.check()
    except CarvqError as exc:
        raise CarvqError(f"CARVQ screen index: {exc}") from None
    rvq = _read_rvq(reader, layout, screen_name, ScreenKey.HOT_ROWS)
    index = ScreenIndex(rvq, _expect(reader, SCREEN_PROJECTION, ("F32",), (lo.n_embd, lo.n_embd)))
    bad = first_non_finite(index)
    if bad is not None:
        raise CarvqError(f"CARVQ tensor {bad} holds non-finite values")
    return index


def _refuse_stray(reader, names, why: str) -> None:
    stray = [n for n in names if gio.tensor_by_name(reader, n) is not None]
    if stray:
        raise CarvqError(f"CARVQ tensor {stray[0]} present but {why}")


# ---------------------------------------------------------------------------------------
# writing

@dataclass(frozen=True)
class Provenance:
    """The descriptive carvq.* keys: where the embedding came from and what it costs."""

    source_type: str  # ggml type name of the source token_embd.weight
    head_copy: bool  # the writer added output.weight for a tied source
    bpw: float  # carvq.bpw: the lookup, every token_embd.carvq.* tensor
    head_bpw: float  # carvq.head_bpw: the head copy, 0 without one
    head_codes: bool = False  # carvq.head_codes: no head copy, the tied head is the lookup's rows (version 8)
    screen_bpw: float = 0.0  # carvq.screen.bpw: the screen index, every output.carvq.* tensor


def first_non_finite(tensors: CarvqTensors | ScreenIndex | ScreenFix) -> str | None:
    """The name of the first float tensor holding inf or NaN, else None."""
    return next((name for name, arr in tensors.named() if arr.dtype.kind == "f" and not np.isfinite(arr).all()), None)


def check_finite(tensors: CarvqTensors | ScreenIndex | ScreenFix) -> None:
    """Writers never store non-finite values (FORMAT.md): a codebook that overflowed F16, or
    a diverged adaptor, would decode to inf/NaN rows."""
    name = first_non_finite(tensors)
    if name is not None:
        raise CarvqError(f"{name}: non-finite values (an F16 overflow or a diverged fit); nothing was written")


def add_metadata(writer, layout: Layout, provenance: Provenance, screen: ScreenIndex | None = None,
                 fix: ScreenFix | None = None) -> None:
    """The carvq.* keys of FORMAT.md, into a gguf.GGUFWriter."""
    import gguf

    tiered = len(layout.tier_rows) > 1
    version = (HEAD_CODES_FORMAT_VERSION if provenance.head_codes else HOT_MAP_FORMAT_VERSION if layout.hot_map else
               TRANSFORM_FORMAT_VERSION if layout.transform else FIX_FORMAT_VERSION if fix is not None else
               TIERS_FORMAT_VERSION if tiered else FORMAT_VERSION if screen is None else SCREEN_FORMAT_VERSION)
    writer.add_uint32(Key.VERSION, version)
    writer.add_uint32(Key.GROUP_SIZE, layout.group_size)
    writer.add_uint32(Key.LEVELS, layout.levels)
    writer.add_uint32(Key.CODEBOOK_SIZE, layout.codebook_size)
    writer.add_uint32(Key.ADAPTOR_RANK, layout.adaptor_rank)
    writer.add_uint32(Key.ADAPTOR_HIDDEN, layout.adaptor_hidden)
    writer.add_string(Key.ACTIVATION, layout.activation if layout.adaptor_rank else "none")
    writer.add_string(Key.SOURCE_TYPE, provenance.source_type)
    writer.add_bool(Key.HEAD_COPY, provenance.head_copy)
    writer.add_float32(Key.BPW, provenance.bpw)
    writer.add_float32(Key.HEAD_BPW, provenance.head_bpw)
    writer.add_uint32(Key.HOT_ROWS, layout.hot_rows)
    writer.add_uint32(Key.HOT_LEVELS, layout.hot_levels)
    if tiered:
        writer.add_key_value(Key.HOT_TIERS, list(layout.tier_rows), gguf.GGUFValueType.ARRAY,
                             sub_type=gguf.GGUFValueType.UINT32)
    if screen is not None:
        sl = screen.rvq.layout
        writer.add_uint32(ScreenKey.GROUP_SIZE, sl.group_size)
        writer.add_uint32(ScreenKey.LEVELS, sl.levels)
        writer.add_uint32(ScreenKey.CODEBOOK_SIZE, sl.codebook_size)
        writer.add_uint32(ScreenKey.HOT_ROWS, sl.hot_rows)
        writer.add_uint32(ScreenKey.HOT_LEVELS, sl.hot_levels)
        writer.add_float32(ScreenKey.BPW, provenance.screen_bpw)
    if fix is not None:
        writer.add_uint32(FIX_RANK, int(fix.fix.shape[0]))
    if layout.transform:
        writer.add_bool(Key.TRANSFORM, True)
    if layout.hot_map:
        writer.add_bool(Key.HOT_MAP, True)
    if provenance.head_codes:
        writer.add_bool(Key.HEAD_CODES, True)


def write_model(source_reader, out, arch: str, tensors: CarvqTensors, provenance: Provenance,
                head: tuple[np.ndarray, object] | None = None, progress: bool = False) -> None:
    """Write `out`: the source model with token_embd.weight replaced by `tensors` (in its
    place, so tensor order is kept) and, for a tied source, `head` = (data, ggml type) as
    output.weight. Every other key and tensor is copied byte for byte. Atomic: a failure
    leaves no file behind."""
    import gguf

    check_finite(tensors)
    screen = tensors.screen
    if screen is not None:
        check_finite(screen)
    writer = gguf.GGUFWriter(None, arch)
    gio.copy_fields(source_reader, writer, skip=set())
    fix = tensors.screen_fix
    if fix is not None:
        check_finite(fix)
    add_metadata(writer, tensors.layout, provenance, screen, fix)
    for tensor in source_reader.tensors:
        if tensor.name != gio.EMBD:
            gio.add_source_tensor(writer, tensor)
            continue
        for name, arr in tensors.named():
            writer.add_tensor(name, arr)
        if head is not None:
            data, qtype = head
            writer.add_tensor(gio.HEAD, data, raw_dtype=qtype)
        for name, arr in screen.named() if screen is not None else ():
            writer.add_tensor(name, arr)
        for name, arr in fix.named() if fix is not None else ():
            writer.add_tensor(name, arr)
    with gio.atomic_output(out, check=_check_written) as tmp:
        gio.write_gguf(writer, tmp, progress)


def _check_written(path) -> None:
    """The writer reads its own file back through the reader's validation before renaming it
    into place: a file that no reader would load is never left behind."""
    try:
        read_tensors(path)
    except CarvqError as exc:
        raise CarvqError(f"the written file fails validation ({exc}); nothing was written") from None
