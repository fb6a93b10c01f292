"""A module's dense parameters shared through one server table: every worker builds the module with
the same seed (the same starting values w0), the table holds the change d (zeros at first, the
table's rule applied to the pushed gradients), and a worker's parameters are w0 + d after each
``step()`` - one push_pull round trip of the gradients. docs/torch.md."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError


class DenseParameters:
    """Share ``module``'s parameters (those with requires_grad, in order) through ``table``.

    Raises ConfigError if the module has no trainable parameter; KV errors as KVWorker raises."""

    def __init__(self, kv, module: torch.nn.Module, table: str, updater: str = "adagrad",
                 updater_args: dict | None = None, declare: bool = True) -> None:
        self.kv, self.table = kv, table
        self.params = [p for p in module.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError("the module has no trainable parameters to share")
        self.base = [p.detach().clone() for p in self.params]
        self.size = sum(p.numel() for p in self.params)
        self.keys = np.arange(self.size, dtype=np.uint64)
        if declare:
            kv.declare_table(table, dim=1, updater=updater,
                             updater_args=updater_args or {"lr": 0.05})
        self._grad = np.zeros(self.size, np.float32)

    def step(self) -> None:
        """Push the gradients (zero where none) and take the table's values after the push."""
        off = 0
        for p in self.params:
            n = p.numel()
            self._grad[off:off + n] = 0.0 if p.grad is None else p.grad.detach().reshape(-1).numpy()
            off += n
        delta = self.kv.push_pull(self.keys, self._grad.copy(), table=self.table)
        self._load(np.asarray(delta, np.float32).reshape(-1))

    def pull(self) -> None:
        """Take the table's current values (no push)."""
        self._load(np.asarray(self.kv.pull(self.keys, table=self.table), np.float32).reshape(-1))

    def _load(self, delta: np.ndarray) -> None:
        off = 0
        with torch.no_grad():
            for p, b in zip(self.params, self.base):
                n = p.numel()
                p.copy_(b + torch.from_numpy(delta[off:off + n]).view_as(p))
                p.grad = None
                off += n
