"""Worker program killed by its test: push +1 to the fixed key set of progress_count_worker with
8 requests in flight until killed. OUT_DIR/victim holds "sent acked": sent is counted before each
push leaves (an upper bound of the pushes any server may have), acked after its acknowledgement."""

import os
import sys

import numpy as np

import pserver

out_dir, nkeys = sys.argv[1], int(sys.argv[2])
kv = pserver.KVWorker()
keys = np.arange(nkeys, dtype=np.uint64) * np.uint64(7919)
ones = np.ones(len(keys), np.float32)
sent = acked = 0
window = []


def record() -> None:
    tmp = f"{out_dir}/victim.tmp"
    with open(tmp, "w") as f:
        f.write(f"{sent} {acked}")
    os.replace(tmp, f"{out_dir}/victim")


while True:
    sent += 1
    record()
    window.append(kv.push(keys, ones))
    while len(window) > 8:
        kv.wait(window.pop(0), timeout=120)
        acked += 1
        record()
