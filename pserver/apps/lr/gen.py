"""Synthetic CTR-like data with a known model (`pserver gen-data`).

Each example has up to `nnz` binary features drawn from a power law over [0, features) (ranks
permuted to ids); a sparse ground-truth w (a fraction `density` of ids, N(0, s^2) with margins of
standard deviation about `signal`) gives y = +1 with probability sigmoid(x . w), flipped with
probability `noise`. Writes train/test .libsvm (and .vw with Vowpal Wabbit's format), truth.npz
(`ids`, `keys`, `weights`) and meta.json, `chunk` examples at a time, so any size fits in memory.
Details: docs/lr.md, "Generated data"."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time

import numba
import numpy as np

from ...errors import ConfigError
from .hashing import int_keys

log = logging.getLogger(__name__)


def zipf_ranks(rng: np.random.Generator, shape, n: int, a: float) -> np.ndarray:
    """0-based ranks in [0, n) with P(r) ~ (r+1)**-a, by inverting the continuous power law's CDF
    on [1, n+1) (vectorised, O(1) per draw)."""
    u = rng.random(shape)
    if abs(a - 1.0) < 1e-9:
        r = np.exp(u * np.log(n + 1.0))
    else:
        top = (n + 1.0) ** (1.0 - a)
        r = (1.0 + u * (top - 1.0)) ** (1.0 / (1.0 - a))
    return np.minimum(r.astype(np.int64) - 1, n - 1)


@numba.njit(cache=True, nogil=True)
def _format(labels, ids, keep, vw):
    """Text of the examples: libsvm `y id:1 ...` or VW `y |f id:1 ...` lines (uint8 array)."""
    n, k = ids.shape
    out = np.empty(n * (k * 22 + 8), np.uint8)
    pos = 0
    digits = np.empty(20, np.uint8)
    for i in range(n):
        if labels[i] > 0:
            out[pos] = 49
            pos += 1
        else:
            out[pos] = 45
            out[pos + 1] = 49
            pos += 2
        if vw:
            out[pos] = 32
            out[pos + 1] = 124
            out[pos + 2] = 102
            pos += 3
        for j in range(k):
            if not keep[i, j]:
                continue
            out[pos] = 32
            pos += 1
            v = ids[i, j]
            nd = 0
            while True:
                digits[nd] = 48 + v % 10
                v //= 10
                nd += 1
                if v == 0:
                    break
            for q in range(nd - 1, -1, -1):
                out[pos] = digits[q]
                pos += 1
            out[pos] = 58
            out[pos + 1] = 49
            pos += 2
        out[pos] = 10
        pos += 1
    return out[:pos]


class Truth:
    """The generating model: a dense weight vector over ids and the rank -> id permutation."""

    def __init__(self, rng: np.random.Generator, features: int, nnz: int, density: float,
                 signal: float):
        self.features = features
        self.perm = rng.permutation(features)
        s = signal / np.sqrt(max(nnz * density, 1e-12))
        mask = rng.random(features) < density
        self.w = np.where(mask, rng.normal(0.0, s, features), 0.0)

    def sample(self, rng: np.random.Generator, n: int, nnz: int, zipf: float, noise: float):
        """(labels in {-1,+1}, ids (n, nnz) sorted per row, keep mask) of n fresh examples."""
        ids = np.sort(self.perm[zipf_ranks(rng, (n, nnz), self.features, zipf)], axis=1)
        keep = np.ones(ids.shape, dtype=bool)
        keep[:, 1:] = ids[:, 1:] != ids[:, :-1]
        margin = (self.w[ids] * keep).sum(axis=1)
        y = rng.random(n) < 1.0 / (1.0 + np.exp(-margin))
        y ^= rng.random(n) < noise
        return np.where(y, 1, -1).astype(np.int8), ids, keep


def generate(out: str, examples: int, *, features: int = 1 << 22, nnz: int = 40,
             noise: float = 0.0, seed: int = 0, test_examples: int | None = None,
             zipf: float = 1.0, density: float = 0.1, signal: float = 2.0, vw: bool = False,
             chunk: int = 100_000) -> dict:
    """Write a training and a held-out set (and the true model) into directory `out`.
    Returns the meta dict (also written to meta.json). Raises ConfigError on bad arguments."""
    if examples < 1 or features < 1 or nnz < 1 or not 0 <= noise <= 0.5 or not 0 < density <= 1:
        raise ConfigError("gen-data needs examples, features, nnz >= 1, 0 <= noise <= 0.5 and "
                          f"0 < density <= 1 (got {examples}, {features}, {nnz}, {noise}, "
                          f"{density})")
    if test_examples is None:
        test_examples = max(examples // 10, min(examples, 1000))
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    truth = Truth(rng, features, nnz, density, signal)
    paths = {}
    for part, n_part in (("train", examples), ("test", test_examples)):
        names = {"libsvm": os.path.join(out, f"{part}.libsvm")}
        if vw:
            names["vw"] = os.path.join(out, f"{part}.vw")
        with contextlib.ExitStack() as stack:
            files = {fmt: stack.enter_context(open(p, "wb")) for fmt, p in names.items()}
            for lo in range(0, n_part, chunk):
                y, ids, keep = truth.sample(rng, min(chunk, n_part - lo), nnz, zipf, noise)
                for fmt, f in files.items():
                    f.write(_format(y, ids, keep, fmt == "vw").tobytes())
        paths.update({f"{part}_{fmt}": p for fmt, p in names.items()})
    nz = np.flatnonzero(truth.w)
    np.savez(os.path.join(out, "truth.npz"), ids=nz.astype(np.int64),
             keys=int_keys(nz, 0), weights=truth.w[nz])
    meta = {"examples": examples, "test_examples": test_examples, "features": features,
            "nnz": nnz, "noise": noise, "seed": seed, "zipf": zipf, "density": density,
            "signal": signal, "true_nonzeros": int(nz.size), "files": paths,
            "seconds": round(time.perf_counter() - t0, 3)}
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    log.info("wrote %d + %d examples to %s in %.1f s", examples, test_examples, out,
             meta["seconds"])
    return meta
