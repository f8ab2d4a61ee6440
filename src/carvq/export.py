"""`carvq export`: a CARVQ-GGUF back to a stock GGUF that any llama.cpp runs (Ollama, LM Studio,
unpatched builds). The embedding is decoded (the NumPy reference decoder, bit-exact with the C
one for the RVQ and hot levels) and stored as a plain token_embd.weight of the requested ggml
type; every other tensor, the head copy included, and every non-carvq key is kept as it is.

The quantization is gguf-py's (the same arithmetic as ggml's reference quantizers), so only
the types gguf-py can write are offered; for K-quants or i-quants, export F32 and run
llama-quantize --token-embedding-type on the result.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from carvq import format as fmt
from carvq import gguf_io as gio
from carvq.errors import CarvqError

TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")


@dataclass
class ExportReport:
    input: str
    output: str
    embedding_type: str
    input_bytes: int
    output_bytes: int
    embedding_bytes: int

    def format(self) -> str:
        MiB = 1 << 20
        return (f"{self.output}: token_embd.weight as {self.embedding_type} ({self.embedding_bytes / MiB:.2f} MiB); "
                f"file {self.input_bytes / MiB:.2f} -> {self.output_bytes / MiB:.2f} MiB; runs on any llama.cpp")


def _quantized(matrix: np.ndarray, type_name: str):
    """(data, ggml type) of the decoded embedding in `type_name`."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if matrix.shape[1] % block:
        raise CarvqError(f"--embedding-type {type_name}: its blocks of {block} do not divide the width {matrix.shape[1]}")
    if type_name == "F32":
        return matrix, qtype
    return gguf.quants.quantize(matrix, qtype), qtype


def export(src, out, embedding_type: str = "auto", force: bool = False) -> ExportReport:
    from carvq.dense import write_dense_embedding
    from carvq.reference import decode

    src, out = Path(src), Path(out)
    reader = gio.open_gguf(src)
    if not fmt.is_carvq(reader):
        raise CarvqError(f"{src}: not a CARVQ-GGUF (nothing to export)")
    gio.check_output(src, out, force)
    tensors = fmt.read_tensors(reader)
    if embedding_type == "auto":
        source_type = str(gio.field_value(reader, fmt.Key.SOURCE_TYPE, "Q8_0"))
        embedding_type = source_type if source_type in TYPES else "Q8_0"
    embedding_type = embedding_type.upper()
    if embedding_type not in TYPES:
        raise CarvqError(f"--embedding-type {embedding_type}: one of {', '.join(TYPES)} (for other types, export F32 "
                         "and run llama-quantize --token-embedding-type on the result)")
    matrix = decode(tensors, np.arange(tensors.layout.n_vocab))
    data, qtype = _quantized(matrix, embedding_type)
    write_dense_embedding(reader, out, (data, qtype))
    return ExportReport(str(src), str(out), embedding_type, src.stat().st_size, out.stat().st_size, int(data.nbytes))
