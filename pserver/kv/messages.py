"""The message of one part of a worker's request (no I/O).

A push or pull part carries its keys (kv/keys.py: a contiguous run as start + length) and values,
or, for a table with filters, what its filter chain encoded; a range pull's part names its
sub-range; a declaration carries the table's spec. Every part adds the request-wide fields: round,
span / "as of" / clock, part id, ring version and, on a resend, the parts it was resent from.
"""

from __future__ import annotations

from .. import wire
from ..protocol import HI, LO, ORIGINS, PART, PUSH_PULL, RING_VERSION, SYNC_ROUND
from ..store.spec import TableSpec
from ..wire import Message
from . import keys as keyfmt
from .filtering import WorkerFilters
from .tracker import Request

_OPS = {"range": "pull_range", "declare": "declare_table", "pushpull": "push"}  # kind -> wire op


class PartEncoder:
    """Builds the messages of requests' parts. ``tables`` (name -> spec) is read at each call: the
    worker's own dict, which it updates in place."""

    def __init__(self, tables: dict[str, TableSpec], filters: WorkerFilters):
        self.tables, self.filters = tables, filters

    def encode_part(self, ts: int, req: Request, sid: int, sel, rv: int, orig: tuple = ()
                    ) -> tuple[int, Message]:
        """Record the part of request ``ts`` for server ``sid`` (keys ``sel``, split with ring
        version ``rv``) and encode it; returns (sid, message). Raises as :meth:`message`; the
        part is then recorded but the request not yet tracked."""
        return sid, self.message(ts, req, req.add_part(sid, sel, rv, orig))

    def push_frames(self, ts: int, req: Request, pid: int) -> list:
        """The frames of part ``pid`` of a plain push (no filters, round, request-wide fields or
        resend origins): built in one pass from its arrays when its keys travel explicitly in one
        inline frame (``wire.encode_push``: the same bytes), else ``wire.encode`` of
        :meth:`message`. Raises as ``wire.encode``."""
        part, vals = req.parts[pid], req.vals
        sel = part.sel
        n = len(sel) if type(sel) is not slice else sel.stop - sel.start
        if n * (8 + vals.itemsize * vals.shape[1]) <= wire.INLINE_BYTES:  # else several frames
            keys = req.keys[sel]
            meta, arrays = keyfmt.pack_keys(keys)
            if len(arrays) == 1:  # explicit keys (runs go the general way)
                meta[PART], meta[RING_VERSION] = pid, part.rv
                frames = wire.encode_push(ts, req.table, meta, keys, vals[sel])
                if frames is not None:
                    return frames
        return wire.encode(self.message(ts, req, pid))

    def message(self, ts: int, req: Request, pid: int, encoded: tuple | None = None) -> Message:
        """The message of part ``pid`` of request ``ts`` (with ``encoded``: that (meta, arrays) of
        a filtered resend, stamped). Raises what a filter's encode raises (nothing changed but
        the filters' state, as their encode leaves it)."""
        part = req.parts[pid]
        sel, kind = part.sel, req.kind
        spec = self.tables.get(req.table) if kind in ("push", "pull") else None
        if encoded is not None:
            meta, arrays = encoded
        elif spec is not None and (spec.push_filters if kind == "push" else spec.pull_filters):
            vals = req.vals[sel] if kind == "push" else None  # the chain packs keys and values
            meta, arrays = self.filters.encode(part.sid, (ts, pid), spec, kind, req.keys[sel],
                                               vals)
        elif kind in ("push", "pull", "pushpull"):
            meta, arrays = keyfmt.pack_keys(req.keys[sel])
            if kind != "pull":
                arrays.append(req.vals[sel])
                if kind == "pushpull":
                    meta[PUSH_PULL] = 1  # reply with the values, not an acknowledgement
        else:
            meta, arrays = dict(req.meta), []
            if kind == "range":
                meta[LO], meta[HI] = sel
        # request-wide fields: round, span / as_of / vc, part id, ring version, resent from
        if req.rnd is not None:
            meta[SYNC_ROUND] = req.rnd
        if req.meta and kind in ("push", "pull", "pushpull"):
            meta.update(req.meta)
        meta[PART] = pid
        meta[RING_VERSION] = part.rv
        if part.orig:
            meta[ORIGINS] = [list(o) for o in part.orig]
        return Message(_OPS.get(kind, kind), ts, req.table if kind != "declare" else "", meta,
                       arrays)
