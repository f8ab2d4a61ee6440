"""The source model in PyTorch, read from its GGUF by transformers, in one copy.

transformers' own `from_pretrained(gguf_file=)` dequantizes every tensor into a float32 state
dict, copying each (its largest, the embedding, is then held twice for a moment), while its
parse of the file's metadata is alive (gguf-py keeps a NumPy view per vocabulary entry: 0.7 GB
for Gemma-3's 262144 tokens): Gemma-3-270M (a 0.67 GB float32 embedding) peaked at 2.5 GB
while loading, above issue 14's bound of 3x the float32 embedding for the whole conversion.
Here transformers still reads the configuration and every tensor but the V x n ones (its
tensor-name mapping and per-architecture processing are what it is for), the model is built
without memory (accelerate's empty weights) and takes those tensors as they are (`assign`), and
the embedding (and an untied head) come from carvq's own chunked dequantize, shared with
PyTorch without a copy.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from carvq import gguf_io as gio
from carvq.converter import memory
from carvq.errors import CarvqError

# the V x n tensors carvq dequantizes itself (GGUF names)
OWN_TENSORS = (gio.EMBD, gio.HEAD)


@contextlib.contextmanager
def _gguf_tensor_loop(progress: bool, skip: tuple[str, ...]):
    """transformers' GGUF loader walks the file's tensors through its module's `tqdm`: that walk
    leaves out `skip`, and without progress (`carvq convert -q`) its bar, which its own progress
    switch does not reach, is off so that stderr holds only what carvq says. If a transformers
    version walks differently, the loader still works, with its own copies of those tensors."""
    try:
        import transformers.modeling_gguf_pytorch_utils as loader
    except ImportError:
        loader = None
    bar = getattr(loader, "tqdm", None)
    if bar is None:
        yield
        return

    def walk(tensors, *args, **kwargs):
        kept = [t for t in tensors if getattr(t, "name", None) not in skip]
        return bar(kept, *args, **{**kwargs, "disable": not progress or kwargs.get("disable", False)})

    loader.tqdm = walk
    try:
        yield
    finally:
        loader.tqdm = bar


def _own_tensor(reader, name: str, dtype: torch.dtype) -> torch.Tensor | None:
    tensor = gio.tensor_by_name(reader, name)
    if tensor is None:
        return None
    array = gio.dequantize(tensor)  # chunks of rows into one float32 array
    gio.release_pages(reader, tensor)  # its mapped pages would count beside the copy
    out = torch.from_numpy(array)
    return out if dtype == torch.float32 else out.to(dtype)


def load_frozen(gguf_path: Path, progress: bool, dtype: torch.dtype = torch.float32, reader=None):
    """The source model in PyTorch (`dtype`), every parameter frozen, in eval mode. `reader`: the
    caller's open reader of the same file, if it has one (gguf-py's parse of Gemma-3's vocabulary
    alone takes 0.7 GB and 10 s)."""
    try:
        import transformers
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError as exc:  # the converter's extra brings them
        raise CarvqError(f"running the model in PyTorch needs transformers and accelerate ({exc}); "
                         "pip install 'carvq[convert]'") from None
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    gguf_path = Path(gguf_path).resolve()
    try:
        config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        with init_empty_weights(include_buffers=False):  # parameters on "meta": no memory, no random init
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        with _gguf_tensor_loop(progress, OWN_TENSORS):
            state = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model,
                                         torch_dtype=dtype)["tensors"]
        model.load_state_dict(state, strict=False, assign=True)
        del state
        memory.trim()  # what transformers' own parses of the file left in the heap (0.7 GB on Gemma-3)
    except (ValueError, KeyError, NotImplementedError, TypeError, AttributeError) as exc:
        raise CarvqError(f"transformers cannot run this GGUF in PyTorch ({type(exc).__name__}: {exc})") from None
    reader = reader if reader is not None else gio.open_gguf(gguf_path)
    embedding = _own_tensor(reader, gio.EMBD, dtype)
    head = _own_tensor(reader, gio.HEAD, dtype)
    if embedding is None:
        raise CarvqError(f"{gguf_path.name} has no {gio.EMBD}")
    _set_weight(model.get_input_embeddings(), embedding, "the embedding")
    if head is not None:
        _set_weight(model.get_output_embeddings(), head, "the output head")
    else:
        model.tie_weights()
    unloaded = [name for name, p in model.named_parameters() if p.is_meta]
    if unloaded:
        raise CarvqError(f"transformers found no weights in the GGUF for {', '.join(unloaded[:3])}"
                         f"{' ...' if len(unloaded) > 3 else ''}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _set_weight(module, weight: torch.Tensor, what: str) -> None:
    if module is None or tuple(module.weight.shape) != tuple(weight.shape):
        have = None if module is None else tuple(module.weight.shape)
        raise CarvqError(f"{what}: the GGUF's is {tuple(weight.shape)}, transformers' model wants {have}")
    module.weight = torch.nn.Parameter(weight, requires_grad=False)


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits from its final (normed) hidden states, as its forward computes them
    (the head, then Gemma's soft cap where the configuration has one)."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def check_head_logits(model, tokens: torch.Tensor) -> None:
    """head_logits on the decoder's output must give the model's own logits (on a short prefix):
    an architecture whose head does more is refused, not measured wrongly."""
    prefix = tokens[: min(8, tokens.numel())].unsqueeze(0)
    with torch.no_grad():
        full = model(input_ids=prefix).logits[0]
        mine = head_logits(model, model.get_decoder()(input_ids=prefix).last_hidden_state)[0]
    full, mine = full.float(), mine.to(full.dtype).float()
    tol = 1e-3 if mine.dtype == torch.float32 else 2e-2  # the same operations; bfloat16 rounds at 2^-8
    if not torch.allclose(full, mine, rtol=tol, atol=tol * float(full.abs().max())):
        raise CarvqError("this architecture's logits are not its head applied to its last hidden state")
