"""Measure the compression filter: ratio and speed of lz4 vs zstd on typical payloads.

Run ``python -m pserver.filters.codec_bench [--n 1000000] [--out FILE.json]``; it writes JSON
(stdout by default). Payloads: sorted random uint64 keys alone; float32 values with half zeros;
a sparse gradient (90% zeros); and keys + half-zero values together. Speeds are payload MB/s
(raw bytes in, 1 MB = 1e6 bytes), best of ``--repeat`` runs, single thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np

from .base import FilterContext, Payload
from .compress import Compression


def payloads(n: int, seed: int = 0) -> dict[str, Payload]:
    """The benchmark payloads, each with ``n`` pairs."""
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(0, np.iinfo(np.uint64).max, size=n, dtype=np.uint64))
    while keys.shape[0] < n:  # collisions are rare; top up to exactly n
        extra = rng.integers(0, np.iinfo(np.uint64).max, size=n - keys.shape[0], dtype=np.uint64)
        keys = np.unique(np.concatenate([keys, extra]))
    half = rng.standard_normal(n).astype(np.float32)
    half[rng.random(n) < 0.5] = 0
    sparse = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    sparse[rng.random(n) < 0.9] = 0
    return {
        "keys_sorted_u64": Payload(keys, None),
        "values_f32_half_zero": Payload(None, half),
        "values_f32_90pct_zero": Payload(None, sparse),
        "keys_and_values_half_zero": Payload(keys, half),
    }


def measure(filt: Compression, p: Payload, repeat: int = 3) -> dict[str, float]:
    """Ratio (raw / sent bytes) and encode/decode MB/s of ``filt`` on ``p``."""
    ctx = FilterContext("bench", "push")
    raw = p.nbytes()
    enc_t = dec_t = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        e = filt.encode(p, ctx)
        t1 = time.perf_counter()
        d = filt.decode(Payload(e.keys, e.values, dict(e.meta), list(e.frames)), ctx)
        t2 = time.perf_counter()
        enc_t, dec_t = min(enc_t, t1 - t0), min(dec_t, t2 - t1)
    sent = sum(f.nbytes for f in e.frames)
    ok = ((p.keys is None or np.array_equal(d.keys, p.keys))
          and (p.values is None or np.array_equal(d.values, p.values)))
    return {"raw_bytes": raw, "sent_bytes": sent, "ratio": round(raw / max(sent, 1), 3),
            "encode_MBps": round(raw / enc_t / 1e6, 1), "decode_MBps": round(raw / dec_t / 1e6, 1),
            "exact": bool(ok)}


def run(n: int = 1_000_000, repeat: int = 3) -> dict[str, Any]:
    """Every codec on every payload: ``{payload: {codec: measure(...)}}``."""
    codecs = {"lz4": Compression("lz4"), "zstd:1": Compression("zstd", 1),
              "zstd:3": Compression("zstd", 3)}
    out: dict[str, Any] = {"n": n, "results": {}}
    for pname, p in payloads(n).items():
        out["results"][pname] = {c: measure(f, p, repeat) for c, f in codecs.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="-")
    a = ap.parse_args(argv)
    text = json.dumps(run(a.n, a.repeat), indent=1)
    if a.out == "-":
        sys.stdout.write(text + "\n")
    else:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
