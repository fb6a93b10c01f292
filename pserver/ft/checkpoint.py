"""Checkpoints: snapshots of every table to a directory, and restore into a cluster of any size.

``DIR/LATEST`` names the last committed ``DIR/ckpt-NNNNNN/`` (manifest.json, and per server
shard-<id>.npz with the keys it mastered and shard-<id>.json with its specs and range clocks);
``DIR/ckpt-NNNNNN.partial/`` is one being written, never loaded. Every step is atomic, so a crash
leaves LATEST naming the previous complete checkpoint; readers check sizes and sha256. Restore keeps
the keys a server of the new ring must hold. File I/O only: the scheduler's round is in
:mod:`pserver.ft.checkpoint_round`. Protocol and rationale: docs/fault-tolerance.md, "Checkpoints".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .. import security
from ..consistency.clock import RangeClock
from ..errors import CheckpointError, PServerError
from ..progress import bar
from ..protocol import DIR, FILES, KEY_COUNT, RING, SECONDS, SERVER
from ..ring import KeyRing
from ..store.spec import TableSpec

if TYPE_CHECKING:
    from ..membership.view import ClusterView
    from ..store.table import Table

log = logging.getLogger(__name__)

# Only the scheduler's credentials may start a checkpoint (the CLI uses the scheduler's key, as for
# shutdown), and only the scheduler may tell a server to write its shard.
security.allow_op("checkpoint", "scheduler")

FORMAT = "pserver.checkpoint/1"
SHARD_FORMAT = "pserver.checkpoint-shard/1"
LATEST = "LATEST"
MANIFEST = "manifest.json"
PARTIAL = ".partial"
_NAME = re.compile(r"^ckpt-(\d{6,})$")
_ENTRY = re.compile(r"^ckpt-(\d{6,})(\.partial)?$")
_SHARD_FILE = re.compile(r"^shard-\d+\.(npz|json)$")
_CHUNK_BYTES = 64 << 20      # values are streamed from shard files in chunks of about this size
# Test hook: seconds a server sleeps half-way through writing its shard (so tests can kill it there).
DELAY_ENV = "PSERVER_TEST_CHECKPOINT_DELAY"


# -- writing ------------------------------------------------------------------------------------
class _HashingWriter:
    """A write-only stream that hashes and counts what it passes to ``f`` (no seeks: zipfile then
    writes data descriptors, so the whole file is hashed in the one pass that writes it)."""

    def __init__(self, f) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: str, data: bytes) -> dict:
    """Write ``data`` to ``path`` via a fsynced temporary file; returns {"bytes", "sha256"}."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def begin(directory: str) -> tuple[str, str]:
    """Create DIR (if needed) and the next checkpoint's ``DIR/<name>.partial``; returns (name, path).

    Names are ``ckpt-NNNNNN`` numbered after every checkpoint (complete or not) already in DIR.
    Raises OSError if DIR cannot be created or written.
    """
    os.makedirs(directory, exist_ok=True)
    seqs = [int(m.group(1)) for e in os.listdir(directory) if (m := _ENTRY.match(e))]
    name = f"ckpt-{max(seqs, default=0) + 1:06d}"
    path = os.path.join(directory, name + PARTIAL)
    os.mkdir(path)
    return name, path


def write_shard(partial_dir: str, server_id: int, tables: dict[str, Table],
                clocks: dict[str, RangeClock], ring: KeyRing) -> dict:
    """Write one server's shard into ``partial_dir`` (made by :func:`begin`): for every table the
    keys this server masters under ``ring`` (``ring.owner_of(keys) == server_id``; replicas it holds
    are left to their masters' shards) with values and optimizer state, as ``shard-<id>.npz``, and
    its table specs and range clocks as ``shard-<id>.json``.

    Returns the report the scheduler puts in the manifest: {"server", "files": {name: {"bytes",
    "sha256"}}, "keys": {table: n}, "seconds"}. Raises CheckpointError if ``partial_dir`` is not a
    checkpoint being written (it was aborted and collected, or a wrong path), OSError on I/O errors.
    """
    start = time.monotonic()
    partial_dir = _check_partial_dir(partial_dir)
    data_name, meta_name = f"shard-{server_id}.npz", f"shard-{server_id}.json"
    entries, counts = [], {}
    tmp = os.path.join(partial_dir, data_name + ".tmp")
    shown = bar(len(tables), f"checkpoint {os.path.basename(partial_dir)}", "table")
    with open(tmp, "wb") as f:
        w = _HashingWriter(f)
        with zipfile.ZipFile(w, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for i, (name, table) in enumerate(sorted(tables.items())):
                keys, values, state = table.items()
                if len(keys):
                    mine = ring.owner_of(keys) == server_id
                    keys, values = keys[mine], values[mine]
                    state = state[mine] if state is not None else None
                member = f"t{i}"
                arrays = {"keys": keys, "values": values}
                if state is not None:
                    arrays["state"] = state
                for part, arr in arrays.items():
                    with zf.open(f"{member}_{part}.npy", "w", force_zip64=True) as out:
                        np.lib.format.write_array(out, np.ascontiguousarray(arr), allow_pickle=False)
                clock = clocks.get(name)
                entries.append({"name": name, "member": member, "keys": len(keys),
                                "state": state is not None, "spec": table.spec.to_json(),
                                "clock": clock.to_json() if clock is not None else None})
                counts[name] = len(keys)
                shown.update(1)
        f.flush()
        os.fsync(f.fileno())
    delay = float(os.environ.get(DELAY_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)
    shown.close()
    os.replace(tmp, os.path.join(partial_dir, data_name))
    files = {data_name: {"bytes": w.size, "sha256": w.sha.hexdigest()}}
    manifest = {"format": SHARD_FORMAT, "server": server_id, "ring": ring.to_json(),
                "tables": entries}
    files[meta_name] = _write_atomic(os.path.join(partial_dir, meta_name),
                                     json.dumps(manifest, separators=(",", ":")).encode())
    _fsync_dir(partial_dir)
    seconds = time.monotonic() - start
    log.info("checkpoint shard of server %d: %d keys in %d tables, %d bytes, %.3f s", server_id,
             sum(counts.values()), len(counts), w.size, seconds)
    return {SERVER: server_id, FILES: files, KEY_COUNT: counts, SECONDS: round(seconds, 4)}


def handle_write(meta: dict, server_id: int, tables: dict[str, Table],
                 clocks: dict[str, RangeClock]) -> dict:
    """A server's handler of the scheduler's ``checkpoint_write`` request (meta: "dir" = the
    ``.partial`` directory, "ring" = the ring whose masters write). Returns the shard report."""
    try:
        ring = KeyRing.from_json(meta[RING])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint_write needs the key ring: {e}") from None
    return write_shard(str(meta.get(DIR, "")), server_id, tables, clocks, ring)


def _check_partial_dir(path: str) -> str:
    if not path.endswith(PARTIAL) or not _NAME.match(os.path.basename(path)[:-len(PARTIAL)]):
        raise CheckpointError(f"{path!r} is not a checkpoint being written (ckpt-NNNNNN.partial)")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path} does not exist on this server: it was "
                              f"aborted, or DIR is not on a file system shared with the scheduler")
    return path


def commit(directory: str, name: str, reports: list[dict], ring: KeyRing, *,
           servers: list[dict] | None = None, next_id: int = 0, keep: int = 0) -> dict:
    """Make ``DIR/<name>.partial`` the latest checkpoint: check every reported shard file is there
    with its reported size, write manifest.json, rename to ``DIR/<name>``, replace LATEST (each step
    atomic and fsynced), then :func:`collect_garbage` when ``keep`` > 0. Returns the manifest.

    ``next_id``: the scheduler's next node id; a restored cluster numbers its nodes from there, so
    the restored range clocks never mistake a new node for an old one.
    Raises CheckpointError if a shard is missing or its size differs, or table specs conflict.
    """
    partial = os.path.join(directory, name + PARTIAL)
    tables: dict[str, dict] = {}
    total_keys = total_bytes = 0
    for rep in reports:
        for fname, info in rep["files"].items():
            path = os.path.join(partial, fname)
            size = os.path.getsize(path) if os.path.isfile(path) else -1
            if not _SHARD_FILE.match(fname) or size != info["bytes"]:
                raise CheckpointError(f"shard file {path} is missing or has {size} bytes, but its "
                                      f"server reported {info['bytes']}")
            total_bytes += size
        shard_manifest = _read_json(os.path.join(partial, f"shard-{rep['server']}.json"))
        for entry in shard_manifest["tables"]:
            spec = entry["spec"]
            if tables.setdefault(entry["name"], spec) != spec:
                raise CheckpointError(f"table {entry['name']!r} has different specs on different "
                                      f"servers: {tables[entry['name']]} and {spec}")
        total_keys += sum(rep["keys"].values())
    now = time.time()
    manifest = {"format": FORMAT, "name": name, "time": now,
                "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
                "ring": ring.to_json(), "servers": servers or [], "next_id": int(next_id),
                "tables": tables, "keys": total_keys, "bytes": total_bytes,
                "shards": [{"server": r["server"], "files": r["files"], "keys": r["keys"]}
                           for r in sorted(reports, key=lambda r: r["server"])]}
    _write_atomic(os.path.join(partial, MANIFEST), json.dumps(manifest, indent=1).encode())
    _fsync_dir(partial)
    final = os.path.join(directory, name)
    if os.path.exists(final):
        raise CheckpointError(f"{final} already exists: is another scheduler writing to {directory}?")
    os.rename(partial, final)
    _fsync_dir(directory)
    _write_atomic(os.path.join(directory, LATEST), (name + "\n").encode())
    _fsync_dir(directory)
    if keep > 0:
        collect_garbage(directory, keep)
    return manifest


def collect_garbage(directory: str, keep: int) -> list[str]:
    """Delete ``.partial`` directories older than the latest checkpoint and all but the newest
    ``keep`` (>= 1) complete ones; the one LATEST names is always kept. Returns what was removed.
    Only entries named like checkpoints are touched."""
    current = latest(directory)
    cur_seq = int(current[5:]) if current else -1
    done, partial = [], []
    for e in os.listdir(directory):
        m = _ENTRY.match(e)
        if m:
            (partial if m.group(2) else done).append((int(m.group(1)), e))
    doomed = [e for seq, e in partial if seq < cur_seq]
    doomed += [e for _, e in sorted(done)[:-max(1, keep)] if e != current]
    for e in doomed:
        shutil.rmtree(os.path.join(directory, e), ignore_errors=True)
    if doomed:
        log.info("removed old checkpoints %s from %s", doomed, directory)
    return doomed


# -- reading ------------------------------------------------------------------------------------
def latest(directory: str) -> str | None:
    """Name of the last committed checkpoint in DIR, or None if there is none."""
    try:
        with open(os.path.join(directory, LATEST)) as f:
            name = f.read().strip()
    except FileNotFoundError:
        return None
    if not _NAME.match(name):
        raise CheckpointError(f"{os.path.join(directory, LATEST)} holds {name[:80]!r}, not a "
                              f"checkpoint name")
    return name


def resolve(path: str) -> tuple[str, str | None]:
    """A checkpoint given as DIR (its latest: name None) or as DIR/ckpt-NNNNNN (that one) ->
    (DIR, name). Paths are made absolute."""
    path = os.path.abspath(path)
    if _NAME.match(os.path.basename(path)) and os.path.isfile(os.path.join(path, MANIFEST)):
        return os.path.dirname(path), os.path.basename(path)
    return path, None


def _read_json(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return obj


def read_manifest(directory: str, name: str | None = None) -> dict:
    """The validated manifest of checkpoint ``name`` (default: LATEST) in DIR, after checking that
    every shard file exists with the size the manifest records (sha256 is checked on load).
    Raises CheckpointError naming what is missing or malformed."""
    name = name or latest(directory)
    if name is None:
        raise CheckpointError(f"no checkpoint in {directory} (no LATEST file): write one with "
                              f"`pserver checkpoint` or start the scheduler with --checkpoint-dir")
    if not _NAME.match(name):
        raise CheckpointError(f"{name!r} is not a checkpoint name (ckpt-NNNNNN)")
    path = os.path.join(directory, name)
    m = _read_json(os.path.join(path, MANIFEST))
    try:
        if m.get("format") != FORMAT or m.get("name") != name:
            raise ValueError(f"format {m.get('format')!r} / name {m.get('name')!r}")
        KeyRing.from_json(m["ring"])
        for spec in m["tables"].values():
            TableSpec.from_json(spec)
        int(m["next_id"])
        for shard in m["shards"]:
            int(shard["server"])
            for fname, info in shard["files"].items():
                if not _SHARD_FILE.match(fname):  # never a path: a manifest cannot point outside
                    raise ValueError(f"bad shard file name {fname!r}")
                file = os.path.join(path, fname)
                if not os.path.isfile(file):
                    raise CheckpointError(
                        f"checkpoint {path} is incomplete: shard file {fname} of server "
                        f"{shard['server']} is missing ({file}); copy it back, or restore an older "
                        f"checkpoint with --restore {os.path.join(directory, 'ckpt-NNNNNN')}")
                size = os.path.getsize(file)
                if size != int(info["bytes"]):
                    raise ValueError(f"{fname} has {size} bytes, the manifest says {info['bytes']}")
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, PServerError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged: {e}") from None
    return m


def _verify(path: str, info: dict) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    if h.hexdigest() != info["sha256"]:
        raise CheckpointError(f"{path} is corrupt: its sha256 differs from the manifest's; restore "
                              f"an older checkpoint instead (--restore DIR/ckpt-NNNNNN)")


def _read_array(zf: zipfile.ZipFile, member: str, dtype: np.dtype, cols: int | None,
                mask: np.ndarray | None = None) -> np.ndarray:
    """Read a .npy member (1-D, or 2-D with ``cols`` columns) of dtype ``dtype``; with ``mask``
    only the masked rows, streamed in chunks so memory stays near the rows kept."""
    with zf.open(member + ".npy") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, have = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, have = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
        want = (shape[0],) if cols is None else (shape[0], cols)
        if have != dtype or fortran or shape != want:
            raise ValueError(f"{member} is {have} {shape}, expected {dtype} {want}")
        row = dtype.itemsize * (cols or 1)
        n = shape[0]
        step = max(1, _CHUNK_BYTES // max(row, 1))
        out = []
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            if mask is not None and not mask[lo:hi].any():
                f.seek((hi - lo) * row, 1)
                continue
            buf = f.read((hi - lo) * row)
            if len(buf) != (hi - lo) * row:
                raise ValueError(f"{member} is truncated")
            chunk = np.frombuffer(buf, dtype=dtype).reshape((hi - lo, *want[1:]))
            out.append(chunk if mask is None else chunk[mask[lo:hi]])
        if not out:
            return np.empty((0, *want[1:]), dtype=dtype)
        return np.concatenate(out) if len(out) > 1 else out[0].copy()


@dataclass
class RestoredTable:
    """What one server restores of one table: sorted unique keys, values (n, dim), optimizer
    state (n, state_cols) or None, and the range clock merged from every shard."""

    spec: TableSpec
    keys: np.ndarray
    values: np.ndarray
    state: np.ndarray | None
    clock: RangeClock = field(default_factory=RangeClock)


def load(directory: str, holds: Callable[[np.ndarray], np.ndarray], name: str | None = None
         ) -> tuple[dict, dict[str, RestoredTable]]:
    """Read checkpoint ``name`` (default: LATEST) of DIR for one server of a new ring: from every
    shard, the keys for which ``holds(keys)`` (a vectorised bool mask) is True - its master keys,
    and its replica keys if it holds replicas. Every table of the checkpoint is returned, empty if
    this server holds none of its keys. Returns (manifest, {table name: RestoredTable}).

    Each file's sha256 is verified before use. Raises CheckpointError on a missing, damaged or
    inconsistent checkpoint (nothing is returned partially).
    """
    m = read_manifest(directory, name)
    path = os.path.join(directory, m["name"])
    specs = {n: TableSpec.from_json(s) for n, s in m["tables"].items()}
    parts: dict[str, list] = {n: [] for n in specs}
    clocks = {n: RangeClock() for n in specs}
    shown = bar(len(m["shards"]), f"restoring {m['name']}", "shard")
    for shard in m["shards"]:
        shown.update(1)
        sid = int(shard["server"])
        for fname, info in shard["files"].items():
            _verify(os.path.join(path, fname), info)
        shard_manifest = _read_json(os.path.join(path, f"shard-{sid}.json"))
        data = os.path.join(path, f"shard-{sid}.npz")
        try:
            with zipfile.ZipFile(data) as zf:
                for entry in shard_manifest["tables"]:
                    spec = specs[entry["name"]]
                    if entry.get("clock"):
                        clocks[spec.name].merge(RangeClock.from_json(entry["clock"]))
                    keys = _read_array(zf, f"{entry['member']}_keys", np.dtype(np.uint64), None)
                    if not len(keys):
                        continue
                    mask = np.asarray(holds(keys), dtype=bool)
                    if mask.shape != keys.shape:
                        raise ValueError(f"holds() returned shape {mask.shape} for {len(keys)} keys")
                    dt = np.dtype(spec.dtype)
                    values = _read_array(zf, f"{entry['member']}_values", dt, spec.dim, mask)
                    state = None
                    if entry["state"]:
                        cols = _state_cols(zf, f"{entry['member']}_state")
                        state = _read_array(zf, f"{entry['member']}_state", dt, cols, mask)
                    parts[spec.name].append((keys[mask], values, state))
        except (KeyError, TypeError, ValueError, OSError, zipfile.BadZipFile, PServerError) as e:
            raise CheckpointError(f"cannot read shard {data}: {e}") from None
    shown.close()
    out = {}
    for tname, spec in specs.items():
        out[tname] = _assemble(spec, parts[tname], clocks[tname], path)
    return m, out


def _state_cols(zf: zipfile.ZipFile, member: str) -> int:
    with zf.open(member + ".npy") as f:
        version = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape = read(f)[0]
    if len(shape) != 2:
        raise ValueError(f"{member} is not 2-D")
    return int(shape[1])


def _assemble(spec: TableSpec, parts: list, clock: RangeClock, path: str) -> RestoredTable:
    dt = np.dtype(spec.dtype)
    if not parts:
        return RestoredTable(spec, np.empty(0, np.uint64), np.empty((0, spec.dim), dt), None, clock)
    keys = np.concatenate([p[0] for p in parts])
    values = np.concatenate([p[1] for p in parts])
    with_state = [p[2] is not None for p in parts]
    if any(with_state) and not all(with_state):
        raise CheckpointError(f"table {spec.name!r} in {path} has optimizer state in some shards "
                              f"only")
    state = np.concatenate([p[2] for p in parts]) if all(with_state) else None
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    if len(keys) > 1 and not (keys[1:] > keys[:-1]).all():
        raise CheckpointError(f"table {spec.name!r} in {path}: a key appears in two shards")
    return RestoredTable(spec, keys, values[order], state[order] if state is not None else None,
                         clock)


def holder_mask(ring: KeyRing, server_id: int, k: int = 0) -> Callable[[np.ndarray], np.ndarray]:
    """``holds`` for :func:`load`: keys that ``server_id`` masters under ``ring``, or (k > 0) also
    holds as one of the k replicas (placement of :meth:`KeyRing.holders`)."""
    if k <= 0 or len(ring.servers) == 1:
        return lambda keys: ring.owner_of(keys) == server_id
    return lambda keys: (ring.holders(keys, k) == server_id).any(axis=1)


def restore_for(view: ClusterView, server_id: int, slot_cache: int | None = None
                ) -> tuple[dict[str, Table], dict[str, RangeClock]]:
    """A server's restore at start-up: if the scheduler runs with ``--restore`` and this server was
    part of the starting cluster (view.settings["restore"]), the tables and range clocks it must
    hold under the view's ring (masters and, with replication k = settings["replication"], replicas);
    else ({}, {}). Raises CheckpointError if the checkpoint cannot be read. ``slot_cache``: the
    tables' slot cache bound in bytes (default: the store's)."""
    setting = view.settings.get("restore")
    if not setting or server_id not in setting.get("servers", ()) or view.ring is None:
        return {}, {}
    from ..store.table import SLOT_CACHE_BYTES, Table  # numba: imported by servers only

    start = time.monotonic()
    k = int(view.settings.get("replication", 0))
    _, restored = load(setting["dir"], holder_mask(view.ring, server_id, k), setting["name"])
    tables, clocks = {}, {}
    for tname, r in restored.items():
        table = Table(r.spec, capacity=max(1024, len(r.keys)),
                      slot_cache=SLOT_CACHE_BYTES if slot_cache is None else slot_cache)
        if len(r.keys):
            table.load(r.keys, r.values, r.state)
        tables[tname], clocks[tname] = table, r.clock
    log.info("restored %d keys of %d tables from %s/%s in %.2f s", sum(len(t) for t in
             tables.values()), len(tables), setting["dir"], setting["name"], time.monotonic() - start)
    return tables, clocks
