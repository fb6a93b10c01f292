"""Worker program: push +1 to fixed dense and hashed key sets many times (several requests in
flight), then every rank pulls and writes what it read to OUT_DIR/rank<r>.json. With "hold" after
NKEYS it then waits (at most 120 s) for OUT_DIR/go before leaving, as progress_count_worker.py does:
the cluster stays up until the test has looked at it."""

import json
import os
import sys
import time

import numpy as np

import pserver
from pserver.ring import mix64

out_dir, rounds, nkeys = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
hold = sys.argv[4:] == ["hold"]
kv = pserver.KVWorker()
kv.declare_table("vec", dim=8)
dense = np.arange(nkeys, dtype=np.uint64)
hashed = np.unique(mix64(np.arange(nkeys, dtype=np.uint64) + np.uint64(977)))
vec_vals = np.full((len(hashed), 8), kv.rank + 1, dtype=np.float32)
inflight = []
for _ in range(rounds):
    inflight.append(kv.push(dense, np.ones(len(dense), np.float32)))
    inflight.append(kv.push(hashed, np.ones(len(hashed), np.float32)))
    inflight.append(kv.push(hashed, vec_vals, table="vec"))
    while len(inflight) > 12:
        kv.wait(inflight.pop(0))
kv.wait_all()
kv.barrier()
d, h, v = kv.pull(dense), kv.pull(hashed), kv.pull(hashed, table="vec")
rk, rv = kv.pull_range(0, nkeys)
result = {"rank": kv.rank, "num_workers": kv.num_workers, "num_servers": kv.num_servers,
          "dense": [float(d.min()), float(d.max())], "hashed": [float(h.min()), float(h.max())],
          "vec": [float(v.min()), float(v.max())], "vec_shape": list(v.shape),
          "range_n": len(rk), "range_keys_ok": bool((rk == dense).all()) if len(rk) == nkeys else False,
          "range_vals": [float(rv.min()), float(rv.max())],
          "owners": sorted({int(o) for o in kv.membership.view.ring.owner_of(dense)})}
with open(f"{out_dir}/rank{kv.rank}.json", "w") as f:
    json.dump(result, f)
until = time.monotonic() + 120
while hold and not os.path.exists(f"{out_dir}/go") and time.monotonic() < until:
    time.sleep(0.05)
kv.barrier()
kv.close()
