"""GGUF input and output through gguf-py, with carvq's rules for bad input.

- Opening: one readable CarvqError for a missing, foreign, truncated or inconsistent file.
- Writing: always to a temporary file beside the target, renamed into place at the end,
  so a failure never leaves partial output; the input is opened read-only.
"""
from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from carvq.errors import CarvqError
from carvq.reference import FORMAT_VERSION, PREFIX, READABLE_VERSIONS, CarvqTensors, Layout

GGUF_MAGIC = b"GGUF"
EMBD = "token_embd.weight"
HEAD = "output.weight"

# carvq.* metadata keys (docs/FORMAT.md)
K_VERSION = "carvq.format_version"
K_GROUP = "carvq.group_size"
K_LEVELS = "carvq.levels"
K_CBSIZE = "carvq.codebook_size"
K_RANK = "carvq.adaptor_rank"
K_HIDDEN = "carvq.adaptor_hidden"
K_ACT = "carvq.adaptor_activation"
K_SRC_TYPE = "carvq.source_type"
K_HEAD_COPY = "carvq.head_copy"
K_BPW = "carvq.bpw"
K_HEAD_BPW = "carvq.head_bpw"
K_HOT_ROWS = "carvq.hot_rows"
K_HOT_LEVELS = "carvq.hot_levels"

T_CODES = PREFIX + "codes"
T_CODEBOOKS = PREFIX + "codebooks"
T_SIGMA0 = PREFIX + "sigma0"
T_UP_W = PREFIX + "up.weight"
T_UP_B = PREFIX + "up.bias"
T_DOWN_W = PREFIX + "down.weight"
T_DOWN_B = PREFIX + "down.bias"
ADAPTOR_TENSORS = (T_SIGMA0, T_UP_W, T_UP_B, T_DOWN_W, T_DOWN_B)
T_HOT_IDS = PREFIX + "hot_ids"
T_HOT_CODES = PREFIX + "hot_codes"
T_HOT_CODEBOOKS = PREFIX + "hot_codebooks"
HOT_TENSORS = (T_HOT_IDS, T_HOT_CODES, T_HOT_CODEBOOKS)


@functools.cache
def _plain_view_reader():
    import gguf

    class PlainViewReader(gguf.GGUFReader):
        """gguf-py's reader over a plain ndarray view of its memmap. The reader slices its
        data once per metadata value, and every slice of a np.memmap runs memmap's Python
        hooks: a 262k-token vocabulary (Gemma-3) took 9.6 s to parse, 3.0 s this way. The
        view keeps the mapping alive (it is the view's base); nothing is read eagerly."""

        def __setattr__(self, name, value):
            if name == "data" and isinstance(value, np.memmap):
                value = value.view(np.ndarray)
            super().__setattr__(name, value)

    return PlainViewReader


def open_gguf(path: str | os.PathLike):
    """gguf.GGUFReader of `path`, read-only, or CarvqError with one readable line."""
    path = Path(path)
    if not path.exists():
        raise CarvqError(f"{path}: no such file")
    if not path.is_file():
        raise CarvqError(f"{path}: not a regular file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise CarvqError(f"{path}: not a GGUF file (magic {magic!r})")
    try:
        reader = _plain_view_reader()(path, "r")
    except Exception as exc:  # gguf-py raises many kinds on damaged input
        raise CarvqError(f"{path}: damaged or truncated GGUF ({type(exc).__name__}: {exc})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise CarvqError(f"{path}: truncated GGUF: tensor {t.name} runs past the end of the file")
    return reader


def field_value(reader, key: str, default=None):
    field = reader.get_field(key)
    if field is None:
        return default
    return field.contents()


def tensor_by_name(reader, name: str):
    for t in reader.tensors:
        if t.name == name:
            return t
    return None


def tensor_type_name(tensor) -> str:
    return tensor.tensor_type.name


def dequantize(tensor) -> np.ndarray:
    """A tensor of any ggml type as float32, in NumPy shape (rows, cols)."""
    import gguf

    try:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise CarvqError(f"{tensor.name}: gguf-py cannot dequantize type {tensor.tensor_type.name}") from None
    n_cols = int(tensor.shape[0])
    return np.ascontiguousarray(data.reshape(-1, n_cols), dtype=np.float32)


def is_carvq(reader) -> bool:
    return reader.get_field(K_VERSION) is not None


def read_layout(reader) -> Layout:
    """The Layout of a CARVQ file, from its metadata and tensor shapes (validated)."""
    version = field_value(reader, K_VERSION)
    if version is None:
        raise CarvqError("not a CARVQ-GGUF: no carvq.format_version key")
    if version not in READABLE_VERSIONS:
        raise CarvqError(f"CARVQ format version {version} is not supported (this carvq reads versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))})")
    codes = tensor_by_name(reader, T_CODES)
    if codes is None:
        raise CarvqError(f"CARVQ tensor {T_CODES} is missing")
    embd_width = _embedding_width(reader)
    try:
        layout = Layout(
            n_vocab=int(codes.shape[1]),
            n_embd=embd_width,
            group_size=int(field_value(reader, K_GROUP)),
            levels=int(field_value(reader, K_LEVELS)),
            codebook_size=int(field_value(reader, K_CBSIZE)),
            adaptor_rank=int(field_value(reader, K_RANK)),
            adaptor_hidden=int(field_value(reader, K_HIDDEN)),
            activation=str(field_value(reader, K_ACT)),
            hot_rows=int(field_value(reader, K_HOT_ROWS, 0) if version >= 2 else 0),
            hot_levels=int(field_value(reader, K_HOT_LEVELS, 0) if version >= 2 else 0),
        )
    except TypeError:
        raise CarvqError("CARVQ metadata incomplete: a carvq.* key is missing") from None
    layout.check()
    return layout


def _embedding_width(reader) -> int:
    cb = tensor_by_name(reader, T_CODEBOOKS)
    if cb is None:
        raise CarvqError(f"CARVQ tensor {T_CODEBOOKS} is missing")
    if len(cb.shape) != 4:
        raise CarvqError(f"CARVQ tensor {T_CODEBOOKS} must have 4 dimensions (G, L, K, d), has {len(cb.shape)}")
    return int(cb.shape[0]) * int(cb.shape[3])  # ne = [d, K, L, G]


def _expect(reader, name: str, types: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
    t = tensor_by_name(reader, name)
    if t is None:
        raise CarvqError(f"CARVQ tensor {name} is missing")
    if t.tensor_type.name not in types:
        raise CarvqError(f"CARVQ tensor {name} has type {t.tensor_type.name}, expected {' or '.join(types)}")
    got = tuple(int(x) for x in reversed(t.shape.tolist()))
    if got != shape:
        raise CarvqError(f"CARVQ tensor {name} has shape {got}, expected {shape}")
    return np.asarray(t.data).reshape(shape)


def read_carvq_tensors(reader) -> CarvqTensors:
    layout = read_layout(reader)
    lo = layout
    codes = _expect(reader, T_CODES, ("I8",), (lo.n_vocab, lo.code_row_bytes)).view(np.uint8)
    codebooks = _expect(reader, T_CODEBOOKS, ("F32", "F16"), (lo.n_groups, lo.levels, lo.codebook_size, lo.group_size))
    hot = {}
    if lo.hot_rows:
        hot_ids = _expect(reader, T_HOT_IDS, ("I32",), (lo.hot_rows,))
        if hot_ids.min() < 0 or hot_ids.max() >= lo.n_vocab or (np.diff(hot_ids.astype(np.int64)) <= 0).any():
            raise CarvqError(f"CARVQ tensor {T_HOT_IDS} must hold strictly increasing token ids in 0..{lo.n_vocab - 1}")
        hot = dict(hot_ids=hot_ids,
                   hot_codes=_expect(reader, T_HOT_CODES, ("I8",), (lo.hot_rows, lo.hot_code_row_bytes)).view(np.uint8),
                   hot_codebooks=_expect(reader, T_HOT_CODEBOOKS, ("F32", "F16"),
                                         (lo.n_groups, lo.hot_levels, lo.codebook_size, lo.group_size)))
    else:
        stray = [n for n in HOT_TENSORS if tensor_by_name(reader, n) is not None]
        if stray:
            raise CarvqError(f"CARVQ tensor {stray[0]} present but carvq.hot_rows is 0")
    present = [n for n in ADAPTOR_TENSORS if tensor_by_name(reader, n) is not None]
    if not lo.adaptor_rank:
        if present:
            raise CarvqError(f"CARVQ tensor {present[0]} present but carvq.adaptor_rank is 0")
        return CarvqTensors(lo, codes, codebooks, **hot)
    m, h, n = lo.adaptor_rank, lo.adaptor_hidden, lo.n_embd
    return CarvqTensors(
        lo, codes, codebooks, **hot,
        sigma0=_expect(reader, T_SIGMA0, ("F32", "F16"), (lo.n_vocab, m)),
        up_w=_expect(reader, T_UP_W, ("F32", "F16"), (h, m)),
        up_b=_expect(reader, T_UP_B, ("F32",), (h,)),
        down_w=_expect(reader, T_DOWN_W, ("F32", "F16"), (n, h)),
        down_b=_expect(reader, T_DOWN_B, ("F32",), (n,)),
    )


# ---------------------------------------------------------------------------------------
# writing

@contextlib.contextmanager
def atomic_output(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it to `target` only on success."""
    target = Path(target)
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise CarvqError(f"{target}: directory {directory} does not exist")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise CarvqError(f"{target}: cannot write ({exc.strerror})") from None
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; the result should look like any new file
    try:
        yield tmp
        os.replace(tmp, target)
    except OSError as exc:
        raise CarvqError(f"{target}: write failed ({exc.strerror or exc})") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def copy_fields(reader, writer, skip: set[str]) -> None:
    """Copy every metadata key of `reader` into `writer`, types preserved, except `skip`."""
    import gguf

    for field in reader.fields.values():
        name = field.name
        if name.startswith("GGUF.") or name == gguf.Keys.General.ARCHITECTURE or name in skip:
            continue
        if name == gguf.Keys.General.ALIGNMENT:
            writer.add_custom_alignment(int(field.contents()))
            continue
        val_type = field.types[0]
        sub_type = field.types[-1] if val_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), val_type, sub_type=sub_type)


def add_source_tensor(writer, tensor, name: str | None = None) -> None:
    """Add a reader tensor to a writer byte for byte (quantized types included)."""
    writer.add_tensor(name or tensor.name, tensor.data, raw_dtype=tensor.tensor_type)


def write_gguf(writer, path: Path, progress: bool) -> None:
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=progress)
    writer.close()
