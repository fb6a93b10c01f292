"""Worker program: synchronous aggregation. Each rank pushes gradient rank+1 to a sync table with the
sgd updater each round and pulls right after (no wait): the pull must see the aggregated update of
every worker's push of that round, applied once."""

import json
import sys

import numpy as np

import pserver

out_dir, rounds = sys.argv[1], int(sys.argv[2])
kv = pserver.KVWorker()
kv.declare_table("w", updater="sgd", updater_args={"lr": 0.5}, sync=True)
kv.barrier()  # every worker declared before anyone pushes: each round waits for all
keys = np.arange(0, 20000, 3, dtype=np.uint64)
mine = keys[kv.rank::2] if kv.rank < 2 else keys  # workers push different key subsets
seen = []
for _ in range(rounds):
    kv.push(mine, np.full(len(mine), kv.rank + 1, np.float32), table="w")
    seen.append(kv.pull(keys, table="w").tolist()[:4])
kv.wait_all()
with open(f"{out_dir}/rank{kv.rank}.json", "w") as f:
    json.dump({"seen": seen}, f)
kv.close()
