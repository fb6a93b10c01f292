"""A restarted scheduler's view rebuilt from rejoins (pserver/membership/recovery.py)."""

import pytest

from pserver.membership.recovery import ViewRecovery
from pserver.membership.view import ClusterView, NodeInfo
from pserver.ring import KeyRing
from pserver.testing import FakeClock


def _view(version, dead=()):
    nodes = {1: NodeInfo(1, "server", 0, "h", 10, 100), 2: NodeInfo(2, "server", 1, "h", 11, 101),
             3: NodeInfo(3, "worker", 0, "h", 12, 102)}
    for nid in dead:
        nodes[nid].alive, nodes[nid].state = False, "dead"
    return ClusterView(version, nodes, KeyRing([n for n in (1, 2) if n not in dead], version=version),
                       {"replication": 1})


def _rejoin(rec, nid, view, **claim):
    node = view.nodes[nid]
    meta = {"id": nid, "role": node.role, "rank": node.rank, "host": node.host, "port": node.port,
            "pid": node.pid, "group": node.group, "view": view.to_json(), **claim}
    return rec.rejoin(meta, None)


def test_the_newest_view_wins_and_recovery_ends_when_every_live_node_rejoined():
    clock = FakeClock()
    rec = ViewRecovery(2.0, clock)
    old, new = _view(3), _view(4)
    assert _rejoin(rec, 1, old) and not rec.done()
    assert _rejoin(rec, 3, new) and not rec.done()
    assert _rejoin(rec, 2, old) and rec.done()
    view = rec.result()
    assert view.version == 5 and view.ring.version == 4 and view.settings == {"replication": 1}
    assert sorted((n.id, n.rank) for n in view.nodes.values()) == [(1, 0), (2, 1), (3, 0)]


def test_a_node_the_view_has_dead_or_another_process_claiming_an_id_is_no_member():
    clock = FakeClock()
    rec = ViewRecovery(2.0, clock)
    view = _view(5, dead=(2,))
    assert _rejoin(rec, 1, view)
    assert not _rejoin(rec, 2, view)                 # declared dead before: must not come back
    assert not _rejoin(rec, 3, view, pid=999)        # not the process the view knows
    assert not rec.done()                            # node 3 itself has not rejoined
    clock.now += 2.5
    assert rec.done()                                # the window is over: the detector judges it


def test_a_rejoin_with_credentials_of_another_role_is_refused():
    rec = ViewRecovery(2.0, FakeClock())
    view = _view(1)
    with pytest.raises(PermissionError):
        rec.rejoin({"id": 3, "role": "server", "view": view.to_json()}, "worker")
