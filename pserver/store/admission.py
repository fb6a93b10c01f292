"""Admission of new rows (TableSpec.admit_after / admit_prob): which keys not stored yet a push may
create a row for. Pure decisions over numpy, no I/O. Both rules are functions of the keys and of
the sequence of pushes alone, so a replica applying its master's forwards admits the same keys.
Rationale and sizes: docs/torch.md, "Admission"."""

from __future__ import annotations

import numpy as np

from .init import mix64

SKETCH_WIDTH = 1 << 19    # counters per row of the count-min sketch (bounded memory per table)
SKETCH_DEPTH = 2
MAX_ADMIT_AFTER = 1 << 15  # counters are uint16 and saturate at the threshold
_SALT_PROB = np.uint64(0x5A17AD3177ED0001)
_SALT_ROW = np.uint64(0x9E3779B97F4A7C15)
_TWO_M53 = 2.0 ** -53


class Admission:
    """The admission rule of one table. ``admit(keys)`` -> bool mask: which of these keys, absent
    from the table and pushed now, get a row. Counting rule: a key is admitted on its ``after``-th
    push (a count-min sketch of SKETCH_DEPTH x SKETCH_WIDTH uint16 counters: an estimate is never
    below the true count, so a key is never admitted early by more than collisions add).
    Probability rule: a key is admitted with probability ``prob``, decided once per key by hashing
    (key, seed), so every push of it gets the same answer on every server."""

    def __init__(self, after: int = 0, prob: float = 1.0, seed: int = 0) -> None:
        self.after, self.prob = int(after), float(prob)
        self._seed = mix64(np.array([seed], np.uint64))[0]
        self._sketch = (np.zeros((SKETCH_DEPTH, SKETCH_WIDTH), np.uint16) if self.after > 1
                        else None)
        self.dropped = 0          # pushed rows dropped because their key was not admitted

    @classmethod
    def from_spec(cls, spec) -> Admission | None:
        """The rule of ``spec`` (a TableSpec), or None if every key is admitted at once."""
        if spec.admit_after <= 1 and spec.admit_prob >= 1.0:
            return None
        return cls(spec.admit_after, spec.admit_prob, spec.seed)

    def nbytes(self) -> int:
        return 0 if self._sketch is None else self._sketch.nbytes

    def admit(self, keys: np.ndarray) -> np.ndarray:
        """Count one sighting of each of ``keys`` (unique uint64, not stored) and say which are
        admitted now. Counts the others in ``dropped``."""
        ok = np.ones(keys.size, bool)
        if self.prob < 1.0:
            h = mix64(keys ^ (self._seed ^ _SALT_PROB))
            ok &= (h >> np.uint64(11)).astype(np.float64) * _TWO_M53 < self.prob
        if self._sketch is not None:
            ok &= self._count(keys) >= self.after
        self.dropped += int(keys.size - np.count_nonzero(ok))
        return ok

    def _count(self, keys: np.ndarray) -> np.ndarray:
        """Add one to each key's counters (saturating at ``after``); the keys' estimates."""
        est = np.full(keys.size, np.iinfo(np.uint16).max, np.uint16)
        h = mix64(keys ^ self._seed)
        for row in range(SKETCH_DEPTH):
            cells = self._sketch[row]
            idx = (mix64(h + np.uint64(row) * _SALT_ROW)
                   & np.uint64(SKETCH_WIDTH - 1)).astype(np.intp)
            np.add.at(cells, idx, 1)  # keys of one push that share a cell each add one
            counts = np.minimum(cells[idx], self.after)
            cells[idx] = counts
            np.minimum(est, counts, out=est)
        return est
