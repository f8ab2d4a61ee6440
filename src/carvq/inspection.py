"""`carvq inspect FILE`: what a GGUF holds, tensor by tensor, with CARVQ's parameters."""
from __future__ import annotations

from carvq import format as fmt
from carvq import gguf_io as gio
from carvq.format import Key


def _bpw(t) -> float:
    return 8.0 * int(t.n_bytes) / max(int(t.n_elements), 1)


def inspect_text(path) -> str:
    reader = gio.open_gguf(path)
    rows = []
    for t in reader.tensors:
        shape = "x".join(str(int(x)) for x in reversed(t.shape.tolist()))
        rows.append((t.name, t.tensor_type.name, shape, int(t.n_bytes), _bpw(t)))
    width = max([len(r[0]) for r in rows] + [6])
    lines = [f"{path}: GGUF, architecture {gio.field_value(reader, 'general.architecture', '?')}, "
             f"{len(rows)} tensors, {len(reader.fields)} metadata keys", ""]
    lines.append(f"{'tensor':<{width}}  {'type':<8} {'shape (rows x cols)':<22}{'bytes':>14}{'bpw':>9}")
    lines += [f"{n:<{width}}  {ty:<8} {sh:<22}{b:>14,}{bpw:>9.3f}" for n, ty, sh, b, bpw in rows]
    total = sum(r[3] for r in rows)
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    lines.append(f"{'total':<{width}}  {'':<8} {f'{n_params:,} elements':<22}{total:>14,}{8 * total / max(n_params, 1):>9.3f}")
    if fmt.is_carvq(reader):
        lines += ["", *carvq_summary(reader)]
    return "\n".join(lines)


def carvq_summary(reader) -> list[str]:
    lo = fmt.read_tensors(reader).layout  # every rule the loader checks, not only the shapes
    carvq_bytes = sum(int(t.n_bytes) for t in reader.tensors if t.name.startswith(fmt.PREFIX))
    head = gio.tensor_by_name(reader, gio.HEAD)
    head_copy = bool(gio.field_value(reader, Key.HEAD_COPY, False))
    n_w = lo.n_vocab * lo.n_embd
    lines = [
        f"CARVQ format {gio.field_value(reader, Key.VERSION)}: embedding {lo.n_vocab} x {lo.n_embd} "
        f"(source type {gio.field_value(reader, Key.SOURCE_TYPE)})",
        f"  group size {lo.group_size} ({lo.n_groups} groups), levels {lo.levels}, codebook size {lo.codebook_size}",
        "  adaptor: " + (f"rank {lo.adaptor_rank}, hidden {lo.adaptor_hidden}, {lo.activation}" if lo.adaptor_rank else "none"),
        "  hot rows: " + (f"{lo.hot_rows} tokens with {lo.hot_levels} more levels" if lo.hot_rows else "none"),
        f"  lookup: {carvq_bytes:,} bytes = {8 * carvq_bytes / n_w:.4f} bpw (metadata says {gio.field_value(reader, Key.BPW):.4f})",
    ]
    if head_copy and head is not None:
        hb = int(head.n_bytes)
        lines.append(f"  head copy added for a tied source: {head.tensor_type.name}, {hb:,} bytes = {8 * hb / n_w:.4f} bpw; "
                     f"lookup + head = {8 * (carvq_bytes + hb) / n_w:.4f} bpw")
    return lines
