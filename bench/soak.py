"""Soak (issue 12, item 16): many generations in one process through carvq.Model, then many
model load/close cycles; the process's RSS must stay flat.

RSS is sampled every few iterations; the slope is a least-squares line over the second half of
each phase (the first half includes the allocator's warm-up), in KiB per 100 iterations.

    python bench/soak.py [--model smollm2] [--generations 1000] [--cycles 200]

Writes bench/results/soak.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert import machine  # noqa: E402
from screen import MODELS, _converted  # noqa: E402

from carvq.runtime.model import Model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = ["The history of the city", "A recipe for bread", "The river flows", "In the morning the market",
           "Three facts about the moon"]


def rss_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def slope(samples: list[tuple[int, int]]) -> float:
    """KiB per 100 iterations over the second half of (iteration, RSS KiB) samples."""
    half = samples[len(samples) // 2:]
    x = np.array([s[0] for s in half], float)
    y = np.array([s[1] for s in half], float)
    return float(np.polyfit(x, y, 1)[0] * 100) if len(half) >= 2 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    ap.add_argument("--generations", type=int, default=1000)
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=8)
    args = ap.parse_args()
    label, fetch, _ = MODELS[args.model]
    path = _converted(args.model, fetch())
    gen_samples, cycle_samples = [], []
    t0 = time.time()
    with Model(path, n_ctx=256) as m:
        for i in tqdm(range(args.generations), desc="generations"):
            text = "".join(m.generate(PROMPTS[i % len(PROMPTS)], max_tokens=args.tokens, temperature=0.7, seed=i))
            assert isinstance(text, str)
            if i % 10 == 0 or i == args.generations - 1:
                gen_samples.append((i, rss_kib()))
    gen_seconds = time.time() - t0
    t0 = time.time()
    for i in tqdm(range(args.cycles), desc="load/close cycles"):
        with Model(path, n_ctx=256) as m:
            next(iter(m.generate("Hello", max_tokens=1, temperature=0)), None)
        if i % 5 == 0 or i == args.cycles - 1:
            cycle_samples.append((i, rss_kib()))
    res = {"date": str(date.today()), "machine": machine(), "model": f"{label} CARVQ ({path.name})",
           "generations": args.generations, "tokens_each": args.tokens, "cycles": args.cycles,
           "generation_seconds": round(gen_seconds, 1), "cycle_seconds": round(time.time() - t0, 1),
           "generation_rss_kib": gen_samples, "cycle_rss_kib": cycle_samples,
           "generation_slope_kib_per_100": round(slope(gen_samples), 1),
           "cycle_slope_kib_per_100": round(slope(cycle_samples), 1)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(res, indent=1) + "\n")
    mib = lambda kib: f"{kib / 1024:.1f}"  # noqa: E731
    md = ("| phase | iterations | RSS first → last sample | slope over the second half |\n|---|---|---|---|\n"
          f"| generations ({args.tokens} tokens each, one Model) | {args.generations} | "
          f"{mib(gen_samples[0][1])} → {mib(gen_samples[-1][1])} MiB | {res['generation_slope_kib_per_100']} KiB / 100 |\n"
          f"| load, generate 1 token, close | {args.cycles} | {mib(cycle_samples[0][1])} → {mib(cycle_samples[-1][1])} MiB | "
          f"{res['cycle_slope_kib_per_100']} KiB / 100 |")
    (RESULTS / "soak.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
