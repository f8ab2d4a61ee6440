"""The `carvq` command. Subcommands import their heavy dependencies lazily, so the runtime
commands work without torch or transformers installed."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from carvq.errors import CarvqError

from carvq.runtime import HEADS  # light: the cffi bindings load only with Model


def _cmd_convert(args) -> int:
    from carvq.converter.config import Config
    from carvq.converter.convert import convert

    o = _shape_options(args)
    base = Config(group_size=o["group_size"], levels=o["levels"], adaptor_rank=o["adaptor_rank"],
                  adaptor_hidden=o["adaptor_hidden"] if o["adaptor_rank"] else 0, activation=o["activation"],
                  hot_rows=o["hot_rows"] or 0, hot_levels=o["hot_levels"],
                  hot_bpw=0.0 if o["hot_rows"] is not None else o["hot_bpw"])
    report = convert(args.input, args.output, base, target_bpw=o["target_bpw"], iters=args.iters, seed=args.seed,
                     tied_default=_shape_left_to_default(args),
                     calibration=args.calibration, head_type=o["head_type"], hf_outtype=args.hf_outtype,
                     body_type=args.body_type, progress=not args.quiet, force=args.force, tune_steps=args.tune_steps, prior=args.prior,
                     trim_to=o["trim_to"], tier_floor=o["tier_floor"], tiered=o["tiers"], fit_metric=args.metric, fix_screen=args.screen_fix,
                     transform=o["transform"],
                     screen=None if not o["screen_index"] else Config(group_size=args.screen_group_size,
                                                                      levels=args.screen_levels,
                                                                      hot_bpw=args.screen_hot_bpw))
    print(report.format())
    return 0


# The options that shape the file. Their parsed default is None (given or not is then plain), and
# SHAPE_DEFAULTS the value they take when not given. With none of them given, a tied model gets
# the coded head at 3.0 bpw (converter.convert.TIED_DEFAULT_BPW) instead of the 1.6 bpw lookup
# and a Q5_0 head copy.
SHAPE_DEFAULTS: dict = {}  # filled by build_parser()


def _shape_options(args) -> dict:
    return {name: SHAPE_DEFAULTS[name] if getattr(args, name) is None else getattr(args, name) for name in SHAPE_DEFAULTS}


def _shape_default(name: str, value):
    """Records `value` as the shape option's default; the parser's own default is None."""
    SHAPE_DEFAULTS[name] = value
    return None


def _shape_left_to_default(args) -> bool:
    return all(getattr(args, name) is None for name in SHAPE_DEFAULTS)


def screen_index_defaults():
    from carvq.converter.config import SCREEN_DEFAULT  # torch-free: the runtime parses these options too

    return SCREEN_DEFAULT


def _cmd_export(args) -> int:
    from carvq.export import export

    print(export(args.model, args.output, args.embedding_type, force=args.force).format())
    return 0


def _cmd_inspect(args) -> int:
    from carvq.inspection import inspect_text

    print(inspect_text(args.file))
    return 0


TOOLS = ("llama-cli", "llama-server", "llama-perplexity", "llama-quantize", "llama-imatrix", "llama-bench", "llama-completion")


def _cmd_tools(args) -> int:
    from carvq.runtime import library_dir, tool_path

    if args.lib_dir:  # for LLAMA_CPP_LIB_PATH (llama-cpp-python) and linkers
        print(library_dir())
        return 0
    if args.bin_dir:
        print(tool_path(TOOLS[0]).parent)
        return 0
    print(f"library: {library_dir()}")
    for name in TOOLS:
        path = tool_path(name)
        print(f"{name:<18} {path}{'' if path.exists() else '  (missing)'}")
    return 0


def _cmd_generate(args) -> int:
    from carvq.runtime.model import Model

    with Model(args.model, n_ctx=args.ctx, verbose=args.verbose, head=args.head, screen_k=args.screen_k) as model:
        for piece in model.generate(args.prompt, args.max_tokens, args.temperature, args.top_p, args.seed):
            sys.stdout.write(piece)
            sys.stdout.flush()
    print()
    return 0


def _cmd_eval(args) -> int:
    from carvq.runtime.evaluate import evaluate, to_json

    result = evaluate(args.model, args.text, args.reference, ctx=args.ctx, chunks=args.chunks,
                      threads=args.threads, progress=not args.quiet and not args.json)
    print(to_json(result) if args.json else result.table())
    return 0


def _cmd_footprint(args) -> int:
    from carvq.runtime import footprint as fp

    models = [fp.footprint(args.model, args.tokens, measure=not args.no_rss, head=args.head)]
    if args.baseline:
        models.append(fp.footprint(args.baseline, args.tokens, measure=not args.no_rss, head=args.head))
    print(fp.to_json(models) if args.json else fp.table(models))
    if args.plot:
        fp.plot(models, args.plot)
        if not args.json:
            print(f"chart: {args.plot}")
    return 0


def _cmd_bench(args) -> int:
    from carvq.runtime.ab_speed import bench

    result = bench(args.model, args.baseline, rounds=args.rounds, prompt=args.prompt, gen=args.gen,
                   threads=args.threads, progress=not args.json, head=args.head, baseline_head=args.baseline_head)
    print(result.to_json() if args.json else result.table())
    return 0


def _fit_history(model, history: list[dict], max_tokens: int, n_ctx: int) -> list[dict]:
    """Drop the oldest exchanges until prompt + reply fit the context."""
    while len(history) > 1:
        n = len(model.tokenize(model.chat_prompt(history), parse_special=True))
        if n + max_tokens <= n_ctx:
            break
        drop = 1 if history[0]["role"] != "system" else 2
        del history[drop - 1 : drop + 1]
    return history


def _cmd_chat(args) -> int:
    from carvq.runtime.model import Model

    with Model(args.model, n_ctx=args.ctx, verbose=args.verbose, head=args.head, screen_k=args.screen_k) as model:
        history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
        print(f"carvq chat: {args.model} ({'CARVQ' if model.is_carvq else 'stock'} embedding). "
              "/exit to quit, Ctrl-C stops a reply.", file=sys.stderr)
        while True:
            try:
                line = input("> ")
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                print()
                continue
            if line.strip() in ("/exit", "/quit"):
                return 0
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            history = _fit_history(model, history, args.max_tokens, args.ctx)
            reply: list[str] = []
            try:
                for piece in model.chat(history, args.max_tokens, args.temperature, args.top_p, args.seed):
                    sys.stdout.write(piece)
                    sys.stdout.flush()
                    reply.append(piece)
            except KeyboardInterrupt:
                sys.stdout.write(" [stopped]")
            print()
            history.append({"role": "assistant", "content": "".join(reply)})


def _add_sampling(p: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ctx", type=int, default=2048, help="context length in tokens")
    p.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log")
    p.add_argument("--head", choices=HEADS, default="auto",
                   help="a CARVQ model's logits: screened (every row ranked by the head's screen index, or a tied "
                        "model's lookup codes, the best --screen-k exact), or the dense head; auto screens generation "
                        "(docs/SCREEN.md)")
    p.add_argument("--screen-k", type=int, help="candidate rows computed exactly by the screened head (default: with the "
                        "head's screen index V/16 within 2048..4096, with the lookup's codes V/4 within 4096..8192)")


def build_parser() -> argparse.ArgumentParser:
    from carvq import __version__
    from carvq.format import ACTIVATIONS

    # the converter's defaults, read without importing torch (config.py needs none)
    from carvq.converter.config import DEFAULT_ADAPTOR_HIDDEN, DEFAULT_ITERS
    from carvq.converter.config import Config as D

    p = argparse.ArgumentParser(prog="carvq", description="CARVQ embedding compression for llama.cpp models")
    p.add_argument("--version", action="version", version=f"carvq {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="compress a model's token embedding to CARVQ-GGUF")
    c.add_argument("input", help="a GGUF file or a Hugging Face checkpoint directory")
    c.add_argument("-o", "--output", required=True, help="the CARVQ-GGUF to write")
    c.add_argument("--force", action="store_true", help="replace the output if it exists")
    c.add_argument("--group-size", type=int, default=_shape_default("group_size", D.group_size), help=f"columns per sub-vector, d (default {D.group_size})")
    c.add_argument("--levels", type=int, default=_shape_default("levels", D.levels), help=f"residual levels per group, L (default {D.levels})")
    c.add_argument("--adaptor-rank", type=int, default=_shape_default("adaptor_rank", D.adaptor_rank),
                   help="width m of the per-token table sigma_0 of the corrective adaptor; 0 = no adaptor (default "
                        f"{D.adaptor_rank}: at equal bits hot rows measured better, docs/RESULTS.md); 4 is a good size")
    c.add_argument("--adaptor-hidden", type=int, default=_shape_default("adaptor_hidden", DEFAULT_ADAPTOR_HIDDEN),
                   help=f"hidden width of the adaptor MLP (default {DEFAULT_ADAPTOR_HIDDEN})")
    c.add_argument("--activation", choices=ACTIVATIONS, default=_shape_default("activation", D.activation))
    c.add_argument("--hot-bpw", type=float, default=_shape_default("hot_bpw", D.hot_bpw),
                   help="bits per weight spent on hot rows: the most frequent tokens get extra residual levels, "
                        f"as many as this pays for; 0 = none (default {D.hot_bpw}). With --target-bpw, "
                        "whatever the levels leave of the target goes to hot rows too")
    c.add_argument("--hot-rows", type=int, help="exactly this many hot rows instead (overrides --hot-bpw)")
    c.add_argument("--hot-levels", type=int, default=_shape_default("hot_levels", D.hot_levels),
                   help=f"extra residual levels of a hot row (default {D.hot_levels})")
    c.add_argument("--iters", type=int, default=DEFAULT_ITERS,
                   help=f"RVQ/adaptor alternation rounds at most, with an adaptor (default {DEFAULT_ITERS}; one fit without)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--target-bpw", type=float, help="pick group size and levels: least weighted error with lookup bpw <= this")
    c.add_argument("--calibration", help="text file whose token counts weight the objective, beside the prior "
                                         "(default: the prior alone)")
    c.add_argument("--prior", choices=("model", "tokenizer"), default="model",
                   help="how often each token is expected, without a text: 'model' averages the source model's own "
                        "next-token distribution over 8 short documents it writes (about a minute for Gemma-3-270M on 2 "
                        "cores) into half the prior, the tokenizer's order the other half; 'tokenizer' that order alone "
                        "(instant, but SentencePiece-BPE vocabularies such as Gemma's rank their single characters "
                        "last) (default: model)")
    c.add_argument("--head-type", help="for a tied model: 'codes' writes no head at all, the tied head is the lookup's own "
                                       "rows, its logits computed from the codes (format v8, docs/FORMAT.md \"Coded head\"); "
                                       "or the type of the output.weight copy written beside the lookup, e.g. Q5_0 (the "
                                       "source type keeps the head exact). Default: with no option that shapes the file "
                                       "(--target-bpw, --group-size, --levels, --hot-*, --adaptor-*, --tiers, --transform, "
                                       "--trim-to, --screen-index), 'codes' at --target-bpw 3.0; with any of them, Q5_0, "
                                       "or a byte copy of the source embedding when that is as small")
    c.add_argument("--tiers", action=argparse.BooleanOptionalAction, default=_shape_default("tiers", True),
                   help="hot rows in tiers (format v4): fit one level deeper than the configuration (up to 2.1 bpw the "
                        "--target-bpw family's point at its bpw + 0.9, wider hot rows) and trim it back to "
                        "the configuration's size, every row keeping the levels that lower its token-weighted error "
                        "most, at least one level fewer than the configuration (default; at 1.6 bpw KLD -18 %% on "
                        "SmolLM2, -26 %% on Gemma-3, docs/RESULTS.md). --no-tiers: one hot set (format v2); without an "
                        "adaptor only")
    c.add_argument("--screen-fix", action=argparse.BooleanOptionalAction, default=True,
                   help="for a tied model, store the screened head's correction (format v5): one int8 a row of what the "
                        "scan misses along the hidden states' top direction (0.013 bpw; at k = 4096 Gemma-3's KLD of "
                        "screening -30 %%, docs/RESULTS.md); needs a text the model runs on: the calibration text or "
                        "the documents it writes for its prior (default: on)")
    c.add_argument("--metric", choices=("fisher", "uniform"), default="fisher",
                   help="how the fit counts an error in each embedding dimension: 'fisher' by the source model's "
                        "sensitivity to it (its Fisher information, from gradients through the model in PyTorch on 16 "
                        "sequences of the calibration text or on the 8 documents it writes for the prior; at 1.6 bpw "
                        "KLD -27 %% on SmolLM2, -28 %% on Gemma-3, docs/RESULTS.md; the model runs in float32, or in "
                        "bfloat16 where float32 would take the conversion above 3x the float32 embedding, and not at "
                        "all, with a note, where bfloat16 would too), 'uniform' all alike (default: fisher)")
    c.add_argument("--transform", choices=("auto", "pca", "none"), default=_shape_default("transform", "none"),
                   help="fit, and decode, the codes in the principal axes of the token-weighted embedding, mapped back "
                        "by an n x n matrix stored in the file (format v6; it costs 16 n / V bits per weight, paid from "
                        "the same budget; SmolLM2 at 3.0 bpw: KLD -10 %% before that price, +8 %% after its 0.19 bpw, docs/RESULTS.md): "
                        "'pca', 'none', or 'auto', where the matrix costs at most 0.1 bpw (default: none)")
    c.add_argument("--trim-to", type=float, metavar="BPW",
                   help="then trim the fit to this lookup bpw in hot tiers (format v4): every row keeps between "
                        "--tier-floor levels and the fit's own, the levels going where they lower the token-weighted "
                        "error most (e.g. --levels 4 --trim-to 1.6: frequent rows keep deep levels, rare rows 2)")
    c.add_argument("--tier-floor", type=int,
                   help="with --trim-to: levels every row keeps (default: the fit's levels minus 2, at least 1)")
    c.add_argument("--tune-steps", type=int, default=0,
                   help="then tune the codebooks end to end: this many Adam steps (256 calibration tokens each) on the KL "
                        "divergence between the source model and the model reading the CARVQ lookup, through the frozen "
                        "model in PyTorch; on the --calibration text, or without one on documents the model writes itself "
                        "(default 0: none)")
    c.add_argument("--screen-index", action="store_true", default=None,
                   help="also fit an index of the output head of its own (output.carvq.*, format v3) in the metric of "
                        "the model's hidden states, and keep it where it screens better than the lookup's codes "
                        "(SmolLM2: the same KLD with 3072 exact rows instead of 8192, for 1.97 bpw more; docs/SCREEN.md)"),
    S = screen_index_defaults()
    c.add_argument("--screen-group-size", type=int, default=S.group_size, help=f"the screen index's d (default {S.group_size})")
    c.add_argument("--screen-levels", type=int, default=S.levels, help=f"the screen index's L (default {S.levels})")
    c.add_argument("--screen-hot-bpw", type=float, default=S.hot_bpw,
                   help=f"bpw the screen index spends on hot rows (default {S.hot_bpw})")
    c.add_argument("--body-type", help="also quantize every other tensor with llama-quantize, e.g. Q4_K_M")
    c.add_argument("--hf-outtype", default="auto", help="outtype passed to convert_hf_to_gguf.py for a HF checkpoint")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=_cmd_convert)
    for name in ("hot_rows", "target_bpw", "head_type", "trim_to", "tier_floor", "screen_index"):
        SHAPE_DEFAULTS.setdefault(name, None)  # options without a value of their own when not given

    i = sub.add_parser("inspect", help="tensors, types, sizes and CARVQ parameters of a GGUF")
    i.add_argument("file")
    i.set_defaults(func=_cmd_inspect)

    x = sub.add_parser("export", help="a CARVQ-GGUF back to a stock GGUF that any llama.cpp runs (Ollama, LM Studio)")
    x.add_argument("model")
    x.add_argument("-o", "--output", required=True)
    x.add_argument("--embedding-type", default="auto",
                   help="ggml type of the decoded token_embd.weight: F32, F16, BF16, Q8_0, Q5_1, Q5_0, Q4_1, Q4_0 "
                        "(default: the source's type where gguf-py can write it, else Q8_0)")
    x.add_argument("--force", action="store_true", help="replace the output if it exists")
    x.set_defaults(func=_cmd_export)

    ch = sub.add_parser("chat", help="interactive, streaming chat with a GGUF (CARVQ or stock)")
    ch.add_argument("model")
    ch.add_argument("--system", help="system prompt")
    _add_sampling(ch, 256, 0.7)
    ch.set_defaults(func=_cmd_chat)

    g = sub.add_parser("generate", help="continue a prompt")
    g.add_argument("model")
    g.add_argument("-p", "--prompt", required=True)
    _add_sampling(g, 128, 0.8)
    g.set_defaults(func=_cmd_generate)

    e = sub.add_parser("eval", help="perplexity, and KL divergence against a reference, on a text (llama-perplexity)")
    e.add_argument("model")
    e.add_argument("--text", required=True, help="plain text file")
    e.add_argument("--reference", help="the model to compare with (e.g. the uncompressed one)")
    e.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    e.add_argument("--chunks", type=int, help="evaluate at most this many chunks")
    e.add_argument("-t", "--threads", type=int)
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=_cmd_eval)

    f = sub.add_parser("footprint", help="file bytes by category and resident memory, with and without mmap")
    f.add_argument("model")
    f.add_argument("--baseline", help="another GGUF to compare with (e.g. the stock model)")
    f.add_argument("--tokens", type=int, default=16, help="tokens generated while measuring RSS (default 16)")
    f.add_argument("--no-rss", action="store_true", help="file bytes only")
    f.add_argument("--json", action="store_true")
    f.add_argument("--plot", help="write a PNG stacked-bar chart here")
    f.add_argument("--head", choices=HEADS, default="auto", help="output head mode while generating (docs/SCREEN.md)")
    f.set_defaults(func=_cmd_footprint)

    b = sub.add_parser("bench", help="prompt and generation tokens/s against a baseline, alternating A/B (llama-bench)")
    b.add_argument("model")
    b.add_argument("--baseline", required=True)
    b.add_argument("--rounds", type=int, default=5)
    b.add_argument("-p", "--prompt", type=int, default=128, help="prompt tokens (default 128)")
    b.add_argument("-n", "--gen", type=int, default=32, help="generated tokens (default 32)")
    b.add_argument("-t", "--threads", type=int)
    b.add_argument("--json", action="store_true")
    b.add_argument("--head", choices=HEADS, default="auto", help="the model's output head mode (docs/SCREEN.md)")
    b.add_argument("--baseline-head", choices=HEADS, default="auto",
                   help="the baseline's; e.g. the same CARVQ file with --baseline-head dense")
    b.set_defaults(func=_cmd_bench)

    t = sub.add_parser("tools", help="where the bundled, patched llama.cpp tools are")
    t.add_argument("--lib-dir", action="store_true", help="print only the directory of libllama (LLAMA_CPP_LIB_PATH)")
    t.add_argument("--bin-dir", action="store_true", help="print only the directory of the tools")
    t.set_defaults(func=_cmd_tools)
    return p


class _Terminated(Exception):
    """SIGTERM, raised in the main thread so that temporary files are removed on the way out."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.func(args)
    except _Terminated:
        print("carvq: terminated", file=sys.stderr)
        return 143
    except CarvqError as exc:
        print(f"carvq: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("carvq: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `carvq inspect X | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        print(f"carvq: error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
