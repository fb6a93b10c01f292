"""The trained model on disk, prediction and the metrics (logloss, AUC) - no cluster needed.

Model directory format (version 1):
- weights.npz: `keys` (uint64, increasing) and `weights` (float32), the non-zero weights only;
  every other key's weight is 0. Loaded with allow_pickle=False.
- model.json: {"format": "pserver-lr-model", "version": 1, "hash_spec": ..., "data_format":
  "libsvm"|"criteo", "raw_keys": bool, "int_bins": "log"|"raw", "l1", "l2", "num_weights",
  ...training summary}. The data options say how to turn raw examples into keys the same way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from ...errors import ConfigError
from .data import Shard
from .hashing import HASH_SPEC

MODEL_FORMAT = "pserver-lr-model"
MODEL_VERSION = 1


@dataclass
class Model:
    """Sparse linear model: weight of key keys[j] is weights[j]; absent keys weigh 0."""

    keys: np.ndarray
    weights: np.ndarray
    meta: dict = field(default_factory=dict)

    def weights_for(self, keys: np.ndarray) -> np.ndarray:
        """float64 weights of arbitrary uint64 keys (0 where the model has none)."""
        keys = np.asarray(keys, dtype=np.uint64)
        out = np.zeros(keys.size)
        if self.keys.size == 0:
            return out
        pos = np.minimum(np.searchsorted(self.keys, keys), self.keys.size - 1)
        hit = self.keys[pos] == keys
        out[hit] = self.weights[pos[hit]]
        return out

    @property
    def nnz(self) -> int:
        return int(np.count_nonzero(self.weights))


def save_model(path: str, keys: np.ndarray, weights: np.ndarray, meta: dict) -> Model:
    """Write the non-zero (key, weight) pairs and model.json into directory `path` (created)."""
    keys = np.asarray(keys, dtype=np.uint64)
    weights = np.asarray(weights, dtype=np.float32)
    order = np.argsort(keys, kind="stable")
    keys, weights = keys[order], weights[order]
    nz = weights != 0
    keys, weights = keys[nz], weights[nz]
    meta = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "hash_spec": HASH_SPEC,
            **meta, "num_weights": int(keys.size)}
    os.makedirs(path, exist_ok=True)
    np.savez(os.path.join(path, "weights.npz"), keys=keys, weights=weights)
    with open(os.path.join(path, "model.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    return Model(keys, weights, meta)


def load_model(path: str) -> Model:
    """Read a model directory written by save_model. Raises ConfigError when it is missing or of
    another format/version."""
    meta_path = os.path.join(path, "model.json")
    if not os.path.isfile(meta_path):
        raise ConfigError(f"{path!r} is not a model directory (no model.json); pass the "
                          "--model-out directory of `pserver train lr`")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format") != MODEL_FORMAT or meta.get("version") != MODEL_VERSION:
        raise ConfigError(f"{meta_path}: unsupported model format {meta.get('format')!r} "
                          f"version {meta.get('version')!r} (expected {MODEL_FORMAT} v1)")
    with np.load(os.path.join(path, "weights.npz"), allow_pickle=False) as z:
        keys, weights = z["keys"].astype(np.uint64), z["weights"].astype(np.float32)
    return Model(keys, weights, meta)


def margins(model: Model, data: Shard | tuple[sp.spmatrix, np.ndarray]) -> np.ndarray:
    """x_i . w for each example of a Shard, or of (X, column keys)."""
    X, keys = (data.X, data.keys) if isinstance(data, Shard) else data
    return np.asarray(X @ model.weights_for(keys)).ravel()


def predict(model: Model, data: Shard | tuple[sp.spmatrix, np.ndarray]) -> np.ndarray:
    """P(y = +1 | x) for each example (float64)."""
    return sigmoid(margins(model, data))


def sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)) without overflow."""
    return np.exp(-np.logaddexp(0.0, -np.asarray(z, dtype=np.float64)))


def _positive(y: np.ndarray) -> np.ndarray:
    return np.asarray(y) > 0  # labels in {-1, +1} or {0, 1}


def logloss(y: np.ndarray, p: np.ndarray, eps: float = 1e-15) -> float:
    """Mean negative log-likelihood of labels y ({-1,+1} or {0,1}) under probabilities p."""
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    pos = _positive(y)
    if pos.size == 0:
        return float("nan")
    return float(-np.mean(np.where(pos, np.log(p), np.log1p(-p))))


def auc(y: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (ties count half), by the rank-sum (Mann-Whitney) formula.
    nan when only one class is present."""
    pos = _positive(y)
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks of s, tied values sharing the average of their ranks."""
    order = np.argsort(s, kind="stable")
    ordered = s[order]
    first = np.ones(s.size, dtype=bool)
    first[1:] = ordered[1:] != ordered[:-1]
    starts = np.flatnonzero(first)
    ends = np.append(starts[1:], s.size)
    ranks = np.empty(s.size)
    ranks[order] = ((starts + ends + 1) / 2.0)[np.cumsum(first) - 1]
    return ranks
