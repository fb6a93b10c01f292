"""Heavy-hitter candidates: which items of a batch to publish, and their text as table rows.

A batch publishes its items counted at least share * (batch size) times. An item with at least
share * N of a whole stream reaches that share in some batch of some writer (the batches
partition the stream), so it is always published. The candidate table keys an item by its hash;
its row holds the byte length, then the bytes (up to MAX_TEXT) six per float64 (exact integers).
"""

from __future__ import annotations

import numpy as np

MAX_TEXT = 48
BYTES_PER_COL = 6
DIM = 1 + MAX_TEXT // BYTES_PER_COL
_WEIGHTS = 256.0 ** np.arange(BYTES_PER_COL)


def select(counts: np.ndarray, batch_total: float, share: float) -> np.ndarray:
    """Indices of the items to publish: count >= share * batch_total (at least 1)."""
    return np.flatnonzero(counts >= max(share * batch_total, 1.0))


def encode(items: list[bytes]) -> np.ndarray:
    """(len(items), DIM) float64 rows: length, then the first MAX_TEXT bytes, six per column."""
    raw = np.zeros((len(items), MAX_TEXT), dtype=np.float64)
    rows = np.zeros((len(items), DIM), dtype=np.float64)
    for j, item in enumerate(items):
        head = item[:MAX_TEXT]
        raw[j, :len(head)] = np.frombuffer(head, dtype=np.uint8)
        rows[j, 0] = len(item)
    rows[:, 1:] = raw.reshape(len(items), -1, BYTES_PER_COL) @ _WEIGHTS
    return rows


def decode(rows: np.ndarray) -> list[bytes]:
    """The items of ``rows`` (an item longer than MAX_TEXT bytes comes back cut, ending in
    "..."); a row that is not a valid encoding decodes to b"?"."""
    out = []
    for row in np.asarray(rows, dtype=np.float64).reshape(-1, DIM):
        n = row[0]
        cols = row[1:]
        if not (0 <= n < 1 << 31 and n == int(n) and np.all((cols >= 0) & (cols < 2.0 ** 48))
                and np.all(cols == np.floor(cols))):
            out.append(b"?")
            continue
        v = cols.astype(np.uint64)
        b = (v[:, None] >> (8 * np.arange(BYTES_PER_COL, dtype=np.uint64))) & np.uint64(255)
        text = b.astype(np.uint8).tobytes()[:min(int(n), MAX_TEXT)]
        out.append(text + b"..." if n > MAX_TEXT else text)
    return out
