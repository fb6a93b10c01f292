"""Traffic accounting: per-node reports of bytes, messages and filter stages, and their summaries.

Each node has one :class:`~pserver.filters.Counters` (bytes, pairs and messages per message kind
and filter stage, sent and received) next to its transport's per-op byte counters;
:func:`traffic_report` packs both for ``KVWorker.stats()``, the server's "stats" op and the
heartbeats that let ``pserver status`` show every node's traffic.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..filters import Counters
    from ..transport import TrafficCounters

log = logging.getLogger(__name__)

# Ops of the data plane as a worker sees them (the rest is membership: heartbeats, barriers).
DATA_OPS_SENT = ("push", "pull", "pull_range")
DATA_OPS_RECEIVED = ("ack", "vals", "range", "error")
# A heartbeat carries at most this much traffic report (the header limit is 64 KiB).
_MAX_REPORT_BYTES = 16 << 10
# Counter stage of what a filtered message carries after the whole chain, whatever its filters.
WIRE_STAGE = "on_wire"


def traffic_report(transport: TrafficCounters, counters: Counters) -> dict[str, Any]:
    """One node's traffic: the transport's bytes/messages per op and the filter stages' bytes,
    pairs and events (``{..transport.., "filters": counters.to_json()}``)."""
    return {**transport.to_json(), "filters": counters.to_json()}


def heartbeat_reporter(transport: TrafficCounters, counters: Counters
                       ) -> Callable[[], dict[str, Any]]:
    """A callable for Membership.traffic: a compact traffic report that never raises and stays
    small enough for a heartbeat header."""

    def report() -> dict[str, Any]:
        try:
            full = traffic_report(transport, counters)
            out = {k: full[k] for k in ("bytes_sent", "bytes_received", "messages_sent",
                                        "messages_received")}
            out["sent_by_op"] = full["sent_by_op"]
            out["received_by_op"] = full["received_by_op"]
            out["filters"] = {"stages": full["filters"]["stages"]}
            if len(json.dumps(out)) > _MAX_REPORT_BYTES:
                out.pop("filters")
            return out
        except Exception:  # a heartbeat must never die of its report
            log.exception("traffic report failed")
            return {}

    return report


def data_bytes(report: dict[str, Any]) -> tuple[int, int]:
    """(bytes sent, bytes received) of a worker's report on the data plane only: requests to and
    replies from servers, without membership traffic (heartbeats, barriers)."""
    sent = sum(report.get("sent_by_op", {}).get(op, {}).get("bytes", 0) for op in DATA_OPS_SENT)
    recv = sum(report.get("received_by_op", {}).get(op, {}).get("bytes", 0)
               for op in DATA_OPS_RECEIVED)
    return int(sent), int(recv)


def stage_totals(report: dict[str, Any], kind: str, side: str = "sent") -> list[tuple[str, int, int]]:
    """[(stage, bytes, pairs)] of one message kind in a report, in filter order ("raw" first)."""
    stages = report.get("filters", {}).get("stages", {}).get(kind, {})
    return [(stage, int(c.get(f"bytes_{side}", 0)), int(c.get(f"pairs_{side}", 0)))
            for stage, c in stages.items()]


def format_traffic(view: dict[str, Any]) -> str:
    """Lines for ``pserver status``: each node's traffic as last reported on its heartbeats, and
    for filtered tables the bytes before and after the filters. "" when no node reported."""
    rows = [("ROLE", "RANK", "SENT MB", "RECV MB", "MSGS OUT", "MSGS IN", "FILTERS (raw -> wire MB)")]
    for n in sorted(view.get("nodes", []), key=lambda n: (n["role"], n["rank"])):
        t = n.get("traffic")
        if not t:
            continue
        filt = []
        for kind in ("push", "pull"):
            for side in ("sent", "received"):
                cells = {stage: b for stage, b, _ in stage_totals(t, kind, side)}
                if cells.get(WIRE_STAGE):
                    filt.append(f"{kind} {'out' if side == 'sent' else 'in'} "
                                f"{cells.get('raw', 0) / 1e6:.2f}->{cells[WIRE_STAGE] / 1e6:.2f}")
        rows.append((n["role"], str(n["rank"]), f"{t.get('bytes_sent', 0) / 1e6:.2f}",
                     f"{t.get('bytes_received', 0) / 1e6:.2f}", str(t.get("messages_sent", 0)),
                     str(t.get("messages_received", 0)), "; ".join(filt) or "-"))
    if len(rows) == 1:
        return ""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "traffic (from heartbeats):\n" + "\n".join(lines)


def traffic_row(report: dict[str, Any]) -> list[float]:
    """Four numbers of a worker's report that sum meaningfully over workers: data-plane bytes
    sent to servers, data-plane bytes received from servers (= sent by the servers to it),
    pairs pushed through filter chains before the filters, and after them."""
    sent, recv = data_bytes(report)
    stages = report.get("filters", {}).get("stages", {}).get("push", {})
    raw = stages.get("raw", {}).get("pairs_sent", 0)
    wire = stages.get(WIRE_STAGE, {}).get("pairs_sent", 0)
    return [float(sent), float(recv), float(raw), float(wire)]


def traffic_summary(row: Any) -> dict[str, int]:
    """The summed :func:`traffic_row` of all workers as a dict (for job summaries)."""
    sent, recv, raw, wire = (round(float(x)) for x in row)
    return {"workers_sent_bytes": sent, "servers_sent_bytes": recv,
            "filtered_push_pairs_raw": raw, "filtered_push_pairs_sent": wire}


def format_traffic_summary(t: dict[str, int]) -> str:
    """One line for a job summary from :func:`traffic_summary`."""
    line = (f"  data traffic: workers sent {t['workers_sent_bytes'] / 1e6:,.2f} MB, servers sent "
            f"{t['servers_sent_bytes'] / 1e6:,.2f} MB")
    if t["filtered_push_pairs_raw"]:
        kept = t["filtered_push_pairs_sent"] / t["filtered_push_pairs_raw"]
        line += (f"; push filters passed {t['filtered_push_pairs_sent']:,} of "
                 f"{t['filtered_push_pairs_raw']:,} pairs ({100 * kept:.1f}%)")
    return line
