"""The server's ops: each names its handler, the roles allowed to send it and whether a replica's
deferred updates may stay unapplied while it is served (it neither reads nor replaces what a replica
holds). The authorisation of server ops in ``pserver.security`` is this table's (handed over at import), and
:class:`~pserver.kv.core.ServerCore` binds the handlers."""

from __future__ import annotations

from typing import NamedTuple

from .. import security

_S = frozenset({"scheduler"})
_W = frozenset({"worker"})
_SV = frozenset({"server"})
_ANY = _S | _W | _SV


class Op(NamedTuple):
    """One entry: ``handler`` names a method of ServerCore (or of one of its parts, dotted),
    called as ``handler(identity, msg) -> None``."""

    handler: str
    roles: frozenset[str]
    deferrable: bool


SERVER_OPS: dict[str, Op] = {
    # the workers' data path
    "push": Op("on_push", _W, True),
    "pull": Op("on_pull", _W, True),
    "pull_range": Op("on_pull_range", _W, False),
    "declare_table": Op("on_declare_table", _W, False),
    # replication among servers (pserver.ft.replica)
    "replicate": Op("replica.handle", _SV, True),
    "replicate_agg": Op("replica.handle", _SV, True),
    "repl_evict": Op("replica.handle", _SV, False),
    "repl_batch": Op("replica.handle", _SV, True),
    "repl_load": Op("replica.handle", _SV, False),
    # scheduler-driven fault tolerance
    "migrate_prepare": Op("on_migrate", _S, False),
    "migrate_commit": Op("on_migrate", _S, False),
    "migrate_abort": Op("on_migrate", _S, False),
    "checkpoint_write": Op("on_checkpoint_write", _S, False),
    # queries
    "ping": Op("on_ping", _ANY, True),
    "stats": Op("on_stats", _ANY, False),
}
security.allow_ops({op: entry.roles for op, entry in SERVER_OPS.items()})
