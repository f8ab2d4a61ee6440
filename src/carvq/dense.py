"""Dense variants of a GGUF: the same model with a given float32 `token_embd.weight`.

Used to check the patched lookup against a plain get_rows on the decoded matrix, and by
the quality benchmark to simulate embedding types that llama.cpp cannot store natively.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from carvq import format as fmt
from carvq import gguf_io as gio
from carvq.errors import CarvqError


def write_dense_embedding(src, out: Path, matrix, keep_head: bool = False) -> None:
    """Copy `src` (a GGUF path or reader) to `out` with token_embd.weight = matrix,
    dropping any CARVQ tensors and carvq.* keys. Every other tensor and key is copied.
    matrix: a float32 or float16 array (written as F32 / F16), or (data, ggml type) of an
    already quantized array (gguf-py's layout), or a tensor of another reader (its bytes are
    copied, e.g. an embedding quantized by llama-quantize), or None to keep the source's own
    embedding bytes.
    keep_head: a tied source gains output.weight = a byte copy of its own embedding, so
    that only the lookup changes (llama.cpp would otherwise read logits from `matrix`)."""
    import gguf

    reader = gio.open_gguf(src) if isinstance(src, (str, Path)) else src
    if isinstance(matrix, np.ndarray):
        dtype = np.float16 if matrix.dtype == np.float16 else np.float32
        matrix = np.ascontiguousarray(matrix, dtype=dtype)
        if matrix.ndim != 2:
            raise CarvqError("embedding matrix must be 2-D")
    writer = gguf.GGUFWriter(None, gio.field_value(reader, "general.architecture"))
    carvq_keys = {name for name in reader.fields if name.startswith("carvq.")}
    gio.copy_fields(reader, writer, skip=carvq_keys)
    placed = False
    add_head = keep_head and gio.tensor_by_name(reader, gio.HEAD) is None
    for t in reader.tensors:
        if t.name.startswith(fmt.SCREEN_PREFIX):
            continue  # the head's screen index means nothing to a dense file
        if t.name == gio.EMBD or t.name.startswith(fmt.PREFIX):
            if not placed:
                if isinstance(matrix, np.ndarray):
                    writer.add_tensor(gio.EMBD, matrix)
                elif isinstance(matrix, tuple) and not hasattr(matrix, "tensor_type"):  # a ReaderTensor is a tuple too
                    data, qtype = matrix
                    writer.add_tensor(gio.EMBD, data, raw_dtype=qtype)
                else:
                    gio.add_source_tensor(writer, t if matrix is None else matrix, name=gio.EMBD)
                placed = True
            if add_head and t.name == gio.EMBD:
                gio.add_source_tensor(writer, t, name=gio.HEAD)
            continue
        gio.add_source_tensor(writer, t)
    if not placed:
        raise CarvqError(f"{src}: no embedding to replace")
    with gio.atomic_output(Path(out), check=_check_plain) as tmp:
        gio.write_gguf(writer, tmp, progress=False)


def _check_plain(path) -> None:
    """The written file parses and has a plain token_embd.weight and no CARVQ part."""
    reader = gio.open_gguf(path)
    if fmt.is_carvq(reader) or gio.tensor_by_name(reader, gio.EMBD) is None:
        raise CarvqError(f"{path}: the written file is not a plain GGUF with {gio.EMBD}; nothing was written")
