"""Worker program for scheduler-failure and partition tests: push +1 to a fixed key set ROUNDS
times (4 requests in flight), writing the acknowledged count to OUT_DIR/progress<rank> as it goes;
then barrier, pull, and write acked/min/max/rank/node id/ring version to OUT_DIR/rank<r>.json.
With "hold" after NKEYS it writes OUT_DIR/pushed<rank> after the barrier and waits for OUT_DIR/go
before the pull (a partition test may kill a server meanwhile, so the pull reads the replicas)."""

import json
import os
import sys
import time

import numpy as np

import pserver

out_dir, rounds, nkeys = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
hold = sys.argv[4:] == ["hold"]
kv = pserver.KVWorker()
keys = np.arange(nkeys, dtype=np.uint64) * np.uint64(7919)
ones = np.ones(len(keys), np.float32)
acked = 0
window = []


def progress() -> None:
    tmp = f"{out_dir}/progress{kv.rank}.tmp"
    with open(tmp, "w") as f:
        f.write(str(acked))
    os.replace(tmp, f"{out_dir}/progress{kv.rank}")


for _ in range(rounds):
    window.append(kv.push(keys, ones))
    while len(window) > 4:
        kv.wait(window.pop(0), timeout=180)
        acked += 1
        if acked % 5 == 0:
            progress()
for ts in window:
    kv.wait(ts, timeout=180)
    acked += 1
progress()
kv.barrier()
if hold:
    open(f"{out_dir}/pushed{kv.rank}", "w").close()
    while not os.path.exists(f"{out_dir}/go"):
        time.sleep(0.05)
vals = kv.pull(keys)
with open(f"{out_dir}/rank{kv.rank}.json", "w") as f:
    json.dump({"acked": acked, "min": float(vals.min()), "max": float(vals.max()),
               "rank": kv.rank, "id": kv.membership.node_id,
               "ring_version": kv.membership.view.ring.version}, f)
kv.barrier()
kv.close()
