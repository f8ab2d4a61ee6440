"""carvq footprint on a tiny model: exact byte accounting, a stable JSON schema, sane RSS figures."""
from __future__ import annotations

import json

from conftest import run_cli


def _metadata_and_padding(path) -> int:
    """Bytes that are not tensor data, counted from the file's own layout: the header and
    metadata up to the data section, the alignment gaps between tensors and the tail."""
    from carvq import gguf_io as gio

    reader = gio.open_gguf(path)
    spans = sorted((int(t.data_offset), int(t.data_offset) + int(t.n_bytes)) for t in reader.tensors)
    gaps, end = spans[0][0], spans[0][1]  # everything before the first tensor's data
    for start, stop in spans[1:]:
        assert start >= end, "tensors overlap"
        gaps += start - end
        end = stop
    return gaps + path.stat().st_size - end


def test_categories_sum_to_file_size(tiny_carvq, tiny_gguf):
    from carvq.runtime.footprint import file_categories

    for path in (tiny_carvq("llama")[0], tiny_gguf("qwen2")):
        fp = file_categories(path)
        assert fp.file_bytes == path.stat().st_size
        # the remainder is metadata by definition; check it against the file's layout instead
        assert fp.categories["metadata_and_padding"].bytes == _metadata_and_padding(path) > 0
        tensor_bytes = sum(c.bytes for name, c in fp.categories.items() if name != "metadata_and_padding")
        assert tensor_bytes + _metadata_and_padding(path) == fp.file_bytes
    carvq = file_categories(tiny_carvq("llama")[0])
    assert not carvq.tied_head and carvq.categories["output_head"].bytes > 0
    assert file_categories(tiny_gguf("llama")).tied_head


def test_json_schema_and_rss(tiny_carvq, tiny_gguf, tmp_path):
    path, _ = tiny_carvq("llama")
    chart = tmp_path / "footprint.png"
    proc = run_cli("footprint", path, "--baseline", tiny_gguf("llama"), "--tokens", "4", "--json", "--plot", chart)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert doc["schema"] == 1 and set(doc) == {"schema", "model", "baseline"}
    for side in ("model", "baseline"):
        m = doc[side]
        assert set(m) == {"model", "file_bytes", "tied_head", "categories", "rss", "tokens"}
        assert set(m["categories"]) == {"embedding", "output_head", "blocks", "other_tensors", "metadata_and_padding"}
        assert all(set(c) == {"bytes", "elements", "bpw"} for c in m["categories"].values())
        assert sum(c["bytes"] for c in m["categories"].values()) == m["file_bytes"]
        assert set(m["rss"]) == {"mmap", "no_mmap"}
        for mode in m["rss"].values():
            assert 0 < mode["after_load"] <= mode["peak"]
    assert chart.stat().st_size > 1000 and chart.read_bytes()[:4] == b"\x89PNG"


def test_table_output(tiny_carvq):
    path, _ = tiny_carvq("qwen2")
    proc = run_cli("footprint", path, "--no-rss")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "embedding" in proc.stdout and "bpw" in proc.stdout and "file" in proc.stdout
