"""Worker groups (paper: several worker groups share one server group): group names, the sizes
the scheduler is told, and the group policy - which requests a read-only group may not send.
Free of I/O; semantics in docs/groups.md."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

from .errors import ConfigError
from .protocol import PUSHES

DEFAULT = "default"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NAME_RULE = ("1 to 64 characters: letters, digits, '_', '-' and '.', starting with a letter or "
             "a digit")

# op -> whether a message of that op changes stored values (given its meta). The one place that
# says what a read-only group may not do; a server consults it for members of such groups.
MUTATING: dict[str, Callable[[Mapping], bool]] = {
    "push": lambda meta: True,  # push and push_pull (a push with PUSH_PULL set)
    "declare_table": lambda meta: meta.get(PUSHES, True) is not False,
}


def check_name(name: object) -> str:
    """``name`` if it is a valid group name. Raises ConfigError saying what is allowed."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"group name {name!r} is not valid: use {NAME_RULE} "
                          f"(PSERVER_GROUP / --group)")
    return name


def parse_sizes(items: Iterable[str]) -> dict[str, int]:
    """``["count=2", ...]`` (``--group-size NAME=N``) -> ``{"count": 2}``. Raises ConfigError
    for a malformed item, an invalid name or N < 1."""
    out: dict[str, int] = {}
    for item in items:
        name, sep, n = str(item).partition("=")
        if not sep or not n.isdigit() or int(n) < 1:
            raise ConfigError(f"--group-size {item!r} is not NAME=N with N >= 1 (e.g. count=2)")
        out[check_name(name)] = int(n)
    return out


def scoped(app: str, group: str) -> str:
    """The scheduler's name of application ``app`` of ``group``: task queues, progress and
    consistency models are per group ("lr" of the default group, "count/lr" of group count)."""
    return app if group == DEFAULT else f"{group}/{app}"


def app_group(scoped_app: str) -> tuple[str, str]:
    """(group, app) of a scheduler-side application name (the inverse of :func:`scoped`)."""
    group, sep, app = scoped_app.partition("/")
    return (group, app) if sep else (DEFAULT, scoped_app)


def summary(nodes: Iterable[Mapping], read_only: Iterable[str], sizes: Mapping[str, int],
            progress: Mapping[str, Mapping]) -> dict[str, dict]:
    """Per worker group, for `pserver status`: its members (id, rank, state), how many are live,
    whether it is read-only, its expected size, and its applications' progress with the mean
    idle share its workers report. ``nodes``: the view's nodes as JSON; ``progress``: the task
    scheduler's, by scoped application name."""
    ro = set(read_only)
    out: dict[str, dict] = {}
    for n in sorted(nodes, key=lambda n: n.get("rank", 0)):
        if n.get("role") != "worker":
            continue
        g = out.setdefault(n.get("group", DEFAULT), {"members": [], "live": 0, "apps": {}})
        g["members"].append({"id": n["id"], "rank": n["rank"], "state": n["state"]})
        g["live"] += n["state"] == "up"
    for name, p in progress.items():
        group, app = app_group(name)
        g = out.setdefault(group, {"members": [], "live": 0, "apps": {}})
        idle = [w["idle_share"] for w in p.get("workers", {}).values() if "idle_share" in w]
        g["apps"][app] = {"complete": p.get("complete"), "tasks": p.get("tasks"),
                          "finished": p.get("finished"),
                          "idle_share": round(sum(idle) / len(idle), 4) if idle else None}
    for name in ro | set(sizes):
        out.setdefault(name, {"members": [], "live": 0, "apps": {}})
    for name, g in out.items():
        g["read_only"] = name in ro
        g["size"] = sizes.get(name)
    return dict(sorted(out.items()))


def join_read_only(group: str, read_only: Iterable[str], live_members: int) -> None:
    """Check a worker's request to make ``group`` read-only as it registers: allowed if the group
    already is, or has no live member yet (it may restrict only a group it starts, never members
    that joined to write). Raises ConfigError otherwise. No request lifts a restriction."""
    if group not in read_only and live_members:
        raise ConfigError(f"group {group!r} already has {live_members} writing member(s): a worker "
                          f"cannot make it read-only; join another group to read only, or start "
                          f"the scheduler with --read-only-group {group}")


def refusal(op: str, meta: Mapping, group: str, read_only: Iterable[str]) -> str | None:
    """Why a member of ``group`` may not send ``op`` (with ``meta``), or None if it may: members
    of a read-only group may read but not change stored values."""
    mutates = MUTATING.get(op)
    if mutates is None or group not in read_only or not mutates(meta):
        return None
    what = "declare a table as a pusher" if op == "declare_table" else op
    return (f"group {group!r} is read-only: its members may not {what}; run the job in another "
            f"group (PSERVER_GROUP / --group), or restart the scheduler without "
            f"--read-only-group {group}")
