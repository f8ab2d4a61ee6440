"""The corrective adaptor gamma = sigma_1 o sigma_0, trained in PyTorch.

sigma_0 is a per-token table (V x m); sigma_1 an MLP m -> h -> n with one non-linearity.
It is trained on what RVQ misses, with minibatches drawn in proportion to the token
weights, which makes the plain minibatch MSE an unbiased estimate of the weighted error.
"""
from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "gelu": lambda: nn.GELU(approximate="tanh"),  # ggml_gelu computes the tanh form
}


class Adaptor(nn.Module):
    def __init__(self, n_vocab: int, n_embd: int, rank: int, hidden: int, activation: str, gen: torch.Generator):
        super().__init__()
        self.activation = activation
        self.sigma0 = nn.Parameter(torch.randn(n_vocab, rank, generator=gen) * 0.1)
        self.up = nn.Linear(rank, hidden)
        self.act = ACTIVATIONS[activation]()
        self.down = nn.Linear(hidden, n_embd)
        with torch.no_grad():
            for layer in (self.up, self.down):
                bound = 1.0 / layer.in_features ** 0.5
                layer.weight.uniform_(-bound, bound, generator=gen)
                layer.bias.zero_()
            self.down.weight.mul_(0.01)  # start near zero: the adaptor only corrects

    def forward(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        z = self.sigma0 if ids is None else self.sigma0[ids]
        return self.down(self.act(self.up(z)))

    def rounded_(self) -> None:
        """Round parameters to their stored types (sigma_0 and weights F16, biases F32)."""
        with torch.no_grad():
            for p in (self.sigma0, self.up.weight, self.down.weight):
                p.copy_(p.half().float())


def train(adaptor: Adaptor, target: torch.Tensor, w: torch.Tensor, steps: int, batch: int, lr: float,
          gen: torch.Generator, progress=None) -> None:
    """Fit adaptor(ids) to target[ids] (the RVQ residual), ids ~ w."""
    params = [
        {"params": [adaptor.sigma0], "lr": lr},
        {"params": list(adaptor.up.parameters()) + list(adaptor.down.parameters()), "lr": lr * 0.3},
    ]
    opt = torch.optim.Adam(params)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    prob = w / w.sum()
    for _ in range(steps):
        ids = torch.multinomial(prob, batch, replacement=True, generator=gen)
        loss = ((adaptor(ids) - target[ids]) ** 2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress:
            progress.update(1)
    adaptor.rounded_()
