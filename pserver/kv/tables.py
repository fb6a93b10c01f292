"""The tables a server holds, by name: declaring them (every worker must declare the same spec) and
finding the one a request names."""

from __future__ import annotations

import logging

from ..errors import TableError
from ..store.spec import TableSpec
from ..store.table import Table

log = logging.getLogger(__name__)


class Tables(dict):
    """name -> Table, starting with the table "default" (update rule ``default_updater``)."""

    def __init__(self, slot_cache_bytes: int = 0, default_updater: str = "sum",
                 max_table_bytes: int = 0) -> None:
        super().__init__()
        self.slot_cache_bytes = slot_cache_bytes
        self.max_table_bytes = max_table_bytes  # each table's budget on this server (0 = none)
        self["default"] = Table(TableSpec(name="default", updater=default_updater),
                                slot_cache=slot_cache_bytes)

    def table(self, name: str) -> Table:
        """The table ``name`` ("" = "default"). Raises TableError (saying what to do) if it is
        not declared here."""
        table = self.get(name or "default")
        if table is None:
            raise TableError(f"table {name!r} is not declared on this server; call "
                             f"kv.declare_table({name!r}, ...) on the workers first")
        return table

    def declare(self, spec: TableSpec) -> None:
        """Create table ``spec.name``. Raises TableError if it exists with another spec (nothing
        changes then)."""
        have = self.get(spec.name)
        if have is None:
            self[spec.name] = Table(spec, slot_cache=self.slot_cache_bytes,
                                    max_bytes=self.max_table_bytes)
            log.info("declared table %s", spec.to_json())
        elif have.spec != spec:
            raise TableError(f"table {spec.name!r} already exists with spec {have.spec.to_json()}; "
                             f"it was declared again as {spec.to_json()} - every worker must "
                             f"declare the same spec (or use another name)")

    def set_budget(self, max_table_bytes: int) -> None:
        """Every table's budget on this server, now and for tables declared later (0 = none)."""
        self.max_table_bytes = max_table_bytes
        for t in self.values():
            t.set_budget(max_table_bytes)

    def declare_missing(self, spec: TableSpec) -> None:
        """Create table ``spec.name`` unless a table of that name exists (copies of ranges)."""
        if spec.name not in self:
            self.declare(spec)
