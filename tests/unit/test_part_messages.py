"""The messages of a worker request's parts (kv/messages.py), built without sockets."""

from __future__ import annotations

import numpy as np

from pserver.kv.messages import PartEncoder
from pserver.kv.tracker import Request
from pserver.store.spec import TableSpec


class _Filters:
    """Stands in for WorkerFilters: records what it was asked to encode."""

    def __init__(self) -> None:
        self.calls: list = []

    def encode(self, sid, key, spec, kind, keys, vals):
        self.calls.append((sid, key, spec.name, kind, keys.tolist()))
        return {"fc": 1}, [keys]


def _encoder(*specs: TableSpec) -> tuple[PartEncoder, _Filters]:
    filters = _Filters()
    return PartEncoder({s.name: s for s in (TableSpec(name="default"), *specs)}, filters), filters


def test_a_push_part_carries_its_keys_as_a_run_its_values_and_the_request_wide_fields():
    enc, filters = _encoder()
    keys = np.arange(10, 20, dtype=np.uint64)
    req = Request("push", "default", keys, np.arange(10, dtype=np.float32).reshape(10, 1))
    req.meta["span"] = [0, 100]
    sid, msg = enc.encode_part(7, req, 2, slice(3, 6), rv=4)
    assert sid == 2 and (msg.op, msg.ts, msg.table) == ("push", 7, "default")
    assert msg.meta == {"kf": "r", "span": [0, 100], "p": 0, "rv": 4}
    assert [a.tolist() for a in msg.arrays] == [[13], [3], [[3.0], [4.0], [5.0]]]
    assert req.parts[0].sid == 2 and not filters.calls


def test_push_pull_asks_for_values_and_a_pull_sends_no_values():
    enc, _ = _encoder()
    keys = np.array([1, 5, 9], dtype=np.uint64)
    pp = Request("pushpull", "default", keys, np.ones((3, 1), np.float32))
    _, msg = enc.encode_part(1, pp, 1, slice(0, 3), rv=1)
    assert msg.op == "push" and msg.meta["pp"] == 1 and msg.meta["kf"] == "k"
    assert len(msg.arrays) == 2
    pull = Request("pull", "default", keys)
    _, msg = enc.encode_part(2, pull, 1, slice(0, 3), rv=1)
    assert msg.op == "pull" and "pp" not in msg.meta
    assert [a.tolist() for a in msg.arrays] == [[1, 5, 9]]


def test_a_round_and_a_resend_s_origins_are_stamped_on_the_part():
    enc, _ = _encoder()
    req = Request("push", "default", np.arange(4, dtype=np.uint64), np.ones((4, 1), np.float32))
    req.rnd = 3
    _, msg = enc.encode_part(5, req, 2, slice(0, 2), rv=9, orig=((1, 0), (3, 2)))
    assert msg.meta["rnd"] == 3 and msg.meta["rv"] == 9
    assert msg.meta["orig"] == [[1, 0], [3, 2]]


def test_a_declaration_copies_its_meta_and_names_no_table_and_a_range_names_its_sub_range():
    enc, _ = _encoder()
    decl = Request("declare", meta={"spec": {"name": "t"}})
    _, m1 = enc.encode_part(1, decl, 1, None, rv=1)
    _, m2 = enc.encode_part(1, decl, 2, None, rv=1)
    assert (m1.op, m1.table) == ("declare_table", "")
    assert m1.meta["p"] == 0 and m2.meta["p"] == 1
    assert decl.meta == {"spec": {"name": "t"}}  # each part's fields on a copy
    rng = Request("range", "default", meta={"lo": 0, "hi": 100, "limit": 5})
    _, msg = enc.encode_part(2, rng, 1, (10, 20), rv=1)
    assert msg.op == "pull_range" and (msg.meta["lo"], msg.meta["hi"]) == (10, 20)
    assert rng.meta["lo"] == 0


def test_a_filtered_table_s_part_goes_through_its_filters_and_a_given_encoding_is_only_stamped():
    enc, filters = _encoder(TableSpec(name="f", push_filters="compress"))
    keys = np.arange(6, dtype=np.uint64)
    req = Request("push", "f", keys, np.ones((6, 1), np.float32))
    _, msg = enc.encode_part(4, req, 1, slice(2, 4), rv=1)
    assert filters.calls == [(1, (4, 0), "f", "push", [2, 3])]
    assert msg.meta == {"fc": 1, "p": 0, "rv": 1}
    pid = req.add_part(2, slice(0, 1), 1)
    msg = enc.message(4, req, pid, ({"fc": 2}, [keys[:1]]))
    assert len(filters.calls) == 1 and msg.meta == {"fc": 2, "p": 1, "rv": 1}
