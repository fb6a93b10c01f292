"""TableSpec: what a named table holds and how it is updated.

Shared by workers and servers; it travels as JSON, so ``from_json`` treats its input as untrusted
and validates every field. Two specs compare equal (and hash equal) exactly when their JSON forms
are equal, which is how a server detects a conflicting redeclaration of a table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from ..errors import ConfigError, TableError
from ..filters import SELECT, parse_filters
from .admission import MAX_ADMIT_AFTER
from .init import parse_init
from .updaters import make_updater, updater_names

MAX_DIM = 1 << 24  # a 16 M-float row: one key may hold a whole tensor
MAX_NAME_LEN = 128
MAX_UPDATER_ARGS = 32
DTYPES = ("float32", "float64", "int64")
# Integer tables hold exact counts: only rules that never round, and integer initial values.
INT_DTYPES = ("int64",)


@dataclass(frozen=True)
class TableSpec:
    """Declaration of one table. Construction validates every field (TableError if invalid).

    name: table name (1..128 printable characters). dim: value columns per key.
    dtype: "float32" | "float64" | "int64" (exact counts: rule "sum" or "assign", init "zeros" or
    "constant:<integer>"). init: "zeros" | "constant:<c>" | "uniform:<a>" | "normal:<std>".
    seed: initializer seed, 0 <= seed < 2^64. updater: registered updater name.
    updater_args: keyword arguments of the updater (JSON numbers; do not mutate).
    sync: synchronous aggregation (handled by the server loop, not the store).
    push_filters, pull_filters: filter chains applied to pushes / pulls of this table (specs of
    pserver.filters.parse_filters, e.g. "kkt:1,key_cache,compress"; "" = none), stored in
    canonical form so that nodes with different settings conflict at declare time.
    admit_after: a key gets a row on its admit_after-th push (0 or 1: at once); admit_prob: or
    with this probability, decided per key by a hash (1.0: always); before that a pull reads
    the initial values and pushes are dropped (pserver.store.admission). ttl_steps / ttl_seconds:
    rows not pushed during the last ttl_steps pushes to the table on their server, or for
    ttl_seconds, are evicted by their master (0: never; pserver.store.eviction).
    """

    name: str = "default"
    dim: int = 1
    dtype: str = "float32"
    init: str = "zeros"
    seed: int = 0
    updater: str = "sum"
    updater_args: dict = field(default_factory=dict)
    sync: bool = False
    push_filters: str = ""
    pull_filters: str = ""
    admit_after: int = 0
    admit_prob: float = 1.0
    ttl_steps: int = 0
    ttl_seconds: float = 0.0

    def __post_init__(self) -> None:
        _check_str("name", self.name)
        if not 1 <= len(self.name) <= MAX_NAME_LEN or not self.name.isprintable():
            raise TableError(f"table name must be 1..{MAX_NAME_LEN} printable characters, "
                             f"got {self.name!r}")
        _check_int("dim", self.dim, 1, MAX_DIM)
        _check_str("dtype", self.dtype)
        if self.dtype not in DTYPES:
            raise TableError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        parse_init(self.init)
        _check_int("seed", self.seed, 0, (1 << 64) - 1)
        _check_str("updater", self.updater)
        if not isinstance(self.updater_args, dict):
            raise TableError(f"updater_args must be a JSON object, got {self.updater_args!r}")
        if len(self.updater_args) > MAX_UPDATER_ARGS:
            raise TableError(f"updater_args has more than {MAX_UPDATER_ARGS} entries")
        for k, v in self.updater_args.items():
            if not isinstance(k, str):
                raise TableError(f"updater_args keys must be strings, got {k!r}")
            if not _is_finite_number(v):
                raise TableError(f"updater_args[{k!r}] must be a finite number, got {v!r}")
        if not isinstance(self.sync, bool):
            raise TableError(f"sync must be true or false, got {self.sync!r}")
        _check_churn(self)
        # A private copy: the caller's dict may change later, the spec must not.
        object.__setattr__(self, "updater_args", dict(self.updater_args))
        # Resolve the rule where it is registered (built-ins everywhere; a user rule may live only in
        # the servers' plugin): a worker that does not know it learns the width from the servers.
        try:
            factor = make_updater(self.updater, self.updater_args).push_factor
        except TableError:
            if self.updater in updater_names():
                raise  # a known rule with bad arguments
            factor = None
        object.__setattr__(self, "_push_factor", factor)
        if self.dtype in INT_DTYPES:
            _check_integer_table(self)
        for name in ("push_filters", "pull_filters"):
            object.__setattr__(self, name, _canonical_filters(name, getattr(self, name)))

    @property
    def push_cols(self) -> int:
        """Value columns a worker pushes per key: dim * updater.push_factor. TableError when the
        update rule is not registered in this process (the server then tells, see with_push_factor)."""
        if self._push_factor is None:
            raise TableError(f"update rule {self.updater!r} is not registered here: import the module "
                             f"that registers it (pserver.register_updater) or declare the table "
                             f"through kv.declare_table, which asks the servers")
        return self.dim * self._push_factor

    @property
    def push_factor(self) -> int | None:
        return self._push_factor

    def with_push_factor(self, factor: int) -> TableSpec:
        """This spec with the push width of a rule registered only on the servers."""
        if self._push_factor is None:
            object.__setattr__(self, "_push_factor", int(factor))
        return self

    def to_json(self) -> dict:
        """A JSON-ready dict of every field (from_json(to_json()) == self)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["updater_args"] = dict(self.updater_args)
        return d

    @classmethod
    def from_json(cls, d: dict) -> TableSpec:
        """Parse an untrusted JSON object. Missing fields take their defaults; unknown fields,
        wrong types and invalid values raise TableError."""
        if not isinstance(d, dict):
            raise TableError(f"a table spec must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise TableError(f"unknown table spec field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def _key(self) -> tuple:
        return (self.name, self.dim, self.dtype, self.init, self.seed, self.updater,
                tuple(sorted(self.updater_args.items())), self.sync, self.push_filters,
                self.pull_filters, self.admit_after, self.admit_prob, self.ttl_steps,
                self.ttl_seconds)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TableSpec):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


def _canonical_filters(name: str, text: object) -> str:
    """The canonical spec of a filter chain field (TableError if invalid). Pull chains also run on
    the replies, which carry no keys, so filters that select pairs (kkt, significant, random_skip)
    are refused there."""
    _check_str(name, text)
    if not text:
        return ""
    try:
        chain = parse_filters(text)
    except ConfigError as e:
        raise TableError(f"table spec field {name!r}: {e}") from None
    if name == "pull_filters" and any(f.stage == SELECT for f in chain.filters):
        raise TableError(f"pull_filters {text!r}: kkt, significant and random_skip select pairs of "
                         "pushes and cannot filter pulls; put them in push_filters")
    return ",".join(chain.names)


def _check_churn(spec: TableSpec) -> None:
    """TableError unless the admission and eviction fields are valid; one admission rule only."""
    _check_int("admit_after", spec.admit_after, 0, MAX_ADMIT_AFTER)
    _check_int("ttl_steps", spec.ttl_steps, 0, (1 << 62))
    for name in ("admit_prob", "ttl_seconds"):
        if not _is_finite_number(getattr(spec, name)):
            raise TableError(f"table spec field {name!r} must be a finite number, "
                             f"got {getattr(spec, name)!r}")
    if not 0.0 < spec.admit_prob <= 1.0:
        raise TableError(f"admit_prob must be in (0, 1], got {spec.admit_prob}")
    if spec.ttl_seconds < 0:
        raise TableError(f"ttl_seconds must be >= 0 (0 = rows never expire), got {spec.ttl_seconds}")
    if spec.admit_after > 1 and spec.admit_prob < 1.0:
        raise TableError("give one admission rule: admit_after (a row on the N-th push) or "
                         "admit_prob (a row with probability p), not both")
    object.__setattr__(spec, "admit_prob", float(spec.admit_prob))
    object.__setattr__(spec, "ttl_seconds", float(spec.ttl_seconds))


def _check_integer_table(spec: TableSpec) -> None:
    """TableError unless an integer table's rule and initial value keep every entry an exact
    integer (a rule known only to the servers is checked there, where it resolves)."""
    kind, value = parse_init(spec.init)
    if kind not in ("zeros", "constant") or value != int(value):
        raise TableError(f"an {spec.dtype} table needs init 'zeros' or 'constant:<integer>', got "
                         f"{spec.init!r}")
    if spec.updater in updater_names() and not make_updater(spec.updater,
                                                            spec.updater_args).integer_exact:
        raise TableError(f"update rule {spec.updater!r} rounds, so an {spec.dtype} table cannot use "
                         f"it; use 'sum' (counts) or 'assign', or a float dtype")


def _is_finite_number(v: object) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


def _check_str(name: str, v: object) -> None:
    if not isinstance(v, str):
        raise TableError(f"table spec field {name!r} must be a string, got {v!r}")


def _check_int(name: str, v: object, lo: int, hi: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TableError(f"table spec field {name!r} must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise TableError(f"table spec field {name!r} must be in [{lo}, {hi}], got {v}")
