"""The ``pserver`` command: thin shells over the library.

  pserver scheduler | server          run one role (configured by flags or PSERVER_* variables)
  pserver launch -s S -w W -- CMD     a local cluster; CMD runs once per worker
                                      (--backend ray | slurm: on that engine, docs/engines.md)
  pserver status [--json]             the cluster view as a table
  pserver consistency --app A [MODEL | --tau N]   show or change an application's consistency
  pserver checkpoint [--dir DIR]      snapshot every table now (restore: scheduler --restore DIR)
  pserver keygen DIR                  the cluster's CURVE keys
  pserver trace merge A.json B.json -o ALL.json   join the timelines of several nodes
  pserver demo | train | gen-data | predict | sketch | lda-infer   the applications (LR, LDA, CountMin)
  pserver serve lr --table W --port 8080   live predictions over HTTP (docs/serve.md)
  pserver serve embeddings --table T --port 8081   live embedding rows over HTTP (docs/torch.md)
  pserver dashboard [--dashboard-port 8050]  a live web page of the cluster (docs/observability.md)
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
from .groups import parse_sizes as parse_group_sizes
from .protocol import BYTES, CONSISTENCY, DIR, KEY_COUNT, NAME, PATH, SECONDS, SERVERS, TABLES, TASKS

# Settings one role alone reads: a flag of that role's command only. Every other PSERVER_* setting is
# a flag of every node command. `pserver launch` takes all of them (see launch_cluster_kwargs).
ROLE_SETTINGS = {"scheduler": ("replication", "replicate_after_aggregation", "replica_key_cache"),
                 "server": ("busy_poll", "slot_cache", "max_table_bytes", "recv_queue"),
                 "worker": ("group", "read_only", "worker_busy_poll")}
_SETTING_VAR = {name: (var, typ, text) for var, (name, typ, text) in ENV_VARS.items()}

# Options of a role that are not PSERVER_* settings: (flags, argparse keywords); one definition for
# the role's command and for `pserver launch`, which hands them to that role's processes.
ROLE_OPTIONS: dict[str, list[tuple[tuple[str, ...], dict]]] = {
    "scheduler": [
        (("--keep-alive",), dict(action="store_true", help="keep running after every worker "
                                                           "has left")),
        (("--checkpoint-dir",), dict(help="directory of checkpoints, shared with every server "
                                          "(default: the --restore directory)")),
        (("--checkpoint-every",), dict(type=float, default=0.0, metavar="SECONDS",
                                       help="write a checkpoint this often (default 0: only on "
                                            "`pserver checkpoint`)")),
        (("--checkpoint-keep",), dict(type=int, default=3, metavar="N",
                                      help="complete checkpoints kept; older ones are deleted "
                                           "(default 3)")),
        (("--restore",), dict(metavar="DIR", help="start from the latest checkpoint in DIR, or "
                                                  "from DIR/ckpt-NNNNNN (any number of servers)")),
        (("--group-size",), dict(action="append", metavar="NAME=N",
                                 help="worker group NAME's barriers wait until N of its workers "
                                      "joined (other groups than 'default' are open-ended and "
                                      "never hold the cluster's start back); repeatable")),
        (("--recover",), dict(action="store_true",
                              help="replace a scheduler that died, on the same address: rebuild "
                                   "the cluster's view from the nodes, which rejoin by themselves")),
        (("--read-only-group",), dict(action="append", metavar="NAME",
                                      help="members of worker group NAME may only read: servers "
                                           "refuse their pushes; repeatable")),
    ],
    "server": [
        (("--join",), dict(action="store_true",
                           help="join a running cluster (a server registering after the start "
                                "always joins: it receives its key ranges by a live two-phase "
                                "migration)")),
        (("--plugin",), dict(action="append", metavar="MODULE",
                             help="import this module first (it may register update functions); "
                                  "repeatable")),
    ],
}

# settings `pserver launch` decides for the whole cluster (the scheduler is its own; ranks follow
# the order of start), and those it takes as arguments of LocalCluster rather than as settings
_LAUNCH_DECIDES = ("scheduler", "rank")
_LAUNCH_OWN = ("num_servers", "num_workers", "host", "port", "keys", "insecure", "log_level")
_LAUNCH_FLAGS = {"num_servers": ("-s", "--servers"), "num_workers": ("-w", "--workers")}
_LAUNCH_HELP = {"port": "scheduler port (default: a free one)",
                "host": "address to bind (default 127.0.0.1)",
                "keys": "use these keys instead of fresh ephemeral ones",
                "num_servers": "servers to start (default 1)",
                "num_workers": "worker processes, one per rank, each running the command "
                               "(default 1)"}


_METAVAR = {"scheduler": "HOST:PORT", "host": "HOST", "keys": "DIR", "log_level": "LEVEL",
            "interface": "NAME", "advertise_host": "HOST", "group": "NAME",
            "slot_cache": "BYTES", "max_table_bytes": "BYTES", "replica_key_cache": "BYTES",
            "max_message_bytes": "BYTES", "metrics_port": "PORT", "trace": "PATH",
            "seal_min": "BYTES", "seal_cipher": "NAME"}


def _switch(raw: str) -> bool:
    """A boolean setting's value on the command line: 1/0, true/false, yes/no, on/off."""
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{raw!r} is not 1 or 0")


def _add_setting(p: argparse.ArgumentParser, name: str, *, default=None, flags: tuple = (),
                 help: str | None = None) -> None:
    var, typ, text = _SETTING_VAR[name]
    kw: dict = dict(dest=name, default=default, help=help or f"{text} ({var})")
    if typ is bool and getattr(Config, name) is False:  # off by default: a switch (--insecure)
        kw.update(action="store_const", const=True)
    elif typ is bool:  # on by default: --replicate-after-aggregation 0 turns it off
        kw.update(type=_switch, metavar="1|0")
    else:
        kw.update(type=typ, metavar=_METAVAR.get(name) or {int: "N", float: "SECONDS"}[typ])
    p.add_argument(*flags, "--" + name.replace("_", "-"), **kw)


def _node_settings(p: argparse.ArgumentParser, role: str | None = None) -> None:
    """Flags for the PSERVER_* settings every node reads, plus those ``role`` alone reads."""
    own = {n for names in ROLE_SETTINGS.values() for n in names}
    for name in _SETTING_VAR:
        if name not in own or name in ROLE_SETTINGS.get(role, ()):
            _add_setting(p, name)


def _role_command(p: argparse.ArgumentParser, role: str) -> None:
    _node_settings(p, role)
    for flags, kw in ROLE_OPTIONS[role]:
        p.add_argument(*flags, **kw)


def _launch_options(p: argparse.ArgumentParser) -> None:
    """Every option of `pserver scheduler` and `pserver server`, but the ones launch decides."""
    for name in _SETTING_VAR:
        if name not in _LAUNCH_DECIDES:
            default = 1 if name in _LAUNCH_FLAGS else None
            _add_setting(p, name, default=default, flags=_LAUNCH_FLAGS.get(name, ()),
                         help=_LAUNCH_HELP.get(name))
    for role, options in ROLE_OPTIONS.items():
        group = p.add_argument_group(f"passed to the {role}")
        for flags, kw in options:  # SUPPRESS: only the options given are passed on
            group.add_argument(*flags, **{**kw, "default": argparse.SUPPRESS})


def launch_cluster_kwargs(args: argparse.Namespace) -> dict:
    """LocalCluster keywords for a parsed ``pserver launch``: its own arguments, every other setting
    given (PSERVER_* variables of every process), and each role's options as that role's argv."""
    kw = {name: getattr(args, name) for name in _LAUNCH_OWN}
    kw["settings"] = {name: getattr(args, name) for name in _SETTING_VAR
                      if name not in _LAUNCH_DECIDES + _LAUNCH_OWN
                      and getattr(args, name) is not None}
    for role, options in ROLE_OPTIONS.items():
        argv: list[str] = []
        for flags, opt in options:
            dest = flags[0].lstrip("-").replace("-", "_")
            if not hasattr(args, dest):
                continue
            value = getattr(args, dest)
            if opt.get("action") == "store_true":
                argv += [flags[0]] if value else []
            elif opt.get("action") == "append":
                argv += [a for v in value for a in (flags[0], str(v))]
            else:
                argv += [flags[0], str(value)]
        kw[f"{role}_args"] = argv
    return kw


def _config(args: argparse.Namespace) -> Config:
    return Config.from_env(**{name: getattr(args, name, None) for name in _SETTING_VAR})


def cmd_scheduler(args: argparse.Namespace) -> int:
    from .membership.scheduler import Scheduler

    cfg = _config(args)
    logs.setup_logging(cfg.log_level, "scheduler")
    Scheduler(cfg, exit_when_workers_done=not args.keep_alive, checkpoint_dir=args.checkpoint_dir,
              checkpoint_every=args.checkpoint_every, checkpoint_keep=args.checkpoint_keep,
              restore=args.restore, group_sizes=parse_group_sizes(args.group_size or []),
              read_only_groups=args.read_only_group or (),
              recover=getattr(args, "recover", False)).run()
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from .kv.server import KVServer

    cfg = _config(args)
    logs.setup_logging(cfg.log_level, "server")
    for mod in args.plugin or []:
        importlib.import_module(mod)  # registers user update functions (register_updater)
    KVServer(cfg).run(warm_first=args.join)
    return 0


# `pserver launch --backend NAME`: the module whose launch(command, kwargs, address) runs it
_BACKENDS = {"ray": "pserver.engines.ray", "slurm": "pserver.engines.slurm"}


def cmd_launch(args: argparse.Namespace) -> int:
    from .launch import LocalCluster

    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        print("pserver launch: give the worker command after --, e.g. "
              "`pserver launch -s 2 -w 4 -- python train.py`", file=sys.stderr)
        return 2
    logs.setup_logging(args.log_level or "WARNING", "launcher")
    kw = launch_cluster_kwargs(args)
    if args.backend in _BACKENDS:
        return importlib.import_module(_BACKENDS[args.backend]).launch(cmd, kw, args.address)
    cluster = LocalCluster(kw.pop("num_servers"), kw.pop("num_workers"),
                           host=kw.pop("host") or "127.0.0.1", port=kw.pop("port") or 0,
                           insecure=bool(kw.pop("insecure")), **kw)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        with cluster:
            print(f"pserver: scheduler at {cluster.scheduler}, {args.num_servers} servers, "
                  f"{args.num_workers} workers" + ("" if args.insecure else
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
    for n in view["nodes"]:  # never silent: a replica that diverged (it asked for a re-copy)
        if n.get("replica_apply_errors"):
            lines.append(f"server {n['id']}: {n['replica_apply_errors']} forwarded updates failed to "
                         f"apply as a replica (re-copied from their masters; see its log)")
    lines += format_groups(view.get("groups", {}))
    from .kv.traffic import format_traffic

    traffic = format_traffic(view)  # per node, as last reported on its heartbeats
    return "\n".join(lines + ([traffic] if traffic else []))


def format_groups(groups: dict) -> list[str]:
    """The per worker group lines of `pserver status`."""
    lines = []
    for name, g in groups.items():
        members = ", ".join(f"{m['rank']}:{m['id']}" + ("" if m["state"] == "up" else f" {m['state']}")
                            for m in g["members"]) or "none"
        size = f" of {g['size']} expected" if g.get("size") else ""
        lines.append(f"group {name}{' (read-only)' if g['read_only'] else ''}: {g['live']} live"
                     f"{size}; members rank:id {members}")
        for app, p in sorted(g["apps"].items()):
            idle = f", idle {100 * p['idle_share']:.1f}%" if p.get("idle_share") is not None else ""
            lines.append(f"  app {app}: {p['complete']}/{p['tasks']} tasks complete"
                         f"{' (finished)' if p['finished'] else ''}{idle}")
    return lines


def cmd_checkpoint(args: argparse.Namespace) -> int:
    from .membership.client import scheduler_request

    meta = {DIR: os.path.abspath(args.dir)} if args.dir else {}
    done = scheduler_request(_config(args), "checkpoint", meta, role="scheduler",
                             timeout=args.timeout).meta
    if args.json:
        print(json.dumps(done, indent=2))
    else:
        print(f"checkpoint {done[NAME]} written to {done[PATH]}: {done[KEY_COUNT]:,} keys in "
              f"{len(done[TABLES])} tables from {done[SERVERS]} servers, "
              f"{done[BYTES] / 1e6:.1f} MB in {done[SECONDS]:.2f} s")
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
        print(f"{args.app}: {meta[CONSISTENCY][args.app]}")
        return 0
    tasks = scheduler_request(cfg, "status", role=args.role or _status_role(cfg),
                              timeout=args.timeout).meta.get(TASKS, {})
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


def cmd_trace_merge(args: argparse.Namespace) -> int:
    from .trace import merge

    n = merge(args.files, args.output)
    print(f"{n} events of {len(args.files)} files written to {args.output} (open it in "
          f"ui.perfetto.dev or chrome://tracing)")
    return 0


def build_parser(with_apps: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pserver", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("scheduler", help="run the scheduler")
    _role_command(s, "scheduler")
    s.set_defaults(fn=cmd_scheduler)

    s = sub.add_parser("server", help="run a server")
    _role_command(s, "server")
    s.set_defaults(fn=cmd_server)

    s = sub.add_parser("launch", help="run a local cluster and a worker command per rank",
                       description="A local cluster: the scheduler, -s servers and -w workers, each "
                                   "worker running the command. Takes every option of `pserver "
                                   "scheduler` and `pserver server` (but --scheduler and --rank).")
    _launch_options(s)
    s.add_argument("--backend", choices=("local", *_BACKENDS), default="local",
                   help="where the roles run: this machine (default), Ray actors, or srun steps "
                        "of the current Slurm allocation (docs/engines.md)")
    s.add_argument("--address", help="--backend ray: the Ray cluster (auto or HOST:PORT; default: "
                                     "RAY_ADDRESS, else a new local Ray)")
    s.add_argument("command", nargs=argparse.REMAINDER, help="-- then the worker command")
    s.set_defaults(fn=cmd_launch)

    s = sub.add_parser("status", help="print the cluster view")
    _node_settings(s)
    s.add_argument("--json", action="store_true")
    s.add_argument("--role", help="credentials to use (default: the first secret found)")
    s.add_argument("--timeout", type=float, default=5.0)
    s.set_defaults(fn=cmd_status)

    s = sub.add_parser("consistency", help="show or change an application's consistency model")
    _node_settings(s)
    s.add_argument("model", nargs="?", help="sequential | eventual | bounded_delay:TAU")
    s.add_argument("--tau", type=int, help="shorthand for bounded_delay:TAU")
    s.add_argument("--app", help="the application (e.g. lr); required to change the model")
    s.add_argument("--json", action="store_true", help="print the task progress as JSON")
    s.add_argument("--role", help="credentials to use for showing (changing needs the scheduler's)")
    s.add_argument("--timeout", type=float, default=5.0)
    s.set_defaults(fn=cmd_consistency)

    s = sub.add_parser("checkpoint", help="write a checkpoint of every table now")
    _node_settings(s)
    s.add_argument("--dir", help="checkpoint directory (default: the scheduler's --checkpoint-dir)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (default 600)")
    s.set_defaults(fn=cmd_checkpoint)

    s = sub.add_parser("keygen", help="create the cluster's CURVE key material")
    s.add_argument("dir")
    s.add_argument("--force", action="store_true", help="overwrite an existing directory")
    s.set_defaults(fn=cmd_keygen)

    from .apps.export import register as register_export

    register_export(sub, _node_settings, _config)

    s = sub.add_parser("trace", help="timelines (PSERVER_TRACE files): merge them")
    merge = s.add_subparsers(dest="trace_cmd", required=True).add_parser(
        "merge", help="join the Chrome-trace files of several nodes into one")
    merge.add_argument("files", nargs="+", metavar="FILE")
    merge.add_argument("-o", "--output", required=True, metavar="FILE")
    merge.set_defaults(fn=cmd_trace_merge)

    s = sub.add_parser("env", help="list the PSERVER_* configuration variables")
    s.set_defaults(fn=lambda a: print("\n".join(f"{k:28} {v[2]}" for k, v in ENV_VARS.items()))
                   or 0)

    if with_apps:
        from .k8s import register as register_k8s

        register_k8s(sub)
        from .apps.lr.cli import register as register_lr

        register_lr(sub)
        from .apps.sketch.cli import register as register_sketch

        register_sketch(sub)
        from .apps.lda.cli import register as register_lda

        register_lda(sub)
        from .serving.cli import register as register_serve

        register_serve(sub, _add_setting, tuple(_SETTING_VAR))
        from .dashboard.cli import register as register_dashboard

        register_dashboard(sub, _node_settings, _config, _status_role)
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
