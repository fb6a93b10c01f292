"""Export of a table's live rows for serving without pserver: a sorted uint64 ID array and the
matching row matrix as plain numpy files (``ids.npy``, ``rows.npy``; ``export.json`` says what they
hold), which numpy alone reads. `pserver export TABLE --out DIR [--seen-within T]`.
docs/torch.md, "Export"."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import ConfigError, PServerError, TableError
from ..protocol import TABLES
from ..store.spec import TableSpec
from ..wire import Message

IDS_FILE, ROWS_FILE, META_FILE = "ids.npy", "rows.npy", "export.json"
ID_FORMS = ("embedding", "keys")

# The inverse of splitmix64's finaliser (pserver.ring.mix64): odd multipliers are invertible
# modulo 2^64, and x ^ (x >> s) is undone by xoring the shifts back in.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1_INV = np.uint64(pow(0xBF58476D1CE4E5B9, -1, 1 << 64))
_M2_INV = np.uint64(pow(0x94D049BB133111EB, -1, 1 << 64))


def _unshift(z: np.ndarray, s: int) -> np.ndarray:
    out = z.copy()
    shift = s
    while shift < 64:
        out ^= z >> np.uint64(shift)
        shift += s
    return out


def ids_of_keys(keys: np.ndarray) -> np.ndarray:
    """The IDs (as uint64) whose keys pserver.torch.ids_to_keys made ``keys`` (inverse mix64)."""
    with np.errstate(over="ignore"):
        z = _unshift(np.asarray(keys, np.uint64), 31) * _M2_INV
        z = _unshift(z, 27) * _M1_INV
        return _unshift(z, 30) - _GOLDEN


def export_table(kv, table: str, out: str | Path, seen_within: int | None = None,
                 ids: str = "embedding") -> dict:
    """Write the live rows of ``table`` (every row, or with ``seen_within`` T those pushed during
    the table's last T pushes on their server) to directory ``out``: ids.npy (sorted uint64),
    rows.npy ((n, dim), the table's dtype), export.json. ``ids``: "embedding" writes the IDs
    given to pserver.torch modules, "keys" the table's keys. ``kv``: a KVWorker that declared
    the table. Returns what export.json holds.

    Raises:
        ConfigError: an unknown ``ids`` form, or ``out`` exists and is not a directory.
        TableError: the table is not declared here, or (with seen_within) tracks no usage.
        PServerError: as KVWorker.pull_range raises.
    """
    if ids not in ID_FORMS:
        raise ConfigError(f"ids must be one of {ID_FORMS}, got {ids!r}")
    keys, rows = kv.pull_range(table=table, seen_within=seen_within)
    first = ids_of_keys(keys) if ids == "embedding" else np.asarray(keys, np.uint64)
    order = np.argsort(first, kind="stable")
    rows = np.asarray(rows).reshape(len(first), -1)[order]
    meta = {"table": table, "rows": len(first), "dim": int(rows.shape[1]),
            "dtype": str(rows.dtype), "ids": ids, "seen_within": seen_within}
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / IDS_FILE, first[order])
    np.save(path / ROWS_FILE, np.ascontiguousarray(rows))
    (path / META_FILE).write_text(json.dumps(meta, indent=1))
    return meta


def load_exported(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids sorted uint64, rows (n, dim)) of an export directory; numpy only, no pickles.

    Raises ConfigError if the files are missing or do not match."""
    path = Path(path)
    try:
        ids = np.load(path / IDS_FILE, allow_pickle=False)
        rows = np.load(path / ROWS_FILE, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not a table export (ids.npy, rows.npy): {e}") from None
    if ids.dtype != np.uint64 or ids.ndim != 1 or rows.ndim != 2 or len(rows) != len(ids):
        raise ConfigError(f"{path}: ids.npy must be 1-D uint64 and rows.npy (len(ids), dim)")
    if len(ids) > 1 and not (ids[1:] > ids[:-1]).all():
        raise ConfigError(f"{path}: ids.npy is not sorted and unique")
    return ids, rows


def server_stats(kv, timeout: float = 10.0) -> list[dict]:
    """The "stats" of every live server (per table: keys, bytes, budget_bytes, rows_admitted,
    rows_evicted, pushes_dropped, spec), asked over a link of this process's own.

    Raises PServerError if a server does not answer within ``timeout`` seconds."""
    out = []
    for node in kv.membership.view.role_nodes("server"):
        link = kv.transport.dealer_link(node.host, node.port, "server")
        try:
            link.send(Message("stats", 1))
            if not link.poll(timeout):
                raise PServerError(f"server {node.id} did not answer within {timeout} s")
            _, body = link.recv()
            out.append(kv.transport.decode_body(body)[0].meta)
        finally:
            link.close()
    return out


def server_table_spec(kv, table: str) -> TableSpec:
    """The spec of ``table`` as the servers hold it, so that a process that did not declare the
    table can read it. Raises TableError if the servers do not hold it; as server_stats."""
    for stats in server_stats(kv):
        spec = stats.get(TABLES, {}).get(table, {}).get("spec")
        if spec is not None:
            return TableSpec.from_json(spec)
    raise TableError(f"table {table!r} is not declared on the servers")


def cmd_export(args) -> int:
    """`pserver export TABLE --out DIR [--seen-within T] [--ids keys]`: joins the cluster as a
    read-only worker, writes the export, prints what export.json holds."""
    from .. import KVWorker

    cfg = args.make_config(args) if args.make_config is not None else None
    with KVWorker(cfg, group=args.group, read_only=True) as kv:
        spec = server_table_spec(kv, args.table)
        d = spec.to_json()
        d.pop("name")
        kv.declare_table(args.table, pushes=False, **d)
        meta = export_table(kv, args.table, args.out, args.seen_within, args.ids)
    print(json.dumps(meta))
    return 0


def register(sub, node_settings=None, make_config=None) -> None:
    """Add `pserver export` to the CLI's subcommands. ``node_settings(parser)`` adds the flags of
    the PSERVER_* settings, ``make_config(args)`` reads them (the shell's; None: the environment)."""
    s = sub.add_parser("export", help="write a table's live rows as numpy files for serving",
                       description="Write a table's live rows (all, or those pushed recently) as "
                                   "ids.npy (sorted uint64) and rows.npy, which numpy alone reads "
                                   "(docs/torch.md, \"Export for serving\").")
    if node_settings is not None:
        node_settings(s)
    s.add_argument("table")
    s.add_argument("--out", required=True, help="directory for ids.npy, rows.npy, export.json")
    s.add_argument("--seen-within", type=int, metavar="T",
                   help="only rows pushed during the table's last T pushes on their server (the "
                        "table needs ttl_steps/ttl_seconds or a --max-table-bytes budget)")
    s.add_argument("--ids", choices=ID_FORMS, default="embedding",
                   help="embedding: the IDs given to pserver.torch modules (default); keys: keys")
    s.add_argument("--group", default="export", help="worker group to join (read-only)")
    s.set_defaults(fn=cmd_export, make_config=make_config)
