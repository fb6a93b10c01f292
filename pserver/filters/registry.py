"""Filter specs: ``"key_cache,compress:zstd,fp16"`` -> a FilterChain, and the registry users
extend with their own filters.

A spec is a comma-separated list (or a Python list) of items ``kind[:arg[:arg...]]``; a list may
also hold Filter instances. ``register_filter(kind, factory)`` adds a kind: ``factory(args)`` gets
the colon-separated arguments as strings and returns a Filter (raise ConfigError on bad ones).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..errors import ConfigError
from .base import Filter, FilterChain
from .compress import Compression
from .key_cache import KeyCaching
from .kkt import KKTFilter
from .precision import BF16, FP16, FixedPoint
from .random_skip import RandomSkip
from .significant import SignificantlyModified

__all__ = ["make_filter", "parse_filters", "register_filter", "registered_filters"]

FilterFactory = Callable[[list[str]], Filter]


def _no_args(cls: type[Filter]) -> FilterFactory:
    def make(args: list[str]) -> Filter:
        if args:
            raise ConfigError(f"{cls.kind} takes no arguments, got {':'.join(args)!r}")
        return cls()
    return make


_lock = threading.Lock()
_REGISTRY: dict[str, FilterFactory] = {
    "key_cache": KeyCaching.from_args,
    "compress": Compression.from_args,
    "fp16": _no_args(FP16),
    "bf16": _no_args(BF16),
    "fixed": FixedPoint.from_args,
    "significant": SignificantlyModified.from_args,
    "random_skip": RandomSkip.from_args,
    "kkt": KKTFilter.from_args,
}


def register_filter(kind: str, factory: FilterFactory, replace: bool = False) -> None:
    """Make ``kind`` usable in filter specs. ``factory(args: list[str]) -> Filter``.

    Raises ConfigError if ``kind`` is not a plain identifier or is already registered (pass
    ``replace=True`` to override on purpose).
    """
    if not kind.isidentifier():
        raise ConfigError(f"filter kind {kind!r} must be an identifier (letters, digits, _)")
    with _lock:
        if kind in _REGISTRY and not replace:
            raise ConfigError(f"filter kind {kind!r} is already registered")
        _REGISTRY[kind] = factory


def registered_filters() -> list[str]:
    """The kinds usable in specs, sorted."""
    with _lock:
        return sorted(_REGISTRY)


def make_filter(item: str) -> Filter:
    """One Filter from ``kind[:arg...]``; ConfigError for an unknown kind or bad arguments."""
    kind, *args = item.strip().split(":")
    with _lock:
        factory = _REGISTRY.get(kind)
    if factory is None:
        raise ConfigError(f"unknown filter {kind!r} in {item!r}; known filters: "
                          f"{', '.join(registered_filters())}")
    f = factory(args)
    if not isinstance(f, Filter):
        raise ConfigError(f"the factory of filter {kind!r} returned {type(f).__name__}, "
                          "not a Filter")
    return f


def parse_filters(spec: str | list[str | Filter] | None) -> FilterChain:
    """A FilterChain from a spec such as ``"kkt:1,fp16,key_cache,compress:zstd"``.

    Empty string / list / None give an empty chain (no filtering). Raises ConfigError on unknown
    kinds, bad arguments, duplicates or an order in which a filter needs what an earlier one
    removed (the message suggests the right order).
    """
    if spec is None:
        return FilterChain([])
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    filters: list[Filter] = []
    for item in items:
        if isinstance(item, Filter):
            filters.append(item)
        elif isinstance(item, str):
            if item.strip():
                filters.append(make_filter(item))
            elif isinstance(spec, str) and spec.strip():
                raise ConfigError(f"empty item in filter spec {spec!r}")
        else:
            raise ConfigError(f"filter spec items must be strings or Filters, not {item!r:.40}")
    return FilterChain(filters)
