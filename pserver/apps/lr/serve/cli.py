"""`pserver serve lr` (run the service under uvicorn, N processes) and `pserver serve token`.
The options travel to uvicorn's worker processes as JSON in PSERVER_SERVE_SETTINGS, so every
process builds its own app and its own KVWorker (app_from_env)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os

from ....errors import ConfigError

log = logging.getLogger(__name__)

SETTINGS_ENV = "PSERVER_SERVE_SETTINGS"
# node settings the service decides itself: --port is the HTTP port, ranks and counts are the
# training job's
_NOT_SETTINGS = ("port", "rank", "num_servers", "num_workers", "group", "read_only")  # own --group


def register(subparsers, add_setting, setting_names) -> None:
    """Add `serve lr` and `serve token`. add_setting(parser, name) adds a PSERVER_* setting's
    flag (pserver/cli.py's), setting_names are those settings."""
    p = subparsers.add_parser("serve", help="serve a model's live predictions over HTTP")
    kinds = p.add_subparsers(dest="model_kind", required=True)
    lr = kinds.add_parser("lr", help="POST /predict with the live weights of a sparse LR table")
    for name in setting_names:
        if name not in _NOT_SETTINGS:
            add_setting(lr, name)
    lr.add_argument("--table", default="lr_w", help="weight table (train lr --table)")
    lr.add_argument("--port", type=int, default=8080, help="HTTP port (default 8080)")
    lr.add_argument("--bind", default="127.0.0.1", help="HTTP address (default 127.0.0.1)")
    lr.add_argument("--group", default="serve", help="worker group of the service (read-only)")
    lr.add_argument("--workers", type=int, default=1, help="serving processes (default 1)")
    lr.add_argument("--max-staleness", type=float, default=0.0, metavar="SECONDS",
                    help="cache weights for this long (default 0: every request pulls)")
    lr.add_argument("--cache-entries", type=int, default=1 << 20, help="weights cached at most")
    lr.add_argument("--max-instances", type=int, default=1000, help="instances per request")
    lr.add_argument("--max-body-bytes", type=int, default=1 << 20, help="bytes per request body")
    lr.add_argument("--pull-timeout", type=float, default=5.0, metavar="SECONDS",
                    help="a pull slower than this answers 503 (default 5)")
    lr.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    lr.add_argument("--tls-key", help="... and this private key (PEM)")
    g = lr.add_argument_group("the training job's options (they make the table's spec and the "
                              "hashing; give the same as to `pserver train lr`)")
    g.add_argument("--format", default="libsvm", choices=("libsvm", "criteo"))
    g.add_argument("--raw-keys", action="store_true")
    g.add_argument("--int-bins", default="log", choices=("log", "raw"))
    g.add_argument("--bias", action="store_true")
    g.add_argument("--l1", type=float, default=1.0)
    g.add_argument("--l2", type=float, default=0.0)
    g.add_argument("--eta", type=float, default=1.0)
    g.add_argument("--kkt", action="store_true")
    g.add_argument("--kkt-delta", type=float, default=0.0)
    g.add_argument("--filters", default="")
    g.add_argument("--pull-filters", default="")
    g.add_argument("--train-workers", type=int, default=1,
                   help="workers of the training job (only --kkt needs it)")
    lr.set_defaults(fn=cmd_serve_lr, setting_names=tuple(setting_names))

    t = kinds.add_parser("token", help="print the bearer token of the cluster's keys")
    t.add_argument("--keys", default=os.environ.get("PSERVER_KEYS"),
                   help="the `pserver keygen` directory (PSERVER_KEYS)")
    t.set_defaults(fn=cmd_token)


def cmd_token(args: argparse.Namespace) -> int:
    from ....bearer import cluster_token

    if not args.keys:
        raise ConfigError("pass --keys DIR (the `pserver keygen` directory) or set PSERVER_KEYS")
    print(cluster_token(args.keys))
    return 0


def settings_from_args(args: argparse.Namespace) -> dict:
    """The JSON-able settings of a serving process: {"serve": ServeSettings fields, "config":
    PSERVER_* overrides, "group": name}. Raises ConfigError (bad limits, or secure without keys)."""
    from ....bearer import cluster_token
    from ..dbpg import DBPGConfig, weight_table_args
    from .instances import Featurizer, Limits

    if args.workers < 1 or args.max_instances < 1 or args.max_body_bytes < 1:
        raise ConfigError("--workers, --max-instances and --max-body-bytes must be >= 1")
    if args.max_staleness < 0 or args.pull_timeout <= 0:
        raise ConfigError("--max-staleness must be >= 0 and --pull-timeout > 0")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("HTTPS needs both --tls-cert and --tls-key")
    overrides = {n: getattr(args, n) for n in args.setting_names
                 if getattr(args, n, None) is not None}
    from ....config import Config
    cfg = Config.from_env(**overrides)
    token = None
    if not cfg.insecure:
        if not cfg.keys:
            raise ConfigError("the service requires the cluster's keys (secure by default): pass "
                              "--keys DIR or PSERVER_KEYS, or --insecure")
        token = cluster_token(cfg.keys)
    cfg_lr = DBPGConfig(l1=args.l1, l2=args.l2, eta=args.eta, kkt=args.kkt,
                        kkt_delta=args.kkt_delta, filters=args.filters,
                        pull_filters=args.pull_filters, table=args.table)
    cfg_lr.check()
    serve = dict(table=args.table, table_args=weight_table_args(cfg_lr, args.train_workers),
                 featurizer=dataclasses.asdict(Featurizer(args.format, args.raw_keys,
                                                          args.int_bins, args.bias)),
                 limits=dataclasses.asdict(Limits(args.max_instances, args.max_body_bytes)),
                 token=token, pull_timeout=args.pull_timeout, max_staleness=args.max_staleness,
                 cache_entries=args.cache_entries)
    return {"serve": serve, "config": overrides, "group": args.group}


def app_from_env():
    """The ASGI app of one serving process, from PSERVER_SERVE_SETTINGS (uvicorn's factory)."""
    from .... import logs
    from ....config import Config
    from ....kv.worker import KVWorker
    from .app import ServeSettings, create_app
    from .instances import Featurizer, Limits

    raw = json.loads(os.environ[SETTINGS_ENV])
    s = dict(raw["serve"])
    s["featurizer"], s["limits"] = Featurizer(**s["featurizer"]), Limits(**s["limits"])
    settings = ServeSettings(**s)
    overrides, group = raw["config"], raw["group"]
    logs.set_node("serve", os.getpid())

    def connect():   # a read-only group: never counted by the training's rounds or barriers
        return KVWorker(Config.from_env(**overrides), group=group, read_only=True)

    return create_app(settings, connect)


def cmd_serve_lr(args: argparse.Namespace) -> int:
    import uvicorn

    from .... import logs

    raw = settings_from_args(args)
    logs.setup_logging(args.log_level or "INFO", None)
    if raw["serve"]["token"] is None:
        log.warning("serving WITHOUT authentication (--insecure): anyone who can reach "
                    "%s:%d can query the model", args.bind, args.port)
    os.environ[SETTINGS_ENV] = json.dumps(raw)
    tls = dict(ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key) if args.tls_cert else {}
    uvicorn.run("pserver.apps.lr.serve.cli:app_from_env", factory=True, host=args.bind,
                port=args.port, workers=args.workers, log_level="warning",
                timeout_graceful_shutdown=10, access_log=False, **tls)
    return 0
