"""How often the screened head's exact candidates contain what the sampler needs, against k:
the dense top-1 and the dense top-40 set (llama.cpp's default sampler draws from the top 40),
over positions of the Britannica text: by default `--windows 8` contexts spread evenly over
the whole text (an article's own difficulty moves the figure: SmolLM2's first window,
Shakespeare, is its hardest; `--windows 1` reads only the text's first positions, as before
session 33). Hidden states from the runtime (`Model.hidden_states`), approximate scores from
the NumPy reference of the scan (src/carvq/screen.py, bit-exact with the C scan), exact logits
from the dequantized head copy, or a coded head's rows decoded by the NumPy reference decoder.
Not timed.

With `--kld`, also the KL divergence of the screened logits from the dense ones as the exact op
writes them (the candidates exact, every other row `a + b * approx + s2 / 2`, the regression of
docs/SCREEN.md), the part of it the tail's total mass explains (the KLD left when the tail is
shifted to its true mass), and for `--margins T ...` a candidate count that follows each
position: the rows whose approximate logit is within T nats of the best one, clamped to
`--k-range`, reported by its mean k.

    python bench/screen_sets.py [--model gemma3] [--positions 1024] [--windows 8] [--ks 2048 4096] [--kld --margins 10 12]
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
    ap.add_argument("--positions", type=int, default=1024, help="positions in all")
    ap.add_argument("--windows", type=int, default=8,
                    help="contexts the positions are split over, spread evenly over the text")
    ap.add_argument("--ks", type=int, nargs="+", default=[4096, 8192, 16384])
    ap.add_argument("--file", type=Path, help="a CARVQ file of the model instead of the bench's default conversion")
    ap.add_argument("--fix", action=argparse.BooleanOptionalAction, default=True,
                    help="apply the file's screen correction (format v5), as the C scan does (default: yes)")
    ap.add_argument("--kld", action="store_true", help="also the screened logits' KLD against the dense ones")
    ap.add_argument("--margins", type=float, nargs="*", default=[],
                    help="with --kld: candidates within this many nats of the best approximate logit")
    ap.add_argument("--k-range", type=int, nargs=2, default=[1024, 8192], help="the margin rule's clamp")
    args = ap.parse_args()
    from carvq.runtime.model import Model

    label, fetch, _ = MODELS[args.model]
    path = args.file or _converted(args.model, fetch())
    reader = gio.open_gguf(path)
    tensors = fmt.read_tensors(reader)
    t = screen.lookup_as_index(tensors)  # what the scan reads of a tiered lookup
    fix = tensors.screen_fix if args.fix else None  # the screen correction (format v5), if the file has one
    lo = t.layout
    if tensors.head_codes:  # a coded head (format v8): the head's rows are the lookup's own
        from carvq import reference

        head = reference.decode_all(path)
    else:
        head = gio.dequantize(gio.tensor_by_name(reader, gio.HEAD))  # (V, n)
    text = models.britannica_text().read_text(encoding="utf-8")
    per = -(-args.positions // args.windows)
    toks, states = [], []
    with Model(path, n_ctx=per + 8) as m:
        for w in range(args.windows):
            start = len(text) * w // args.windows
            # a fresh context (its first position a BOS's); 40 characters a token is ample for English
            window = m.tokenize(text[start:start + 40 * per])[:per]
            toks += window
            states.append(m.hidden_states(window))
    h = np.concatenate(states)
    hits = {k: {"top1": 0, "top40": 0} for k in args.ks}
    rules = [("k", k) for k in args.ks] + [("margin", m) for m in args.margins]
    kl = {r: {"k": [], "kld": [], "kld_true_tail_mass": [], "top40": 0} for r in rules}
    for p in tqdm(range(len(toks)), desc="positions"):
        exact = head @ h[p]
        top40 = set(np.argpartition(-exact, 40)[:40].tolist())
        top1 = int(np.argmax(exact))
        tb = screen.tables(lo, t.codebooks, t.hot_codebooks, h[p])
        s = screen.scores(lo, t.codes, tb, t.hot_ids, t.hot_codes)
        if fix is not None:
            s = screen.fix_add(s, fix.fix, screen.fix_weights(fix.dirs, h[p], tb.scale))
        order = np.argsort(-s.astype(np.int64), kind="stable")
        top40_inside = {}  # k -> whether the first k candidates hold the dense top-40 set
        for k in args.ks:
            cand = set(order[:k].tolist())
            hits[k]["top1"] += top1 in cand
            hits[k]["top40"] += top40_inside.setdefault(k, top40 <= cand)
        if args.kld:
            approx = s.astype(np.float64) * tb.scale + tb.bias
            exact64 = exact.astype(np.float64)
            for rule in rules:
                k = rule[1] if rule[0] == "k" else _margin_k(approx, order, rule[1], *args.k_range)
                kld, kld_mass = _screened_kld(exact64, approx, order[:k])
                kl[rule]["k"].append(k)
                kl[rule]["kld"].append(kld)
                kl[rule]["kld_true_tail_mass"].append(kld_mass)
                if k not in top40_inside:
                    top40_inside[k] = top40 <= set(order[:k].tolist())
                kl[rule]["top40"] += top40_inside[k]
    n = len(toks)
    res = {"model": label, "file": path.name, "screen_fix": fix is not None, "positions": n, "windows": args.windows,
           "k": {k: {"top1_inside": v["top1"] / n, "top40_inside": v["top40"] / n} for k, v in hits.items()}}
    if args.kld:
        res["kld"] = {f"{kind} {v:g}": {"mean_k": float(np.mean(r["k"])), "kld": float(np.mean(r["kld"])),
                                        "kld_true_tail_mass": float(np.mean(r["kld_true_tail_mass"])),
                                        "top40_inside": r["top40"] / n}
                      for (kind, v), r in kl.items()}
    print(json.dumps(res, indent=1))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def _screened_kld(exact: np.ndarray, approx: np.ndarray, cand: np.ndarray) -> tuple[float, float]:
    """(KL(dense || screened), the same with the tail shifted to its true total mass)."""
    b, a = np.polyfit(approx[cand], exact[cand], 1)
    s2 = float(np.var(exact[cand] - (a + b * approx[cand])))
    out = a + b * approx + s2 / 2
    out[cand] = exact[cand]
    lp = _log_softmax(exact)
    p = np.exp(lp)
    tail = np.ones(len(exact), bool)
    tail[cand] = False
    top = exact.max()
    shifted = out.copy()
    shifted[tail] += np.log(np.exp(exact[tail] - top).sum()) - np.log(np.exp(out[tail] - top).sum())
    return float((p * (lp - _log_softmax(out))).sum()), float((p * (lp - _log_softmax(shifted))).sum())


def _margin_k(approx: np.ndarray, order: np.ndarray, margin: float, k_min: int, k_max: int) -> int:
    """How many rows lie within `margin` of the best approximate logit, clamped to k_min..k_max."""
    inside = int(np.count_nonzero(approx >= approx[order[0]] - margin))
    return min(max(inside, k_min), k_max)


if __name__ == "__main__":
    main()
