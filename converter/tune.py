"""End-to-end tuning (`carvq convert --tune-steps N`): the codes stay, the codebooks learn
what the model needs of them.

The RVQ fit minimises a token-weighted squared error of the rows, but what a user sees is
the model's next-token distribution (docs/RESULTS.md: quality is decided by KL divergence
through llama.cpp, never by matrix error). Here the codebooks and the hot rows' codebooks
are refitted by Adam on the KL divergence between the source model and the same model
reading the decoded lookup, on sequences of the calibration text, through the frozen model
in PyTorch (transformers reads the GGUF and dequantizes it). The codes, the adaptor (if any)
and every weight of the model stay as they are; only a few ten thousand codebook values move.

The reference distribution is kept as its TOP_K most likely tokens plus one bucket for the
rest: the KL of that coarsened distribution is a lower bound of the full one that is tight
where the mass is, and it keeps no V-wide reference in memory.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from carvq import reference
from carvq.errors import CarvqError
from carvq.converter.torch_model import load_frozen
from carvq.format import CarvqTensors, unpack_codes

SEQ_TOKENS = 256
# Adam's step, relative to the codebooks' RMS: Adam moves every value by about lr a step whatever
# its scale, and Gemma-3's codebooks are a third of SmolLM2's. SmolLM2 L3+2 (RMS 0.073), 60 steps:
# lr 3e-4 (0.004 x RMS) took the Britannica KLD 0.187 -> 0.157, 1e-3 only to 0.176; Gemma-3 at
# 3e-4 made its held-out KL worse (0.101 -> 0.119)
RELATIVE_LR = 0.004
CHECK_EVERY = 20  # steps between held-out checks; the best state seen is kept
TOP_K = 128
HELD_OUT_SEQS = 4  # sequences never trained on: the report's KL before and after


@dataclass
class TuneResult:
    steps: int
    seconds: float
    held_out_kl_before: float
    held_out_kl_after: float
    train_sequences: int

    kept_step: int = 0  # the step whose codebooks were kept (0: the fit's own)
    text: str = "calibration"  # or "self-written": documents the model wrote itself

    def note(self) -> str:
        kept = (f"kept step {self.kept_step}" if self.kept_step else
                "no step lowered it, the fit's codebooks kept")
        return (f"tuned {self.steps} steps on {self.train_sequences} {self.text} sequences of "
                f"{'up to ' if self.text != 'calibration' else ''}{SEQ_TOKENS} tokens "
                f"in {self.seconds:.0f} s: KL on {HELD_OUT_SEQS} held-out sequences {self.held_out_kl_before:.4f} -> "
                f"{self.held_out_kl_after:.4f} ({kept})")


def calibration_sequences(ids: np.ndarray, opening: list[int], seq_tokens: int = SEQ_TOKENS) -> torch.Tensor:
    """The calibration text's token ids as (S, seq_tokens) sequences, each opened as llama.cpp
    opens a context (`opening`: BOS where the model adds one)."""
    body = seq_tokens - len(opening)
    count = len(ids) // body
    if count < 2:
        raise CarvqError(f"the calibration text has {len(ids)} tokens; --tune-steps needs at least {2 * body} "
                         f"(two sequences of {seq_tokens})")
    seqs = torch.from_numpy(np.ascontiguousarray(ids[: count * body], np.int64)).view(count, body)
    return torch.cat([torch.tensor(opening, dtype=torch.long).expand(count, -1), seqs], dim=1)


def document_sequences(start: list[int], documents: list[list[int]], seq_tokens: int = SEQ_TOKENS) -> list[torch.Tensor]:
    """Documents the model wrote (each after `start`), one sequence each, cut to seq_tokens: a
    small model's documents often end early, and a step takes one sequence of any length."""
    seqs = [torch.tensor((start + list(d))[:seq_tokens], dtype=torch.long) for d in documents]
    if len(seqs) < 2:
        raise CarvqError(f"--tune-steps without --calibration: the model wrote {len(seqs)} usable document(s), "
                         "at least 2 are needed; give it --calibration text")
    return seqs


class Lookup(torch.nn.Module):
    """The CARVQ lookup of docs/FORMAT.md, differentiable in its codebooks."""

    def __init__(self, t: CarvqTensors):
        super().__init__()
        lo = t.layout
        G = lo.n_groups
        self.t = t
        self.codes = torch.from_numpy(unpack_codes(t.codes, lo).reshape(lo.n_vocab, G, lo.levels).astype(np.int64))
        self.codebooks = torch.nn.Parameter(torch.from_numpy(t.codebooks.astype(np.float32)).clone())
        self.hot = lo.hot_rows > 0
        if self.hot:
            # one row of positions per tier: where each token sits in hot_ids, -1 outside the tier
            self.hot_pos = torch.full((len(lo.tier_rows), lo.n_vocab), -1, dtype=torch.long)
            for tier, (start, rows) in enumerate(zip(lo.tier_starts(), lo.tier_rows)):
                ids = torch.from_numpy(t.hot_ids[start:start + rows].astype(np.int64))
                self.hot_pos[tier, ids] = torch.arange(start, start + rows)
            hl = lo.hot_layout()
            self.hot_codes = torch.from_numpy(unpack_codes(t.hot_codes, hl).reshape(lo.hot_rows, G, lo.hot_levels)
                                              .astype(np.int64))
            self.hot_codebooks = torch.nn.Parameter(torch.from_numpy(t.hot_codebooks.astype(np.float32)).clone())
        self.adaptor = t.sigma0 is not None  # kept fixed: added as the reference decoder computes it
        self.transform = None if t.transform is None else torch.from_numpy(t.transform.astype(np.float32))

    @staticmethod
    def _sum(codebooks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """sum over levels of codebooks[g, l, codes[t, g, l]]: (T, G, L) -> (T, G * d)."""
        G, L = codebooks.shape[:2]
        picked = codebooks[torch.arange(G).view(1, G, 1), torch.arange(L).view(1, 1, L), codes]
        return picked.sum(2).reshape(codes.shape[0], -1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self._sum(self.codebooks, self.codes[tokens])
        if self.hot:
            G = self.t.layout.n_groups
            for tier in range(self.hot_pos.shape[0]):
                pos = self.hot_pos[tier, tokens]
                rows = (pos >= 0).nonzero().squeeze(1)
                if rows.numel():
                    cb = self.hot_codebooks[tier * G:(tier + 1) * G]
                    e = e.index_add(0, rows, self._sum(cb, self.hot_codes[pos[rows]]))
        if self.transform is not None:
            e = e @ self.transform.T  # FORMAT.md "Lookup transform": fixed, as the codes are
        if self.adaptor:
            lo = self.t.layout
            ids = tokens.numpy()
            e = e + torch.from_numpy(reference.decode_adaptor(lo, self.t.sigma0, self.t.up_w, self.t.up_b, self.t.down_w,
                                                              self.t.down_b, ids))
        return e

    def store(self) -> None:
        """Write the tuned codebooks back, in their stored type."""
        self.t.codebooks = self.codebooks.detach().numpy().astype(self.t.codebooks.dtype)
        if self.hot:
            self.t.hot_codebooks = self.hot_codebooks.detach().numpy().astype(self.t.hot_codebooks.dtype)


def _reference(model, embed, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The source model's TOP_K log-probabilities, their token ids and the rest's log-mass."""
    with torch.no_grad():
        lp = model(inputs_embeds=embed(tokens).unsqueeze(0)).logits[0].float().log_softmax(-1)
        top, ids = lp.topk(min(TOP_K, lp.shape[-1]), -1)
    rest = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-7))
    return top, ids, rest


def _kl(model, lookup: Lookup, scale: float, tokens: torch.Tensor, ref) -> torch.Tensor:
    """Mean KL(reference || model with the decoded lookup) over the sequence's positions."""
    top, ids, rest = ref
    lq = model(inputs_embeds=(lookup(tokens) * scale).unsqueeze(0)).logits[0].float().log_softmax(-1)
    q_top = lq.gather(-1, ids)
    q_rest = torch.log1p(-q_top.exp().sum(-1).clamp(max=1 - 1e-7))
    return ((top.exp() * (top - q_top)).sum(-1) + rest.exp() * (rest - q_rest)).mean()


def tune(gguf_path: Path, tensors: CarvqTensors, seqs, steps: int, seed: int, progress: bool = True,
         text: str = "calibration", reader=None) -> TuneResult:
    """Tune `tensors`' codebooks in place by `steps` Adam steps, one sequence of `seqs` each
    (calibration_sequences or document_sequences);
    the state with the least KL on the held-out sequences (checked every CHECK_EVERY steps, the
    fit's own included) is kept, so tuning never leaves the held-out KL worse."""
    from tqdm import tqdm

    start = time.perf_counter()
    model = load_frozen(gguf_path, progress, reader=reader)
    embed = model.get_input_embeddings()
    # Gemma's embedding layer scales its rows by sqrt(n); inputs_embeds bypass it
    scale = float(getattr(embed, "embed_scale", 1.0))
    if model.config.vocab_size != tensors.layout.n_vocab:
        raise CarvqError(f"--tune-steps: transformers reads {model.config.vocab_size} tokens, the embedding has "
                         f"{tensors.layout.n_vocab}")
    held = min(HELD_OUT_SEQS, len(seqs) // 2)
    train, held_out = seqs[held:], seqs[:held]
    lookup = Lookup(tensors)
    refs_held = [_reference(model, embed, s) for s in held_out]

    def held_out_kl() -> float:
        with torch.no_grad():
            return float(np.mean([float(_kl(model, lookup, scale, s, r)) for s, r in zip(held_out, refs_held)]))

    def rounded() -> None:
        # the stored type (F16) is what llama.cpp decodes: keep, and measure, the rounded values
        # (the starting codebooks are read from that type already)
        with torch.no_grad():
            for p in lookup.parameters():
                p.copy_(torch.from_numpy(p.detach().numpy().astype(tensors.codebooks.dtype).astype(np.float32)))

    best = (held_out_kl(), 0, [p.detach().clone() for p in lookup.parameters()])
    before = best[0]
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train), generator=gen)
    lr = RELATIVE_LR * float(lookup.codebooks.detach().pow(2).mean().sqrt())
    opt = torch.optim.Adam([p for p in lookup.parameters()], lr=lr)
    bar = tqdm(range(steps), desc="carvq tune", unit="step", disable=not progress, leave=False)
    for step in bar:
        tokens = train[int(order[step % len(train)])]
        loss = _kl(model, lookup, scale, tokens, _reference(model, embed, tokens))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % CHECK_EVERY == 0 or step + 1 == steps:
            saved = [p.detach().clone() for p in lookup.parameters()]
            rounded()
            kl = held_out_kl()
            if kl < best[0]:
                best = (kl, step + 1, [p.detach().clone() for p in lookup.parameters()])
            with torch.no_grad():  # Adam goes on from its unrounded values
                for p, v in zip(lookup.parameters(), saved):
                    p.copy_(v)
        bar.set_postfix(kl=f"{float(loss.detach()):.4f}", held_out=f"{best[0]:.4f}")
    bar.close()
    with torch.no_grad():
        for p, v in zip(lookup.parameters(), best[2]):
            p.copy_(v)
    lookup.store()
    return TuneResult(steps, time.perf_counter() - start, before, best[0], len(train), best[1], text)
