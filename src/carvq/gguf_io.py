"""GGUF input and output through gguf-py, with carvq's rules for bad input. Nothing here
knows the CARVQ format (that is carvq.format); these are the GGUF-level helpers it and the
runtime share.

- Opening: one readable CarvqError for a missing, foreign, truncated or inconsistent file.
- Writing: always to a temporary file beside the target, renamed into place at the end,
  so a failure never leaves partial output; the input is opened read-only.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from carvq.errors import CarvqError

GGUF_MAGIC = b"GGUF"
EMBD = "token_embd.weight"
HEAD = "output.weight"


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


class _Field:
    """A metadata field as carvq reads it (name, types, contents()), without gguf-py's arrays:
    its reader keeps one NumPy view per element of an array of strings, 0.7 GB for Gemma-3's
    262144-token vocabulary, which then sat under every phase of a conversion (issue 14's bound
    is 3x the float32 embedding, 1.9 GB there). The values are read once, as Python objects."""

    __slots__ = ("name", "offset", "types", "_value")

    def __init__(self, field):
        self.name, self.offset, self.types = field.name, field.offset, list(field.types)
        self._value = field.contents()

    def contents(self, index_or_slice: int | slice = slice(None)):
        if isinstance(self._value, list):
            return self._value[index_or_slice]
        return self._value


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
        reader.fields = type(reader.fields)((name, _Field(f)) for name, f in reader.fields.items())
    except Exception as exc:  # gguf-py raises many kinds on damaged input
        raise CarvqError(f"{path}: damaged or truncated GGUF ({type(exc).__name__}: {exc})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise CarvqError(f"{path}: truncated GGUF: tensor {t.name} runs past the end of the file")
    return reader


def release_pages(reader, tensor) -> None:
    """Drop a tensor's pages from this process's memory map (MADV_DONTNEED; the file is
    read-only, so nothing is lost and a later access reads them again). Its mapped pages
    otherwise count in the converter's RSS beside the float32 copy made from them."""
    import mmap

    m, arr = None, reader.data
    while arr is not None and m is None:  # the reader holds a plain view; its base chain ends at the mapping
        m = arr if isinstance(arr, mmap.mmap) else getattr(arr, "_mmap", None)
        arr = getattr(arr, "base", None)
    if m is None or not hasattr(m, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = tensor.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
    stop = min(len(m), tensor.data_offset + tensor.n_bytes)
    m.madvise(mmap.MADV_DONTNEED, start, stop - start)


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


# Rows per step when a whole matrix is converted (dequantized, quantized, decoded): gguf-py's
# NumPy kernels make several temporaries the size of their input, so a 128256 x 2048 matrix
# done at once peaked at many times its own size.
CHUNK_ROWS = 16384


def row_chunks(n_rows: int):
    """(start, stop) of each CHUNK_ROWS-row step over n_rows rows."""
    for a in range(0, n_rows, CHUNK_ROWS):
        yield a, min(n_rows, a + CHUNK_ROWS)


def dequantize_rows(data: np.ndarray, qtype, n_cols: int) -> np.ndarray:
    """Rows of ggml type `qtype` (data: one row of bytes per row) as float32 (rows, n_cols)."""
    import gguf

    return gguf.quants.dequantize(np.asarray(data), qtype).reshape(len(data), n_cols)


def dequantize(tensor) -> np.ndarray:
    """A tensor of any ggml type as float32, in NumPy shape (rows, cols), dequantized in
    chunks of rows into one preallocated array (peak: the result plus one chunk)."""
    n_cols = int(tensor.shape[0])
    n_rows = int(np.prod(tensor.shape[1:], dtype=np.int64)) if len(tensor.shape) > 1 else 1
    data = np.asarray(tensor.data).reshape(n_rows, -1)  # a view of the mapped file: one row per row
    out = np.empty((n_rows, n_cols), np.float32)
    for a, b in row_chunks(n_rows):
        try:
            out[a:b] = dequantize_rows(data[a:b], tensor.tensor_type, n_cols)
        except NotImplementedError:
            raise CarvqError(f"{tensor.name}: gguf-py cannot dequantize type {tensor.tensor_type.name}") from None
    return out


# ---------------------------------------------------------------------------------------
# writing

TMP_SUFFIX = ".carvq-tmp"


def _temp_prefix(target: Path) -> str:
    """Our temporary files are hidden, beside the target and named after it: f".{name}.{pid}.*"."""
    return f".{target.name}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(target: Path) -> list[Path]:
    """Delete the temporary files that an earlier writer of `target` left when it was killed
    (SIGKILL, power loss): ours by name, their process gone (the pid in the name, so that a
    live writer's file is left alone). Returns what was removed."""
    removed = []
    prefix = _temp_prefix(target)
    for p in target.parent.glob(glob.escape(prefix) + "*" + TMP_SUFFIX):
        pid = p.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and a.exists() and a.samefile(b))
    except OSError:
        return False


def check_output(src: Path, out: Path, force: bool) -> None:
    """Never destroy input: the output may not be the input, and an existing output is replaced
    only with force."""
    if same_file(src, out):
        raise CarvqError(f"output {out} is the input; choose another path")
    if out.exists() and not force:
        raise CarvqError(f"{out} exists; pass --force to replace it")
    if out.is_dir():
        raise CarvqError(f"{out} is a directory")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open a directory; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(target: Path, check=None) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it to `target` only on success.

    The data and the directory entry are fsynced before and after the rename, so that a crash
    leaves either the old file or the whole new one. `check(tmp)`, if given, validates the
    finished file before it takes the target's name. A writer killed outright leaves its
    temporary file behind; the next write to the same target removes it (and says so)."""
    import sys

    target = Path(target)
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise CarvqError(f"{target}: directory {directory} does not exist")
    for stale in remove_stale_temps(directory / target.name):
        print(f"carvq: removed {stale}, left by an interrupted earlier write", file=sys.stderr)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f"{_temp_prefix(target)}{os.getpid()}.", suffix=TMP_SUFFIX,
                                        dir=directory)
    except OSError as exc:
        raise CarvqError(f"{target}: cannot write ({exc.strerror})") from None
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; the result should look like any new file
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        os.replace(tmp, target)
        _fsync_dir(directory)
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
