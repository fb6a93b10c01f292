"""Worker program for the overload test: push PUSHES requests of NKEYS keys to table "w" (the
servers' "slow_sum" rule of slowrules.py) without waiting for any, then wait for all of them;
after a barrier rank 0 pulls and writes the smallest and largest sum to OUT_DIR/sums."""

import sys

import numpy as np

import pserver

out_dir, pushes, nkeys = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
kv = pserver.KVWorker()
keys = np.arange(nkeys, dtype=np.uint64) * np.uint64(7919)
ones = np.ones(nkeys, np.float32)
kv.declare_table("w", updater="slow_sum")
stamps = [kv.push(keys, ones, table="w") for _ in range(pushes)]
for ts in stamps:
    kv.wait(ts, timeout=300)
kv.barrier()
if kv.rank == 0:
    vals = kv.pull(keys, table="w")
    with open(f"{out_dir}/sums", "w") as f:
        f.write(f"{vals.min()} {vals.max()}")
kv.barrier()
kv.close()
