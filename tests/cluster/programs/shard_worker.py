"""Worker program for worker-failure tests: process data shards handed out by the scheduler's task
scheduler ("any" tasks); each shard pushes +1 to its 100 keys. Appends every finished shard id to
OUT_DIR/done<rank> (flushed, so a killed worker's file shows what it finished)."""

import sys
import time

import numpy as np

import pserver

out_dir, shards = sys.argv[1], int(sys.argv[2])
on_failure = sys.argv[3] if len(sys.argv) > 3 else "requeue"
kv = pserver.KVWorker()
ex = kv.tasks(app="shards", model="eventual")
ex.plan(count=shards, kind="any", on_failure=on_failure)
log = open(f"{out_dir}/done{kv.rank}", "a", buffering=1)  # noqa: SIM115 - open for the whole run


def process(t: int) -> None:
    keys = np.arange(t * 100, t * 100 + 100, dtype=np.uint64)
    kv.wait(kv.push(keys, np.ones(100, np.float32)))
    time.sleep(0.05)  # "reading the shard"


for t, _ in ex.assigned():
    ex.run(t, process)
    log.write(f"{t}\n")
if kv.rank == 0:
    with open(f"{out_dir}/progress.json", "w") as f:
        import json

        from pserver.membership.client import scheduler_request
        json.dump(scheduler_request(kv.cfg, "status", role="worker").meta.get("tasks", {}), f)
ex.close()
kv.close()
