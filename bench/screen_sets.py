"""How often the screened head's exact candidates contain what the sampler needs, against k:
the dense top-1 and the dense top-40 set (llama.cpp's default sampler draws from the top 40),
over positions of the Britannica text. Hidden states from the runtime (`Model.hidden_states`),
approximate scores from the NumPy reference of the scan (src/carvq/screen.py, bit-exact with the
C scan), exact logits from the dequantized head copy. Not timed.

    python bench/screen_sets.py [--model gemma3] [--positions 256] [--ks 4096 8192 16384]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import models  # noqa: E402
from screen import MODELS, _converted  # noqa: E402

from carvq import format as fmt  # noqa: E402
from carvq import gguf_io as gio  # noqa: E402
from carvq import screen  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3", choices=sorted(MODELS))
    ap.add_argument("--positions", type=int, default=256)
    ap.add_argument("--ks", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--file", type=Path, help="a CARVQ file of the model instead of the bench's default conversion")
    ap.add_argument("--fix", action=argparse.BooleanOptionalAction, default=True,
                    help="apply the file's screen correction (format v5), as the C scan does (default: yes)")
    args = ap.parse_args()
    from carvq.runtime.model import Model

    label, fetch, _ = MODELS[args.model]
    path = args.file or _converted(args.model, fetch())
    reader = gio.open_gguf(path)
    tensors = fmt.read_tensors(reader)
    t = screen.lookup_as_index(tensors)  # what the scan reads of a tiered lookup
    fix = tensors.screen_fix if args.fix else None  # the screen correction (format v5), if the file has one
    lo = t.layout
    head = gio.dequantize(gio.tensor_by_name(reader, gio.HEAD))  # (V, n)
    text = models.britannica_text().read_text(encoding="utf-8")[:20000]
    with Model(path, n_ctx=1024) as m:
        toks = m.tokenize(text)[: args.positions]
        h = m.hidden_states(toks)
    hits = {k: {"top1": 0, "top40": 0} for k in args.ks}
    for p in tqdm(range(len(toks)), desc="positions"):
        exact = head @ h[p]
        top40 = set(np.argpartition(-exact, 40)[:40].tolist())
        top1 = int(np.argmax(exact))
        tb = screen.tables(lo, t.codebooks, t.hot_codebooks, h[p])
        s = screen.scores(lo, t.codes, tb, t.hot_ids, t.hot_codes)
        if fix is not None:
            s = screen.fix_add(s, fix.fix, screen.fix_weights(fix.dirs, h[p], tb.scale))
        order = np.argsort(-s.astype(np.int64), kind="stable")
        for k in args.ks:
            cand = set(order[:k].tolist())
            hits[k]["top1"] += top1 in cand
            hits[k]["top40"] += top40 <= cand
    n = len(toks)
    res = {"model": label, "file": path.name, "screen_fix": fix is not None, "positions": n,
           "k": {k: {"top1_inside": v["top1"] / n, "top40_inside": v["top40"] / n} for k, v in hits.items()}}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
