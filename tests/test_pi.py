"""Raspberry Pi: the cross-built wheels (scripts/pi/build.py) in an emulated arm64 Debian root.

For each CPU profile (pi4: armv8-a under qemu's cortex-a72; pi5: armv8.2-a+dotprod+fp16 under
cortex-a76) the wheel is installed with pip into a fresh venv of the root's own Python, and:
- the lookup through the wheel's libllama (NEON) equals the NumPy reference bit for bit;
- greedy tokens of a tiny CARVQ model and of SmolLM2-135M equal this machine's (x86-64);
- `carvq chat` answers one turn, `carvq footprint` measures;
- no instruction outside the profile: the pi4 build runs under cortex-a72 (qemu raises SIGILL
  for any instruction the core lacks), and the pi5 build, as a control, does not.

Without the cross tools (Debian: g++-aarch64-linux-gnu qemu-user debootstrap) these tests skip,
unless CARVQ_REQUIRE_PI=1 (set by .ci/run): then they fail, saying what to install.
Emulated timings are emulation, never Pi speed.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import pi_build as pi
from test_real_model import smollm2_carvq  # noqa: F401  (session fixture)

PROBE = Path(__file__).resolve().parent / "pi" / "probe.py"
# A prompt whose next tokens are clear-cut. "The capital of France is" was a near-tie for
# SmolLM2 CARVQ at its first token: the pi5 build, whose fp16 vector arithmetic rounds
# differently from x86, took the other branch (476 against 216) while pi4 agreed with x86.
PROMPT = "The capital of France is Paris. The capital of Germany is"

pytestmark = pytest.mark.slow


def _need_tools() -> None:
    missing = pi.missing_tools()
    problem = None
    if missing:
        problem = f"need Debian's {' '.join(missing)} (apt install)"
    elif not pi.root_dir().joinpath(".carvq-root-done").exists() and os.geteuid() != 0:
        problem = "need root once, to build the arm64 root with debootstrap"
    if problem and os.environ.get("CARVQ_REQUIRE_PI") == "1":
        pytest.fail(f"the Raspberry Pi tests {problem}; CARVQ_REQUIRE_PI=1 forbids skipping them")
    if problem:
        pytest.skip(f"the Raspberry Pi tests {problem}")


@pytest.fixture(scope="session")
def pi_root() -> Path:
    _need_tools()
    return pi.build_root()


@pytest.fixture(scope="session")
def pi_venv(pi_root):
    """profile -> the emulated venv with that profile's wheel installed (built once per session)."""
    made = {}

    def get(profile: str) -> Path:
        if profile not in made:
            made[profile] = pi.make_venv(profile, pi_root, pi.build_wheel(profile, pi_root))
        return made[profile]

    return get


def _probe(python: Path | str, *args, env: dict | None = None, timeout: float = 900) -> dict:
    proc = subprocess.run([str(python), str(PROBE), *map(str, args)], capture_output=True, text=True, errors="replace",
                          timeout=timeout, env=dict(os.environ, **(env or {})))
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def tiny_model(tiny_carvq) -> Path:
    return tiny_carvq("llama")[0]  # with a corrective adaptor


@pytest.mark.parametrize("profile", list(pi.PROFILES))
def test_lookup_matches_reference_on_arm(pi_venv, tiny_carvq, tiered_tiny, profile):
    """RVQ with hot rows (tiny gemma3) and with hot tiers whose ids are a hot map (format v7)
    bit for bit; with an adaptor (tiny llama) within float rounding, since its matrix products
    sum in ggml's order (as on x86, tests/test_llama.py)."""
    cases = [(arch, *tiny_carvq(arch)) for arch in ("gemma3", "llama")] + [("tiered", *tiered_tiny[:2])]
    for name, path, report in cases:
        out = _probe(pi_venv(profile) / "bin" / "python", "decode", path)
        assert out["machine"] == "aarch64"
        if report.config.adaptor_rank == 0:
            assert out["bit_exact_rows"] == out["rows"], (name, out)
        else:
            assert out["max_abs_diff"] <= 1e-5 * out["max_abs"], (name, out)


# nats between the two best logits within which NEON's and AVX's rounding may pick the other
# token: the blocks' quantized matmuls round their 8-bit activations on different paths.
# Seen: 0.0002 nats at token 9 (SmolLM2's tiered default), 0.028 at token 5 (the polished one),
# 0.054 at token 2 (the default with a hot map, format v7: both Pi profiles took the runner-up).
NEAR_TIE = 0.1


@pytest.mark.parametrize("profile", list(pi.PROFILES))
def test_greedy_tokens_equal_x86(pi_venv, tiny_model, smollm2_carvq, profile):  # noqa: F811
    for model, n in ((tiny_model, 16), (smollm2_carvq, 24)):
        host = _probe(sys.executable, "greedy", model, n, PROMPT)
        arm_python = pi_venv(profile) / "bin" / "python"
        arm = _probe(arm_python, "greedy", model, n, PROMPT)
        assert arm["machine"] == "aarch64"
        # generation (the default head) equal up to the first near-tie on the host's path
        tie = next((i for i, m in enumerate(host["margins"]) if m < NEAR_TIE), len(host["tokens"]))
        assert arm["tokens"][:tie] == host["tokens"][:tie], (model.name, profile, tie)
        # and past it, teacher-forced on the host's tokens: the Pi's best token at every position
        # that is not a near-tie
        forced = _probe(arm_python, "forced", model, PROMPT, json.dumps(host["tokens"]))["best"]
        clear = [i for i, m in enumerate(host["margins"]) if m >= NEAR_TIE]
        assert [forced[i] for i in clear] == [host["tokens"][i] for i in clear], (model.name, profile)
        assert len(clear) >= n - 4, f"{model.name}: {n - len(clear)} near-ties of {n} leave too little to compare"
        print(f"{profile} {model.name}: {n} tokens in {arm['seconds']:.1f} s emulated, {host['seconds']:.2f} s native; "
              f"generated equal up to token {tie}, teacher-forced equal at {len(clear)} of {n}")


@pytest.mark.parametrize("profile", list(pi.PROFILES))
def test_chat_and_footprint_on_arm(pi_venv, smollm2_carvq, profile):  # noqa: F811
    carvq = pi_venv(profile) / "bin" / "carvq"
    chat = subprocess.run([str(carvq), "chat", str(smollm2_carvq), "-n", "12", "--temperature", "0", "--ctx", "512"],
                          input="What is the capital of France?\n", capture_output=True, text=True, errors="replace",
                          timeout=900)
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert "Paris" in chat.stdout, chat.stdout[-2000:]
    fp = subprocess.run([str(carvq), "footprint", str(smollm2_carvq), "--tokens", "4", "--json"], capture_output=True,
                        text=True, errors="replace", timeout=900)
    assert fp.returncode == 0, fp.stderr[-2000:]
    report = json.loads(fp.stdout)
    assert report["model"]["file_bytes"] == smollm2_carvq.stat().st_size
    assert report["model"]["rss"]["mmap"]["peak"] > 0


def test_pi5_build_needs_its_core(pi_venv, tiny_model):
    """The control that makes the pi4 runs above mean something: qemu enforces the core's
    instruction set, so the pi5 build (dotprod) dies with SIGILL on a Cortex-A72."""
    python = pi_venv("pi5") / "bin" / "python"
    proc = subprocess.run([str(python), str(PROBE), "greedy", str(tiny_model), "4", PROMPT], capture_output=True,
                          text=True, timeout=900, env=dict(os.environ, CARVQ_QEMU_CPU="cortex-a72"))
    assert proc.returncode == -signal.SIGILL, (proc.returncode, proc.stderr[-1000:])
