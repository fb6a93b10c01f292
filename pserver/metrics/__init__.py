"""Prometheus metrics of every role, read from the node's own counters when scraped.

``latency.py`` records request latencies in fixed buckets (the one per-request cost, workers only),
``families.py`` turns a node's stats into metric families (no I/O), ``exporter.py`` serves them
over HTTP with the cluster's authentication. Metric list and security: docs/observability.md.
"""

from .exporter import MetricsEndpoint, start_endpoint
from .latency import LatencyHistograms

__all__ = ["LatencyHistograms", "MetricsEndpoint", "start_endpoint"]
