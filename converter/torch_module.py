"""CARVQEmbedding: a torch nn.Module that decodes a CARVQ-GGUF's embedding, for evaluation
in PyTorch (swap it in for a transformers model's input embedding)."""
from __future__ import annotations

import torch
from torch import nn

from carvq.reference import CarvqTensors, read_tensors


def _t(a) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.array(a, dtype=np.float32, copy=True))  # torch wants it writable


class CARVQEmbedding(nn.Module):
    """Decodes rows as FORMAT.md states: RVQ levels summed in order, hot levels for hot
    rows, plus the adaptor."""

    def __init__(self, tensors: CarvqTensors, scale: float = 1.0):
        super().__init__()
        import numpy as np

        from carvq.reference import unpack_codes

        lo = self.layout = tensors.layout
        codes = unpack_codes(np.asarray(tensors.codes), lo).astype(np.int64)  # (V, G, L)
        self.register_buffer("codes", torch.from_numpy(codes))
        self.register_buffer("codebooks", _t(tensors.codebooks))  # (G, L, K, d)
        self.scale = scale
        if lo.hot_rows:
            # hot slot of each token: 0 for none, j + 1 for hot row j
            slot = np.zeros(lo.n_vocab, np.int64)
            slot[np.asarray(tensors.hot_ids, np.int64)] = np.arange(1, lo.hot_rows + 1)
            hot_codes = unpack_codes(np.asarray(tensors.hot_codes), lo.hot_layout()).astype(np.int64)  # (N, G, Lh)
            self.register_buffer("hot_slot", torch.from_numpy(slot))
            self.register_buffer("hot_codes", torch.from_numpy(hot_codes))
            self.register_buffer("hot_codebooks", _t(tensors.hot_codebooks))  # (G, Lh, K, d)
        if lo.adaptor_rank:
            self.register_buffer("sigma0", _t(tensors.sigma0))
            self.register_buffer("up_w", _t(tensors.up_w))
            self.register_buffer("up_b", _t(tensors.up_b))
            self.register_buffer("down_w", _t(tensors.down_w))
            self.register_buffer("down_b", _t(tensors.down_b))

    @classmethod
    def from_gguf(cls, path_or_reader, scale: float = 1.0) -> "CARVQEmbedding":
        return cls(read_tensors(path_or_reader), scale)

    @property
    def num_embeddings(self) -> int:
        return self.layout.n_vocab

    @property
    def embedding_dim(self) -> int:
        return self.layout.n_embd

    def _activation(self, x: torch.Tensor) -> torch.Tensor:
        name = self.layout.activation
        if name == "relu":
            return torch.relu(x)
        if name == "silu":
            return x / (1 + torch.exp(-x))
        c = torch.tensor((2.0 / torch.pi) ** 0.5, dtype=x.dtype)
        return 0.5 * x * (1 + torch.tanh(c * (x + 0.044715 * (x * x * x))))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        lo = self.layout
        flat = input_ids.reshape(-1)
        codes = self.codes[flat]  # (T, G, L)
        g = torch.arange(lo.n_groups)
        out = torch.zeros(flat.numel(), lo.n_groups, lo.group_size)
        for level in range(lo.levels):
            out = out + self.codebooks[:, level][g.unsqueeze(0), codes[:, :, level]]  # (T, G, d)
        if lo.hot_rows:
            slot = self.hot_slot[flat]
            rows = torch.nonzero(slot).squeeze(1)
            hot = self.hot_codes[slot[rows] - 1]  # (H, G, Lh)
            acc = out[rows]
            for level in range(lo.hot_levels):
                acc = acc + self.hot_codebooks[:, level][g.unsqueeze(0), hot[:, :, level]]
            out = out.index_copy(0, rows, acc)
        out = out.reshape(flat.numel(), lo.n_embd)
        if lo.adaptor_rank:
            u = self._activation(self.sigma0[flat] @ self.up_w.T + self.up_b)
            out = out + (u @ self.down_w.T + self.down_b)
        out = out * self.scale if self.scale != 1.0 else out
        return out.reshape(*input_ids.shape, lo.n_embd)
