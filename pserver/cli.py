"""The ``pserver`` command: thin shells over the library.

  pserver scheduler | server          run one role (configured by flags or PSERVER_* variables)
  pserver launch -s S -w W -- CMD     a local cluster; CMD runs once per worker
  pserver status [--json]             the cluster view as a table
  pserver consistency --app A [MODEL | --tau N]   show or change an application's consistency
  pserver checkpoint [--dir DIR]      snapshot every table now (restore: scheduler --restore DIR)
  pserver keygen DIR                  the cluster's CURVE keys
  pserver demo | train | gen-data | predict   the sparse logistic regression job
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import time

from . import logs
from .config import ENV_VARS, Config
from .errors import PServerError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", help="host:port of the scheduler (PSERVER_SCHEDULER)")
    p.add_argument("--host", help="address to bind and advertise (PSERVER_HOST)")
    p.add_argument("--port", type=int, help="port to bind, 0 = any (PSERVER_PORT)")
    p.add_argument("--keys", help="key directory from `pserver keygen` (PSERVER_KEYS)")
    p.add_argument("--insecure", action="store_true", default=None,
                   help="plain text, no authentication (PSERVER_INSECURE=1); logs a warning")
    p.add_argument("--num-servers", type=int, help="PSERVER_NUM_SERVERS")
    p.add_argument("--num-workers", type=int, help="PSERVER_NUM_WORKERS")
    p.add_argument("--rank", type=int, help="requested rank (PSERVER_RANK)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR (PSERVER_LOG_LEVEL)")
    p.add_argument("--max-message-bytes", type=int,
                   help="largest accepted message payload in bytes (PSERVER_MAX_MESSAGE_BYTES)")
    p.add_argument("--max-keys", type=int, help="most keys in one request (PSERVER_MAX_KEYS)")
    p.add_argument("--max-dim", type=int, help="largest value dimension (PSERVER_MAX_DIM)")


def _config(args: argparse.Namespace) -> Config:
    return Config.from_env(scheduler=args.scheduler, host=args.host, port=args.port,
                           keys=args.keys, insecure=args.insecure, num_servers=args.num_servers,
                           num_workers=args.num_workers, rank=args.rank,
                           log_level=args.log_level, max_message_bytes=args.max_message_bytes,
                           max_keys=args.max_keys, max_dim=args.max_dim)


def cmd_scheduler(args: argparse.Namespace) -> int:
    from .membership.scheduler import Scheduler

    cfg = _config(args)
    if args.replication is not None:
        cfg.replication = args.replication
    if args.replicate_after_aggregation is not None:
        cfg.replicate_after_aggregation = bool(args.replicate_after_aggregation)
    if args.replica_key_cache is not None:
        cfg = cfg.with_(replica_key_cache=args.replica_key_cache)
    cfg.validate()
    logs.setup_logging(cfg.log_level, "scheduler")
    Scheduler(cfg, exit_when_workers_done=not args.keep_alive, checkpoint_dir=args.checkpoint_dir,
              checkpoint_every=args.checkpoint_every, checkpoint_keep=args.checkpoint_keep,
              restore=args.restore).run()
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from .kv.server import KVServer

    cfg = _config(args)
    if args.busy_poll is not None:
        cfg = cfg.with_(busy_poll=args.busy_poll)
    if args.slot_cache is not None:
        cfg = cfg.with_(slot_cache=args.slot_cache)
    cfg.validate()
    logs.setup_logging(cfg.log_level, "server")
    for mod in args.plugin or []:
        importlib.import_module(mod)  # registers user update functions (register_updater)
    KVServer(cfg).run(warm_first=args.join)
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from .launch import LocalCluster

    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        print("pserver launch: give the worker command after --, e.g. "
              "`pserver launch -s 2 -w 4 -- python train.py`", file=sys.stderr)
        return 2
    logs.setup_logging(args.log_level or "WARNING", "launcher")
    cluster = LocalCluster(args.servers, args.workers, host=args.host or "127.0.0.1",
                           port=args.port or 0, insecure=bool(args.insecure), keys=args.keys,
                           log_level=args.log_level)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        with cluster:
            print(f"pserver: scheduler at {cluster.scheduler}, {args.servers} servers, "
                  f"{args.workers} workers" + ("" if args.insecure else
                                             f", keys in {cluster.keys}"), file=sys.stderr)
            return cluster.run_workers(cmd)
    except KeyboardInterrupt:
        print("pserver: interrupted, tearing the cluster down", file=sys.stderr)
        return 130


def cmd_status(args: argparse.Namespace) -> int:
    from .membership.client import scheduler_request

    cfg = _config(args)
    role = args.role or _status_role(cfg)
    view = scheduler_request(cfg, "status", role=role, timeout=args.timeout).meta
    if args.json:
        print(json.dumps(view, indent=2))
        return 0
    print(format_status(view))
    return 0


def _status_role(cfg: Config) -> str:
    if cfg.insecure or not cfg.keys:
        return "worker"
    for role in ("scheduler", "worker", "server"):
        if os.path.exists(os.path.join(cfg.keys, "private", f"{role}.key_secret")):
            return role
    return "worker"


def format_status(view: dict) -> str:
    rows = [("ROLE", "ID", "RANK", "ADDRESS", "PID", "STATE", "LAST HB (s)", "RING SHARE")]
    for n in sorted(view["nodes"], key=lambda n: (n["role"], n["rank"])):
        share = f"{100 * n['ring_share']:.1f}%" if "ring_share" in n else "-"
        rows.append((n["role"], str(n["id"]), str(n["rank"]), f"{n['host']}:{n['port']}",
                     str(n["pid"]), n["state"], f"{n['last_heartbeat']:.2f}", share))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    s = view.get("scheduler", {})
    ring = view.get("ring") or {}
    lines.insert(0, f"cluster view v{view['version']}: scheduler pid {s.get('pid')} port "
                    f"{s.get('port')}, ring v{ring.get('version', '-')} with "
                    f"{ring.get('virtual', '-')} virtual servers per server")
    from .kv.traffic import format_traffic

    traffic = format_traffic(view)  # per node, as last reported on its heartbeats
    return "\n".join(lines + ([traffic] if traffic else []))


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from .membership.client import scheduler_request

    meta = {"dir": os.path.abspath(args.dir)} if args.dir else {}
    done = scheduler_request(_config(args), "checkpoint", meta, role="scheduler",
                             timeout=args.timeout).meta
    if args.json:
        print(json.dumps(done, indent=2))
    else:
        print(f"checkpoint {done['name']} written to {done['path']}: {done['keys']:,} keys in "
              f"{len(done['tables'])} tables from {done['servers']} servers, "
              f"{done['bytes'] / 1e6:.1f} MB in {done['seconds']:.2f} s")
    return 0


def cmd_consistency(args: argparse.Namespace) -> int:
    """Show the applications' consistency models and task progress, or set one (scheduler-only op
    set_consistency; workers apply it to the tasks they issue after their next heartbeat)."""
    from .membership.client import scheduler_request

    cfg = _config(args)
    model = f"bounded_delay:{args.tau}" if args.tau is not None else args.model
    if model is not None:
        if not args.app:
            print("pserver consistency: name the application with --app (e.g. --app lr)",
                  file=sys.stderr)
            return 2
        meta = scheduler_request(cfg, "set_consistency", {"app": args.app, "model": model},
                                 role="scheduler", timeout=args.timeout).meta
        print(f"{args.app}: {meta['consistency'][args.app]}")
        return 0
    tasks = scheduler_request(cfg, "status", role=args.role or _status_role(cfg),
                              timeout=args.timeout).meta.get("tasks", {})
    if args.json:
        print(json.dumps(tasks, indent=2))
        return 0
    for app, p in sorted(tasks.items()):
        if args.app and app != args.app:
            continue
        print(f"{app}: {p['model'] or 'sequential'}, {p['complete']}/{p['tasks']} {p['kind']} tasks "
              f"complete{' (stopped)' if p['stopped'] else ''}, {p['seconds']:.1f} s")
        for node, w in p["workers"].items():
            idle = f", idle {100 * w['idle_share']:.1f}%" if "idle_share" in w else ""
            print(f"  worker {node}: {w['done']} done, {w['outstanding']} outstanding{idle}")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from .security import keygen

    path = keygen(args.dir, force=args.force)
    print(f"cluster keys written to {path}; give every node PSERVER_KEYS={path} (workers need "
          f"only public/ and private/worker.key_secret)")
    return 0


def build_parser(with_apps: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pserver", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("scheduler", help="run the scheduler")
    _common(s)
    s.add_argument("--keep-alive", action="store_true",
                   help="keep running after every worker has left")
    s.add_argument("--replication", type=int, help="replicas per key range, k (PSERVER_REPLICATION, "
                                                   "default 1)")
    s.add_argument("--replicate-after-aggregation", type=int, choices=(0, 1),
                   help="1: replicate a synchronous round's aggregated update once (default); 0: "
                        "replicate every worker's push (PSERVER_REPLICATE_AFTER_AGGREGATION)")
    s.add_argument("--replica-key-cache", metavar="BYTES",
                   help="bytes of key lists a master may keep stored at each replica, so that a "
                        "repeated list is forwarded once and named after that (PSERVER_REPLICA_KEY_CACHE; "
                        "default 8M; 0 = off)")
    s.add_argument("--checkpoint-dir", help="directory of checkpoints, shared with every server "
                   "(default: the --restore directory)")
    s.add_argument("--checkpoint-every", type=float, default=0.0, metavar="SECONDS",
                   help="write a checkpoint this often (default 0: only on `pserver checkpoint`)")
    s.add_argument("--checkpoint-keep", type=int, default=3, metavar="N",
                   help="complete checkpoints kept; older ones are deleted (default 3)")
    s.add_argument("--restore", metavar="DIR",
                   help="start from the latest checkpoint in DIR, or from DIR/ckpt-NNNNNN (any "
                        "number of servers)")
    s.set_defaults(fn=cmd_scheduler)

    s = sub.add_parser("server", help="run a server")
    _common(s)
    s.add_argument("--join", action="store_true",
                   help="join a running cluster (a server registering after the start always "
                        "joins: it receives its key ranges by a live two-phase migration)")
    s.add_argument("--plugin", action="append",
                   help="import this module first (it may register update functions)")
    s.add_argument("--busy-poll", type=float, metavar="SECONDS",
                   help="keep polling without sleeping this long after a request: lower latency "
                        "for a server with a core of its own (PSERVER_BUSY_POLL; default 0)")
    s.add_argument("--slot-cache", metavar="BYTES",
                   help="bytes of repeated key lists per table whose value slots are cached, so "
                        "their pushes and pulls skip the hash index (PSERVER_SLOT_CACHE; "
                        "default 64M; 0 = off)")
    s.set_defaults(fn=cmd_server)

    s = sub.add_parser("launch", help="run a local cluster and a worker command per rank")
    s.add_argument("-s", "--servers", type=int, default=1)
    s.add_argument("-w", "--workers", type=int, default=1)
    s.add_argument("--host", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="scheduler port (default: a free one)")
    s.add_argument("--keys", help="use these keys instead of fresh ephemeral ones")
    s.add_argument("--insecure", action="store_true", help="plain text (warns)")
    s.add_argument("--log-level", help="log level of the cluster's processes")
    s.add_argument("command", nargs=argparse.REMAINDER, help="-- then the worker command")
    s.set_defaults(fn=cmd_launch)

    s = sub.add_parser("status", help="print the cluster view")
    _common(s)
    s.add_argument("--json", action="store_true")
    s.add_argument("--role", help="credentials to use (default: the first secret found)")
    s.add_argument("--timeout", type=float, default=5.0)
    s.set_defaults(fn=cmd_status)

    s = sub.add_parser("consistency", help="show or change an application's consistency model")
    _common(s)
    s.add_argument("model", nargs="?", help="sequential | eventual | bounded_delay:TAU")
    s.add_argument("--tau", type=int, help="shorthand for bounded_delay:TAU")
    s.add_argument("--app", help="the application (e.g. lr); required to change the model")
    s.add_argument("--json", action="store_true", help="print the task progress as JSON")
    s.add_argument("--role", help="credentials to use for showing (changing needs the scheduler's)")
    s.add_argument("--timeout", type=float, default=5.0)
    s.set_defaults(fn=cmd_consistency)

    s = sub.add_parser("checkpoint", help="write a checkpoint of every table now")
    _common(s)
    s.add_argument("--dir", help="checkpoint directory (default: the scheduler's --checkpoint-dir)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (default 600)")
    s.set_defaults(fn=cmd_checkpoint)

    s = sub.add_parser("keygen", help="create the cluster's CURVE key material")
    s.add_argument("dir")
    s.add_argument("--force", action="store_true", help="overwrite an existing directory")
    s.set_defaults(fn=cmd_keygen)

    s = sub.add_parser("env", help="list the PSERVER_* configuration variables")
    s.set_defaults(fn=lambda a: print("\n".join(f"{k:28} {v[2]}" for k, v in ENV_VARS.items()))
                   or 0)

    if with_apps:
        from .apps.lr.cli import register as register_lr

        register_lr(sub)
    return p


# the roles' commands: their parser skips the applications' (whose imports cost a node ~0.3 s)
_NODE_COMMANDS = {"scheduler", "server"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(with_apps=not argv or argv[0] not in _NODE_COMMANDS).parse_args(argv)
    start = time.monotonic()
    try:
        return int(args.fn(args) or 0)
    except PServerError as e:
        print(f"pserver {args.cmd}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        logs.logging.getLogger(__name__).debug("%s took %.2f s", args.cmd,
                                               time.monotonic() - start)


if __name__ == "__main__":
    sys.exit(main())
