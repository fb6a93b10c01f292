"""Key caching on the replication link: a master names a key list its replica already holds ("kr")
instead of sending the keys again; it stores lists at the replica ("ks") within a bound it accounts
(LRU, the cluster's ``replica_key_cache``) and names those it evicts ("kd"). A replica that lacks a
named list refuses the whole message (``repl_miss``) and the master resends it with its keys.
Details: docs/fault-tolerance.md, "Replication".
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ..config import REPLICA_KEY_CACHE_DEFAULT, parse_size
from ..errors import ProtocolError
from ..protocol import KEY_DROP, KEY_REF, KEY_STORE

# bytes of keys a master may keep stored at one replica (and a replica per master), unless the
# cluster's setting (PSERVER_REPLICA_KEY_CACHE, on the scheduler) says otherwise
REF_BYTES = parse_size(REPLICA_KEY_CACHE_DEFAULT)
MIN_KEYS = 256       # shorter parts travel with their keys: an id would save little


class RefSender:
    """A master's account of the lists it stored at one replica: id -> bytes, least recent first."""

    __slots__ = ("lru", "nbytes", "limit")

    def __init__(self, limit: int | None = None) -> None:
        self.lru: OrderedDict[int, int] = OrderedDict()
        self.nbytes = 0
        self.limit = REF_BYTES if limit is None else limit

    def use(self, ref: int) -> bool:
        """True if the replica holds ``ref`` (it becomes the most recently used)."""
        if ref not in self.lru:
            return False
        self.lru.move_to_end(ref)
        return True

    def store(self, ref: int, nbytes: int) -> list[int] | None:
        """Account ``ref`` (``nbytes`` of keys) as stored; returns the ids evicted to make room,
        which the replica must drop first, or None if the list is too large to store at all."""
        if nbytes > self.limit:
            return None
        evicted = []
        while self.nbytes + nbytes > self.limit:
            old, size = self.lru.popitem(last=False)
            self.nbytes -= size
            evicted.append(old)
        self.lru[ref] = nbytes
        self.nbytes += nbytes
        return evicted

    def reset(self) -> list[int]:
        """Forget every stored list (after a miss); returns their ids, for the replica to drop."""
        ids = list(self.lru)
        self.lru.clear()
        self.nbytes = 0
        return ids


class RefStore:
    """The lists one master stored at this replica."""

    __slots__ = ("lists", "nbytes", "limit")

    def __init__(self, limit: int | None = None) -> None:
        self.lists: dict[int, np.ndarray] = {}
        self.nbytes = 0
        self.limit = REF_BYTES if limit is None else limit

    def drop(self, refs) -> None:
        for ref in refs:
            keys = self.lists.pop(ref, None)
            if keys is not None:
                self.nbytes -= keys.nbytes

    def put(self, ref: int, keys: np.ndarray) -> bool:
        """Store a copy of ``keys`` (validated by the caller) under ``ref``, in place of a list
        stored under it before; False (nothing stored) past the bound a master must keep to - a
        later use of ``ref`` is then a miss, which the master recovers from."""
        self.drop((ref,))
        if self.nbytes + keys.nbytes > self.limit:
            return False
        self.lists[ref] = keys.copy()
        self.nbytes += keys.nbytes
        return True

    def adopt(self, ref: int, same: np.ndarray | None) -> None:
        """Hold ``same`` (an array equal to list ``ref``: the slot cache's own copy) instead of
        this store's copy, so the next use of ``ref`` is found in the cache without a comparison
        and the list is held once."""
        keys = self.lists.get(ref)
        if same is not None and keys is not None and same is not keys and same.shape == keys.shape:
            self.lists[ref] = same


def check_refs(store: RefStore | None, metas) -> bool:
    """True if every list the item metas ``metas`` name is held, in order: an item may name a
    list an earlier item of the same message stores, and not one an earlier item drops."""
    lists = store.lists if store is not None else {}
    added: set[int] = set()    # by earlier items of the message
    dropped: set[int] = set()
    for meta in metas:
        drop, put, use = meta.get(KEY_DROP), meta.get(KEY_STORE), meta.get(KEY_REF)
        if drop is not None:
            if type(drop) is not list or not all(type(ref) is int for ref in drop):
                raise ProtocolError("meta 'kd' must be a list of integer key list ids")
            dropped.update(drop)
            added.difference_update(drop)
        if (put is not None and type(put) is not int) or (use is not None and type(use) is not int):
            raise ProtocolError("meta 'ks' and 'kr' must be integer key list ids")
        if put is not None:
            added.add(put)
        if use is not None and use not in added and (use in dropped or use not in lists):
            return False
    return True
