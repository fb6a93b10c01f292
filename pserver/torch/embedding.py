"""Embedding tables on the servers as PyTorch modules: a forward pulls the unique IDs' rows (or takes
rows prefetched for this batch), a backward pushes their gradients, coalesced by ID, and the servers
apply the table's rule per row (sgd, adagrad, adam, ftrl). IDs: any int64 values, hashed
collision-free to keys (mix64 is a bijection). docs/torch.md."""

from __future__ import annotations

from collections import deque

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..ring import mix64

MAX_PREFETCHED = 4  # batches whose rows a module holds ahead (older ones are collected)


def ids_to_keys(ids: torch.Tensor) -> np.ndarray:
    """uint64 keys of int64 IDs (one key per ID, none shared: mix64 is a bijection)."""
    return mix64(_raw_ids(ids).view(np.uint64))


def _raw_ids(ids: torch.Tensor) -> np.ndarray:
    """The IDs as a flat int64 numpy array (a view where possible). ConfigError if not integers."""
    if ids.dtype not in (torch.int64, torch.int32):
        raise ConfigError(f"embedding IDs must be an int64 (or int32) tensor, got {ids.dtype}")
    return ids.detach().cpu().numpy().astype(np.int64, copy=False).ravel()


class _Table(torch.nn.Module):
    """What Embedding and EmbeddingBag share: the table, its pulls and pushes."""

    def __init__(self, kv, table: str, dim: int, init: str, updater: str, updater_args: dict | None,
                 declare: bool, max_pending: int, table_options: dict | None) -> None:
        super().__init__()
        if max_pending < 1:
            raise ConfigError(f"max_pending must be >= 1, got {max_pending}")
        self.kv, self.table, self.dim = kv, table, int(dim)
        if declare:
            kv.declare_table(table, dim=self.dim, init=init, updater=updater,
                             updater_args=updater_args or {}, **(table_options or {}))
        self.max_pending = max_pending
        self._pending: deque = deque()       # (ts, gradient array kept until acknowledged)
        self._prefetched: deque = deque()    # (ids, keys, inverse, ts)
        self.rows_pulled = self.rows_pushed = 0

    def prefetch(self, ids: torch.Tensor) -> None:
        """Ask for the rows of a coming batch now: the forward that gets the same IDs uses them
        (batches prefetched before it and never run are collected then; at most MAX_PREFETCHED
        are held). Raises what KVWorker.pull raises."""
        raw = _raw_ids(ids).copy()    # the caller may reuse the tensor's memory meanwhile
        keys, inverse = np.unique(mix64(raw.view(np.uint64)), return_inverse=True)
        self._prefetched.append((raw, keys, inverse,
                                 self.kv.pull(keys, table=self.table, wait=False)))
        while len(self._prefetched) > MAX_PREFETCHED:   # a pull not waited for stays tracked
            self.kv.wait(self._prefetched.popleft()[3])

    def _take_prefetched(self, raw: np.ndarray):
        """(keys, inverse, rows) prefetched for exactly these IDs, or None. Batches prefetched
        before them are collected; those after them stay (a loop prefetches one ahead)."""
        at = next((i for i, entry in enumerate(self._prefetched)
                   if entry[0].shape == raw.shape and np.array_equal(entry[0], raw)), None)
        if at is None:
            return None
        for _ in range(at):
            self.kv.wait(self._prefetched.popleft()[3])
        _, keys, inverse, ts = self._prefetched.popleft()
        return keys, inverse, self.kv.wait(ts)

    def _lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows of the batch's unique IDs as a leaf tensor, index of each ID's row)."""
        raw = _raw_ids(ids)
        hit = self._take_prefetched(raw) if self._prefetched else None
        if hit is None:
            keys, inverse = np.unique(mix64(raw.view(np.uint64)), return_inverse=True)
            rows = self.kv.pull(keys, table=self.table)
        else:
            keys, inverse, rows = hit
        self.rows_pulled += keys.size
        w = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32).reshape(keys.size, self.dim))
        if torch.is_grad_enabled() and self.training:
            w.requires_grad_(True)
            w.register_hook(self._pusher(keys))
        return w, torch.from_numpy(inverse.astype(np.int64).reshape(ids.shape))

    def _pusher(self, keys: np.ndarray):
        def push(grad: torch.Tensor) -> None:
            g = grad.detach().cpu().numpy().astype(np.float32, copy=True)
            self._pending.append((self.kv.push(keys, g, table=self.table), g))
            self.rows_pushed += keys.size
            while len(self._pending) > self.max_pending:   # bounded delay: at most this many
                self.kv.wait(self._pending.popleft()[0])    # of our pushes unacknowledged
        return push

    def flush(self) -> None:
        """Wait until every gradient pushed so far is applied. Raises what KVWorker.wait raises
        (the pushes not yet waited for stay pending)."""
        while self._pending:
            self.kv.wait(self._pending[0][0])
            self._pending.popleft()


class Embedding(_Table):
    """``Embedding(kv, table, dim)(ids)`` -> (*ids.shape, dim) rows of the server table ``table``.
    The table is declared (with ``init`` and the per-row rule ``updater``) unless declare=False.
    Gradients go to the servers in backward; the module has no local parameters.
    table_options: admission and eviction of the table's rows, e.g. {"admit_after": 2,
    "ttl_steps": 100000} (KVWorker.declare_table's keywords; docs/torch.md).

    Raises ConfigError for non-integer IDs; pull/push errors as KVWorker raises them."""

    def __init__(self, kv, table: str, dim: int, init: str = "normal:0.01",
                 updater: str = "adagrad", updater_args: dict | None = None,
                 declare: bool = True, max_pending: int = 4,
                 table_options: dict | None = None) -> None:
        super().__init__(kv, table, dim, init, updater, updater_args or {"lr": 0.05}, declare,
                         max_pending, table_options)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w, inverse = self._lookup(ids)
        return F.embedding(inverse, w)


class EmbeddingBag(_Table):
    """``EmbeddingBag(kv, table, dim, mode)(ids, offsets)`` -> (bags, dim): the sum or mean of each
    bag's rows (torch.nn.EmbeddingBag's input forms: 1-D ids with offsets, or 2-D ids one bag per
    row). Declares the table as Embedding does."""

    def __init__(self, kv, table: str, dim: int, mode: str = "sum", init: str = "normal:0.01",
                 updater: str = "adagrad", updater_args: dict | None = None,
                 declare: bool = True, max_pending: int = 4,
                 table_options: dict | None = None) -> None:
        if mode not in ("sum", "mean"):
            raise ConfigError(f"EmbeddingBag mode must be 'sum' or 'mean', got {mode!r}")
        super().__init__(kv, table, dim, init, updater, updater_args or {"lr": 0.05}, declare,
                         max_pending, table_options)
        self.mode = mode

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        w, inverse = self._lookup(ids)
        return F.embedding_bag(inverse, w, offsets, mode=self.mode,
                               per_sample_weights=per_sample_weights)
