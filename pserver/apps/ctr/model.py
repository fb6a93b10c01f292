"""DeepFM (Guo et al., IJCAI 2017): first-order weights and k-dimensional factors per categorical
ID, their pairwise (FM) interactions, and an MLP over the factors and the dense columns. The two
ID tables are modules given by the caller: pserver.torch.Embedding on a cluster, or a local
stand-in (``LocalTable``) for the single-process baseline."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class DeepFM(nn.Module):
    """forward(dense (B, 13) float32, ids (B, F) int64) -> logits (B,)."""

    def __init__(self, first: nn.Module, factors: nn.Module, dense: int, fields: int, k: int,
                 hidden: tuple[int, ...] = (64, 32)) -> None:
        super().__init__()
        self.first, self.factors = first, factors
        layers: list[nn.Module] = []
        width = fields * k + dense
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)
        self.dense_linear = nn.Linear(dense, 1)

    def forward(self, dense: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        v = self.factors(ids)                                    # (B, F, k)
        s = v.sum(dim=1)
        fm = 0.5 * (s * s - (v * v).sum(dim=1)).sum(dim=1)
        first = self.first(ids).sum(dim=(1, 2)) + self.dense_linear(dense).squeeze(1)
        deep = self.mlp(torch.cat([v.flatten(1), dense], dim=1)).squeeze(1)
        return first + fm + deep


class LocalTable(nn.Module):
    """The baseline's table: torch.nn.Embedding with sparse gradients over the distinct IDs of the
    data (``vocab``, sorted), rows initialised N(0, std) as the servers' ``normal:std`` does."""

    def __init__(self, vocab: np.ndarray, dim: int, std: float, seed: int = 0) -> None:
        super().__init__()
        self.vocab = torch.from_numpy(np.asarray(vocab, np.int64))
        self.table = nn.Embedding(len(vocab), dim, sparse=True)
        with torch.no_grad():
            self.table.weight.normal_(0.0, std, generator=torch.Generator().manual_seed(seed))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(torch.searchsorted(self.vocab, ids))
