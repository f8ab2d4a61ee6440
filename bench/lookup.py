"""Decoder throughput: rows/s and bytes/s of the CARVQ lookup for batches of 1, 32 and 512
rows on 1 and 2 threads, next to a plain memcpy of the same rows and ggml's get_rows on
Q8_0 and Q4_K copies of the same matrix, all measured in one process by the C program
carvq-lookup-bench (bench/lookup_bench.c), built and installed with carvq.

    python bench/lookup.py [V n d L]      (default 32768 2048 8 3)
"""
from __future__ import annotations

import json
import subprocess
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert import machine  # noqa: E402
import update_readme  # noqa: E402

from carvq.runtime import tool_path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    shape = sys.argv[1:5] or ["32768", "2048", "8", "3"]
    proc = subprocess.run([str(tool_path("carvq-lookup-bench")), *shape], capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    header = proc.stderr.strip().splitlines()[-1]
    by = {(r["what"], r["batch"], r["threads"]): r for r in rows}
    lines = [f"Measured {date.today().isoformat()} on {machine()}; {header.split(': ', 1)[1]}.",
             "Bytes/s are bytes of float32 rows written. memcpy copies the same rows of the dense F32 matrix on one thread.", "",
             "| batch | threads | CARVQ rows/s | CARVQ GB/s | % of memcpy | Q8_0 get_rows GB/s | Q4_K get_rows GB/s | memcpy GB/s |",
             "|---|---|---|---|---|---|---|---|"]
    gb = lambda r: "-" if r is None else f"{r['out_bytes_per_s'] / 1e9:.1f}"  # noqa: E731
    for batch in (1, 32, 512):
        mem = by[("memcpy_f32", batch, 1)]
        for threads in (1, 2):
            c = by[("carvq", batch, threads)]
            lines.append(f"| {batch} | {threads} | {c['rows_per_s'] / 1e6:.2f} M | {gb(c)} | "
                         f"{100 * c['out_bytes_per_s'] / mem['out_bytes_per_s']:.0f} % | "
                         f"{gb(by.get(('get_rows_q8_0', batch, threads)))} | {gb(by.get(('get_rows_q4_k', batch, threads)))} | {gb(mem)} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lookup.json").write_text(json.dumps({"shape": shape, "rows": rows}, indent=2))
    (RESULTS / "lookup.md").write_text("\n".join(lines) + "\n")
    update_readme.update("lookup")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
