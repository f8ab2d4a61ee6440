"""A gain per row for the lookup's RVQ, simulated: does shape-gain coding pay inside the hot tiers?

Session 27's trellis tail gained 9 % from a gain per row at equal depth. This runs the
converter's own `carvq convert --target-bpw X --calibration` path on SmolLM2 (prior, Fisher
metric, fit, trim, polish), with three changes patched in for the run:

- after the metric's column scales, each row is divided by its gain 2^(q/16), q = one signed
  byte, the row's RMS against the median row's;
- the token weights are multiplied by the gain squared wherever the fit, the trim and the
  polish read them, so that they weigh the error of the row as decoded (gain times codes);
- the trim's budget pays one byte a row for the gains.

The fitted tensors are decoded (the NumPy reference decoder), multiplied by the gains, written
as a dense embedding and scored like the bench's simulated types (20 chunks of the Britannica
text). The bpw counts every byte of the lookup and the gains. Not in the format.

    python bench/gain_sim.py --target-bpw 3.0 [--seed 0] [--no-gain]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402
import quality  # noqa: E402

from carvq import format as fmt  # noqa: E402
from carvq import gguf_io as gio  # noqa: E402
from carvq import reference  # noqa: E402
from carvq.cli import main as carvq_main  # noqa: E402
from carvq.converter import metric, polish, tiers, train  # noqa: E402
from carvq.dense import write_dense_embedding  # noqa: E402

GAIN_STEPS = 16  # a gain is 2^(q / 16): steps of 4.4 %


class GainPatch:
    """The converter's path with a gain per row (module docstring); `gains` and `tensors` after a run."""

    def __init__(self, use_gain: bool):
        self.use_gain = use_gain
        self.gains: np.ndarray | None = None
        self.tensors = None

    def scale_rows(self, M, scale):
        self._scale_rows(M, scale)
        g = np.ones(M.shape[0], np.float32)
        if self.use_gain:
            rms = np.sqrt((M.astype(np.float64) ** 2).mean(1))
            q = np.clip(np.rint(np.log2(rms / np.median(rms)) * GAIN_STEPS), -127, 127)
            g = (2.0 ** (q / GAIN_STEPS)).astype(np.float32)
            M /= g[:, None]
        self.gains = g

    def _w(self, w):
        return np.asarray(w, np.float64) * self.gains.astype(np.float64) ** 2

    def __enter__(self):
        self._saved = [(module, name, getattr(module, name)) for module, name in (
            (metric, "scale_rows"), (train, "compress"), (tiers, "trim"), (polish, "polish"), (fmt, "write_model"))]
        o = {name: original for _, name, original in self._saved}
        self._scale_rows = o["scale_rows"]
        gain_bytes = lambda M: M.shape[0] if self.use_gain else 0  # noqa: E731

        def write(reader, out, arch, tensors, *a, **k):
            self.tensors = tensors
            return o["write_model"](reader, out, arch, tensors, *a, **k)
        metric.scale_rows = self.scale_rows
        train.compress = lambda M, w, *a, **k: o["compress"](M, self._w(w), *a, **k)
        tiers.trim = lambda t, M, w, floor, budget: o["trim"](t, M, self._w(w), floor, budget - gain_bytes(M))
        polish.polish = lambda t, M, w, **k: o["polish"](t, M, self._w(w), **k)
        fmt.write_model = write
        return self

    def __exit__(self, *exc):
        for module, name, original in self._saved:
            setattr(module, name, original)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target-bpw", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-gain", action="store_true", help="the converter as it is, through the same harness")
    ap.add_argument("--chunks", type=int, default=20)
    args = ap.parse_args()
    src = quality.MODELS["smollm2"][1]()
    work = quality._workdir("smollm2")
    ref = quality.make_reference(src, work)
    head_type = gio.tensor_by_name(gio.open_gguf(src), gio.EMBD).tensor_type.name
    start = time.perf_counter()
    with GainPatch(not args.no_gain) as run, tempfile.TemporaryDirectory() as tmp:
        rc = carvq_main(["convert", str(src), "-o", str(Path(tmp) / "out.gguf"), "--force", "-q",
                         "--target-bpw", str(args.target_bpw), "--calibration", str(models.calibration_text()),
                         "--head-type", head_type, "--seed", str(args.seed)])
        if rc:
            raise SystemExit(f"carvq convert failed ({rc})")
    V = len(run.gains)
    rows = reference.decode(run.tensors, np.arange(V)) * run.gains[:, None]
    label = f"gain-sim-{args.target_bpw}-{'plain' if args.no_gain else 'gain'}-s{args.seed}"
    dense = work / f"{label}.gguf"
    write_dense_embedding(ref, dense, rows.astype(np.float32))
    lookup = sum(tiers.part_bytes(run.tensors).values()) + (0 if args.no_gain else V)
    s = quality.score(dense, ref, models.britannica_text(), args.chunks, work)
    print(json.dumps({"variant": label, "bpw": 8.0 * lookup / rows.size, "kld": s["kld"], "delta_ppl": s["delta_ppl"],
                      "top1": s["top1"], "seconds": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
