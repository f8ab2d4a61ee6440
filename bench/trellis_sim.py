"""A trellis-coded tail for the lookup, simulated: how much KLD the deep levels' code leaves.

The rows are fitted as `carvq convert` fits them (the bench's calibration text, the model's
Fisher metric and token weights; seed 0), then coded as

- `rvq LN`: N levels of the converter's RVQ (d = 8, K = 16), every row alike;
- `LB + trellis kR`: B RVQ levels, and the rest of each row (scaled per dimension, and per row
  with `gain`) coded by converter/trellis.py at R bits a value;
- `LB + trellis tiers X`: the same with each row's rate (0..4 bits a value) chosen by measured
  gain, like the hot tiers, within X bpw;

decoded to dense rows, written as an F32 token_embd and scored by llama-perplexity like the
simulated llama.cpp types (bench/quality.py's reference, text and chunks). The bpw count
everything a file would hold: codes, codebooks, streams and their first states, value tables,
the per-dimension scales (F16), the row gains (8 bits) and the rate of each row (2 bits).

    python bench/trellis_sim.py [--model smollm2] [--state-bits 10] [--variants ...]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402
import quality  # noqa: E402

from carvq import gguf_io as gio  # noqa: E402
from carvq.converter import convert as conv  # noqa: E402
from carvq.converter import metric, rvq, tiers, train, trellis  # noqa: E402
from carvq.converter.config import Config  # noqa: E402
from carvq.dense import write_dense_embedding  # noqa: E402

GROUP, K = 8, 16
GAIN_STEPS = 16  # a row's gain is 2^(q / 16), q one signed byte
FIT_ROWS = 8192
LLOYD_STEPS = 3
MAX_RATE = 4


def fit_inputs(src: Path, calibration: Path, seed: int = 0):
    """(M in the metric (V, n) float32, token weights (V,), the metric's scale (n,)): what
    `carvq convert --calibration` hands its fit (converter/convert.py, _convert_reader)."""
    reader = gio.open_gguf(src)
    embd = gio.tensor_by_name(reader, gio.EMBD)
    V, n = int(embd.shape[1]), int(embd.shape[0])
    prior_w, prior_how, _, mp = conv._prior(reader, src, V, "model", seed, False)
    tokens = conv._calibration_tokens(src, calibration, V)
    sens, why = conv._fit_metric(reader, src, tokens, mp, seed, False, n)
    if sens is None:
        raise SystemExit(f"no Fisher metric: {why}")
    M = gio.dequantize(embd)
    w, _ = conv._token_weights(prior_w, prior_how, reader, V, calibration, tokens[0])
    if sens.token_factor is not None and sens.token_factor.shape == (V,):
        w = w * sens.token_factor
    metric.scale_rows(M, sens.scale)
    return M, np.asarray(w, np.float64), np.asarray(sens.scale, np.float32)


class Sim:
    def __init__(self, M: np.ndarray, w: np.ndarray, state_bits: int):
        self.M = torch.from_numpy(M)
        self.w = torch.from_numpy(w.astype(np.float32))
        self.V, self.n = M.shape
        self.b = state_bits
        self._levels = {}

    def bpw(self, bits: float) -> float:
        return bits / (self.V * self.n)

    def rvq(self, L: int) -> tuple[torch.Tensor, float]:
        """(the rows' L-level RVQ reconstruction, its bits): the converter's fit, F16 codebooks."""
        if L not in self._levels:
            cfg = Config(group_size=GROUP, levels=L, codebook_size=K, codebook_type="F16")
            self._levels[L] = train._fit_rvq(self.M, self.w, cfg, torch.Generator().manual_seed(0), None).reconstruct()
        G = self.n // GROUP
        return self._levels[L], self.V * G * L * 4 + G * L * K * GROUP * 16

    def tail(self, R: torch.Tensor, rate: int, gain: bool) -> tuple[torch.Tensor, float]:
        """(R coded by the trellis at `rate` bits a value, its bits): per-dimension scales,
        optionally a gain per row, a value table fitted on a weighted sample of rows."""
        sigma = torch.sqrt(((R ** 2) * self.w[:, None]).sum(0) / self.w.sum()).clamp_min(1e-12)
        X = R / sigma
        g = torch.ones(self.V)
        if gain:
            rms = X.pow(2).mean(1).sqrt().clamp_min(2.0 ** -7)
            g = torch.pow(2.0, torch.round(torch.log2(rms) * GAIN_STEPS).clamp(-128, 127) / GAIN_STEPS)
            X = X / g[:, None]
        gen = torch.Generator().manual_seed(0)
        ids, w_fit = rvq.fit_rows(self.w, FIT_ROWS, gen)
        ids = torch.arange(self.V) if ids is None else ids
        values = trellis.fit_values(X[ids], w_fit * g[ids] ** 2, sigma ** 2, self.b, rate, LLOYD_STEPS, gen)
        values = values.half().float()
        states = trellis.encode(X, sigma ** 2, values, self.b, rate)
        bits = (self.V * trellis.stream_bits(self.n, self.b, rate) + (1 << self.b) * 16 + self.n * 16
                + (self.V * 8 if gain else 0))
        return values[states] * g[:, None] * sigma[None, :], bits


def run(variants: list[str], sim: Sim, scale: np.ndarray, model: str, chunks: int) -> list[dict]:
    work = quality._workdir(model)
    src = quality.MODELS[model][1]()
    ref = quality.make_reference(src, work)
    text = models.britannica_text()
    rows = []
    for v in variants:
        start = time.perf_counter()
        base, _, rest = v.partition("+")
        L = int(base.strip()[1:])
        H, bits = sim.rvq(L)
        Mh = H
        note = ""
        if rest.startswith("trellis k"):  # "L2+trellis k2 gain"
            rate = int(rest.split()[1][1:])
            T, more = sim.tail(sim.M - H, rate, "gain" in rest)
            Mh, bits = H + T, bits + more
        elif rest.startswith("trellis tiers"):  # "L2+trellis tiers 3.0"
            target = float(rest.split()[2])
            R = sim.M - H
            errs, tails, fixed = [(R ** 2).sum(1).double().numpy()], [None], bits + 2 * sim.V
            for rate in range(1, MAX_RATE + 1):
                T, more = sim.tail(R, rate, True)
                tails.append(T)
                errs.append(((R - T) ** 2).sum(1).double().numpy())
                fixed += (1 << sim.b) * 16  # every rate's value table
            fixed += sim.n * 16 + sim.V * (8 + sim.b)  # scales, gains, first states (every row counted)
            step = sim.n - 1  # bits of one more bit a value
            rate_of = tiers.allocate(np.stack(errs, 1), sim.w.double().numpy(), int((target * sim.V * sim.n - fixed) // step))
            Mh = H.clone()
            for rate in range(1, MAX_RATE + 1):
                sel = torch.from_numpy(np.nonzero(rate_of == rate)[0])
                Mh[sel] += tails[rate][sel]
            bits = fixed + int(rate_of.sum()) * step
            note = "rows per rate 0-4: " + " / ".join(f"{c:,}" for c in np.bincount(rate_of, minlength=MAX_RATE + 1))
        out = work / f"trellis-sim-{v.replace(' ', '-').replace('+', '_')}.gguf"
        write_dense_embedding(ref, out, (Mh / torch.from_numpy(scale)[None, :]).numpy())
        s = quality.score(out, ref, text, chunks, work)
        rows.append({"variant": v, "bpw": sim.bpw(bits), "weighted_error": train.weighted_error(sim.M, Mh, sim.w),
                     "kld": s["kld"], "delta_ppl": s["delta_ppl"], "top1": s["top1"], "note": note,
                     "seconds": time.perf_counter() - start})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", choices=sorted(quality.MODELS))
    ap.add_argument("--state-bits", type=int, default=10)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--variants", nargs="+", default=["L6", "L2+trellis k2", "L2+trellis k2 gain",
                                                      "L4+trellis k1 gain", "L2+trellis tiers 3.0"])
    args = ap.parse_args()
    torch.manual_seed(0)
    M, w, scale = fit_inputs(quality.MODELS[args.model][1](), models.calibration_text())
    rows = run(args.variants, Sim(M, w, args.state_bits), scale, args.model, args.chunks)
    print(f"\n| variant (state bits {args.state_bits}) | bpw | weighted error | KLD | Δ PPL | top-1 | |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['bpw']:.3f} | {r['weighted_error']:.5f} | {r['kld']:.4f} | "
              f"{r['delta_ppl']:+.3f} | {100 * r['top1']:.2f} % | {r['note']} |")


if __name__ == "__main__":
    main()
