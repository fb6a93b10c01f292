"""Timelines without a cluster: the Chrome-trace file, request lanes, sampling, killed writers, merge."""

from __future__ import annotations

import json
import time

import pytest

from pserver.errors import ConfigError
from pserver.trace import REQUEST_LANES, Tracer, load, merge, node_path, sampled
from pserver.wire import Message


def test_node_path_inserts_role_and_id():
    assert node_path("/t/run.json", "server", 3) == "/t/run.server-3.json"
    assert node_path("run", "worker", 7) == "run.worker-7.json"


def test_overlapping_requests_get_their_own_lanes(tmp_path):
    t = Tracer(str(tmp_path / "t.json"), "worker 1")
    t.request("push", 10.0, 2.0, 1)   # [10, 12]
    t.request("pull", 11.0, 0.5, 2)   # overlaps: lane 2
    t.request("push", 12.5, 1.0, 3)   # after the first: lane 1 again
    t.span("wait", 10.0, 3.0, args={"ts": 1})
    t.close()
    t.close()
    events = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    assert events[0]["ph"] == "M" and events[0]["args"]["name"] == "worker 1"
    x = {e["args"]["ts"]: e for e in events if e["ph"] == "X" and e["name"] != "wait"}
    assert x[1]["tid"] == x[3]["tid"] != x[2]["tid"]
    assert x[1]["dur"] == pytest.approx(2e6) and x[3]["ts"] - x[1]["ts"] == pytest.approx(2.5e6)
    t.span("late", 1.0, 1.0)  # after close: ignored


def test_lanes_are_bounded(tmp_path):
    t = Tracer(str(tmp_path / "t.json"), "w")
    for i in range(REQUEST_LANES + 10):
        t.request("pull", 1.0, 100.0, i)
    t.close()
    tids = {e["tid"] for e in load(str(tmp_path / "t.json")) if e["ph"] == "X"}
    assert len(tids) == REQUEST_LANES


def test_sampled_records_the_first_request_then_one_in_every(tmp_path):
    t = Tracer(str(tmp_path / "s.json"), "server 1")
    seen = []
    handle = sampled(lambda i, m, r: seen.append(m.ts), t, every=4)
    for ts in range(1, 10):
        handle(b"w", Message("push", ts), "worker")
    t.close()
    assert seen == list(range(1, 10))
    assert [e["args"]["ts"] for e in load(str(tmp_path / "s.json")) if e["ph"] == "X"] == [1, 5, 9]


def test_a_killed_writers_file_still_loads_and_merges(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    ta, tb = Tracer(str(a), "worker 1"), Tracer(str(b), "server 2")
    now = time.monotonic()
    ta.span("wait", now, 0.1)
    tb.span("push", now, 0.01, 1)
    tb.span("pull", now, 0.01, 1)
    ta.close()
    tb._file.flush()  # never closed: as if killed
    text = b.read_text()
    assert len(load(str(b))) == 3
    b.write_text(text[:-10])  # killed inside an event: that event is lost, the others load
    assert [e["name"] for e in load(str(b))] == ["process_name", "push"]
    assert merge([str(a), str(b)], str(tmp_path / "all.json")) == 4
    merged = json.loads((tmp_path / "all.json").read_text())["traceEvents"]
    assert {e["pid"] for e in merged} == {e["pid"] for e in load(str(a)) + load(str(b))}
    (tmp_path / "bad.json").write_text("not a trace")
    with pytest.raises(ConfigError, match="not a Chrome trace"):
        load(str(tmp_path / "bad.json"))
    with pytest.raises(ConfigError, match="cannot read"):
        load(str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="cannot write"):
        Tracer(str(tmp_path / "no" / "dir.json"), "w")


def test_a_tracer_that_cannot_write_closes_without_raising(tmp_path, caplog):
    t = Tracer(str(tmp_path / "t.json"), "w")

    class Full:
        closed = False

        def write(self, _):
            raise OSError(28, "No space left on device")

        def close(self):
            self.closed = True

    t._file = Full()
    t.span("push", 1.0, 0.1)  # the request being traced is not failed by its trace
    assert t._file.closed and "No space left" in caplog.text
    t.span("push", 2.0, 0.1)
    t.close()
