"""Worker program for failover tests: push +1 to a fixed key set ROUNDS times (several requests in
flight), count what was acknowledged, then pull and write both to OUT_DIR/rank<r>.json."""

import json
import sys
import time

import numpy as np

import pserver
from pserver.ring import mix64

out_dir, rounds, nkeys = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
kv = pserver.KVWorker()
keys = np.unique(np.concatenate([np.arange(nkeys // 2, dtype=np.uint64),
                                 mix64(np.arange(nkeys // 2, dtype=np.uint64))]))
ones = np.ones(len(keys), np.float32)
acked = 0
window = []
start = time.monotonic()
slowest = 0.0
for i in range(rounds):
    if i == 5:
        open(f"{out_dir}/started{kv.rank}", "w").close()
    window.append((kv.push(keys, ones), time.monotonic()))
    while len(window) > 4:
        ts, t0 = window.pop(0)
        kv.wait(ts, timeout=60)
        slowest = max(slowest, time.monotonic() - t0)
        acked += 1
for ts, t0 in window:
    kv.wait(ts, timeout=60)
    slowest = max(slowest, time.monotonic() - t0)
    acked += 1
kv.barrier()
vals = kv.pull(keys)
with open(f"{out_dir}/rank{kv.rank}.json", "w") as f:
    json.dump({"acked": acked, "min": float(vals.min()), "max": float(vals.max()),
               "n": len(keys), "seconds": time.monotonic() - start, "slowest_wait": slowest,
               "ring_version": kv.membership.view.ring.version}, f)
kv.barrier()
kv.close()
