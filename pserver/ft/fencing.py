"""Fencing of servers the cluster declared dead, without I/O. A server cut off from the scheduler
serves on with its last view (the scheduler grace period) while its ranges fail over; workers that
still hold that view may push to it. A replica refuses every forward from a server its own view
names dead or gone (``repl_fenced``, nothing applied): the stale master then never acknowledges
the push, the worker resends it to the new master, and the stale master exits. Rationale:
docs/fault-tolerance.md, "Partitions and fencing"."""

from __future__ import annotations

from ..membership.view import ClusterView

FENCED = "repl_fenced"   # a replica's answer to a forward from a fenced master


def fenced_masters(view: ClusterView) -> frozenset[bytes]:
    """The DEALER identities (b"s<id>") of the servers ``view`` names dead or gone: their
    forwards must not be applied here. A server the view does not name (a joiner announced by a
    migration before the view) is not fenced."""
    return frozenset(b"s%d" % n.id for n in view.nodes.values()
                     if n.role == "server" and not n.alive)


def fenced_reason(replica: int) -> str:
    """What a fenced master logs before it exits."""
    return (f"replica {replica} refused this server's forwards: the cluster declared this server "
            f"dead (cut off from the scheduler?) and moved its key ranges; exiting without "
            f"acknowledging what it could not replicate (the workers resend it to the new owners)")
