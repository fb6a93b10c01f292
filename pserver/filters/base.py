"""The user-defined filter interface (paper: "User-defined filters") and the chain that applies it.

A filter is a pair of pure functions over a message payload: ``encode`` on the sender, ``decode``
on the receiver, plus counters. A :class:`FilterChain` applies its filters in stage order (SELECT,
PRECISION, KEYS, PACK) on the sender, names them in the header (``meta["filters"]``) and undoes
them in reverse on the receiver, refusing a message whose names differ from its own. The stages,
and the rules every filter follows (encode never modifies its input; header fields under
``meta[kind]``; decode treats its input as hostile): docs/filters.md ("The interface").
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..errors import (
    ConfigError,
    DTypeError,
    FilterMismatchError,
    InvalidKeysError,
    ProtocolError,
    PServerError,
    ValueShapeError,
)
from ..protocol import FILTER_NAMES
from .counters import Counters, StageCount

__all__ = [
    "DEFAULT_MAX_BYTES",
    "KEYS",
    "PACK",
    "PRECISION",
    "SELECT",
    "STAGE_NAMES",
    "WIRE_DTYPES",
    "Counters",
    "Filter",
    "FilterChain",
    "FilterContext",
    "Payload",
    "StageCount",
    "check_wire_keys",
    "check_wire_values",
    "header_int",
    "header_section",
    "header_str",
]

log = logging.getLogger(__name__)

SELECT, PRECISION, KEYS, PACK = 0, 1, 2, 3
STAGE_NAMES = {SELECT: "select", PRECISION: "precision", KEYS: "keys", PACK: "pack"}

# Value dtypes a filter may put on the wire (little-endian, same set as pserver.wire).
WIRE_DTYPES: dict[str, np.dtype] = {
    code: np.dtype(code)
    for code in ("<f2", "<f4", "<f8", "|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8")
}

DEFAULT_MAX_BYTES = 1 << 30

WeightSource = Callable[[np.ndarray], np.ndarray] | np.ndarray


@dataclass
class Payload:
    """What filters see of a message.

    keys:   1-D uint64, sorted and unique; None when a filter replaced them (signature, frame).
    values: 1-D (n,) or 2-D (n, cols) array, one row per key; None when packed into frames or
            when the message carries no values (a pull request).
    meta:   JSON-safe header fields; each filter adds its own under ``meta[filter.kind]``.
    frames: extra binary frames (1-D uint8 arrays) that filters add.
    local:  sender-side bookkeeping that is never sent (the chain keeps resend state here).
    """

    keys: np.ndarray | None = None
    values: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    frames: list[np.ndarray] = field(default_factory=list)
    local: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def n_pairs(self) -> int:
        """Rows of ``values``, else length of ``keys``, else 0."""
        if self.values is not None:
            return int(self.values.shape[0])
        if self.keys is not None:
            return int(self.keys.shape[0])
        return 0

    def nbytes(self) -> int:
        """Bytes this payload puts on the wire: arrays, frames and the JSON header fields."""
        n = len(json.dumps(self.meta, separators=(",", ":"), default=str)) if self.meta else 0
        for a in (self.keys, self.values, *self.frames):
            if a is not None:
                n += a.nbytes
        return n


@dataclass
class FilterContext:
    """Everything a filter may know about the message besides its payload.

    peer:      id of the other side (the receiver when encoding, the sender when decoding).
    direction: "push" or "pull" - the message kind used by the counters.
    table:     the parameter table the message is about.
    counters:  where the chain and the filters count traffic and events.
    state:     a dict the caller keeps *per peer* across messages (``states.setdefault(peer, {})``);
               filters keep peer-specific state here (key cache, residuals) under their own keys.
    max_bytes: receiver-side limit on any size a decode allocates (bytes); larger declared sizes
               are rejected with ProtocolError before anything is allocated.
    weights:   for the KKT filter and ``significant:rel``: the sender's current weights w for the
               message's keys, either an array aligned with ``payload.keys`` as the filter sees them
               or a callable ``keys -> w`` (1-D float, one weight per key; missing keys read 0).
    flush:     set by :meth:`FilterChain.flush`: SELECT filters pass every entry and release
               everything they held back.
    """

    peer: str
    direction: str
    table: str = ""
    counters: Counters = field(default_factory=Counters)
    state: dict[Any, Any] = field(default_factory=dict)
    max_bytes: int = DEFAULT_MAX_BYTES
    weights: WeightSource | None = None
    flush: bool = False

    def __post_init__(self) -> None:
        if self.direction not in ("push", "pull"):
            raise ConfigError(f"FilterContext.direction must be 'push' or 'pull', not "
                              f"{self.direction!r}")

    def weights_for(self, keys: np.ndarray, who: str) -> np.ndarray:
        """The current weights for ``keys`` from ``self.weights`` as a 1-D float64 array.

        Raises ConfigError when no weights were given, ValueShapeError when their length differs
        from the number of keys. ``who`` names the filter in the error message.
        """
        if self.weights is None:
            raise ConfigError(f"filter {who} needs the current weights: set FilterContext.weights "
                              "to an array aligned with the keys or a callable keys -> weights")
        w = self.weights(keys) if callable(self.weights) else self.weights
        w = np.asarray(w)
        if w.ndim != 1 or w.shape[0] != keys.shape[0]:
            raise ValueShapeError(f"filter {who}: weights have shape {w.shape} but the message "
                                  f"has {keys.shape[0]} keys; give one weight per key")
        return w.astype(np.float64, copy=False)


class Filter:
    """Base class of a filter. Subclasses set ``kind`` (registered id), ``stage`` and, in
    ``__init__``, ``name`` (the canonical spec with parameters, e.g. "compress:zstd:1"), and
    implement ``encode`` and ``decode``."""

    kind: str = ""
    stage: int = SELECT
    name: str = ""

    def encode(self, p: Payload, ctx: FilterContext) -> Payload:
        """Sender side: return a new payload; never modify ``p``."""
        raise NotImplementedError

    def decode(self, p: Payload, ctx: FilterContext) -> Payload:
        """Receiver side: undo ``encode``; raise ProtocolError on inconsistent input."""
        raise NotImplementedError

    def pairs_after(self, p: Payload) -> int:
        """Pairs ``p`` carries right after this filter's encode (for the counters). Filters that
        pack both keys and values away override this."""
        return p.n_pairs()

    def reset_peer(self, ctx: FilterContext) -> None:
        """Forget what this filter believes about ``ctx.peer`` (it restarted, or reported a
        KeyCacheMiss). Default: nothing to forget."""

    def held_back(self, ctx: FilterContext) -> Payload | None:
        """A zero-row payload shaped like the entries this filter holds back for ``ctx.peer`` and
        ``ctx.table``, or None if it holds nothing (used by :meth:`FilterChain.flush`)."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


def _check_outgoing(p: Payload) -> None:
    """Validate a payload handed to the chain by the local caller (user errors, not protocol)."""
    if p.keys is not None:
        k = p.keys
        if not isinstance(k, np.ndarray) or k.dtype != np.uint64:
            got = getattr(k, "dtype", type(k))
            raise DTypeError(f"keys must be a numpy uint64 array, not {got}")
        if k.ndim != 1:
            raise InvalidKeysError(f"keys must be 1-D, not shape {k.shape}")
        if k.shape[0] > 1 and not bool(np.all(k[1:] > k[:-1])):
            raise InvalidKeysError("keys must be sorted and unique: use np.unique(keys)")
    if p.values is not None:
        v = p.values
        if not isinstance(v, np.ndarray) or v.dtype.str not in WIRE_DTYPES:
            raise DTypeError(f"values must be a numeric numpy array (float32/float64), not "
                             f"{getattr(v, 'dtype', type(v))}")
        if v.ndim not in (1, 2):
            raise ValueShapeError(f"values must be 1-D or 2-D (n, cols), not shape {v.shape}")
        if p.keys is not None and v.shape[0] != p.keys.shape[0]:
            raise ValueShapeError(f"{v.shape[0]} value rows for {p.keys.shape[0]} keys")


def check_wire_keys(keys: Any, who: str) -> None:
    """Raise ProtocolError unless ``keys`` (from the network) is a 1-D uint64 array."""
    if keys is None:
        return
    if not isinstance(keys, np.ndarray) or keys.dtype != np.uint64 or keys.ndim != 1:
        raise ProtocolError(f"{who}: keys on the wire must be a 1-D uint64 array")


def check_wire_values(values: Any, who: str) -> None:
    """Raise ProtocolError unless ``values`` (from the network) is a 1-D/2-D numeric array."""
    if values is None:
        return
    if (not isinstance(values, np.ndarray) or values.dtype.str not in WIRE_DTYPES
            or values.ndim not in (1, 2)):
        raise ProtocolError(f"{who}: values on the wire must be a 1-D or 2-D numeric array")


def header_section(meta: dict[str, Any], kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split the header into (meta without ``kind``, the ``kind`` section); ProtocolError if the
    section is missing or not an object."""
    rest = dict(meta)
    sec = rest.pop(kind, None)
    if not isinstance(sec, dict):
        raise ProtocolError(f"header has no valid {kind!r} section, but the chain says filter "
                            f"{kind} was applied")
    return rest, sec


def header_int(sec: dict[str, Any], key: str, lo: int, hi: int, who: str) -> int:
    """``sec[key]`` as an int in [lo, hi]; ProtocolError otherwise (bools are not ints here)."""
    v = sec.get(key)
    if type(v) is not int or not lo <= v <= hi:
        raise ProtocolError(f"{who}: header field {key!r}={v!r:.40} is not an integer in "
                            f"[{lo}, {hi}]")
    return v


def header_str(sec: dict[str, Any], key: str, choices: tuple[str, ...] | None, who: str) -> str:
    """``sec[key]`` as a str (one of ``choices`` if given); ProtocolError otherwise."""
    v = sec.get(key)
    if not isinstance(v, str) or len(v) > 256 or (choices is not None and v not in choices):
        raise ProtocolError(f"{who}: header field {key!r}={v!r:.40} is not one of {choices}")
    return v


class FilterChain:
    """An ordered list of filters applied to every message of one kind.

    ``encode`` applies the filters in order and records their names in ``meta["filters"]``;
    ``decode`` applies them in reverse and raises FilterMismatchError when the names differ from
    this chain's. Both count bytes and pairs per stage in ``ctx.counters``.
    """

    def __init__(self, filters: list[Filter]) -> None:
        filters = list(filters)
        seen: set[str] = set()
        for i, f in enumerate(filters):
            if not isinstance(f, Filter) or not f.kind or not f.name:
                raise ConfigError(f"filter #{i} ({f!r}) is not a Filter with a kind and a name")
            if f.kind in seen:
                raise ConfigError(f"filter {f.kind!r} appears twice in the chain; list it once")
            seen.add(f.kind)
            if i and f.stage < filters[i - 1].stage:
                good = ",".join(g.name for g in sorted(filters, key=lambda g: g.stage))
                raise ConfigError(
                    f"filter {f.name!r} ({STAGE_NAMES.get(f.stage, f.stage)} stage) cannot come "
                    f"after {filters[i - 1].name!r} ({STAGE_NAMES.get(filters[i - 1].stage)} "
                    f"stage): it needs what that one removes. Use the order {good!r}")
        self.filters = filters
        self.names = [f.name for f in filters]

    def __repr__(self) -> str:
        return f"FilterChain({','.join(self.names)!r})"

    def __len__(self) -> int:
        return len(self.filters)

    def _count(self, ctx: FilterContext, stage: str, side: str, p: Payload, pairs: int) -> None:
        ctx.counters.add(ctx.direction, stage, side, p.nbytes(), pairs)

    def encode(self, p: Payload, ctx: FilterContext) -> Payload:
        """Apply every filter in order (sender side) and return the payload to send.

        Raises DTypeError / InvalidKeysError / ValueShapeError for an invalid input payload,
        ConfigError when ``meta`` already uses the reserved "filters" field. ``p`` is not
        modified. The result's ``local`` keeps what :meth:`resend_with_keys` needs.
        """
        _check_outgoing(p)
        if FILTER_NAMES in p.meta:
            raise ConfigError('meta["filters"] is reserved for the filter chain')
        p = Payload(p.keys, p.values, dict(p.meta), list(p.frames))
        self._count(ctx, "raw", "sent", p, p.n_pairs())
        inputs: list[Payload] = []
        for f in self.filters:
            inputs.append(p)
            p = f.encode(p, ctx)
            self._count(ctx, f.name, "sent", p, f.pairs_after(p))
        return Payload(p.keys, p.values, {**p.meta, "filters": list(self.names)}, list(p.frames),
                       local={"chain.inputs": inputs})

    def decode(self, p: Payload, ctx: FilterContext) -> Payload:
        """Undo every filter in reverse order (receiver side) and return the original payload.

        Raises FilterMismatchError when ``meta["filters"]`` is not this chain's names, KeyCacheMiss
        when a key signature is not cached, ProtocolError on any other inconsistency.
        """
        if not isinstance(p.meta, dict):
            raise ProtocolError("message meta is not a JSON object")
        got = p.meta.get(FILTER_NAMES, [])
        if not isinstance(got, list) or got != self.names:
            raise FilterMismatchError(
                f"message from {ctx.peer!r} was encoded with filters {got!r:.200} but this node "
                f"decodes with {self.names!r}; start every node with the same filter setting")
        check_wire_keys(p.keys, "filter chain")
        check_wire_values(p.values, "filter chain")
        if not all(isinstance(fr, np.ndarray) for fr in p.frames):
            raise ProtocolError("filter frames must be numpy arrays")
        meta = {k: v for k, v in p.meta.items() if k != "filters"}
        p = Payload(p.keys, p.values, meta, list(p.frames))
        stages = ["raw", *self.names]
        for i in range(len(self.filters) - 1, -1, -1):
            f = self.filters[i]
            self._count(ctx, stages[i + 1], "received", p, _safe_pairs(f, p))
            try:
                p = f.decode(p, ctx)
            except PServerError:
                raise
            except Exception as e:  # a filter bug or an input it did not foresee: never crash
                log.warning("filter %s failed to decode a message from %s: %r", f.name, ctx.peer, e)
                raise ProtocolError(f"filter {f.name} could not decode a message from "
                                    f"{ctx.peer!r}: {type(e).__name__}: {e}") from e
            check_wire_keys(p.keys, f.name)
            check_wire_values(p.values, f.name)
        self._check_decoded(p)
        self._count(ctx, "raw", "received", p, p.n_pairs())
        return p

    @staticmethod
    def _check_decoded(p: Payload) -> None:
        if p.frames:
            raise ProtocolError(f"{len(p.frames)} frames left over after decoding: the message "
                                "carries frames no filter of this chain claimed")
        if p.keys is not None:
            if p.values is not None and p.values.shape[0] != p.keys.shape[0]:
                raise ProtocolError(f"decoded message has {p.values.shape[0]} value rows for "
                                    f"{p.keys.shape[0]} keys")
            k = p.keys
            if k.shape[0] > 1 and not bool(np.all(k[1:] > k[:-1])):
                raise ProtocolError("decoded keys are not sorted and unique")

    def resend_with_keys(self, encoded: Payload, ctx: FilterContext) -> Payload:
        """The message ``encoded`` (a result of :meth:`encode`) again, with its key list instead
        of a signature: call after the receiver raised KeyCacheMiss.

        Forgets what KEYS/PACK filters believe about ``ctx.peer`` and re-runs only those filters,
        from the payload they saw the first time, so SELECT and PRECISION decisions (residuals,
        sampling, rounding) are not taken twice and nothing is lost or double counted.
        Raises ConfigError if ``encoded`` did not come from this chain's encode.
        """
        inputs = encoded.local.get("chain.inputs")
        if not isinstance(inputs, list) or len(inputs) != len(self.filters):
            raise ConfigError("resend_with_keys needs the payload returned by this chain's encode")
        first = next((i for i, f in enumerate(self.filters) if f.stage >= KEYS), None)
        if first is None:
            return encoded
        for f in self.filters[first:]:
            f.reset_peer(ctx)
        p = inputs[first]
        for i in range(first, len(self.filters)):
            f = self.filters[i]
            inputs[i] = p
            p = f.encode(p, ctx)
            self._count(ctx, f.name, "sent", p, f.pairs_after(p))
        return Payload(p.keys, p.values, {**p.meta, "filters": list(self.names)}, list(p.frames),
                       local={"chain.inputs": inputs})

    def encode_rows(self, encoded: Payload, rows: np.ndarray, ctx: FilterContext) -> Payload:
        """Rows ``rows`` (indices into the keys as the SELECT and PRECISION stages left them) of
        the message ``encoded`` (a result of :meth:`encode` or of this method), encoded again for
        the peer of ``ctx``: a resend of part of a message to another peer after a failover.
        Only the KEYS/PACK filters run again, so residuals, sampling and rounding are not applied
        twice: what was held back stays held back, counted once.
        Raises ConfigError if ``encoded`` did not come from this chain."""
        inputs = encoded.local.get("chain.inputs")
        if not isinstance(inputs, list) or len(inputs) != len(self.filters):
            raise ConfigError("encode_rows needs the payload returned by this chain's encode")
        first = next((i for i, f in enumerate(self.filters) if f.stage >= KEYS), len(self.filters))
        src = inputs[first] if first < len(self.filters) else encoded
        meta = {k: v for k, v in src.meta.items() if k != "filters"}
        p = Payload(None if src.keys is None else src.keys[rows],
                    None if src.values is None else src.values[rows], meta, [])
        inputs = list(inputs[:first])
        for i in range(first, len(self.filters)):
            f = self.filters[i]
            inputs.append(p)
            p = f.encode(p, ctx)
            self._count(ctx, f.name, "sent", p, f.pairs_after(p))
        return Payload(p.keys, p.values, {**p.meta, "filters": list(self.names)}, list(p.frames),
                       local={"chain.inputs": inputs})

    def selected_keys(self, encoded: Payload) -> np.ndarray | None:
        """The keys the message ``encoded`` carries after its SELECT and PRECISION stages (the
        rows :meth:`encode_rows` indexes), or None if it carries none."""
        inputs = encoded.local.get("chain.inputs")
        first = next((i for i, f in enumerate(self.filters) if f.stage >= KEYS), len(self.filters))
        src = inputs[first] if isinstance(inputs, list) and first < len(inputs) else encoded
        return src.keys

    def reset_peer(self, ctx: FilterContext) -> None:
        """Forget every belief about ``ctx.peer`` (call when the peer restarted)."""
        for f in self.filters:
            f.reset_peer(ctx)

    def flush(self, ctx: FilterContext) -> Payload | None:
        """Encode a message carrying every entry the filters held back for ``ctx.peer`` and
        ``ctx.table`` (e.g. SignificantlyModified residuals), or None if nothing is held back."""
        for f in self.filters:
            template = f.held_back(ctx)
            if template is not None:
                return self.encode(template, replace(ctx, flush=True))
        return None


def _safe_pairs(f: Filter, p: Payload) -> int:
    # Counting happens before validation, so a hostile header must not break it.
    try:
        return max(0, int(f.pairs_after(p)))
    except (TypeError, ValueError, AttributeError, OverflowError):
        return 0
