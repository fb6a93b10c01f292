# The README's quickstart job (kept identical to it, plus a check of what it read).
import numpy as np

import pserver

kv = pserver.KVWorker()                               # joins the cluster described by PSERVER_* vars
workers = kv.num_workers                              # (a worker may leave before the last print)
kv.declare_table("emb", dim=16, init="normal:0.01", updater="adagrad", updater_args={"lr": 0.1})
keys = np.unique(np.random.default_rng(kv.rank).integers(0, 2**64 - 1, 1000, dtype=np.uint64))
rows = kv.pull(keys, table="emb")                     # (1000, 16), never-written keys read their init
ts = kv.push(keys, np.ones_like(rows), table="emb")   # returns at once
kv.wait(ts)
kv.barrier()
after = kv.pull(keys, table="emb")
assert rows.shape == (len(keys), 16) and (after < rows).all(), "adagrad did not step"
print(f"rank {kv.rank} of {workers} done")
kv.close()
