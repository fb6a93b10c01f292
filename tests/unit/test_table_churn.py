"""Admission and eviction of rows without sockets: the pure rules (pserver.store.admission,
pserver.store.eviction), a Table applying them, and a master's evictions reaching its replica
through the server cores (so that a failover reads what the master served)."""

from __future__ import annotations

import numpy as np
import pytest

import pserver
from pserver.errors import TableError
from pserver.ft.replication import Replicator
from pserver.kv.core import ServerCore
from pserver.membership.view import ClusterView, NodeInfo
from pserver.ring import KeyRing
from pserver.store.admission import Admission
from pserver.store.eviction import SWEEP_EVERY, EvictionPolicy, StepClock, choose_victims
from pserver.store.init import initial_values
from pserver.store.table import Table
from pserver.testing import RecordingTransport
from pserver.wire import Message

K = np.arange(100, 110, dtype=np.uint64)


def _ones(n: int, cols: int = 1) -> np.ndarray:
    return np.ones((n, cols), np.float32)


# ------------------------------------------------------------------------------ the spec
@pytest.mark.parametrize("bad", [{"admit_after": -1}, {"admit_prob": 0.0}, {"admit_prob": 1.5},
                                 {"ttl_seconds": -1.0}, {"ttl_steps": -2},
                                 {"admit_after": 3, "admit_prob": 0.5}, {"admit_prob": "x"}])
def test_invalid_admission_and_eviction_fields_are_refused(bad):
    with pytest.raises(TableError):
        pserver.TableSpec(name="t", **bad)


def test_the_new_fields_travel_in_the_json_and_make_specs_differ():
    spec = pserver.TableSpec(name="t", admit_after=3, ttl_steps=10, ttl_seconds=2)
    assert pserver.TableSpec.from_json(spec.to_json()) == spec
    assert spec != pserver.TableSpec(name="t", admit_after=3, ttl_steps=10)


# ------------------------------------------------------------------------------ admission rules
def test_counting_admission_admits_a_key_on_its_nth_sighting():
    adm = Admission(after=3)
    assert not adm.admit(K).any()
    assert not adm.admit(K).any()
    assert adm.admit(K).all()
    assert adm.dropped == 2 * K.size


def test_probabilistic_admission_is_a_function_of_key_and_seed():
    keys = np.arange(20_000, dtype=np.uint64)
    a, b, other = Admission(prob=0.25, seed=7), Admission(prob=0.25, seed=7), Admission(prob=0.25)
    first = a.admit(keys)
    assert np.array_equal(first, a.admit(keys)) and np.array_equal(first, b.admit(keys))
    assert abs(first.mean() - 0.25) < 0.02
    assert not np.array_equal(first, other.admit(keys))


# ------------------------------------------------------------------------------ admission in a table
def test_an_id_pushed_fewer_than_n_times_has_no_row_and_reads_its_initial_value():
    spec = pserver.TableSpec(name="t", dim=2, init="normal:0.1", seed=3, updater="sgd",
                             updater_args={"lr": 1.0}, admit_after=3)
    t = Table(spec)
    for _ in range(2):
        t.push(K, _ones(K.size, 2))
    assert len(t) == 0 and t.rows_admitted == 0 and t.admission.dropped == 2 * K.size
    assert np.array_equal(t.pull(K), initial_values(spec, K))
    t.push(K, _ones(K.size, 2))    # the third push: admitted, and this push applied
    assert len(t) == K.size and t.rows_admitted == K.size
    assert np.allclose(t.pull(K), initial_values(spec, K) - 1.0)


def test_stored_keys_of_a_push_are_applied_while_its_new_keys_wait():
    t = Table(pserver.TableSpec(name="t", admit_after=2))
    t.push(K[:5], _ones(5))
    t.push(K[:5], _ones(5))                      # K[:5] admitted
    t.push(K, _ones(K.size))                     # K[5:] seen once: dropped
    assert np.array_equal(t.pull(K).ravel(), [2] * 5 + [0] * 5)


# ------------------------------------------------------------------------------ eviction rules
def test_choose_victims_takes_expired_rows_then_the_least_frequently_pushed():
    last = np.array([1, 9, 9, 9, 9, 9])
    hits = np.array([9, 5, 1, 3, 1, 7])
    assert choose_victims(last, hits, 2, None).tolist() == [0]
    # 5 live rows, budget 3: down to 0.9 * 3 = 2 rows - the three least pushed go
    assert choose_victims(last, hits, 2, 3).tolist() == [0, 2, 3, 4]


def test_a_ttl_in_seconds_becomes_a_step_threshold():
    clock = StepClock(10.0)
    for t, step in [(0.0, 1), (5.0, 2), (11.0, 3), (30.0, 4)]:
        clock.note(t, step)
    assert clock.step_at(20.0) == 3 and clock.step_at(29.9) == 3 and clock.step_at(30.0) == 4


def test_a_policy_sweeps_every_so_many_pushes_or_at_once_over_its_budget():
    pol = EvictionPolicy(ttl_steps=100, ttl_seconds=0, max_bytes=0, value_bytes=4)
    assert not pol.due(1, 10) and pol.due(64, 10)
    budget = EvictionPolicy(0, 0, max_bytes=100 * (4 + 80), value_bytes=4)
    assert budget.max_rows() == 90 and budget.max_rows(copies=2) == 45   # HIGH_WATER of a part
    assert budget.due(1, 91) and not budget.due(1, 90) and budget.due(1, 46, copies=2)


def test_a_budget_sweep_that_frees_nothing_waits_until_the_rows_grow():
    pol = EvictionPolicy(0, 0, max_bytes=1000 * (4 + 80), value_bytes=4)
    mine = np.ones(400)           # a master's own rows: under its part (450 of 2 copies)
    assert pol.victims(np.zeros(400, np.int64), mine, 1, copies=2, rows=900).size == 0
    assert not pol.due(2, 900, copies=2) and pol.due(2, 900 + int(0.05 * 450), copies=2)


# ------------------------------------------------------------------------------ eviction in a table
def _mine(keys):
    return np.ones(keys.size, bool)


def test_an_expired_row_is_gone_and_reads_its_initial_value_again():
    spec = pserver.TableSpec(name="t", init="constant:5", updater="sum", ttl_steps=64)
    t = Table(spec)
    t.push(K, _ones(K.size))                              # step 1
    hot = np.array([7], np.uint64)
    swept_at = None
    for _ in range(200):
        t.push(hot, _ones(1))
        gone = t.eviction_due(_mine)
        if gone.size:
            swept_at = t.steps
            break
    # unpushed for ttl_steps pushes, it goes at the next sweep (every SWEEP_EVERY pushes)
    assert 1 + 64 <= swept_at <= 1 + 64 + SWEEP_EVERY
    assert gone.tolist() == K.tolist()
    assert t.evict(gone) == K.size and t.rows_evicted == K.size
    assert len(t) == 1 and (t.pull(K) == 5).all()         # the initializer again
    assert t.items()[0].tolist() == [7]                   # a checkpoint holds the live rows only
    t.push(K, _ones(K.size))                              # a new row, from its initial value
    assert (t.pull(K) == 6).all()


def test_a_ttl_in_seconds_expires_rows_not_pushed_for_that_long():
    now = [0.0]
    t = Table(pserver.TableSpec(name="t", ttl_seconds=10.0))
    t.set_budget(0, clock=lambda: now[0])
    t.push(K, _ones(K.size))                              # at 0 s
    hot = np.array([7], np.uint64)
    seen = []
    for i in range(1, 2 * SWEEP_EVERY + 1):
        now[0] = i * 0.1
        t.push(hot, _ones(1))
        gone = t.eviction_due(_mine)
        if gone.size:
            seen.append((now[0], gone.tolist()))
    # the sweep at 6.4 s keeps them, the one at 12.8 s (more than 10 s unpushed) takes them
    assert seen == [(pytest.approx(0.1 * (2 * SWEEP_EVERY - 1)), K.tolist())]


def test_under_a_budget_the_rows_stay_bounded_while_ids_grow_tenfold():
    spec = pserver.TableSpec(name="t", dim=4, updater="adagrad", updater_args={"lr": 0.1})
    probe = Table(spec)
    row_cost = 4 * 4 * 2 + 80
    t = Table(spec, max_bytes=1000 * row_cost)
    assert probe.eviction is None and t.eviction.max_rows() == 900
    hot = np.arange(50, dtype=np.uint64)
    rng = np.random.default_rng(0)
    peak = 0
    for step in range(200):                       # 10,000 new IDs and 50 pushed every time
        new = np.arange(1000 + 50 * step, 1050 + 50 * step, dtype=np.uint64)
        keys = np.unique(np.concatenate([hot, new, rng.choice(new, 5)]))
        t.push(keys, _ones(keys.size, 4))
        t.evict(t.eviction_due(_mine))
        peak = max(peak, len(t))
        assert t.churn_stats()["budget_bytes"] <= 1000 * row_cost
    assert peak <= 1000 and t.rows_evicted >= 9000
    assert np.isin(hot, t.keys_sorted()).all()    # the frequently pushed rows stay


def test_rows_loaded_into_a_tracked_table_count_as_used_now():
    t = Table(pserver.TableSpec(name="t", ttl_steps=64))
    t.load(K, _ones(K.size))
    assert t.usage.last[:K.size].tolist() == [0] * K.size
    assert t.eviction_due(_mine).tolist() == []


# ------------------------------------------------------------------------------ replicas follow
def _pair():
    """A master core (server 1) whose forwards are recorded, and its replica (server 2)."""
    view = ClusterView(version=1, nodes={4: NodeInfo(4, "worker", 0, "h", 0, 0)})
    cap = RecordingTransport()
    repl = Replicator(cap, 1, lambda sid: ("127.0.0.1", sid))
    master = ServerCore(repl)
    master.on_view(view)
    repl.k, repl.ring = 1, KeyRing([1, 2], version=1)   # what a view would configure
    replica = ServerCore(Replicator(None, 2, None))
    replica.on_view(view)
    return master, replica, cap


def _deliver(cap, replica) -> None:
    for _, msg in cap.sent:
        replica.handle(b"s1", msg)
    cap.sent.clear()
    replica.replica.apply_deferred()


def test_a_replica_evicts_what_its_master_evicts_so_a_failover_reads_the_same_values():
    master, replica, cap = _pair()
    spec = pserver.TableSpec(name="e", init="constant:3", updater="sum", ttl_steps=64).to_json()
    for core in (master, replica):
        core.handle(b"n4", Message("declare_table", 1, "", {"spec": spec}))
        core.out.clear()
    ring = master.repl.ring
    keys = np.unique(np.random.default_rng(1).integers(0, 2**63, 400, dtype=np.uint64))
    cold = keys[ring.owner_of(keys) == 1][:20]
    hot = keys[ring.owner_of(keys) == 1][20:21]
    push = [Message("push", 2, "e", {"kf": "k", "p": 0}, [cold, _ones(cold.size)])]
    push += [Message("push", ts, "e", {"kf": "k", "p": 0}, [hot, _ones(1)])
             for ts in range(3, 3 + 2 * SWEEP_EVERY)]
    for msg in push:
        master.handle(b"n4", msg)
        _deliver(cap, replica)
    assert master.tables["e"].rows_evicted == cold.size
    # the replica, promoted after a failover, serves what the master served
    assert np.array_equal(replica.tables["e"].pull(cold), master.tables["e"].pull(cold))
    assert (replica.tables["e"].pull(cold) == 3).all()
    assert replica.tables["e"].keys_sorted().tolist() == hot.tolist()
    assert replica.tables["e"].rows_evicted == cold.size
