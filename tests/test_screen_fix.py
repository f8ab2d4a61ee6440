"""The screen correction (format v5, converter/screen_fix.py): what the scan misses along the
hidden states' top directions, one int8 a row and direction."""
from __future__ import annotations

import numpy as np
import pytest

from carvq import format as fmt
from carvq import gguf_io as gio
from carvq import reference, screen


def _anisotropic_states(rng, mean: np.ndarray, count: int) -> np.ndarray:
    """Hidden states like a model's final ones: a large shared direction plus small noise."""
    return (rng.standard_normal((count, 1)) * 0.3 + 4.0) * mean + 0.3 * rng.standard_normal((count, len(mean)))


@pytest.mark.parametrize("rank", [1, 3])
def test_the_correction_lowers_the_scan_error(tiny_carvq, rank):
    """Fitted on one sample of states, the corrected approximate logits (float: Ê_v . h plus
    the stored int8 coefficients times D . h) are closer to the head's exact logits on another
    sample than the scan's alone; the int8 rounding keeps most of the float correction."""
    from carvq.converter import screen_fix

    path, _ = tiny_carvq("llama")
    t = fmt.read_tensors(path)
    head = gio.dequantize(gio.tensor_by_name(gio.open_gguf(path), gio.HEAD)).astype(np.float32)
    V, n = head.shape
    rng = np.random.default_rng(rank)
    mean = rng.standard_normal(n)
    mean /= np.linalg.norm(mean)
    fit_states, test_states = _anisotropic_states(rng, mean, 400), _anisotropic_states(rng, mean, 200)
    fix, note = screen_fix.fit(t, lambda a, b: head[a:b], fit_states, rank=rank)
    assert fix.fix.shape == (rank, V) and fix.fix.dtype == np.int8 and fix.dirs.shape == (rank, n)
    assert np.abs(fix.fix).max() == 127  # the scale puts the largest coefficient at the int8 edge
    assert f"{fix.nbytes:,} bytes" in note
    approx_rows = reference.decode_codes(screen.lookup_as_index(t), np.arange(V))
    exact = test_states @ head.T
    plain = test_states @ approx_rows.T
    corrected = plain + (test_states @ fix.dirs.T) @ fix.fix.astype(np.float32)
    U = screen_fix.directions(fit_states, rank)
    unrounded = plain + (test_states @ U) @ ((head - approx_rows) @ U).T
    err = lambda z: float(((z - exact) ** 2).mean())  # noqa: E731
    assert err(corrected) < 0.8 * err(plain)
    assert err(corrected) < err(unrounded) + 0.1 * (err(plain) - err(unrounded))


def test_the_file_keeps_the_correction_it_was_written_with(tiny_carvq):
    """The converter's correction survives the file: version 5, the key's rank, int8 codes, float32
    directions, and inspect shows its bytes; without --screen-fix the same conversion has none."""
    from carvq.inspection import carvq_summary

    path, report = tiny_carvq("llama")
    t = fmt.read_tensors(path)
    assert t.screen_fix is not None and t.screen is None
    reader = gio.open_gguf(path)
    assert gio.field_value(reader, fmt.FIX_RANK) == t.screen_fix.fix.shape[0] == fmt.read_tensors(path).screen_fix.dirs.shape[0]
    assert report.screen_bytes == t.screen_fix.nbytes
    assert any("screen correction" in line and f"{t.screen_fix.nbytes:,} bytes" in line for line in carvq_summary(reader))
    assert any("screen correction" in note for note in report.notes)
    plain, _ = tiny_carvq("llama", fix=False)
    assert fmt.read_tensors(plain).screen_fix is None
    assert np.array_equal(reference.decode_all(plain), reference.decode_all(path)), "the lookup must not change"
