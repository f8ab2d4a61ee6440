"""bench/quality.py's bookkeeping of several seeds' conversions (--seeds)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import quality  # noqa: E402


def _score(kld, dppl):
    return {"ppl": 26.0 + dppl, "ref_ppl": 26.0, "delta_ppl": dppl, "kld": kld, "kld_p99": 10 * kld, "top1": 0.9,
            "seconds": 1.0}


def test_one_seed_is_the_conversion_itself():
    s = _score(0.02, 0.1)
    assert quality._mean_score([s]) is s
    assert quality._seeded("CARVQ tiers 3.0", 0) == "CARVQ tiers 3.0"
    assert quality._seed_args(0) == []


def test_seeds_are_averaged_and_kept_apart():
    s = quality._mean_score([_score(0.0236, 0.358), _score(0.0207, 0.126), _score(0.0212, 0.224)])
    assert abs(s["kld"] - 0.0655 / 3) < 1e-12 and abs(s["delta_ppl"] - 0.708 / 3) < 1e-12
    assert s["seeds"]["kld"] == [0.0236, 0.0207, 0.0212] and s["ref_ppl"] == 26.0
    row = quality.Row("m", "CARVQ tiers 3.0", "carvq", 3.0, s["ppl"], s["delta_ppl"], s["kld"], s["kld_p99"], s["top1"],
                      1, {"seeds": s["seeds"]})
    assert quality._seed_range(row) == " (0.0207–0.0236, 3 seeds)"
    # another seed is another file: make_carvq drops a label's older files
    assert quality._seeded("CARVQ tiers 3.0", 2) != quality._seeded("CARVQ tiers 3.0", 1)
    assert quality._seed_args(2) == ["--seed", "2"]
