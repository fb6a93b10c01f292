"""Worker program: push then pull without waiting for the push, many times; the pull must always see
the push (per-sender FIFO). Writes the first violation (or none) to OUT_DIR/rank<r>.json."""

import json
import sys

import numpy as np

import pserver

out_dir, iters = sys.argv[1], int(sys.argv[2])
kv = pserver.KVWorker()
keys = np.unique(np.random.default_rng(kv.rank).integers(0, 2**63, 500, dtype=np.uint64))
table = f"fifo{kv.rank}"
kv.declare_table(table)
violations = []
for i in range(iters):
    kv.push(keys, np.ones(len(keys), np.float32), table=table)  # not waited for
    seen = kv.pull(keys, table=table)
    if not (seen == i + 1).all():
        violations.append([i, float(seen.min()), float(seen.max())])
kv.wait_all()
with open(f"{out_dir}/rank{kv.rank}.json", "w") as f:
    json.dump({"violations": violations[:5], "count": len(violations)}, f)
kv.close()
