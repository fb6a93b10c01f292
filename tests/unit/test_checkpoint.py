"""Checkpoints without sockets: write shards, commit, load into rings of other sizes; interrupted and
corrupt checkpoints; garbage collection; detection of key ranges that lost every copy."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pserver.consistency.clock import RangeClock
from pserver.errors import CheckpointError, DataLostError
from pserver.ft import checkpoint as ck
from pserver.ft.checkpoint_round import CheckpointCoordinator
from pserver.ft.loss import DataLoss, find_data_loss
from pserver.link import MemoryHub
from pserver.membership.view import ClusterView
from pserver.ring import KeyRing
from pserver.store.spec import TableSpec
from pserver.store.table import Table
from pserver.testing import MemoryTransport, memory_config, view_of
from pserver.wire import Message, decode

SPECS = [TableSpec("w", dim=1),
         TableSpec("emb", dim=3, dtype="float64", updater="adagrad", updater_args={"lr": 0.5})]
OLD = KeyRing([1, 2, 3], virtual=16)
KEYS = np.unique(np.concatenate([
    np.arange(30_000, dtype=np.uint64),  # dense ids: long runs of one server
    np.random.default_rng(7).integers(0, 2**64 - 1, 7_000, dtype=np.uint64, endpoint=True)]))


def _pushed(spec: TableSpec, keys: np.ndarray, salt: int) -> np.ndarray:
    """Pushed rows that differ per key, table and checkpoint generation."""
    cols = spec.push_cols
    base = (keys % np.uint64(1009)).astype(np.float64)[:, None] + np.arange(cols) + 1000 * salt
    return base.astype(spec.dtype)


def _servers(salt: int = 0, k: int = 1) -> dict[int, dict[str, Table]]:
    """The tables of each server of OLD: its master keys plus the keys it replicates (k)."""
    out = {}
    for sid in OLD.servers:
        held = (OLD.holders(KEYS, k) == sid).any(axis=1)
        tables = {}
        for spec in SPECS:
            t = Table(spec)
            t.push(KEYS[held], _pushed(spec, KEYS[held], salt))
            tables[spec.name] = t
        out[sid] = tables
    return out


def _expected(salt: int = 0) -> dict[str, tuple]:
    """(keys, values, state) every table must hold after the pushes of _servers(salt)."""
    out = {}
    for spec in SPECS:
        t = Table(spec)
        t.push(KEYS, _pushed(spec, KEYS, salt))
        out[spec.name] = t.items()
    return out


def _checkpoint(directory, salt: int = 0, keep: int = 0) -> dict:
    name, partial = ck.begin(str(directory))
    reports = []
    for sid, tables in _servers(salt).items():
        clock = RangeClock()
        clock.advance(100 + sid, 0, 1 << 40, 10 + salt)  # worker 100+sid pushed up to 10+salt
        reports.append(ck.write_shard(partial, sid, tables, {"w": clock}, OLD))
    return ck.commit(str(directory), name, reports, OLD, next_id=42, keep=keep)


@pytest.mark.parametrize("new_servers,k", [(1, 0), (2, 0), (5, 0), (4, 1), (3, 2)])
def test_round_trip_into_any_number_of_servers(tmp_path, new_servers, k):
    m = _checkpoint(tmp_path)
    assert m["name"] == "ckpt-000001" and ck.latest(str(tmp_path)) == "ckpt-000001"
    assert m["keys"] == len(KEYS) * len(SPECS)        # each key written once: by its master only
    assert m["next_id"] == 42 and sorted(m["tables"]) == ["emb", "w"]
    want = _expected()
    ring = KeyRing(list(range(50, 50 + new_servers)), virtual=8)
    got: dict[str, list[np.ndarray]] = {s.name: [] for s in SPECS}
    for sid in ring.servers:
        manifest, restored = ck.load(str(tmp_path), ck.holder_mask(ring, sid, k))
        assert manifest["name"] == "ckpt-000001"
        for spec in SPECS:
            r = restored[spec.name]
            assert r.spec == spec
            holds = (ring.holders(KEYS, k) == sid).any(axis=1) if k else ring.owner_of(KEYS) == sid
            assert np.array_equal(r.keys, KEYS[holds])             # exactly what it must hold
            wk, wv, ws = want[spec.name]
            sel = np.searchsorted(wk, r.keys)
            assert np.array_equal(r.values, wv[sel])
            assert (r.state is None) == (ws is None)
            if ws is not None:
                assert np.array_equal(r.state, ws[sel])
            got[spec.name].append(r.keys[ring.owner_of(r.keys) == sid])
        assert restored["w"].clock.nodes() == [101, 102, 103]
        assert restored["w"].clock.time(102, 0, 1 << 40) == 10
    for spec in SPECS:  # masters of the new ring together hold every key exactly once
        assert np.array_equal(np.sort(np.concatenate(got[spec.name])), KEYS)


def test_restore_for_builds_tables_of_a_server_in_the_starting_cluster(tmp_path):
    _checkpoint(tmp_path)
    ring = KeyRing([7, 8], virtual=8)
    setting = {"dir": str(tmp_path), "name": "ckpt-000001", "servers": [7, 8]}
    view = ClusterView(version=1, ring=ring, settings={"restore": setting, "replication": 1})
    tables, clocks = ck.restore_for(view, 8)
    want = _expected()
    assert sorted(tables) == ["emb", "w"] and clocks["w"].nodes() == [101, 102, 103]
    assert len(tables["w"]) == len(KEYS)                   # 2 servers, k=1: each holds everything
    assert np.array_equal(tables["emb"].pull(KEYS), want["emb"][1])
    # a server that joined later (not in the starting cluster) restores nothing
    assert ck.restore_for(view, 9) == ({}, {})
    assert ck.restore_for(ClusterView(version=1, ring=ring), 8) == ({}, {})


def test_interrupted_checkpoint_leaves_the_previous_one_latest(tmp_path, monkeypatch):
    d = str(tmp_path)
    _checkpoint(tmp_path, salt=0)
    # checkpoint 2: server 1 wrote its shard, server 2 was killed mid-write (a .tmp), 3 never began
    name, partial = ck.begin(d)
    assert name == "ckpt-000002"
    servers = _servers(salt=1)
    ck.write_shard(partial, 1, servers[1], {}, OLD)
    with open(os.path.join(partial, "shard-2.npz.tmp"), "wb") as f:
        f.write(b"PK\x03\x04 half a zip file")
    assert ck.latest(d) == "ckpt-000001"
    _, restored = ck.load(d, lambda keys: np.ones(len(keys), bool))
    assert np.array_equal(restored["emb"].values, _expected(0)["emb"][1])
    # checkpoint 3 completes every shard but crashes between the rename and replacing LATEST
    name, partial = ck.begin(d)
    assert name == "ckpt-000003"
    reports = [ck.write_shard(partial, sid, t, {}, OLD) for sid, t in _servers(salt=2).items()]
    real = ck._write_atomic

    def crash_on_latest(path, data):
        if path.endswith(ck.LATEST):
            raise OSError("power cut")
        return real(path, data)

    monkeypatch.setattr(ck, "_write_atomic", crash_on_latest)
    with pytest.raises(OSError, match="power cut"):
        ck.commit(d, name, reports, OLD)
    monkeypatch.setattr(ck, "_write_atomic", real)
    assert os.path.isdir(os.path.join(d, "ckpt-000003")) and ck.latest(d) == "ckpt-000001"
    _, restored = ck.load(d, lambda keys: np.ones(len(keys), bool))
    assert np.array_equal(restored["w"].values, _expected(0)["w"][1])
    # the next good checkpoint becomes latest; the stale .partial is collected, newer ones kept
    m = _checkpoint(tmp_path, salt=3, keep=5)
    assert m["name"] == "ckpt-000004" and ck.latest(d) == "ckpt-000004"
    assert sorted(os.listdir(d)) == ["LATEST", "ckpt-000001", "ckpt-000003", "ckpt-000004"]
    _, restored = ck.load(d, lambda keys: np.ones(len(keys), bool))
    assert np.array_equal(restored["w"].values, _expected(3)["w"][1])
    # an older checkpoint stays loadable by name
    _, restored = ck.load(d, lambda keys: np.ones(len(keys), bool), name="ckpt-000001")
    assert np.array_equal(restored["w"].values, _expected(0)["w"][1])


def test_corrupt_shard_is_detected_by_sha256(tmp_path):
    _checkpoint(tmp_path)
    path = tmp_path / "ckpt-000001" / "shard-2.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01                           # one bit, same size
    path.write_bytes(bytes(data))
    ck.read_manifest(str(tmp_path))                        # sizes still match
    with pytest.raises(CheckpointError, match=r"shard-2\.npz is corrupt: its sha256"):
        ck.load(str(tmp_path), lambda keys: np.ones(len(keys), bool))
    path.write_bytes(bytes(data[:-10]))                    # truncated: caught by the size check
    with pytest.raises(CheckpointError, match=r"shard-2\.npz has"):
        ck.read_manifest(str(tmp_path))


def test_a_missing_shard_is_named_with_its_server_and_what_to_do(tmp_path):
    _checkpoint(tmp_path)
    (tmp_path / "ckpt-000001" / "shard-2.npz").unlink()
    for read in (lambda: ck.read_manifest(str(tmp_path)),
                 lambda: ck.load(str(tmp_path), lambda keys: np.ones(len(keys), bool))):
        with pytest.raises(CheckpointError, match=r"incomplete: shard file shard-2\.npz of server 2 "
                                                  r"is missing .*restore an older checkpoint"):
            read()


def test_restore_setting_names_the_latest_or_a_chosen_checkpoint(tmp_path):
    _checkpoint(tmp_path, salt=0)
    _checkpoint(tmp_path, salt=1)
    d = str(tmp_path)
    assert ck.resolve(d) == (d, None)
    assert ck.resolve(os.path.join(d, "ckpt-000001")) == (d, "ckpt-000001")
    coord = CheckpointCoordinator(None, lambda: ClusterView(), None, lambda: 1)  # no sockets used
    for given, name in ((d, "ckpt-000002"), (os.path.join(d, "ckpt-000001"), "ckpt-000001")):
        view = ClusterView()
        assert coord.prepare_restore(given, view) == 42                 # the checkpoint's next id
        assert view.settings["restore"] == {"dir": d, "name": name, "servers": []}
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        coord.prepare_restore(str(tmp_path / "empty"), ClusterView())


def test_damaged_or_hostile_manifests_are_refused(tmp_path):
    d = str(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        ck.load(d, lambda keys: keys > 0)
    _checkpoint(tmp_path)
    mpath = tmp_path / "ckpt-000001" / "manifest.json"
    m = json.loads(mpath.read_text())
    m["shards"][0]["files"] = {"../../etc/passwd": {"bytes": 1, "sha256": "0"}}
    mpath.write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="bad shard file name"):
        ck.read_manifest(d)
    (tmp_path / "LATEST").write_text("../elsewhere\n")
    with pytest.raises(CheckpointError, match="not a checkpoint name"):
        ck.latest(d)
    with pytest.raises(CheckpointError, match="not a checkpoint being written"):
        ck.handle_write({"dir": str(tmp_path), "ring": OLD.to_json()}, 1, {}, {})
    with pytest.raises(CheckpointError, match="does not exist"):
        ck.write_shard(str(tmp_path / "ckpt-000009.partial"), 1, {}, {}, OLD)


def test_values_stream_in_chunks(tmp_path, monkeypatch):
    _checkpoint(tmp_path)
    monkeypatch.setattr(ck, "_CHUNK_BYTES", 1000)         # ~40 chunks per array, most skipped
    ring = KeyRing([5, 6, 7, 8], virtual=4)
    want = _expected()
    _, restored = ck.load(str(tmp_path), ck.holder_mask(ring, 6))
    sel = np.searchsorted(want["emb"][0], restored["emb"].keys)
    assert len(sel) and np.array_equal(restored["emb"].values, want["emb"][1][sel])
    assert np.array_equal(restored["emb"].state, want["emb"][2][sel])


def test_garbage_collection_keeps_the_last_n(tmp_path):
    d = str(tmp_path)
    for _ in range(3):
        _checkpoint(tmp_path, keep=2)
    os.mkdir(os.path.join(d, "ckpt-000002.partial"))      # stale: older than LATEST
    os.mkdir(os.path.join(d, "unrelated"))
    _checkpoint(tmp_path, keep=2)
    assert sorted(os.listdir(d)) == ["LATEST", "ckpt-000003", "ckpt-000004", "unrelated"]
    name, _ = ck.begin(d)                                 # in progress: newer than LATEST, kept
    assert ck.collect_garbage(d, 1) == ["ckpt-000003"]
    assert sorted(os.listdir(d)) == ["LATEST", "ckpt-000004", name + ".partial", "unrelated"]


# -- lost key ranges ------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 1, 2])
def test_data_loss_matches_a_brute_force_over_keys(k):
    ring = KeyRing([3, 4, 5, 6, 7], virtual=8)
    keys = np.unique(np.random.default_rng(k).integers(0, 2**64 - 1, 200_000, dtype=np.uint64))
    holders = ring.holders(keys, k) if k else ring.owner_of(keys)[:, None]
    for dead in ([4], [4, 5], [3, 5, 7], [4, 5, 6], [3, 4, 5, 6, 7]):
        lost_by_key = np.isin(holders, dead).all(axis=1)
        loss = find_data_loss(ring, dead, k)
        if not lost_by_key.any():
            assert loss is None, (k, dead)
            continue
        assert loss is not None
        assert np.array_equal(loss.lost_mask(keys), lost_by_key)
        assert loss.fraction == pytest.approx(lost_by_key.mean(), abs=0.01)
        assert set(loss.holders) <= set(dead)
        assert loss.masters == sorted({int(o) for o in ring.owner_of(keys[lost_by_key])})
    assert find_data_loss(ring, [], k) is None


def test_data_loss_needs_k_plus_one_failures_and_says_what_to_do():
    ring = KeyRing([1, 2, 3, 4], virtual=8)
    assert find_data_loss(ring, [2], 1) is None                 # one replica survives every range
    loss = find_data_loss(ring, [2, 3], 1)
    assert loss is not None and loss.holders == [2, 3]          # adjacent somewhere on 32 vnodes
    msg = loss.message()
    assert "servers 2 and 3 held the only copies" in msg and "pserver scheduler --restore DIR" in msg
    again = DataLoss.from_json(json.loads(json.dumps(loss.to_json())))
    assert np.array_equal(again.segments, loss.segments) and again.fraction == loss.fraction
    keys = np.arange(0, 1 << 24, 4096, dtype=np.uint64)         # one key per block
    lost = keys[loss.lost_mask(keys)]
    safe = keys[~loss.lost_mask(keys)]
    assert len(lost) and len(safe)
    loss.check(safe)
    with pytest.raises(DataLostError, match=r"1 of the 2 keys .*restore the cluster"):
        loss.check(np.array([safe[0], lost[0]], dtype=np.uint64))
    whole = find_data_loss(KeyRing([9], virtual=1), [9], 0)
    assert whole is not None and whole.fraction == 1.0 and "server 9 held the only copy" in whole.message()


# -- the scheduler's checkpoint round over in-memory links ----------------------------------------------
class _Round:
    """A CheckpointCoordinator whose servers are in-memory routers the test answers for."""

    def __init__(self, tmp_path):
        self.hub, self.view, self.replies = MemoryHub(), view_of(servers=2), []
        self.servers = {sid: self.hub.router(f"127.0.0.1:{7000 + sid}") for sid in (1, 2)}
        self.coord = CheckpointCoordinator(
            MemoryTransport(self.hub, memory_config(), "scheduler"), lambda: self.view,
            lambda ident, msg: self.replies.append((ident, msg)), lambda: 9,
            directory=str(tmp_path))

    def requests(self, sid):
        """The checkpoint_write requests server ``sid`` received: (sender, message)."""
        out = []
        while (item := self.servers[sid].recv()) is not None:
            out.append((item[0], decode(item[1])))
        return out

    def answer(self, sid, sender, request, error=None):
        if error is not None:
            msg = Message("error", request.ts, meta={"error": error})
        else:  # an empty shard: nothing but its description
            with open(os.path.join(request.meta["dir"], f"shard-{sid}.json"), "w") as f:
                json.dump({"tables": []}, f)
            msg = Message("checkpoint_done", request.ts, meta={"server": sid, "files": {},
                                                               "keys": {}})
        self.servers[sid].send(msg, to=sender)


def test_checkpoint_round_commits_once_every_server_reported(tmp_path):
    r = _Round(tmp_path)
    r.coord.request(b"cli", Message("checkpoint", 5))
    for sid in (1, 2):
        [(sender, req)] = r.requests(sid)
        assert req.op == "checkpoint_write" and req.meta["dir"].endswith(".partial")
        r.coord.tick()
        assert r.replies == []                     # not before the last shard is in
        r.answer(sid, sender, req)
    r.coord.tick()
    [(ident, done)] = r.replies
    assert (ident, done.op, done.ts) == (b"cli", "checkpoint_done", 5)
    assert done.meta["servers"] == 2 and ck.latest(str(tmp_path)) == done.meta["name"]


def test_checkpoint_round_aborts_on_a_refusal_or_a_dead_server(tmp_path):
    r = _Round(tmp_path)
    r.coord.request(b"cli", Message("checkpoint", 1))
    (sender, req), = r.requests(1)
    r.answer(1, sender, req, error="disk full")
    r.coord.tick()
    assert [(i, m.op) for i, m in r.replies] == [(b"cli", "error")]
    assert "disk full" in r.replies[0][1].meta["error"] and r.coord.round is None
    r.coord.request(b"cli", Message("checkpoint", 2))
    assert r.coord.round is not None
    r.view.nodes[2].alive = False
    r.coord.tick()
    assert "died while writing" in r.replies[-1][1].meta["error"] and r.coord.round is None
    assert ck.latest(str(tmp_path)) is None        # nothing was committed
