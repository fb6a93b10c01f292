"""User-defined filters (paper: "User-defined filters"): pure encode/decode functions applied to
every message's (key, value) payload, chained, with traffic counters. See docs/filters.md."""

from .base import (
    KEYS,
    PACK,
    PRECISION,
    SELECT,
    Counters,
    Filter,
    FilterChain,
    FilterContext,
    Payload,
)
from .compress import Compression
from .key_cache import KeyCaching, key_signature
from .kkt import ActiveSet, KKTFilter, kkt_mask
from .precision import BF16, FP16, FixedPoint
from .random_skip import RandomSkip
from .registry import parse_filters, register_filter, registered_filters
from .significant import SignificantlyModified

__all__ = [
    "BF16",
    "FP16",
    "KEYS",
    "PACK",
    "PRECISION",
    "SELECT",
    "ActiveSet",
    "Compression",
    "Counters",
    "Filter",
    "FilterChain",
    "FilterContext",
    "FixedPoint",
    "KKTFilter",
    "KeyCaching",
    "Payload",
    "RandomSkip",
    "SignificantlyModified",
    "key_signature",
    "kkt_mask",
    "parse_filters",
    "register_filter",
    "registered_filters",
]
