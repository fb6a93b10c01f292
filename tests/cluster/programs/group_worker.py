"""Worker program of tests/cluster/test_groups.py; its group comes from PSERVER_GROUP.

job OUT TABLE ROUNDS [SLEEP] [SIGNAL]: declare sync table TABLE, pass the group's barrier, push 1.0
to every key until round ROUNDS (a late joiner starts at the round its declaration named),
writing its progress; at the end report rank, group size and start round, then (with SIGNAL) stay
alive until that file exists (exit 1 after 60 s).
barrier OUT: pass the group's barrier "x", then write OUT/released-<rank>.
hang: register and sleep (the test kills it).
"""

import json
import os
import sys
import time

import numpy as np

import pserver

KEYS = np.arange(0, 3000, 7, dtype=np.uint64)


def job(out: str, table: str, rounds: int, sleep: float = 0.0, signal: str = "") -> int:
    kv = pserver.KVWorker()
    kv.declare_table(table, sync=True)
    start = kv.next_round(table)
    if start == 0:  # the job's first members; a late joiner (start > 0) just joins in
        kv.barrier("declared")
    tag = f"{kv.group}-{kv.rank}"
    info = {"group": kv.group, "rank": kv.rank, "num_workers": kv.num_workers, "start": start}
    while kv.next_round(table) < rounds:
        kv.wait(kv.push(KEYS, np.ones(len(KEYS), np.float32), table=table))
        with open(f"{out}/progress-{tag}.tmp", "w") as f:
            f.write(str(kv.next_round(table)))
        os.replace(f"{out}/progress-{tag}.tmp", f"{out}/progress-{tag}")
        time.sleep(sleep)
    kv.wait_all()
    with open(f"{out}/done-{tag}.json", "w") as f:
        json.dump(info, f)
    if signal:
        deadline = time.monotonic() + 60
        while not os.path.exists(signal):
            if time.monotonic() > deadline:
                return 1
            time.sleep(0.05)
    kv.close()
    return 0


def barrier(out: str) -> int:
    kv = pserver.KVWorker()
    kv.barrier("x", timeout=60)
    open(f"{out}/released-{kv.rank}", "w").close()
    kv.close()
    return 0


def hang() -> int:
    pserver.KVWorker()
    time.sleep(600)
    return 0


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "job":
        sys.exit(job(args[0], args[1], int(args[2]), float(args[3]) if len(args) > 3 else 0.0,
                     args[4] if len(args) > 4 else ""))
    sys.exit({"barrier": lambda: barrier(*args), "hang": hang}[mode]())
