"""Decoding a /lookup request without I/O: JSON -> (table, IDs) -> keys, mapped exactly as
pserver.torch maps its modules' int64 IDs (mix64 of the 64-bit pattern), and which rows read the
table's initializer. Every mistake raises BadRequest(status, message)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...ring import mix64
from ...serving.http import BadRequest, json_object
from ...store.init import initial_values
from ...store.spec import TableSpec

_MASK64 = (1 << 64) - 1
_LOWEST, _END = -(1 << 63), 1 << 64    # int64 IDs, or their uint64 pattern (as ids.npy holds it)


@dataclass(frozen=True)
class Lookup:
    """One request: the table and the keys of its IDs, in the request's order."""

    table: str
    keys: np.ndarray     # uint64, one per ID


def keys_of_ids(ids: np.ndarray) -> np.ndarray:
    """The keys of int64 (or uint64) IDs, as pserver.torch.ids_to_keys makes them."""
    return mix64(np.ascontiguousarray(ids).view(np.uint64))


def decode_lookup(body: bytes, content_type: str | None, tables: tuple[str, ...],
                  max_ids: int) -> Lookup:
    """The table and keys of a /lookup body {"table": name, "ids": [int, ...]} ("table" may be
    left out when one table is served). Raises BadRequest (415: not JSON; 400: malformed JSON, no
    ids list, an ID not an integer in [-2^63, 2^64); 404: a table not served; 413: more IDs than
    max_ids)."""
    doc = json_object(body, content_type, "ids", '{"table": "name", "ids": [int, ...]}')
    table = doc.get("table", tables[0] if len(tables) == 1 else None)
    if table is None:
        raise BadRequest(400, f'name the table: "table" is one of {list(tables)}')
    if table not in tables:
        raise BadRequest(404, f"table {table!r} is not served here; served: {list(tables)} "
                              f"(--table/--tables)")
    ids = doc["ids"]
    if len(ids) > max_ids:
        raise BadRequest(413, f"{len(ids)} IDs exceed the limit of {max_ids} per request "
                              f"(--max-ids)")
    for i, v in enumerate(ids):
        if type(v) is not int or not _LOWEST <= v < _END:   # bool is not an ID either
            raise BadRequest(400, f"ids[{i}] = {v!r}: an ID must be an integer in [-2^63, 2^64) "
                                  f"(the int64 given to pserver.torch, or its uint64 pattern)")
    raw = np.fromiter((v & _MASK64 for v in ids), np.uint64, len(ids))
    return Lookup(table, keys_of_ids(raw))


def initializer_rows(spec: TableSpec, keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Indices i where rows[i] equals the table's initial row of keys[i] (every column): IDs
    without a row (never pushed, not admitted, or evicted) - and a row no push has moved yet, which
    reads the same."""
    if keys.size == 0:
        return np.empty(0, np.int64)
    init = initial_values(spec, keys)
    return np.flatnonzero((rows.reshape(init.shape) == init).all(axis=1))
