"""Timelines of requests in the Chrome trace event format (opens in Perfetto and chrome://tracing).

A :class:`Tracer` appends complete ("X") events to a JSON file as they happen; a node killed midway
leaves a file :func:`load` still reads. :func:`merge` joins the files of several nodes (times are
wall-clock microseconds, so they line up). How to read one: docs/observability.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .errors import ConfigError

log = logging.getLogger(__name__)

SERVER_SAMPLE = 16    # a server records one request in this many (its per-request cost stays small)
REQUEST_LANES = 64    # tracks for overlapping requests of one worker; more overlap shares the last
_LANE_TID = 1000      # tid of the first request lane (a thread's own spans use its native id)
_HEAD = '{"displayTimeUnit":"ms","traceEvents":[\n'
_TAIL = "\n]}\n"


def node_path(path: str, role: str, node_id: int) -> str:
    """The file of one node for PSERVER_TRACE=path: ``run.json`` -> ``run.worker-3.json``."""
    p = Path(path)
    return str(p.with_name(f"{p.stem}.{role}-{node_id}{p.suffix or '.json'}"))


class Tracer:
    """Writes the spans of one process to ``path`` (truncated) until :meth:`close`. Thread-safe.

    Raises:
        ConfigError: the file cannot be created (the message names it).
    """

    def __init__(self, path: str, process_name: str) -> None:
        try:
            self._file = open(path, "w")  # noqa: SIM115 - open for the tracer's life
        except OSError as e:
            raise ConfigError(f"cannot write the trace file {path!r} ({e}): set PSERVER_TRACE / "
                              f"trace= to a writable path") from None
        self.path = path
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._offset_us = (time.time() - time.monotonic()) * 1e6  # monotonic -> wall-clock us
        self._lanes: list[float] = []   # monotonic end of the last span in each request lane
        self._file.write(_HEAD)
        self._file.write(json.dumps({"ph": "M", "name": "process_name", "pid": self._pid,
                                     "tid": 0, "args": {"name": process_name}}))

    def span(self, name: str, start: float, seconds: float, tid: int | None = None,
             args: dict[str, Any] | None = None) -> None:
        """Record ``name`` from ``start`` (time.monotonic()) for ``seconds`` on thread ``tid``
        (default: the calling thread). A closed tracer ignores it; one that cannot write (disk
        full) logs the error once and closes, never raising."""
        event = (f',\n{{"ph":"X","name":"{name}","pid":{self._pid},'
                 f'"tid":{threading.get_native_id() if tid is None else tid},'
                 f'"ts":{start * 1e6 + self._offset_us:.1f},"dur":{seconds * 1e6:.1f}'
                 + (f',"args":{json.dumps(args)}}}' if args else "}"))
        with self._lock:
            if not self._file.closed:
                try:
                    self._file.write(event)
                except OSError as e:  # a full disk must not fail the request being traced
                    log.error("trace %s stopped: %s", self.path, e)
                    with contextlib.suppress(OSError):  # closes even when its flush fails
                        self._file.close()

    def request(self, name: str, start: float, seconds: float, ts: int) -> None:
        """Record request ``ts`` on the first lane free since ``start``: overlapping requests
        get tracks of their own, so the viewer never nests unrelated spans."""
        with self._lock:
            lanes = self._lanes
            lane = next((i for i, end in enumerate(lanes) if end <= start), None)
            if lane is None:
                if len(lanes) < REQUEST_LANES:
                    lanes.append(0.0)
                lane = len(lanes) - 1
            lanes[lane] = max(lanes[lane], start + seconds)
        self.span(name, start, seconds, _LANE_TID + lane, {"ts": ts})

    def close(self) -> None:
        """Finish the file (idempotent)."""
        with self._lock:
            if not self._file.closed:
                try:
                    self._file.write(_TAIL)
                    self._file.close()
                except OSError as e:
                    log.error("trace %s could not be finished: %s", self.path, e)


def sampled(handle: Callable, tracer: Tracer, every: int = SERVER_SAMPLE) -> Callable:
    """``handle(identity, msg, role)`` that records every ``every``-th call as a span named by the
    message's op (a server's request handling)."""
    count = 0
    clock = time.monotonic

    def traced(identity: bytes, msg, role):
        nonlocal count
        count += 1
        if count % every != 1 % every:  # the first request, then one in ``every``
            return handle(identity, msg, role)
        start = clock()
        try:
            return handle(identity, msg, role)
        finally:
            tracer.span(msg.op, start, clock() - start, 1, {"ts": msg.ts})

    return traced


def load(path: str) -> list[dict]:
    """The events of a trace file, also one its process never finished (killed).

    Raises:
        ConfigError: not a trace file (the message says which and why).
    """
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeError) as e:
        raise ConfigError(f"cannot read the trace file {path}: {e}") from None
    # as written, cut short after an event, or cut inside one (dropped: events end at ",\n{")
    for candidate in (text, text + _TAIL, text[:text.rfind(",\n{")] + _TAIL):
        try:
            data = json.loads(candidate)
            break
        except ValueError as e:
            error = e
    else:
        raise ConfigError(f"{path} is not a Chrome trace file: {error}")
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise ConfigError(f"{path} is not a Chrome trace file: no traceEvents list")
    return events


def merge(paths: Iterable[str], out: str) -> int:
    """Write the events of every file of ``paths`` into one trace ``out``; returns their number.

    Raises: ConfigError for a file that is not a trace (nothing is written then).
    """
    events = [e for p in paths for e in load(p)]
    with open(out, "w") as f:
        json.dump({"displayTimeUnit": "ms", "traceEvents": events}, f)
    return len(events)
