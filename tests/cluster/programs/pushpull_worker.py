"""Worker program: push_pull on a synchronous table. Each rank pushes gradient rank+1 each round
with push_pull (no separate pull): the values it gets back must be those after the whole round
(every worker's push aggregated and applied once), never before it."""

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
pending = []
for _ in range(rounds):  # two rounds in flight: replies come back in order all the same
    pending.append(kv.push_pull(mine, np.full(len(mine), kv.rank + 1, np.float32), table="w",
                                wait=False))
    if len(pending) == 2:
        seen.append(kv.wait(pending.pop(0))[:2].tolist())
seen += [kv.wait(ts)[:2].tolist() for ts in pending]
with open(f"{out_dir}/rank{kv.rank}.json", "w") as f:
    json.dump({"seen": seen, "first_keys": mine[:2].tolist()}, f)
kv.close()
