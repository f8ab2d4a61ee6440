"""The lookup transform (format v6, converter/frame.py): the codes fit, and decode, in the
principal axes of the weighted embedding. The NumPy reference, the patched llama.cpp's lookup
and its screened head agree on it; bad transforms are refused by both readers."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from carvq import format as fmt
from conftest import check_screened_candidates, rewrite_gguf

IDS = [1, 5, 17, 42, 99, 200, 7, 3, 250, 11, 64, 128, 300, 2, 19, 33]


@pytest.fixture(scope="module")
def transformed(workdir, tiny_gguf):
    """(arch, codebook type) -> (path, report) of a conversion with --transform pca and the Fisher metric."""
    from carvq.converter.config import Config
    from carvq.converter.convert import convert

    cache = {}

    def get(arch: str, cb_type: str = "F32"):
        if (arch, cb_type) not in cache:
            out = workdir / f"{arch}.transform.{cb_type}.carvq.gguf"
            cfg = Config(group_size=8, levels=2, codebook_type=cb_type, hot_rows=24, hot_levels=2)
            report = convert(tiny_gguf(arch), out, cfg, iters=2, seed=0, progress=False, fit_metric="fisher",
                             transform="pca")
            cache[arch, cb_type] = (out, report)
        return cache[arch, cb_type]

    return get


def test_principal_frame_is_orthogonal_and_deals_axes_to_groups():
    from carvq.converter import frame

    rng = np.random.default_rng(0)
    M = (rng.standard_normal((500, 16)) * np.linspace(3, 0.1, 16)).astype(np.float32)
    w = rng.random(500)
    Q = frame.principal_frame(M, w, group_size=4)
    assert np.allclose(Q.T @ Q, np.eye(16), atol=1e-10)
    # the strongest axis goes to group 0, the next to group 1, ... then back: groups balanced
    rotated = M.astype(np.float64) @ Q
    var = (w[:, None] * (rotated - w @ rotated / w.sum()) ** 2).sum(0) / w.sum()
    strongest = np.argsort(-var)
    assert [int(c) // 4 for c in strongest[:4]] == [0, 1, 2, 3]
    assert [int(c) // 4 for c in strongest[4:8]] == [3, 2, 1, 0]
    before = M.copy()
    frame.rotate_rows(M, Q)
    assert np.allclose(M, before.astype(np.float64) @ Q, atol=1e-5)


def test_auto_takes_the_frame_where_it_is_cheap():
    from carvq.converter import frame

    assert frame.wanted("auto", 262144, 640)  # Gemma-3: 0.04 bpw
    assert not frame.wanted("auto", 49152, 576)  # SmolLM2: 0.19 bpw
    assert frame.wanted("pca", 49152, 576) and not frame.wanted("none", 262144, 640)


@pytest.mark.parametrize("cb_type", ["F32", "F16"])
def test_file_counts_and_decodes_the_transform(transformed, tiny_gguf, cb_type):
    from carvq import gguf_io as gio
    from carvq.reference import decode_all

    path, report = transformed("gemma3", cb_type)
    reader = gio.open_gguf(path)
    assert gio.field_value(reader, fmt.Key.VERSION) == fmt.TRANSFORM_FORMAT_VERSION
    t = fmt.read_tensors(reader)
    n = t.layout.n_embd
    assert t.layout.transform and t.transform.shape == (n, n) and t.transform.dtype == {"F32": np.float32, "F16": np.float16}[cb_type]
    assert report.parts["transform"] == t.transform.nbytes
    lookup = sum(int(x.n_bytes) for x in reader.tensors if x.name.startswith(fmt.PREFIX))
    assert report.lookup_bytes == lookup
    assert abs(float(gio.field_value(reader, fmt.Key.BPW)) - 8.0 * lookup / (t.layout.n_vocab * n)) < 1e-4
    from carvq.inspection import carvq_summary
    assert any(f"transform (format v6): {n} x {n}" in line for line in carvq_summary(reader))
    # the decoded rows approximate the source (the frame is undone, the metric's scale too)
    source = gio.dequantize(gio.tensor_by_name(gio.open_gguf(tiny_gguf("gemma3")), gio.EMBD))
    err = np.linalg.norm(decode_all(path) - source) / np.linalg.norm(source)
    assert err < 0.9 and abs(err - report.errors.rel_error) < 1e-3


def test_llama_lookup_applies_the_transform(transformed):
    from carvq.reference import decode_rows
    from carvq.runtime.model import Model

    path, _ = transformed("gemma3", "F16")
    want = decode_rows(path, IDS)
    with Model(path, n_ctx=64) as model:
        got = model.embedding_rows(IDS)
    # W sums in ggml's order (FORMAT.md): float32 rounding, not bit for bit
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_screened_head_scans_in_the_codes_frame(transformed):
    """A tied head screened by the lookup's codes: the tables come from h @ W (FORMAT.md), and the
    candidates are exactly the NumPy reference's top-k."""
    path, _ = transformed("gemma3", "F16")
    check_screened_candidates(path, IDS, k=24)


def test_tuning_keeps_the_transform(workdir, tiny_gguf):
    from carvq.converter.config import Config
    from carvq.converter.convert import convert
    from conftest import SCREEN_TEXT

    text = workdir / "transform-calibration.txt"
    text.write_text(SCREEN_TEXT)
    out = workdir / "gemma3.transform.tuned.carvq.gguf"
    report = convert(tiny_gguf("gemma3"), out, Config(group_size=8, levels=2, codebook_type="F32"), iters=1, seed=0,
                     progress=False, transform="pca", tune_steps=2, calibration=text)
    assert fmt.read_tensors(out).layout.transform
    assert any("held-out" in n or "KL" in n for n in report.notes)


def _refused(path, *needles):
    from carvq.errors import CarvqError

    with pytest.raises(CarvqError) as exc:
        fmt.read_tensors(path)
    assert all(s in str(exc.value) for s in needles), str(exc.value)
    proc = subprocess.run([sys.executable, "-m", "carvq.cli", "generate", str(path), "-p", "the", "-n", "2"],
                          capture_output=True, text=True, errors="replace", timeout=120)
    assert proc.returncode == 1 and "carvq: error:" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("case", ["old version", "tensor without key", "wrong shape", "not finite"])
def test_bad_transforms_are_refused(transformed, workdir, case):
    path, _ = transformed("gemma3", "F32")
    W = fmt.read_tensors(path).transform
    bad = workdir / f"bad-transform-{case.replace(' ', '-')}.gguf"
    if case == "old version":
        rewrite_gguf(path, bad, version=5)
        _refused(bad, fmt.Key.TRANSFORM, "version")
    elif case == "tensor without key":
        rewrite_gguf(path, bad, drop_keys=(fmt.Key.TRANSFORM,))
        _refused(bad, fmt.Tensor.TRANSFORM)
    elif case == "wrong shape":
        rewrite_gguf(path, bad, replace={fmt.Tensor.TRANSFORM: lambda t: np.ascontiguousarray(W[:-1])})
        _refused(bad, fmt.Tensor.TRANSFORM, "shape")
    else:
        W = W.copy()
        W[3, 5] = np.inf
        rewrite_gguf(path, bad, replace={fmt.Tensor.TRANSFORM: lambda t: W})
        _refused(bad, fmt.Tensor.TRANSFORM, "non-finite")


def test_the_matrix_is_paid_from_the_budget(workdir, tiny_gguf, monkeypatch):
    """(A tiny model's matrix costs 3.2 bpw, its codebooks as much: hence the large budget.) Trimmed to a budget in hot tiers, the lookup with its matrix stays within it; --target-bpw
    without tiers cannot pay it, so `auto` leaves the frame out there."""
    from carvq.converter import frame
    from carvq.converter.config import Config
    from carvq.converter.convert import convert
    from carvq.errors import CarvqError

    cfg = Config(group_size=8, levels=4, codebook_type="F16")
    out = workdir / "gemma3.transform.trimmed.carvq.gguf"
    report = convert(tiny_gguf("gemma3"), out, cfg, iters=1, seed=0, progress=False, transform="pca", trim_to=12.0,
                     tier_floor=2)
    t = fmt.read_tensors(out)
    assert t.layout.transform and report.parts["transform"] > 0
    with pytest.raises(CarvqError, match="transform none"):  # a budget the matrix leaves too little of
        convert(tiny_gguf("gemma3"), workdir / "too-small.gguf", cfg, iters=1, seed=0, progress=False, transform="pca",
                trim_to=6.0, tier_floor=2)
    assert report.bpw(report.lookup_bytes) <= 12.0 + 1e-9
    assert len(t.layout.tier_rows) > 1
    check_screened_candidates(out, IDS, k=24)  # the scan reads the first tier, in the codes' frame

    monkeypatch.setattr(frame, "AUTO_MAX_BPW", 1e9)  # the tiny model's matrix is dear: make auto take it
    out = workdir / "gemma3.transform.untiered.carvq.gguf"
    report = convert(tiny_gguf("gemma3"), out, Config(group_size=8, codebook_type="F16"), iters=1, seed=0,
                     progress=False, transform="auto", target_bpw=4.0)
    assert not fmt.read_tensors(out).layout.transform and "transform" not in report.parts
