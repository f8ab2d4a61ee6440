"""Run by tests/test_pi.py twice: with this machine's carvq and inside the emulated Pi's venv.
Prints one JSON object; the test compares the two.

    python probe.py decode MODEL            the C lookup against the NumPy reference, every row
    python probe.py greedy MODEL N PROMPT   N greedy tokens after PROMPT (the default head)
    python probe.py forced MODEL PROMPT IDS the dense head's argmax after PROMPT + each prefix of IDS (JSON list)
"""
import json
import platform
import sys
import time

import numpy as np

import carvq
from carvq import reference


def decode(model: str) -> dict:
    with carvq.Model(model, n_ctx=256, n_batch=256) as m:
        ids = list(range(m.n_vocab))
        rows = np.concatenate([m.embedding_rows(ids[i:i + 256]) for i in range(0, len(ids), 256)])
    ref = reference.decode_rows(model, ids)
    same = rows.view(np.uint32) == ref.view(np.uint32)
    return {"rows": len(ids), "bit_exact_rows": int(same.all(axis=1).sum()), "max_abs_diff": float(np.abs(rows - ref).max()),
            "max_abs": float(np.abs(ref).max())}


def greedy(model: str, n: int, prompt: str) -> dict:
    """The tokens, and at each the margin of the winner over the runner-up (dense head): where
    it is within float noise, another machine's SIMD rounding may pick the other token."""
    with carvq.Model(model, n_ctx=256) as m:
        t0 = time.perf_counter()
        start = m.tokenize(prompt)
        tokens = list(m.generate_tokens(start, n, temperature=0))
        seconds = time.perf_counter() - t0
    with carvq.Model(model, n_ctx=256, head="dense") as m:
        logits = m.logits(start + tokens)[len(start) - 1:-1] if tokens else np.zeros((0, 2), np.float32)
    top2 = np.sort(logits, axis=1)[:, -2:]
    return {"tokens": tokens, "seconds": seconds, "margins": (top2[:, 1] - top2[:, 0]).tolist()}


def forced(model: str, prompt: str, ids: list[int]) -> dict:
    """Teacher-forced: the dense head's best token at each position of PROMPT + ids (another
    machine's tokens), so that one near-tie does not end the comparison as it ends greedy decoding."""
    with carvq.Model(model, n_ctx=256, head="dense") as m:
        start = m.tokenize(prompt)
        logits = m.logits(start + ids)[len(start) - 1:-1]
    return {"best": logits.argmax(axis=1).tolist()}


if __name__ == "__main__":
    what, model, *rest = sys.argv[1:]
    out = (decode(model) if what == "decode" else greedy(model, int(rest[0]), rest[1]) if what == "greedy"
           else forced(model, rest[0], json.loads(rest[1])))
    out["machine"] = platform.machine()
    print(json.dumps(out))
