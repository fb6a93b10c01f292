"""The filter chain on the push/pull path (paper: "User-defined filters"), worker and server side.

A table's spec names its chains (``TableSpec.push_filters`` / ``pull_filters``), parsed the same
way on every node; a message whose header names other filters is refused (FilterMismatchError).
A filtered request carries the chain's header under ``meta["fc"]``, a layout ``meta["fl"]`` and
then keys, values and the filters' extra frames. Tables without filters keep the plain path of
pserver.kv.keys untouched. Wire layout, key-cache misses, per-peer state and resends after a
failover: docs/filters.md ("On the push/pull path: filtered tables").
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Container
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ConfigError, KeyCacheMiss, ProtocolError, PServerError, ServerDeadError
from ..filters import KEYS, Counters, FilterChain, FilterContext, KeyCaching, Payload, parse_filters
from ..filters.key_cache import parse_size
from ..protocol import ERROR, FILTER_META, KIND, LAYOUT
from ..wire import Message
from .keys import KeySet
from .traffic import WIRE_STAGE

if TYPE_CHECKING:
    from ..membership.view import ClusterView
    from ..store.spec import TableSpec
    from ..store.table import Table

log = logging.getLogger(__name__)

__all__ = [
    "FILTER_META",
    "LAYOUT",
    "ServerFilters",
    "WorkerFilters",
    "chain_for",
    "lossless_part",
]

_LAYOUTS = ("", "k", "v", "kv")
KEY_CACHE_LIMIT_VAR = "PSERVER_KEY_CACHE_LIMIT"

_chains: dict[str, FilterChain] = {}
_chains_lock = threading.Lock()


def chain_for(spec_text: str) -> FilterChain:
    """The FilterChain of a canonical spec string (from a TableSpec), parsed once per process.

    Raises ConfigError for an invalid spec (a TableSpec never holds one)."""
    chain = _chains.get(spec_text)
    if chain is None:
        with _chains_lock:
            chain = _chains.get(spec_text)
            if chain is None:
                chain = _chains[spec_text] = parse_filters(spec_text)
    return chain


def _message_parts(p: Payload) -> tuple[dict[str, Any], list[np.ndarray]]:
    """(meta, arrays) of an encoded payload, in the layout described in the module docstring."""
    layout = ("k" if p.keys is not None else "") + ("v" if p.values is not None else "")
    arrays = [a for a in (p.keys, p.values) if a is not None]
    arrays.extend(p.frames)
    return {FILTER_META: p.meta, LAYOUT: layout}, arrays


def _payload_of(msg: Message) -> Payload:
    """The encoded payload a filtered message carries (ProtocolError if the layout is bad). A
    message without a chain header gets an empty one, which the chain refuses by name."""
    meta = msg.meta.get(FILTER_META, {})
    layout = msg.meta.get(LAYOUT, "")
    if layout not in _LAYOUTS:
        raise ProtocolError(f"filtered message has an invalid layout {layout!r:.20}")
    if len(msg.arrays) < len(layout):
        raise ProtocolError(f"filtered message with layout {layout!r} has only "
                            f"{len(msg.arrays)} arrays")
    arrays = list(msg.arrays)
    keys = arrays.pop(0) if "k" in layout else None
    values = arrays.pop(0) if "v" in layout else None
    return Payload(keys, values, meta, arrays)


# -- worker side -------------------------------------------------------------------------------
@dataclass
class _Sent:
    """What a worker keeps of a filtered request part until its reply arrives."""

    chain: FilterChain
    op: str                 # "push" or "pull"
    table: str
    encoded: Payload        # the chain's output, for resend_with_keys
    meta: dict[str, Any]    # the message meta, shared with the caller (it may add fields)
    n: int                  # keys in this part
    dim: int = 0            # pull: value columns expected
    dtype: str = ""         # pull: value dtype expected
    resent: bool = False


class WorkerFilters:
    """The filter chains of one KVWorker: encodes its filtered requests, decodes the replies,
    resends after a key-cache miss, and counts traffic per filter stage.

    Used under the worker's lock (every call comes from KVWorker methods holding it), except
    :meth:`set_weights` / :meth:`select_all`, which only replace dict entries.
    """

    def __init__(self, send: Callable[[int, Message], None], pending: Container[int]) -> None:
        self._send = send        # (server id, message): resends after a key-cache miss
        self._pending = pending  # timestamps of requests still pending (to purge ``sent``)
        self.counters = Counters()
        self.states: dict[tuple[int, str], dict] = {}   # (server id, table) -> filter state
        self.weights: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
        self.sent: dict[Any, _Sent] = {}   # part key (the caller's, e.g. (ts, part id)) -> sent
        self._select_all: set[str] = set()
        self._purge_at = 4096

    # -- application hooks ------------------------------------------------------------------
    def set_weights(self, table: str, weights: Callable[[np.ndarray], np.ndarray] | None) -> None:
        """Give the filters that need the current weights (kkt, significant:rel) a source for
        ``table``: ``weights(keys) -> w``, one float per key (``keys``: sorted uint64, one
        server's part of a push; keys the worker has no weight for must read 0). It is called
        while the push is encoded, so it sees the weights as they are then. None removes it."""
        if weights is None:
            self.weights.pop(table, None)
        elif not callable(weights):
            raise ConfigError("set_weights needs a callable keys -> weights (e.g. a lookup into "
                              "the worker's last pulled copy of w)")
        else:
            self.weights[table] = weights

    def select_all(self, table: str, on: bool = True) -> None:
        """While on, the select filters of ``table`` (kkt, significant, random_skip) pass every
        entry, and significant also sends what it held back: the KKT active set is reset, every
        coordinate is pushed so the servers re-check the optimality conditions."""
        if on:
            self._select_all.add(table)
        else:
            self._select_all.discard(table)

    def holds(self, spec: TableSpec) -> bool:
        """Whether the select filters of ``spec``'s push chain hold anything back."""
        chain = chain_for(spec.push_filters)
        return any(f.held_back(self._ctx(sid, name, "push")) is not None
                   for sid, name in list(self.states) if name == spec.name for f in chain.filters)

    def take_held(self, spec: TableSpec) -> tuple[np.ndarray, np.ndarray] | None:
        """Remove and return everything the select filters of ``spec``'s push chain hold back
        for any server (significant's residuals) as sorted (keys, (n, cols) values), or None if
        nothing is held. The caller pushes them (``KVWorker.flush``) with :meth:`select_all` on,
        and holds the lock that keeps other pushes from adding to the residuals meanwhile."""
        chain = chain_for(spec.push_filters)
        parts: list[Payload] = []
        for sid, name in list(self.states):
            if name != spec.name:
                continue
            ctx = self._ctx(sid, name, "push")
            for f in chain.filters:
                take = getattr(f, "flush", None)
                p = take(ctx) if callable(take) else None
                if p is not None and p.keys is not None and p.keys.shape[0]:
                    parts.append(p)
        if not parts:
            return None
        # residuals of several servers (one that left the ring and its heirs) may share keys
        keys, inverse = np.unique(np.concatenate([p.keys for p in parts]), return_inverse=True)
        rows = np.concatenate([np.asarray(p.values).reshape(p.keys.shape[0], -1) for p in parts])
        vals = np.zeros((keys.shape[0], rows.shape[1]), dtype=rows.dtype)
        np.add.at(vals, inverse, rows)
        return keys, vals.astype(spec.dtype, copy=False)

    # -- requests ---------------------------------------------------------------------------
    def _ctx(self, sid: int, table: str, direction: str) -> FilterContext:
        return FilterContext(peer=f"server-{sid}", direction=direction, table=table,
                             counters=self.counters,
                             state=self.states.setdefault((sid, table), {}),
                             weights=self.weights.get(table), flush=table in self._select_all)

    def check(self, spec: TableSpec) -> None:
        """Raise ConfigError before a push of ``spec``'s table if a filter of its push chain
        lacks what it needs (kkt or significant:rel without weights)."""
        if spec.name not in self.weights and _needs_weights(chain_for(spec.push_filters)):
            raise ConfigError(f"the push filters {spec.push_filters!r} of table {spec.name!r} need "
                              f"the current weights: call kv.filters.set_weights({spec.name!r}, "
                              "keys -> w) first")

    def encode(self, sid: int, part: Any, spec: TableSpec, op: str, keys: np.ndarray,
               values: np.ndarray | None) -> tuple[dict[str, Any], list[np.ndarray]]:
        """(meta, arrays) of request part ``part`` (a key the caller passes to :meth:`on_reply`
        with the reply) for server ``sid``, after ``spec``'s push (``values`` given) or pull chain.
        The meta dict is kept for a resend: fields the caller adds to it (round, part id) go
        into the resend too.

        Raises ConfigError when a filter lacks something it needs (see :meth:`check`),
        DTypeError / ValueShapeError for unsuitable values."""
        chain = chain_for(spec.push_filters if op == "push" else spec.pull_filters)
        ctx = self._ctx(sid, spec.name, op)
        enc = chain.encode(Payload(keys, values), ctx)
        _count_wire(ctx, chain, enc, "sent")
        meta, arrays = _message_parts(enc)
        if len(self.sent) > self._purge_at:
            self._forget_stale()
        self.sent[part] = _Sent(chain, op, spec.name, enc, meta, int(keys.shape[0]), spec.dim,
                                spec.dtype)
        return meta, arrays

    def take_sent(self, part: Any) -> _Sent | None:
        """Forget request part ``part`` and return what was recorded of it (None if nothing)."""
        return self.sent.pop(part, None)

    def encode_rows(self, sid: int, part: Any, sent: _Sent, rows: np.ndarray
                    ) -> tuple[dict[str, Any], list[np.ndarray]]:
        """(meta, arrays) of rows ``rows`` of an earlier part ``sent`` (see :meth:`take_sent`),
        resent to server ``sid`` as part ``part`` after a failover: the entries that part
        carried, nothing that was held back (``FilterChain.encode_rows``)."""
        ctx = self._ctx(sid, sent.table, sent.op)
        enc = sent.chain.encode_rows(sent.encoded, rows, ctx)
        _count_wire(ctx, sent.chain, enc, "sent")
        meta, arrays = _message_parts(enc)
        self.sent[part] = replace(sent, encoded=enc, meta=meta, n=int(rows.shape[0]),
                                  resent=False)
        return meta, arrays

    def _forget_stale(self) -> None:
        # Parts abandoned without a reply (a dead server, a re-routed part, a request that failed
        # elsewhere) would otherwise stay here forever: keep those of requests still pending.
        pending = self._pending
        for key in [k for k in self.sent if k[0] not in pending]:
            del self.sent[key]
        self._purge_at = max(4096, 2 * len(self.sent))

    def on_reply(self, part: Any, sid: int, msg: Message) -> Message | None:
        """The reply to request part ``part`` from server ``sid`` as the worker's plain path
        expects it: pulled values decoded into one (n, dim) array, or an error message if they
        cannot be. None when the reply was a key-cache miss and the part has been resent with its
        keys under the same timestamp and meta (the request keeps waiting)."""
        sent = self.sent.pop(part, None)
        if sent is None:
            if FILTER_META in msg.meta:
                return _error(msg.ts, ProtocolError("a filtered reply to an unfiltered request"),
                              msg.meta)
            return msg
        if msg.op == "error":
            if msg.meta.get(KIND) == "KeyCacheMiss" and not sent.resent:
                self._resend(part, sid, msg.ts, sent)
                return None
            return msg
        if sent.op != "pull":
            return msg
        try:
            meta = {k: v for k, v in msg.meta.items() if k not in (FILTER_META, LAYOUT)}
            return Message(msg.op, msg.ts, msg.table, meta,
                           arrays=[self._decode_values(sid, msg, sent)])
        except PServerError as e:
            log.warning("undecodable pull reply from server %d: %s", sid, e)
            return _error(msg.ts, e, msg.meta)

    def _resend(self, part: Any, sid: int, ts: int, sent: _Sent) -> None:
        ctx = self._ctx(sid, sent.table, sent.op)
        enc = sent.chain.resend_with_keys(sent.encoded, ctx)
        _count_wire(ctx, sent.chain, enc, "sent")
        meta, arrays = _message_parts(enc)
        meta = {**sent.meta, **meta}
        self.sent[part] = replace(sent, encoded=enc, meta=meta, resent=True)
        self.counters.incr("key_cache.resent")
        log.info("server %d missed a cached key list of request %d: resent with its keys", sid, ts)
        try:
            self._send(sid, Message(sent.op, ts, sent.table, meta, arrays))
        except ServerDeadError:
            pass  # the part stays waiting; the worker re-routes it when the ring drops the server

    def _decode_values(self, sid: int, msg: Message, sent: _Sent) -> np.ndarray:
        p = _decode_counted(sent.chain, _payload_of(msg), self._ctx(sid, sent.table, "pull"))
        v = p.values
        if p.keys is not None or v is None or v.dtype != np.dtype(sent.dtype) \
                or v.size != sent.n * sent.dim:
            raise ProtocolError(f"pull reply does not hold {sent.n} x {sent.dim} {sent.dtype} "
                                f"values")
        return v.reshape(sent.n, sent.dim)


def _count_wire(ctx: FilterContext, chain: FilterChain, enc: Payload, side: str) -> None:
    pairs = chain.filters[-1].pairs_after(enc) if chain.filters else enc.n_pairs()
    ctx.counters.add(ctx.direction, WIRE_STAGE, side, enc.nbytes(), pairs)


def _decode_counted(chain: FilterChain, p: Payload, ctx: FilterContext) -> Payload:
    """chain.decode, counting the message in the WIRE_STAGE cell (pairs 0 if it fails)."""
    nbytes, pairs = p.nbytes(), 0
    try:
        out = chain.decode(p, ctx)
        pairs = out.n_pairs()
        return out
    finally:
        ctx.counters.add(ctx.direction, WIRE_STAGE, "received", nbytes, pairs)


def _needs_weights(chain: FilterChain) -> bool:
    return any(f.kind == "kkt" or (f.kind == "significant" and getattr(f, "mode", "") == "rel")
               for f in chain.filters)


def _error(ts: int, err: Exception, reply_meta: dict[str, Any]) -> Message:
    meta = {k: v for k, v in reply_meta.items() if k not in (FILTER_META, LAYOUT)}
    return Message("error", ts, meta={**meta, ERROR: str(err)[:1000], KIND: type(err).__name__})


# -- server side -------------------------------------------------------------------------------
class ServerFilters:
    """The filter chains of one KVServer: decodes filtered requests, encodes pull replies,
    tracks key-cache misses whose resend is awaited, and counts traffic per filter stage.

    held: the server's per-sender hold queues (identity -> deque); a miss opens one so that the
          sender's later requests wait behind the resend.
    max_bytes: the largest size a decode may allocate (the wire limit).
    key_cache_limit: bytes a key cache may hold per (worker, table, direction) on this server,
          at most; None keeps the table's setting. Lists over it are not cached, so requests
          naming them miss and are resent with keys (PSERVER_KEY_CACHE_LIMIT, e.g. "16M").
    """

    def __init__(self, held: dict, max_bytes: int, key_cache_limit: int | None = None) -> None:
        self.held = held
        self.max_bytes = max_bytes
        self.key_cache_limit = key_cache_limit
        self.counters = Counters()
        self.states: dict[tuple[bytes, str], dict] = {}  # (worker identity, table) -> state
        self.awaiting: dict[bytes, int] = {}
        self._chains: dict[str, FilterChain] = {}

    @classmethod
    def from_env(cls, held: dict, max_bytes: int) -> ServerFilters:
        """Configured from PSERVER_KEY_CACHE_LIMIT (bytes, k/M/G suffix; unset = no limit)."""
        raw = os.environ.get(KEY_CACHE_LIMIT_VAR, "").strip()
        return cls(held, max_bytes, parse_size(raw) if raw else None)

    def _chain(self, spec_text: str) -> FilterChain:
        chain = self._chains.get(spec_text)
        if chain is None:
            chain = parse_filters(spec_text)  # own objects: the limit below changes them
            if self.key_cache_limit is not None:
                for f in chain.filters:
                    # Same name (the worker's mirror is unchanged), smaller cache here: lists it
                    # cannot hold are answered with a miss, never mis-applied.
                    if isinstance(f, KeyCaching):
                        f.capacity_bytes = min(f.capacity_bytes, self.key_cache_limit)
            self._chains[spec_text] = chain
        return chain

    def _decode(self, identity: bytes, msg: Message, spec: TableSpec, direction: str) -> Payload:
        text = spec.push_filters if direction == "push" else spec.pull_filters
        ctx = FilterContext(peer=identity.decode("ascii", "replace"), direction=direction,
                            table=spec.name, counters=self.counters,
                            state=self.states.setdefault((identity, spec.name), {}),
                            max_bytes=self.max_bytes)
        try:
            return _decode_counted(self._chain(text), _payload_of(msg), ctx)
        except KeyCacheMiss:
            # Nothing was applied; hold this sender's later requests until the resend arrives.
            self.awaiting[identity] = msg.ts
            self.held.setdefault(identity, deque())
            raise

    def decode_push(self, identity: bytes, msg: Message, table: Table) -> tuple[KeySet, np.ndarray]:
        """Keys and (n, push_cols) values of a push to a filtered table (or of a filtered push to
        a plain table, which fails by name). Raises FilterMismatchError, KeyCacheMiss or
        ProtocolError; nothing is applied in any of those cases."""
        spec = table.spec
        p = self._decode(identity, msg, spec, "push")
        cols = spec.push_cols
        v = p.values
        if p.keys is None or v is None:
            raise ProtocolError("a filtered push must decode to keys and values")
        if v.dtype != np.dtype(spec.dtype) or v.size != p.keys.shape[0] * cols:
            raise ProtocolError(f"filtered push decoded to {v.dtype} values of shape {v.shape}; "
                                f"table {spec.name!r} takes {p.keys.shape[0]} x {cols} "
                                f"{spec.dtype}")
        return KeySet(keys=p.keys), v.reshape(p.keys.shape[0], cols)

    def decode_pull(self, identity: bytes, msg: Message, table: Table) -> KeySet:
        """Keys of a pull request to a filtered table (errors as :meth:`decode_push`)."""
        p = self._decode(identity, msg, table.spec, "pull")
        if p.keys is None or p.values is not None:
            raise ProtocolError("a filtered pull request must decode to keys only")
        return KeySet(keys=p.keys)

    def encode_reply(self, identity: bytes, table: Table, values: np.ndarray
                     ) -> tuple[list[np.ndarray], dict[str, Any]]:
        """(arrays, meta) of the "vals" reply to a pull of a filtered table: the values through
        the table's pull chain."""
        spec = table.spec
        ctx = FilterContext(peer=identity.decode("ascii", "replace"), direction="pull",
                            table=spec.name, counters=self.counters,
                            state=self.states.setdefault((identity, spec.name), {}))
        chain = self._chain(spec.pull_filters)
        enc = chain.encode(Payload(None, values), ctx)
        _count_wire(ctx, chain, enc, "sent")
        meta, arrays = _message_parts(enc)
        return arrays, meta

    def is_awaited_resend(self, identity: bytes, msg: Message) -> bool:
        """True (and the wait ends) if ``msg`` is the resend of a request that missed."""
        if self.awaiting.get(identity) != msg.ts:
            return False
        del self.awaiting[identity]
        return True

    def on_view(self, view: ClusterView) -> None:
        """Drop the filter state of workers that are no longer alive."""
        alive = {b"n%d" % n.id for n in view.role_nodes("worker")}
        for key in [k for k in self.states if k[0] not in alive]:
            del self.states[key]
        for identity in [i for i in self.awaiting if i not in alive]:
            del self.awaiting[identity]


def lossless_part(spec: str) -> str:
    """The filters of ``spec`` that change only the encoding, never the values (key caching and
    compression: the keys and pack stages), as a spec - safe for tables of exact counts."""
    return ",".join(f.name for f in parse_filters(spec).filters if f.stage >= KEYS)
