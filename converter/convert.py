"""`carvq convert`: a GGUF or HF checkpoint in, a CARVQ-GGUF out (the orchestration).

Every tensor but token_embd.weight, and every metadata key, is copied byte for byte; the
embedding becomes the CARVQ tensors of docs/FORMAT.md (written by carvq.format). A tied
model gains an output.weight (converter/head.py).
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from carvq import format as fmt
from carvq import gguf_io as gio
from carvq.converter import config as cfgmod
from carvq.converter import frame, frequency, hf, memory, metric, model_prior, polish, screen_fix, screen_index, tiers, train, tune
from carvq.converter.body import quantize_body
from carvq.converter.config import DEFAULT_ITERS, Config
from carvq.converter.head import CODED_HEAD, default_head_type, head_tensor
from carvq.converter.report import ErrorStats, Report
from carvq.converter.search import check_target, choose_config
from carvq.errors import CarvqError


def _calibration_tokens(gguf_path: Path, calibration: Path, n_vocab: int) -> tuple[np.ndarray, list[int]]:
    """The calibration text's token ids by llama.cpp's tokenizer: exactly the ids the model
    will see at inference, and a vocab-only load takes a second where building a transformers
    tokenizer from a GGUF took 26 s on Gemma-3. Also the tokens llama.cpp opens a context
    with (BOS where the model adds one). Read once: the token weights and the tuning use both."""
    from carvq.runtime.model import Model

    with Model(gguf_path, vocab_only=True) as vocab:
        ids = frequency.text_tokens(lambda piece: vocab.tokenize(piece, add_special=False), calibration, n_vocab)
        return ids, vocab.tokenize("", add_special=True)


PRIORS = ("model", "tokenizer")
# A tied model's default file: the coded head (no head copy) at this lookup bpw. Measured against
# the stock file (docs/RESULTS.md, session 31, dense head): SmolLM2 75.4 MiB and KLD 0.061, Gemma-3
# 132.4 MiB and 0.046, where the 1.6 bpw lookup + Q5_0 copy gave 89.3 MiB / 0.148 and 214.1 MiB / 0.087.
TIED_DEFAULT_BPW = 3.0
METRICS = ("fisher", "uniform")


# The default prior's share of the model's own distribution; the rest is the tokenizer's Zipf
# prior, whose long tail the model's few documents lack. Measured (docs/RESULTS.md, session 10):
# Gemma-3 default perplexity 28.69 with the model's alone, 28.01 half and half; SmolLM2 L3 +2
# with the Shakespeare counts KLD 0.194-0.204 with the model's alone, 0.187 Zipf's alone, 0.182
# half and half.
MODEL_SHARE = 0.5
# documents the model writes when --tune-steps has no calibration text to tune on: 4 of the
# sequences are held out, the rest trained on (the prior then averages all of them)
TUNE_DOCUMENTS = 16


def _prior(reader, gguf_path: Path, n_vocab: int, prior: str, seed: int, progress: bool,
           documents: int = model_prior.DOCUMENTS) -> tuple[np.ndarray, str, list[str], model_prior.ModelPrior | None]:
    """(weights, description, notes, the model's prior) of the token prior: half the source
    model's own next-token distribution (converter/model_prior.py, over `documents` documents it
    writes) and half the tokenizer's rank, or the tokenizer's alone (asked for, or where the
    model cannot write text here; the model's prior is then None)."""
    zipf, zipf_how = frequency.tokenizer_distribution(reader, n_vocab)
    if prior == "model":
        try:
            mp = model_prior.predicted_unigram(gguf_path, seed, progress, documents)
        except CarvqError as exc:
            return frequency.from_distribution(zipf), zipf_how, [
                f"the model could not write text to weight its tokens by ({exc}); {zipf_how} alone instead, "
                "which ranks some vocabularies' most frequent tokens last (docs/RESULTS.md)"], None
        return (frequency.from_distribution(MODEL_SHARE * mp.p + (1 - MODEL_SHARE) * zipf),
                f"half {mp.how}, half a {zipf_how}", [], mp)
    return frequency.from_distribution(zipf), zipf_how, [], None


def _tuning_sequences(tokens, mp: model_prior.ModelPrior | None) -> tuple[list, str]:
    """(sequences, what they are) that --tune-steps trains on: the calibration text, or without
    one the documents the model wrote for its prior (its own distribution is the target there,
    as it is the reference of every KL step)."""
    if tokens is not None:
        return tune.calibration_sequences(*tokens), "calibration"
    if mp is None:
        raise CarvqError("--tune-steps without --calibration tunes on text the source model writes itself, and it "
                         "wrote none here (or --prior tokenizer was asked for); give it --calibration text")
    return tune.document_sequences(mp.start, mp.documents), "self-written"


def _fit_metric(reader, gguf_path: Path, tokens, mp: model_prior.ModelPrior | None, seed: int, progress: bool,
                n_embd: int) -> tuple[metric.Metric | None, str]:
    """The model's Fisher diagonal on the calibration text, or without one on the documents it
    wrote for its prior; (None, why) where there is no text or transformers cannot run the model."""
    if tokens is not None:
        ids, opening = tokens
        body = tune.SEQ_TOKENS - len(opening)
        count = max(1, len(ids) // body)  # a text too short for one sequence gives one shorter one
        picks = np.unique(np.linspace(0, count - 1, min(count, metric.SEQUENCES)).round().astype(int))
        seqs = [torch.tensor(opening + ids[i * body:(i + 1) * body].tolist()) for i in picks]
        what = "calibration"
    elif mp is not None:
        seqs = [torch.tensor((mp.start + list(d))[:tune.SEQ_TOKENS]) for d in mp.documents]
        what = "self-written"
    else:
        return None, "no text to measure the model's sensitivity on (--prior tokenizer, no --calibration)"
    try:
        longest = max(int(s.numel()) for s in seqs)
        dtype, tokens = metric.pass_plan(reader, longest)
        sens = metric.from_model(gguf_path, [s[:tokens] for s in seqs], what, seed, progress, n_embd, reader, dtype)
        if tokens < longest:
            sens.how += (f"; in float32 on the sequences' first {tokens} tokens, for memory: bfloat16 is slow on "
                         "this CPU (no bfloat16 units)")
        return sens, ""
    except CarvqError as exc:
        return None, str(exc)
    except (RuntimeError, ValueError, KeyError, IndexError, TypeError, OSError) as exc:
        # transformers' GGUF reader and model code are not ours: a model it cannot run is
        # converted in the uniform metric, saying why, rather than not at all
        return None, f"transformers could not run the model ({type(exc).__name__}: {str(exc)[:200]})"


def _token_weights(prior: np.ndarray, how: str, reader, n_vocab, calibration, ids: np.ndarray | None):
    if ids is None:
        w, desc = prior, how
    else:
        w = frequency.from_counts(np.bincount(ids, minlength=n_vocab)[:n_vocab], prior)
        desc = f"counts from {calibration} ({ids.size:,} tokens) + 1, plus {how} of the same mass"
    return frequency.with_special_tokens(w, reader, n_vocab), desc + "; special tokens as heavy as the heaviest"


def _first_non_finite_row(M: np.ndarray) -> int | None:
    for a, b in gio.row_chunks(M.shape[0]):  # by chunks: a (V, n) bool mask is a quarter of M again
        ok = np.isfinite(M[a:b]).all(axis=1)
        if not ok.all():
            return a + int(np.argmin(ok))
    return None


def _coded_rows(tensors):
    """head_rows(a, b) of a coded head: the lookup's own rows, decoded (FORMAT.md "Coded head")."""
    from carvq import reference

    return lambda a, b: reference.decode(tensors, np.arange(a, b, dtype=np.int32))


def _head_rows(head, M: np.ndarray):
    """head_rows(a, b) of the head copy as written, dequantized: what the screened head's exact op reads."""
    import gguf

    data, qtype = head
    if qtype == gguf.GGMLQuantizationType.F32:
        return lambda a, b: M[a:b]
    return lambda a, b: gio.dequantize_rows(data[a:b], qtype, M.shape[1])


def _check_paths(src: Path, out: Path, calibration, force: bool) -> None:
    """Never destroy input: the output may not be the input, a file inside an input
    checkpoint folder, or the calibration text; an existing output needs force."""
    if not src.exists():
        raise CarvqError(f"{src}: no such file or directory")
    gio.check_output(src, out, force)
    if src.is_dir() and out.resolve().is_relative_to(src.resolve()):
        raise CarvqError(f"output {out} is inside the input checkpoint {src}; choose a path outside it")
    if calibration is not None and gio.same_file(Path(calibration), out):
        raise CarvqError(f"output {out} is the calibration text; choose another path")


def _frame(M: np.ndarray, w: np.ndarray, cfg: Config, sens, transform: str, trimmed: bool, target_bpw,
           notes: list[str]) -> np.ndarray | None:
    """The lookup transform W (converter/frame.py, format v6), M rotated in place into its frame
    for the fit; None (M untouched) where it is not used."""
    V, n = M.shape
    cb_dtype = np.float16 if cfg.codebook_type == "F16" else np.float32
    if cfg.adaptor_rank or not frame.wanted(transform, V, n, np.dtype(cb_dtype).itemsize):
        return None
    if not trimmed and target_bpw is not None:
        # only a trim pays the matrix from the budget: --target-bpw without tiers would overshoot
        if transform == "auto":
            return None
        notes.append(f"the transform's {frame.matrix_bpw(V, n, np.dtype(cb_dtype).itemsize):.4f} bpw comes on top "
                     "of --target-bpw: only hot tiers pay it from the budget")
    axes = frame.principal_frame(M, w, cfg.group_size)
    frame.rotate_rows(M, axes)  # the fit, trim and polish work in the principal frame
    return frame.transform(axes, None if sens is None else 1.0 / sens.scale, cb_dtype)


def convert(input_path, output_path, base: Config, *, target_bpw: float | None = None, iters: int = DEFAULT_ITERS,
            seed: int = 0, calibration=None, head_type: str | None = None, hf_outtype: str = "auto",
            body_type: str | None = None, progress: bool = True, force: bool = False,
            screen: Config | bool | None = None, tune_steps: int = 0, prior: str = "model",
            trim_to: float | None = None, tier_floor: int | None = None, tiered: bool = False,
            fit_metric: str = "uniform", fix_screen: bool = True, transform: str = "none",
            tied_default: bool = False) -> Report:
    """tune_steps: Adam steps of end-to-end tuning of the codebooks on the calibration text, or
    without one on documents the model writes itself (converter/tune.py; 0 = none). screen: fit the head's own screen index (format v3; kept for a tied model only where it
    screens better than the lookup's codes): True for config.SCREEN_DEFAULT, a Config of its
    own, or False/None for none (the default: format v2). prior: where the token weights come
    from beside the calibration counts, "model" (the source model's own next-token distribution)
    or "tokenizer" (a Zipf prior over the vocabulary's order; no model run). trim_to: cut the fit
    to this lookup bpw in hot tiers (converter/tiers.py, format v4), every row keeping at least
    tier_floor levels (default: the fit's levels minus 2, at least 1). tiered: without trim_to,
    fit one level deeper than the configuration (tiers.deeper_fit: up to 2.1 bpw the family's
    point at its bpw + 0.9) and trim it to the configuration's own size in hot tiers, every row
    keeping at least one level fewer (the CLI's default).
    fit_metric: "fisher" weights each embedding dimension by the model's Fisher information
    (converter/metric.py; the CLI's default), "uniform" counts every dimension alike.
    fix_screen: for a tied model screened by the lookup's codes, add the screen correction
    (converter/screen_fix.py, format v5) when the model ran on a text (the calibration text or its
    own documents).
    transform: fit and decode the codes in the principal axes of the embedding (converter/frame.py,
    format v6): "pca", "none" (the CLI's default), or "auto" (where the matrix costs at most
    frame.AUTO_MAX_BPW).
    tied_default: the caller left the file's shape to the default (the CLI: no shape option); a
    tied source then gets the coded head at TIED_DEFAULT_BPW, in tiers (format v8), instead of
    `base` and a head copy. An untied source keeps `base`."""
    start = time.perf_counter()
    if screen is True:
        screen = cfgmod.SCREEN_DEFAULT
    src, out = Path(input_path), Path(output_path)
    _check_paths(src, out, calibration, force)
    if screen and calibration is None:
        raise CarvqError("--screen-index needs --calibration: the index is fitted to, and judged on, the model's hidden "
                         "states on text like the text it will see (docs/SCREEN.md)")
    if prior not in PRIORS:
        raise CarvqError(f"--prior {prior!r}: one of {', '.join(PRIORS)}")
    if tune_steps < 0:
        raise CarvqError(f"--tune-steps {tune_steps}: must not be negative")
    if tune_steps and calibration is None and prior != "model":
        raise CarvqError("--tune-steps needs --calibration, or the model's prior (--prior model) whose documents it "
                         "then tunes on")
    if target_bpw is not None and target_bpw <= 0:
        raise CarvqError(f"--target-bpw {target_bpw}: must be positive")
    if trim_to is not None and trim_to <= 0:
        raise CarvqError(f"--trim-to {trim_to}: must be positive")
    if tier_floor is not None and trim_to is None:
        raise CarvqError("--tier-floor only means something with --trim-to")
    if fit_metric not in METRICS:
        raise CarvqError(f"--metric {fit_metric!r}: one of {', '.join(METRICS)}")
    if transform not in frame.MODES:
        raise CarvqError(f"--transform {transform!r}: one of {', '.join(frame.MODES)}")
    with tempfile.TemporaryDirectory(prefix="carvq-") as tmpdir:
        gguf_path = src
        if src.is_dir():
            if not hf.is_hf_checkpoint(src):
                raise CarvqError(f"{src}: a directory but not a Hugging Face checkpoint (no config.json)")
            gguf_path = Path(tmpdir) / "source.gguf"
            hf.convert_hf(src, gguf_path, hf_outtype)
        reader = gio.open_gguf(gguf_path)
        written = Path(tmpdir) / "carvq.gguf" if body_type else out
        coded_default = tied_default and gio.tensor_by_name(reader, gio.HEAD) is None and not screen
        if coded_default:
            target_bpw, head_type, tiered = TIED_DEFAULT_BPW, CODED_HEAD, True
        report = _convert_reader(reader, src, written, gguf_path, base, target_bpw, iters, seed,
                                 calibration, head_type, progress, start, screen, tune_steps, prior, trim_to, tier_floor,
                                 tiered, fit_metric, fix_screen, transform)
        if coded_default:
            report.notes.append(f"tied model, no shape option: the default is the coded head at {TIED_DEFAULT_BPW:g} bpw "
                                "(lookup and head together); --head-type Q5_0 keeps a head copy beside a 1.6 bpw lookup "
                                "(README, \"Coded head\")")
        if body_type:
            quantize_body(written, out, body_type, keep_head=report.head_copied)
            report.output = str(out)
            report.notes.append(f"transformer body quantized to {body_type} by llama-quantize; CARVQ tensors passed through")
        return report


def _convert_reader(reader, src, out, gguf_path, base, target_bpw, iters, seed, calibration,
                    head_type, progress, start, screen, tune_steps, prior, trim_to=None, tier_floor=None,
                    tiered=False, fit_metric="uniform", fix_screen=False, transform="none") -> Report:
    arch = gio.field_value(reader, "general.architecture")
    if fmt.is_carvq(reader):
        raise CarvqError(f"{src}: already a CARVQ-GGUF")
    if arch not in fmt.ARCHITECTURES:
        raise CarvqError(f"{src}: architecture {arch!r} is not supported (supported: {', '.join(fmt.ARCHITECTURES)})")
    split = gio.field_value(reader, "split.count")
    if split is not None and int(split) > 1:
        raise CarvqError(f"{src}: one part of a {split}-part split GGUF; merge it first "
                         "(llama-gguf-split --merge) and convert the whole file")
    embd = gio.tensor_by_name(reader, gio.EMBD)
    if embd is None:
        raise CarvqError(f"{src}: no {gio.EMBD} tensor")
    head_src = gio.tensor_by_name(reader, gio.HEAD)
    coded_head = head_type is not None and head_type.lower() == CODED_HEAD
    if coded_head and head_src is not None:
        raise CarvqError(f"--head-type {CODED_HEAD}: {src} has an {gio.HEAD} of its own (an untied head); a coded head "
                         "is the lookup's rows, only for a model whose head is its embedding")
    if coded_head and screen:
        raise CarvqError(f"--head-type {CODED_HEAD} with --screen-index: a coded head is screened by the lookup's own "
                         "codes; leave out --screen-index")
    if head_src is not None and tuple(int(x) for x in head_src.shape[:2]) != tuple(int(x) for x in embd.shape[:2]):
        raise CarvqError(f"{src}: {gio.HEAD} has shape {tuple(head_src.shape)}, {gio.EMBD} {tuple(embd.shape)}")
    if target_bpw is not None:
        check_target(base, int(embd.shape[1]), int(embd.shape[0]), target_bpw)
    # the source model writes its documents before the embedding is unpacked: its context and
    # logits then add nothing to the conversion's peak
    documents = TUNE_DOCUMENTS if tune_steps and calibration is None else model_prior.DOCUMENTS
    prior_w, prior_how, notes, mp = _prior(reader, gguf_path, int(embd.shape[1]), prior, seed, progress, documents)
    tokens = _calibration_tokens(gguf_path, Path(calibration), int(embd.shape[1])) if calibration is not None else None
    sens = None
    memory.trim()
    if fit_metric == "fisher":
        sens, why = _fit_metric(reader, gguf_path, tokens, mp, seed, progress, int(embd.shape[0]))
        notes.append(sens.how if sens is not None else f"every dimension weighted alike: {why}")
        memory.trim()
    # the source model runs in llama.cpp for the hidden states before the embedding is unpacked:
    # beside the float32 copy, its mapped weights and buffers were the conversion's peak (Gemma-3:
    # 2.27 GiB, 3.6x the float32 embedding; docs/RESULTS.md, session 23)
    states = screen_index.hidden_states(gguf_path, calibration, progress) if screen else None
    fix_states = None
    if fix_screen and head_src is None and not screen:  # the scan reads the lookup's codes
        seqs = (screen_fix.calibration_sequences(*tokens) if tokens is not None else
                [mp.start + list(d) for d in mp.documents] if mp is not None else [])
        fix_states = screen_fix.hidden_states(gguf_path, seqs) if seqs else None
        if fix_states is None:
            notes.append("no screen correction: no text to take the hidden states from (--prior tokenizer, no --calibration)")
    memory.trim()
    M = gio.dequantize(embd)
    gio.release_pages(reader, embd)  # M holds it now; a byte-copied head maps it again when written
    memory.trim()
    bad = _first_non_finite_row(M)
    if bad is not None:
        raise CarvqError(f"{src}: {gio.EMBD} holds non-finite values (row {bad}); nothing to compress")
    V, n = M.shape
    w, weights_from = _token_weights(prior_w, prior_how, reader, V, calibration, None if tokens is None else tokens[0])
    if sens is not None and sens.token_factor is not None and sens.token_factor.shape == (V,):
        w = w * sens.token_factor
        weights_from += f"; times each token's sensitivity ** {metric.TOKEN_POWER:g}"
    if target_bpw is not None:
        cfg, search_notes = choose_config(M, w, base, target_bpw, seed, progress)
        notes += search_notes
        memory.trim()
    else:
        base.check(n)
        cfg = base.resolve_hot(V, n)
    cfg.check(n)
    if tiered and trim_to is None:
        plan = tiers.deeper_fit(cfg, V, n)
        if plan is None:
            notes.append("no hot tiers: they trim a fit without an adaptor, of at most 15 levels, whose codebooks "
                         "leave room for tier rows")
        else:
            cfg, tier_floor, trim_to = plan
    if trim_to is not None:
        floor = tier_floor if tier_floor is not None else max(1, cfg.levels - 2)
        tiers.check(cfg.levels, cfg.adaptor_rank, floor)  # before the fit, not minutes after it

    if sens is not None:
        metric.scale_rows(M, sens.scale)  # the fit and the trim work in the metric (converter/metric.py)
    W = _frame(M, w, cfg, sens, transform, trim_to is not None, target_bpw, notes)
    fit = train.compress(M, w, cfg, iters, seed, progress)
    memory.trim()
    if trim_to is not None:
        matrix = 0 if W is None else W.nbytes  # paid from the same budget
        try:
            fit.tensors, how = tiers.trim(fit.tensors, M, w, floor, trim_to * V * n / 8 - matrix)
        except CarvqError as exc:
            if not matrix:
                raise
            raise CarvqError(f"{exc} (the transform's {n} x {n} matrix takes {matrix:,} bytes of it: "
                             "--transform none leaves them to the codes)") from None
        notes.append(how)
        fit.tensors, how = polish.polish(fit.tensors, M, w, progress=progress)
        notes.append(how)
        memory.trim()
    if W is not None:
        fit.tensors.layout = dataclasses.replace(fit.tensors.layout, transform=True)
        fit.tensors.transform = W
        notes.append(f"transform: the codes fit, and decode, in the principal axes of the weighted embedding"
                     f"{' (in the metric)' if sens is not None else ''}; the {n} x {n} matrix costs "
                     f"{8.0 * W.nbytes / (V * n):.4f} bpw (converter/frame.py)")
    if sens is not None and W is None:
        metric.unscale(fit.tensors, 1.0 / sens.scale)  # with a transform, its rows undo the scale
    if sens is not None or W is not None:
        del M  # the scaled or rotated rows; the source's, exactly, for what follows
        memory.trim()
        M = gio.dequantize(embd)
        gio.release_pages(reader, embd)
    if tune_steps:
        seqs, kind = _tuning_sequences(tokens, mp)
        notes.append(tune.tune(gguf_path, fit.tensors, seqs, tune_steps, seed, progress, kind, reader).note())
        memory.trim()
    errors = ErrorStats.measure(M, fit.tensors, w)
    memory.trim()

    head = None
    if coded_head and fit.tensors.layout.adaptor_rank:
        raise CarvqError(f"--head-type {CODED_HEAD} needs the lookup without an adaptor (the head's rows are the "
                         "codes' sums); leave out --adaptor-rank")
    if head_src is None and not coded_head:
        head = head_tensor(embd, M, head_type or default_head_type(embd, n))
    if states is not None:
        # the index is fitted to the head's rows: the embedding's for a tied model (overwritten in
        # place, unless the head copy is M itself), the source's output.weight for an untied one
        fit_states, held_out, source = states
        if head_src is None:
            E = M if not np.shares_memory(head[0], M) else M.copy()
        else:
            del M
            memory.trim()
            M = E = gio.dequantize(head_src)
        exact_top = screen_index.top_rows(held_out, lambda a, b: E[a:b], V, screen_index.TOP)
        index = screen_index.fit(E, w, fit_states, screen, seed, progress)
        del E
        notes.append(f"screen index fitted in the metric of the hidden states of {source}")
        if head_src is None:
            # a tied head can also be screened by the lookup's codes: keep the index only where it screens better
            keep, how = screen_index.choose(index, fit.tensors, exact_top, held_out)
            notes.append(how + ("" if keep else "; the file is written without it (format v2)"))
        else:
            keep = True  # an untied head has no other screen
        fit.tensors.screen = index if keep else None
    if fix_states is not None:  # taken only for a head copy (tied) without a screen index
        rows = _coded_rows(fit.tensors) if coded_head else _head_rows(head, M)
        fit.tensors.screen_fix, how = screen_fix.fit(fit.tensors, rows, fix_states)
        notes.append(how)
    del M  # the write reads the output back to validate it: not beside a float32 copy of the embedding
    memory.trim()
    head_bytes = int(head[0].nbytes) if head is not None else 0
    screen_bytes = fit.tensors.screen.nbytes if fit.tensors.screen is not None else 0
    screen_bytes += fit.tensors.screen_fix.nbytes if fit.tensors.screen_fix is not None else 0
    parts = tiers.part_bytes(fit.tensors)  # what is written, trimmed or not (equal to cfgmod.part_bytes untrimmed)
    fit.tensors.head_codes = coded_head
    provenance = fmt.Provenance(source_type=embd.tensor_type.name, head_copy=head is not None, head_codes=coded_head,
                                bpw=8.0 * sum(parts.values()) / (V * n), head_bpw=8.0 * head_bytes / (V * n),
                                screen_bpw=8.0 * screen_bytes / (V * n))
    fmt.write_model(reader, out, arch, fit.tensors, provenance, head, progress)
    return Report(
        input=str(src), output=str(out), arch=arch, n_vocab=V, n_embd=n, source_type=embd.tensor_type.name,
        config=cfg, weights_from=weights_from, parts=parts, head_bytes=head_bytes,
        head_type=(head[1].name if head is not None else CODED_HEAD if coded_head else "untied"), head_copied=head is not None, screen_bytes=screen_bytes,
        errors=errors, seconds=time.perf_counter() - start, rounds=fit.rounds, source_bytes=int(embd.n_bytes),
        notes=notes, trimmed_to=trim_to, peak_rss=memory.peak_rss(),
    )
