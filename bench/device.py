"""What CARVQ saves and costs on this device, for SmolLM2-135M-Instruct and Gemma-3-270M
(both from PyPI), against their stock GGUFs: file size, resident memory with and without
mmap (carvq footprint) and tokens/s ratios from alternating A/B llama-bench runs (carvq bench).
Uses the CARVQ files bench/convert.py made (converting them when absent).

    python bench/device.py [--rounds 8]
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import update_readme  # noqa: E402
from convert import MODELS, convert_one, machine  # noqa: E402

from carvq.llama_source import cache_dir  # noqa: E402
from carvq.runtime.footprint import footprint, plot  # noqa: E402
from carvq.runtime.ab_speed import bench  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--target-bpw", type=float, default=1.6)
    args = ap.parse_args()
    rows, raw, charted = [], {}, []
    for key, (name, fetch) in MODELS.items():
        stock = fetch()
        carvq = cache_dir() / "bench" / f"{name}.target{args.target_bpw}.carvq.gguf"
        if not carvq.exists():
            convert_one(name, stock, args.target_bpw)
        print(f"{name}: footprint ...", flush=True)
        fc, fs = footprint(carvq, 32), footprint(stock, 32)
        charted += [fs, fc]
        print(f"{name}: speed, {args.rounds} A/B rounds ...", flush=True)
        speed = bench(carvq, stock, rounds=args.rounds, prompt=128, gen=64, progress=False).summary()
        raw[name] = {"carvq": fc.as_dict(), "stock": fs.as_dict(), "speed": speed}
        mib = lambda n: f"{n / 2**20:.1f}"  # noqa: E731
        rows.append(
            f"| {name} | {mib(fs.categories['embedding'].bytes)} → {mib(fc.categories['embedding'].bytes)} "
            f"(+{mib(fc.categories['output_head'].bytes)} head) | {mib(fs.file_bytes)} → {mib(fc.file_bytes)} | "
            f"{mib(fs.rss['mmap']['peak'])} → {mib(fc.rss['mmap']['peak'])} | "
            f"{mib(fs.rss['no_mmap']['peak'])} → {mib(fc.rss['no_mmap']['peak'])} | "
            f"{speed['pp128']['ratio']:.3f} ± {speed['pp128']['ratio_std']:.3f} | "
            f"{speed['tg64']['ratio']:.3f} ± {speed['tg64']['ratio_std']:.3f} |")
    lines = [f"Measured {date.today().isoformat()} on {machine()}; CARVQ at --target-bpw {args.target_bpw}, default head "
             f"(the source embedding at Q5_0); stock = the PyPI GGUF (tied Q8_0 embedding). Sizes in MiB; RSS is "
             f"the peak of the carvq runtime loading the model and generating 32 tokens; speed ratios are CARVQ/stock "
             f"tokens/s over {args.rounds} alternating llama-bench rounds (mean ± std).", "",
             "| model | embedding | file | peak RSS, mmap | peak RSS, no mmap | prompt 128 t/s ratio | generation 64 t/s ratio |",
             "|---|---|---|---|---|---|---|", *rows, "", "![file bytes by category](bench/results/footprint.png)"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "device.json").write_text(json.dumps(raw, indent=2))
    (RESULTS / "device.md").write_text("\n".join(lines) + "\n")
    plot(charted, RESULTS / "footprint.png")
    update_readme.update("device")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
