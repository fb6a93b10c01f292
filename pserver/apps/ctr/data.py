"""Criteo-format CTR data: generated (categorical fields with Zipf-distributed IDs and a planted
logistic model with pairwise field interactions) and read (the Criteo TSV: label, 13 integer
columns, 26 hexadecimal categorical columns; empty cells allowed). docs/torch.md."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import ConfigError
from ...ring import mix64

DENSE, FIELDS = 13, 26


@dataclass
class CTRData:
    """labels (n,) float32 in {0, 1}; dense (n, 13) float32 (log1p of the counts); ids (n, 26)
    int64: field-salted hashes of the categorical values (0 for an empty cell of a field)."""

    labels: np.ndarray
    dense: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, sel) -> CTRData:
        return CTRData(self.labels[sel], self.dense[sel], self.ids[sel])


def _gauss(keys: np.ndarray, salt: int) -> np.ndarray:
    """A fixed standard normal per key (Box-Muller over two hashes)."""
    a = mix64(keys ^ np.uint64(salt)).astype(np.float64) / 2.0**64
    b = mix64(keys ^ np.uint64(salt + 1)).astype(np.float64) / 2.0**64
    return np.sqrt(-2 * np.log(np.maximum(a, 1e-300))) * np.cos(2 * np.pi * b)


def generate(path: str | Path, n: int, vocab: int = 10_000, zipf: float = 1.3, seed: int = 0,
             rank: int = 4) -> Path:
    """Write ``n`` Criteo-format lines to ``path``: each field's IDs Zipf-distributed over
    ``vocab`` values; the label drawn from a logistic model of the dense columns, per-ID weights and
    rank-``rank`` interactions of the IDs' latent vectors (what an FM or DeepFM can learn)."""
    if n < 1 or vocab < 2 or zipf <= 1:
        raise ConfigError("need n >= 1, vocab >= 2 and zipf > 1")
    rng = np.random.default_rng(seed)
    ids = (rng.zipf(zipf, size=(n, FIELDS)) - 1) % vocab
    perm = mix64(np.arange(FIELDS, dtype=np.uint64) * np.uint64(vocab))   # per-field ID relabel
    raw = (ids.astype(np.uint64) * np.uint64(2654435761) + perm[None, :]) & np.uint64(0xFFFFFFFF)
    counts = rng.poisson(lam=rng.uniform(0.5, 20, DENSE), size=(n, DENSE))
    keys = _field_keys(raw)
    margin = 1.5 * _gauss(keys, 11).sum(axis=1) / np.sqrt(FIELDS)
    latent = np.stack([_gauss(keys, 20 + 2 * r) for r in range(rank)], axis=-1)   # (n, F, r)
    s = latent.sum(axis=1)
    margin += 0.5 * ((s * s).sum(axis=1) - (latent * latent).sum(axis=(1, 2))) / FIELDS
    wd = rng.normal(0, 0.3, DENSE)
    margin += (np.log1p(counts) - np.log1p(counts).mean(axis=0)) @ wd - 1.0
    labels = (rng.random(n) < 1 / (1 + np.exp(-margin))).astype(np.int64)
    empty = rng.random((n, DENSE)) < 0.05
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for i in range(n):
            dense = "\t".join("" if e else str(c) for c, e in zip(counts[i], empty[i]))
            cats = "\t".join(f"{int(v):08x}" for v in raw[i])
            f.write(f"{labels[i]}\t{dense}\t{cats}\n")
    return out


def _field_keys(raw: np.ndarray) -> np.ndarray:
    """Field-salted uint64 keys of raw categorical values (n, 26)."""
    fields = np.arange(FIELDS, dtype=np.uint64)[None, :]
    return mix64(raw.astype(np.uint64) ^ (fields << np.uint64(40)))


def read(path: str | Path, limit: int | None = None) -> CTRData:
    """Read a Criteo-format TSV file (the Kaggle/Terabyte day files, or ``generate``'s).

    Raises:
        ConfigError: a line without 40 tab-separated columns, or a malformed cell (line number).
    """
    labels, dense, cats = [], [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(labels) >= limit:
                break
            cols = line.rstrip("\n").split("\t")
            if len(cols) != 1 + DENSE + FIELDS:
                raise ConfigError(f"{path}:{lineno}: {len(cols)} columns, a Criteo line has "
                                  f"{1 + DENSE + FIELDS} (label, 13 integers, 26 categories)")
            try:
                labels.append(int(cols[0]))
                dense.append([max(int(c), 0) if c else 0 for c in cols[1:1 + DENSE]])
                cats.append([int(c, 16) + 1 if c else 0 for c in cols[1 + DENSE:]])
            except ValueError as e:
                raise ConfigError(f"{path}:{lineno}: {e}") from None
    raw = np.asarray(cats, dtype=np.uint64).reshape(-1, FIELDS)
    keys = np.where(raw == 0, np.uint64(0), _field_keys(raw - np.uint64(1)))
    return CTRData(np.asarray(labels, np.float32),
                   np.log1p(np.asarray(dense, np.float32).reshape(-1, DENSE)),
                   keys.view(np.int64))
