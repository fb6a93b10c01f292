"""KVWorker's re-routing after a failover, driven without sockets: a filtered push resent to the
heir of a server that left carries exactly what it carried, so held-back values count once."""

from __future__ import annotations

import numpy as np

from pserver.kv.filtering import WorkerFilters
from pserver.kv.tracker import Request, RequestTracker
from pserver.kv.worker import KVWorker
from pserver.ring import KeyRing
from pserver.store.spec import TableSpec


def _worker(spec: TableSpec, ring: KeyRing) -> tuple[KVWorker, list]:
    """A KVWorker without a cluster: its sends are recorded instead of going out."""
    kv = object.__new__(KVWorker)
    sent: list = []
    kv._tracker = RequestTracker()
    kv._send = lambda sid, msg: sent.append((sid, msg))
    kv.filters = WorkerFilters(kv._send, kv._tracker.pending)
    kv._tables = {spec.name: spec}
    kv._rings, kv._ring = {}, ring
    return kv, sent


def test_a_resent_filtered_push_does_not_count_held_back_values_twice():
    spec = TableSpec(name="sig", push_filters="significant:abs:1.5")
    old, new = KeyRing([1, 2], version=1), KeyRing([2], version=2)
    kv, sent = _worker(spec, old)
    keys = np.arange(0, 4000, 7, dtype=np.uint64)
    vals = np.where(np.arange(len(keys)) % 2 == 0, 2.0, 1.0).astype(np.float32).reshape(-1, 1)
    ts = kv._tracker.next_ts()
    req = Request("push", "sig", keys, vals)
    msgs = [kv._encode_part(ts, req, sid, sel) for sid, sel in old.split(keys)]
    kv._tracker.register(ts, req)
    for sid, msg in msgs:
        kv._send(sid, msg)
    n_first = len(sent)

    # server 1 leaves before acknowledging: its part goes to server 2, which may see it twice
    plan, _ = kv._tracker.reroute_plan(set(new.servers), set(), new.version, now=0.0)
    for t, r, pid, orig in plan:
        kv._resend(t, r, pid, orig, new)
    resent = sent[n_first:]
    assert resent and all(sid == 2 for sid, _ in resent)
    assert all(m.meta["orig"] == [[1, 0]] for _, m in resent)

    # what went out, first send and resend of server 1's part: each big value exactly once
    part1 = req.parts[0]
    first_keys = {int(k) for k in keys[part1.sel][vals[part1.sel, 0] == 2.0]}
    resent_keys = {int(k) for _, m in resent for k in m.arrays[0]}
    assert resent_keys == first_keys
    # held back (the 1.0 values): once in all, whatever server held them
    held_keys, held_vals = kv.filters.take_held(spec)
    assert held_keys.tolist() == keys[vals[:, 0] == 1.0].tolist()
    assert (held_vals == 1.0).all()
