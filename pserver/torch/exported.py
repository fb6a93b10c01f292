"""A table export (pserver.apps.export: ids.npy + rows.npy) as a plain PyTorch module, for serving
without a cluster: ``load_exported(dir)(ids)`` gives each ID's exported row, a default row (zeros)
for IDs the export lacks. docs/torch.md, "Export"."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..apps.export import load_exported as load_arrays
from ..errors import ConfigError


class ExportedEmbedding(torch.nn.Module):
    """``forward(ids)`` -> (*ids.shape, dim) float32 rows. ids: (n,) uint64 as exported, rows:
    (n, dim); ``default``: the row of IDs not exported (zeros if None).

    Raises ConfigError for non-integer IDs in forward."""

    def __init__(self, ids: np.ndarray, rows: np.ndarray, default: np.ndarray | None = None
                 ) -> None:
        super().__init__()
        signed = np.asarray(ids, np.uint64).view(np.int64)   # torch sorts int64: order as such
        order = np.argsort(signed, kind="stable")
        dim = rows.shape[1]
        self.register_buffer("ids", torch.from_numpy(signed[order].copy()))
        self.weight = torch.nn.Parameter(torch.from_numpy(
            np.ascontiguousarray(rows[order], np.float32)), requires_grad=False)
        fallback = np.zeros(dim, np.float32) if default is None else np.asarray(default, np.float32)
        self.register_buffer("default", torch.from_numpy(fallback.reshape(1, dim).copy()))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int64, torch.int32):
            raise ConfigError(f"embedding IDs must be an int64 (or int32) tensor, got {ids.dtype}")
        ids = ids.to(torch.int64)
        n = self.ids.numel()
        table = torch.cat([self.weight, self.default])
        if n == 0:
            return F.embedding(torch.zeros_like(ids), table)
        pos = torch.searchsorted(self.ids, ids).clamp(max=n - 1)
        return F.embedding(torch.where(self.ids[pos] == ids, pos, n), table)


def load_exported(path: str | Path, default: np.ndarray | None = None) -> ExportedEmbedding:
    """The export in directory ``path`` as an ExportedEmbedding. Raises ConfigError if the
    directory holds no valid export."""
    ids, rows = load_arrays(path)
    return ExportedEmbedding(ids, rows, default)
