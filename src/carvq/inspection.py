"""`carvq inspect FILE`: what a GGUF holds, tensor by tensor, with CARVQ's parameters."""
from __future__ import annotations

from pathlib import Path

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
    else:
        lines += ["", *conversion_estimate(reader, Path(path).stat().st_size)]
    return "\n".join(lines)


def conversion_estimate(reader, file_bytes: int) -> list[str]:
    """What `carvq convert` at its defaults would make of a stock GGUF, from its shapes alone:
    the embedding's share of the file, the head copy a tied model gains, the expected size."""
    import gguf

    from carvq.converter import config as cfgmod
    from carvq.converter.head import default_head_type
    from carvq.errors import CarvqError

    MiB = 1 << 20
    arch = gio.field_value(reader, "general.architecture", "?")
    embd = gio.tensor_by_name(reader, gio.EMBD)
    if embd is None:
        return [f"no {gio.EMBD}: nothing for carvq to compress"]
    n, V = int(embd.shape[0]), int(embd.shape[1])
    eb = int(embd.n_bytes)
    tied = gio.tensor_by_name(reader, gio.HEAD) is None
    lines = [f"embedding {V} x {n}, {embd.tensor_type.name}: {eb / MiB:.2f} MiB = {100 * eb / file_bytes:.1f} % of the "
             f"file, {8 * eb / (V * n):.3f} bpw" + ("; the output head is tied to it" if tied else "")]
    if arch not in fmt.ARCHITECTURES:
        return lines + [f"carvq convert: architecture {arch!r} is not supported (supported: {', '.join(fmt.ARCHITECTURES)})"]
    try:
        cfg = cfgmod.Config()
        cfg.check(n)
        cfg = cfg.resolve_hot(V, n)
    except CarvqError as exc:
        return lines + [f"carvq convert at the defaults: {exc} (choose --group-size)"]
    lookup = sum(cfgmod.part_bytes(cfg, V, n).values())
    head = 0
    head_note = ""
    if tied:
        head_type = default_head_type(embd, n)
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[head_type]]
        head = V * n // block * size
        head_note = f" + a {head_type} head copy of {head / MiB:.2f} MiB (the tied head needs rows of its own)"
    expected = file_bytes - eb + lookup + head + 640  # + the carvq.* keys and the new tensors' headers
    lines.append(f"carvq convert at the defaults (d={cfg.group_size}, L={cfg.levels}, {cfg.hot_rows} hot rows): lookup "
                 f"{lookup / MiB:.2f} MiB ({8 * lookup / (V * n):.3f} bpw){head_note}; file about "
                 f"{expected / MiB:.2f} MiB instead of {file_bytes / MiB:.2f} MiB ({100 * (expected - file_bytes) / file_bytes:+.1f} %)")
    return lines


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
        "  hot rows: " + (f"{lo.hot_rows} tokens with {lo.hot_levels} more levels" if len(lo.tier_rows) == 1 else
                          f"{len(lo.tier_rows)} tiers of {', '.join(map(str, lo.tier_rows))} tokens, {lo.hot_levels} more "
                          "level(s) each (a row in k tiers has L + k levels)" if lo.hot_rows else "none"),
        "  transform (format v6): " + (f"{lo.n_embd} x {lo.n_embd}, the codes decode in a frame of their own"
                                       if lo.transform else "none"),
        f"  lookup: {carvq_bytes:,} bytes = {8 * carvq_bytes / n_w:.4f} bpw (metadata says {gio.field_value(reader, Key.BPW):.4f})",
    ]
    if head_copy and head is not None:
        hb = int(head.n_bytes)
        lines.append(f"  head copy added for a tied source: {head.tensor_type.name}, {hb:,} bytes = {8 * hb / n_w:.4f} bpw; "
                     f"lookup + head = {8 * (carvq_bytes + hb) / n_w:.4f} bpw")
    tensors = fmt.read_tensors(reader)
    if tensors.head_codes:
        lines.append(f"  coded head (format v8): the tied head is the lookup's own rows, no head copy; "
                     f"lookup + head = {8 * carvq_bytes / n_w:.4f} bpw")
    screen = tensors.screen
    if tensors.screen_fix is not None:
        fb = tensors.screen_fix.nbytes
        lines.append(f"  screen correction (output.carvq.fix*, format v5): rank {tensors.screen_fix.fix.shape[0]}; "
                     f"{fb:,} bytes = {8 * fb / n_w:.4f} bpw")
    if screen is not None:
        sl, sb = screen.rvq.layout, screen.nbytes
        hot = f"{sl.hot_rows} hot rows with {sl.hot_levels} more levels" if sl.hot_rows else "no hot rows"
        lines.append(f"  head screen index (output.carvq.*): group size {sl.group_size}, levels {sl.levels}, {hot}, "
                     f"projection {sl.n_embd} x {sl.n_embd}; {sb:,} bytes = {8 * sb / n_w:.4f} bpw")
    return lines
