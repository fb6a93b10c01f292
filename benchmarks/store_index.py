"""Benchmark of the server store (pserver.store.Table): hash-indexed lookup+update, inserts, the
dense-run fast path, the slot cache, memory per key, and the cold start of a process using a table.
Writes JSON (default benchmarks/results/store_index.json); ``run()`` is importable. Rates are keys
per second, best of ``repeats`` timings. Method: docs/benchmarks.md.

    python benchmarks/store_index.py [--n-table 10000000] [--n-query 1000000] [--out PATH]"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pserver.store import TableSpec
from pserver.store.index import gather_rows, warm_up
from pserver.store.slot_cache import SlotCache
from pserver.store.table import SLOT_CACHE_BYTES, Table

DEFAULT_OUT = Path(__file__).parent / "results" / "store_index.json"

_COLD_START = """
import time
t0 = time.perf_counter()
import numpy as np
from pserver.store.spec import TableSpec
from pserver.store.table import Table
t1 = time.perf_counter()
t = Table(TableSpec(dim=4))
k = np.arange(8, dtype=np.uint64)
t.push(k, np.ones((8, 4), np.float32))
t.pull(k)
t2 = time.perf_counter()
print(t1 - t0, t2 - t1)
"""


def _best(fn, repeats: int) -> float:
    """Smallest wall time of ``repeats`` calls of fn(), in seconds."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _random_keys(rng: np.random.Generator, n: int) -> np.ndarray:
    """n distinct random uint64 keys over the full 64-bit range, in random order."""
    keys = np.sort(rng.integers(0, 2**64 - 1, size=n + n // 100 + 16, dtype=np.uint64,
                                endpoint=True))
    keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))]   # np.unique is far slower
    rng.shuffle(keys)
    return keys[:n]


def _build(spec: TableSpec, keys: np.ndarray, batch: int) -> tuple[Table, float]:
    """A table holding ``keys`` pushed in sorted batches (as servers receive them); returns it
    and the insert rate in keys/s."""
    table = Table(spec, slot_cache=0)
    t = time.perf_counter()
    for lo in range(0, keys.size, batch):
        b = np.sort(keys[lo:lo + batch])
        table.push(b, np.ones((b.size, spec.push_cols), dtype=spec.dtype))
    return table, keys.size / (time.perf_counter() - t)


def cold_start(repeats: int = 3) -> dict:
    """Seconds for a fresh process to import the store and do its first push+pull, with the
    numba cache warm (best of ``repeats``; the first run also fills the cache)."""
    subprocess.run([sys.executable, "-c", _COLD_START], check=True, capture_output=True)
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", _COLD_START], check=True,
                             capture_output=True, text=True).stdout.split()
        runs.append((time.perf_counter() - t, float(out[0]), float(out[1])))
    total, imp, first = min(runs)
    return {"process_total_s": total, "import_s": imp, "first_push_pull_s": first}


def _random_table(spec: TableSpec, keys: np.ndarray, query: np.ndarray, batch: int,
                  repeats: int) -> dict:
    """Build a table of ``keys`` and time lookup+update (and pull) of the present ``query``."""
    table, insert_rate = _build(spec, keys, batch)
    pushed = np.full((query.size, spec.push_cols), 0.5, dtype=spec.dtype)
    table.push(query, pushed)     # warm the kernels
    return {
        "insert_keys_per_s": insert_rate,
        "push_keys_per_s": query.size / _best(lambda: table.push(query, pushed), repeats),
        "pull_keys_per_s": query.size / _best(lambda: table.pull(query), repeats),
        "lookup_only_keys_per_s": query.size / _best(lambda: table._index.lookup(query),
                                                     repeats),
        "bytes_per_key": table.nbytes() / len(table),
        "index_bytes_per_key": table._index.nbytes() / len(table),
        "push_cached_list_keys_per_s": _cached_push(table, query, pushed, repeats),
    }


def _cached_push(table: Table, query: np.ndarray, pushed: np.ndarray, repeats: int) -> float:
    """Push rate of ``query`` served by the slot cache (turned on for this, then off again)."""
    table.slot_cache = SlotCache(max(SLOT_CACHE_BYTES, 2 * 16 * query.size))
    table.push(query, pushed)
    table.push(query, pushed)     # second sighting: cached
    rate = query.size / _best(lambda: table.push(query, pushed), repeats)
    assert table.slot_cache.hits >= repeats
    table.slot_cache = SlotCache(0)
    return rate


def _dense_runs(n: int, repeats: int) -> dict:
    """Time push/pull of the dense keys 0..n-1 as one run, and as a key list."""
    table = Table(TableSpec(), capacity=n, slot_cache=0)
    starts, lengths = np.zeros(1, np.uint64), np.array([n])
    ones = np.ones((n, 1), dtype=np.float32)
    t = time.perf_counter()
    table.push_runs(starts, lengths, ones)
    first = n / (time.perf_counter() - t)
    push = n / _best(lambda: table.push_runs(starts, lengths, ones), repeats)
    keys = np.arange(n, dtype=np.uint64)
    return {
        "dense_run_first_push_keys_per_s": first,
        "dense_run_push_keys_per_s": push,
        "dense_run_push_ms": 1e3 * n / push,
        "dense_run_pull_keys_per_s": n / _best(lambda: table.pull_runs(starts, lengths),
                                               repeats),
        "dense_keylist_push_keys_per_s": n / _best(lambda: table.push(keys, ones), repeats),
    }


def _insertion_order(keys: np.ndarray, n_query: int, batch: int, repeats: int,
                     rng: np.random.Generator) -> dict:
    """A server that masters half the keys and replicates the other half, inserted after them
    (as the forwards of its master arrive after its own pushes): lookups of each half, and
    the alternative a replica could use instead of hashing - an array indexed by the master's
    slot of each key - timed on the second half's queries.

    Linear probing puts keys inserted later further from their home buckets; the total over
    both halves is what one index of all the keys costs (the total displacement does not
    depend on the insertion order)."""
    first, second = keys[: keys.size // 2], keys[keys.size // 2:]
    table = Table(TableSpec(), slot_cache=0)
    for half in (first, second):
        for lo in range(0, half.size, batch):
            b = np.sort(half[lo:lo + batch])
            table.push(b, np.ones((b.size, 1), np.float32))
    n = min(n_query, second.size)
    qa = np.sort(rng.choice(first, size=n, replace=False))
    qb = np.sort(rng.choice(second, size=n, replace=False))
    # the master's slots of the second half: a permutation (its own insertion order)
    master_slot = rng.permutation(second.size)
    translate = np.empty(second.size, np.int64)
    translate[master_slot] = table._index.lookup(np.ascontiguousarray(second))[0]
    order = np.argsort(second)
    qslots = master_slot[order[np.searchsorted(second[order], qb)]]
    out = np.empty(n, np.int64)
    gather_rows(translate.reshape(-1, 1), qslots, out.reshape(-1, 1))
    assert np.array_equal(out, table._index.lookup(qb)[0])
    return {
        "table_keys": int(keys.size), "query_keys": int(n),
        "lookup_first_half_keys_per_s": n / _best(lambda: table._index.lookup(qa), repeats),
        "lookup_second_half_keys_per_s": n / _best(lambda: table._index.lookup(qb), repeats),
        "gather_by_master_slot_keys_per_s":
            n / _best(lambda: gather_rows(translate.reshape(-1, 1), qslots, out.reshape(-1, 1)),
                      repeats),
    }


def run(n_table: int = 10_000_000, n_query: int = 1_000_000, repeats: int = 5,
        seed: int = 0) -> dict:
    """Measure the store; returns a JSON-ready dict (rates in keys/s, memory in bytes/key).

    Tables are built by pushing n_query-sized sorted batches of random 64-bit keys (and, for
    "sum_scattered_slots", 1,000-key batches); queries are n_query distinct present keys,
    sorted (as the worker client sends them).
    """
    warm_up(("float32",))       # compile/load kernels outside the timed regions
    rng = np.random.default_rng(seed)
    keys = _random_keys(rng, n_table)
    n_query = min(n_query, n_table)
    query = np.sort(rng.choice(keys, size=n_query, replace=False))
    res: dict = {"n_table": n_table, "n_query": n_query, "repeats": repeats,
                 "machine": platform.machine(), "cpus": os.cpu_count()}
    res["sum"] = _random_table(TableSpec(), keys, query, n_query, repeats)
    # Built from 1,000-key pushes: a query's rows are scattered over the whole values array
    # (no slot locality from large sorted batches), the harder case for the cache.
    res["sum_scattered_slots"] = _random_table(TableSpec(), keys, query, 1000, repeats)
    res["adagrad"] = _random_table(TableSpec(updater="adagrad", updater_args={"lr": 0.1}),
                                   keys, query, n_query, repeats)
    res["dense"] = _dense_runs(n_query, repeats)
    res["insertion_order"] = _insertion_order(keys[: min(n_table, 1_000_000)], 50_000, 50_000, repeats,
                                              rng)
    res["cold_start"] = cold_start()
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-table", type=int, default=10_000_000)
    ap.add_argument("--n-query", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args(argv)
    res = run(a.n_table, a.n_query, a.repeats)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2) + "\n")
    sys.stdout.write(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
