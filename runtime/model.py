"""A Pythonic runtime over the patched libllama: load, tokenize, generate, chat.

Needs only numpy and the compiled cffi module; no torch, no transformers.
"""
from __future__ import annotations

import codecs
import contextlib
import os
import threading
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from carvq.errors import CarvqError
from carvq.runtime import HEADS

try:
    from carvq.runtime._llama_cffi import ffi, lib
except ImportError as exc:  # pragma: no cover - only without a built package
    raise ImportError(f"carvq's llama.cpp bindings are not built ({exc}); install carvq with pip") from None

_init_lock = threading.Lock()
_initialised = False
_log_state = {"verbose": False}


class _Errors(threading.local):
    """llama.cpp's error lines, per thread: llama.cpp logs on the thread that called it, so two
    models used from two threads never see each other's errors."""

    last_error = ""
    cause = ""

    def reset(self) -> None:
        self.last_error = self.cause = ""


_errors = _Errors()
_GENERIC_LOAD_ERROR = "failed to load model from"


@ffi.def_extern()
def carvq_log_callback(level, text, user_data):  # noqa: ARG001
    msg = ffi.string(text).decode("utf-8", "replace")
    # keep the most specific error: llama.cpp ends a failed load with a generic line, and when
    # the loader's own line is generic too (a file gguf cannot parse), the first error before
    # it says why
    if level == lib.GGML_LOG_LEVEL_ERROR and msg.strip():
        if "error loading model:" in msg or "error loading model:" not in _errors.last_error:
            _errors.last_error = msg.strip()
        if not _errors.cause and "error loading model:" not in msg:
            _errors.cause = msg.strip()
    if _log_state["verbose"]:
        os.write(2, msg.encode("utf-8", "replace"))


def _load_error() -> str:
    err = _errors.last_error or "unknown error"
    if _GENERIC_LOAD_ERROR in err and _errors.cause:
        err = f"{_errors.cause} ({err.split('error loading model: ')[-1]})"
    return err


@ffi.def_extern()
def carvq_eval_callback(tensor, ask, user_data):
    capture = ffi.from_handle(user_data)
    name = ffi.string(tensor.name).decode()
    if ask:
        return name == capture["name"]
    if name == capture["name"] and tensor.type == lib.GGML_TYPE_F32:
        n0, n1 = tensor.ne[0], tensor.ne[1]
        row_stride = tensor.nb[1] // 4
        buf = ffi.buffer(ffi.cast("float *", tensor.data), 4 * row_stride * n1)
        capture["rows"] = np.frombuffer(buf, np.float32).reshape(n1, row_stride)[:, :n0].copy()
    return True


def _ensure_backend(verbose: bool) -> None:
    global _initialised
    _log_state["verbose"] = verbose
    with _init_lock:
        if not _initialised:
            lib.llama_log_set(lib.carvq_log_callback, ffi.NULL)
            lib.llama_backend_init()
            _initialised = True


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_fits_in_memory(nbytes: int, what: str) -> None:
    """Refuse a result array larger than half the available memory, with a message, instead
    of an out-of-memory kill part way through."""
    avail = _available_memory()
    if avail is not None and nbytes > avail // 2:
        raise CarvqError(f"{what} would take {nbytes / 2**30:.1f} GiB, more than half the {avail / 2**30:.1f} GiB "
                         "of memory available; ask for fewer positions")


class Model:
    """A GGUF model (CARVQ or stock) loaded through the patched llama.cpp.

    >>> with Model("model.gguf") as m:
    ...     print("".join(m.generate("The capital of France is", max_tokens=8, temperature=0)))
    """

    HEADS = HEADS

    def __init__(self, path, *, n_ctx: int = 2048, n_batch: int = 512, n_threads: int | None = None,
                 use_mmap: bool = True, kv_f32: bool = False, vocab_only: bool = False, verbose: bool = False,
                 head: str = "auto", screen_k: int | None = None):
        """head: how a CARVQ file of a tied model computes its logits (docs/SCREEN.md):
        "screened" approximates every logit from the codes and computes the screen_k best
        exactly, "dense" multiplies by the whole head, "auto" screens when a batch asks for
        at most a few logits (generation) and is dense otherwise. Stock files are always dense."""
        path = Path(path)
        if not path.is_file():
            raise CarvqError(f"{path}: no such file")
        if head not in self.HEADS:
            raise CarvqError(f"head {head!r}: one of {', '.join(self.HEADS)}")
        if screen_k is not None and screen_k < 1:
            raise CarvqError(f"screen_k {screen_k}: must be at least 1")
        if n_ctx < 1 or n_batch < 1:
            raise CarvqError(f"n_ctx ({n_ctx}) and n_batch ({n_batch}) must be at least 1")
        n_batch = min(n_batch, n_ctx)  # a batch is one sequence of its own in embedding_rows()
        # read by the patched llama.cpp when it builds a graph (llama-carvq.h)
        self._head_env = {"CARVQ_HEAD": head, "CARVQ_SCREEN_K": str(screen_k) if screen_k else ""}
        _ensure_backend(verbose)
        self.path = path
        self._n_ctx, self._n_batch = n_ctx, n_batch
        self._n_threads = n_threads or max(1, os.cpu_count() or 1)
        self._kv_f32 = kv_f32  # F32 attention end to end: logits continuous in the inputs (tests)
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        params.load_mode = lib.LLAMA_LOAD_MODE_MMAP if use_mmap else lib.LLAMA_LOAD_MODE_NONE
        params.vocab_only = vocab_only  # tokenizer only: no weights read
        _errors.reset()
        self._model = lib.llama_model_load_from_file(str(path).encode(), params)
        if self._model == ffi.NULL:
            self._model = None
            raise CarvqError(f"{path}: llama.cpp could not load the model: {_load_error()}")
        self._vocab = lib.llama_model_get_vocab(self._model)
        self._ctx = None
        # One model, one llama.cpp context: calls from several threads take turns (cffi
        # releases the GIL inside llama_decode), and every call that uses the context starts a
        # new epoch, so that a generator left open by an earlier call, or by close(), stops
        # with CarvqError instead of decoding into a context that was reset or freed.
        self._lock = threading.RLock()
        self._epoch = 0

    # ---- lifecycle -------------------------------------------------------------------
    def _live_model(self):
        if self._model is None:
            raise CarvqError("the model is closed")
        return self._model

    def _context(self, fresh: bool = False, cb_capture=None):
        self._live_model()
        if cb_capture is not None or fresh or self._ctx is None:
            cparams = lib.llama_context_default_params()
            cparams.n_ctx = self._n_ctx
            cparams.n_batch = self._n_batch
            cparams.n_ubatch = self._n_batch
            cparams.n_threads = self._n_threads
            cparams.n_threads_batch = self._n_threads
            cparams.no_perf = True
            if self._kv_f32:  # and no flash attention, which rounds Q to F16
                cparams.type_k = cparams.type_v = lib.GGML_TYPE_F32
                cparams.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
            if cb_capture is not None:
                cparams.cb_eval = lib.carvq_eval_callback
                cparams.cb_eval_user_data = cb_capture
            _errors.reset()
            ctx = lib.llama_init_from_model(self._model, cparams)
            if ctx == ffi.NULL:
                raise CarvqError(f"llama.cpp could not create a context: {_errors.last_error or 'unknown error'}")
            if cb_capture is not None:
                return ctx
            if self._ctx is not None:
                lib.llama_free(self._ctx)
            self._ctx = ctx
        return self._ctx

    def close(self) -> None:
        lock = getattr(self, "_lock", None)  # absent when __init__ failed early
        with lock if lock is not None else contextlib.nullcontext():
            self._epoch = getattr(self, "_epoch", 0) + 1
            if getattr(self, "_ctx", None) is not None:
                lib.llama_free(self._ctx)
                self._ctx = None
            if getattr(self, "_model", None) is not None:
                lib.llama_model_free(self._model)
                self._model = None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ---- facts -----------------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        self._live_model()
        return lib.llama_vocab_n_tokens(self._vocab)

    @property
    def n_embd(self) -> int:
        return lib.llama_model_n_embd(self._live_model())

    @property
    def size(self) -> int:
        """Bytes of all tensors, as llama.cpp counts them."""
        return lib.llama_model_size(self._live_model())

    @property
    def n_params(self) -> int:
        return lib.llama_model_n_params(self._live_model())

    def metadata(self) -> dict[str, str]:
        model = self._live_model()
        out = {}
        buf = ffi.new("char[]", 1 << 16)
        for i in range(lib.llama_model_meta_count(model)):
            lib.llama_model_meta_key_by_index(model, i, buf, len(buf))
            key = ffi.string(buf).decode("utf-8", "replace")
            lib.llama_model_meta_val_str_by_index(model, i, buf, len(buf))
            out[key] = ffi.string(buf).decode("utf-8", "replace")
        return out

    @property
    def is_carvq(self) -> bool:
        buf = ffi.new("char[]", 64)
        return lib.llama_model_meta_val_str(self._live_model(), b"carvq.format_version", buf, len(buf)) >= 0

    # ---- text ------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        self._live_model()
        data = text.encode("utf-8")
        cap = len(data) + 16
        out = ffi.new("llama_token[]", cap)
        n = lib.llama_tokenize(self._vocab, data, len(data), out, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            out = ffi.new("llama_token[]", cap)
            n = lib.llama_tokenize(self._vocab, data, len(data), out, cap, add_special, parse_special)
        if n < 0:
            raise CarvqError("tokenization failed")
        return list(out[0:n])

    def _check_tokens(self, tokens: list[int]) -> None:
        # llama.cpp's vocabulary throws std::out_of_range for a bad id, which would abort the
        # process across the C API: refuse it here
        n_vocab = self.n_vocab
        bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise CarvqError(f"token id {bad} outside 0..{n_vocab - 1}")

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        self._live_model()
        token = int(token)
        self._check_tokens([token])
        buf = ffi.new("char[]", 256)
        n = lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ffi.new("char[]", -n)
            n = lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return ffi.buffer(buf, n)[:]

    def detokenize(self, tokens: Iterable[int], remove_special: bool = False) -> str:
        self._live_model()
        toks = [int(t) for t in tokens]
        self._check_tokens(toks)
        arr = ffi.new("llama_token[]", toks or [0])
        cap = 16 * len(toks) + 16
        buf = ffi.new("char[]", cap)
        n = lib.llama_detokenize(self._vocab, arr, len(toks), buf, cap, remove_special, False)
        if n < 0:
            buf = ffi.new("char[]", -n)
            n = lib.llama_detokenize(self._vocab, arr, len(toks), buf, -n, remove_special, False)
        return ffi.buffer(buf, n)[:].decode("utf-8", "replace")

    def chat_prompt(self, messages: list[dict], add_assistant: bool = True) -> str:
        """The model's chat template (llama.cpp's built-in templates) applied to messages."""
        tmpl = lib.llama_model_chat_template(self._live_model(), ffi.NULL)
        if tmpl == ffi.NULL:
            raise CarvqError(f"{self.path.name} has no chat template")
        keep = []
        msgs = ffi.new("llama_chat_message[]", len(messages))
        for i, m in enumerate(messages):
            role, content = ffi.new("char[]", m["role"].encode()), ffi.new("char[]", m["content"].encode())
            keep += [role, content]
            msgs[i].role, msgs[i].content = role, content
        cap = 4096 + sum(len(m["content"]) * 2 for m in messages)
        buf = ffi.new("char[]", cap)
        n = lib.llama_chat_apply_template(tmpl, msgs, len(messages), add_assistant, buf, cap)
        if n > cap:
            buf = ffi.new("char[]", n)
            n = lib.llama_chat_apply_template(tmpl, msgs, len(messages), add_assistant, buf, n)
        if n < 0:
            raise CarvqError("llama.cpp does not support this model's chat template")
        return ffi.buffer(buf, n)[:].decode("utf-8", "replace")

    # ---- evaluation ------------------------------------------------------------------
    def _decode(self, ctx, tokens: list[int], start_pos: int, all_logits: bool) -> None:
        for off in range(0, len(tokens), self._n_batch):
            chunk = tokens[off : off + self._n_batch]
            batch = lib.llama_batch_init(len(chunk), 0, 1)
            try:
                batch.n_tokens = len(chunk)
                for i, tok in enumerate(chunk):
                    batch.token[i] = tok
                    batch.pos[i] = start_pos + off + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = 1 if (all_logits or off + i == len(tokens) - 1) else 0
                os.environ.update(self._head_env)  # this model's head mode for the graphs built now
                _errors.reset()
                rc = lib.llama_decode(ctx, batch)
            finally:
                lib.llama_batch_free(batch)
            if rc != 0:
                raise CarvqError(f"llama_decode failed (code {rc}): {_errors.last_error or 'see llama.cpp log'}")

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Logits of every position of `tokens` (one sequence from position 0): (len, n_vocab)."""
        with self._lock:
            self._epoch += 1
            return self._logits(tokens)

    def _logits(self, tokens: list[int]) -> np.ndarray:
        if not tokens:
            raise CarvqError("no tokens")
        if len(tokens) > self._n_ctx:
            raise CarvqError(f"{len(tokens)} tokens exceed the context of {self._n_ctx}")
        self._check_tokens(tokens)
        _check_fits_in_memory(len(tokens) * self.n_vocab * 4, f"the logits of {len(tokens)} positions x "
                              f"{self.n_vocab} tokens")
        ctx = self._context()
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        out = np.empty((len(tokens), self.n_vocab), np.float32)
        for off in range(0, len(tokens), self._n_batch):
            chunk = tokens[off : off + self._n_batch]
            self._decode(ctx, chunk, off, all_logits=True)
            for i in range(len(chunk)):
                ptr = lib.llama_get_logits_ith(ctx, i)
                out[off + i] = np.frombuffer(ffi.buffer(ptr, 4 * out.shape[1]), np.float32)
        return out

    def embedding_rows(self, token_ids: list[int]) -> np.ndarray:
        """Input embeddings of `token_ids` as llama.cpp computes them: the lookup (CARVQ decode
        or get_rows) read back from the graph node build_inp_embd names "embd", before any
        architecture scaling applied after it (Gemma's sqrt(n)): (len, n_embd) float32.
        Each batch is decoded as a sequence of its own: only the lookup matters here."""
        return self._capture("embd", token_ids, one_sequence=False)

    def hidden_states(self, tokens: list[int]) -> np.ndarray:
        """The final hidden states of `tokens` (one sequence from position 0), as the output
        head sees them: the graph node "result_norm", (len, n_embd) float32."""
        return self._capture("result_norm", tokens, one_sequence=True)

    def _capture(self, node: str, token_ids: list[int], one_sequence: bool) -> np.ndarray:
        with self._lock:  # a context of its own, but the same model and the same head setting
            return self._capture_locked(node, token_ids, one_sequence)

    def _capture_locked(self, node: str, token_ids: list[int], one_sequence: bool) -> np.ndarray:
        ids = [int(t) for t in token_ids]
        if not ids:
            raise CarvqError("no tokens")
        self._check_tokens(ids)
        if one_sequence and len(ids) > self._n_ctx:
            raise CarvqError(f"{len(ids)} tokens exceed the context of {self._n_ctx}")
        capture = {"name": node, "rows": None}
        handle = ffi.new_handle(capture)
        rows = []
        ctx = self._context(cb_capture=handle)
        try:
            lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
            for off in range(0, len(ids), self._n_batch):
                if not one_sequence:
                    lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
                capture["rows"] = None
                chunk = ids[off : off + self._n_batch]
                self._decode(ctx, chunk, off if one_sequence else 0, all_logits=True)
                if capture["rows"] is None:
                    raise CarvqError(f"the graph node {node!r} was not seen")
                rows.append(capture["rows"])
        finally:
            lib.llama_free(ctx)
        return np.concatenate(rows, axis=0)

    # ---- generation ------------------------------------------------------------------
    def _sampler(self, temperature: float, top_p: float, seed: int):
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if temperature <= 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
        else:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(top_p, 1))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(temperature))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def generate_tokens(self, tokens: list[int], max_tokens: int = 128, temperature: float = 0.8,
                        top_p: float = 0.95, seed: int = 0) -> Iterator[int]:
        """Sample up to max_tokens after `tokens`; stops at end-of-generation tokens. The
        generator holds the model between its steps only: another call on this model, or
        close(), ends it (its next step raises CarvqError)."""
        if not tokens:
            raise CarvqError("empty prompt")
        if len(tokens) + max_tokens > self._n_ctx:
            raise CarvqError(f"prompt ({len(tokens)} tokens) + max_tokens exceeds the context of {self._n_ctx}")
        return self._generate(list(tokens), max_tokens, temperature, top_p, seed)

    def _generate(self, tokens: list[int], max_tokens: int, temperature: float, top_p: float,
                  seed: int) -> Iterator[int]:
        with self._lock:
            self._epoch += 1
            epoch = self._epoch
            ctx = self._context()
            lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
            sampler = self._sampler(temperature, top_p, seed)
        try:
            with self._lock:
                self._check_epoch(epoch)
                self._decode(ctx, tokens, 0, all_logits=False)
            pos = len(tokens)
            for _ in range(max_tokens):
                with self._lock:
                    self._check_epoch(epoch)
                    tok = lib.llama_sampler_sample(sampler, ctx, -1)
                if lib.llama_vocab_is_eog(self._vocab, tok):
                    return
                yield tok
                with self._lock:
                    self._check_epoch(epoch)
                    self._decode(ctx, [tok], pos, all_logits=False)
                pos += 1
        finally:
            lib.llama_sampler_free(sampler)

    def _check_epoch(self, epoch: int) -> None:
        if self._model is None or self._ctx is None:
            raise CarvqError("the model was closed while generating")
        if self._epoch != epoch:
            raise CarvqError("generation ended: another call used this model's context")

    def _stream_text(self, tokens: Iterator[int]) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        for tok in tokens:
            text = decoder.decode(self.token_bytes(tok))
            if text:
                yield text
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail

    def generate(self, prompt: str, max_tokens: int = 128, temperature: float = 0.8, top_p: float = 0.95,
                 seed: int = 0) -> Iterator[str]:
        """Stream the continuation of `prompt`, piece by piece."""
        toks = self.tokenize(prompt, add_special=True, parse_special=False)
        return self._stream_text(self.generate_tokens(toks, max_tokens, temperature, top_p, seed))

    def chat(self, messages: list[dict], max_tokens: int = 256, temperature: float = 0.7, top_p: float = 0.95,
             seed: int = 0) -> Iterator[str]:
        """Stream the assistant's reply to `messages` ([{"role": ..., "content": ...}]),
        formatted with the model's chat template."""
        prompt = self.chat_prompt(messages, add_assistant=True)
        toks = self.tokenize(prompt, add_special=True, parse_special=True)
        return self._stream_text(self.generate_tokens(toks, max_tokens, temperature, top_p, seed))
