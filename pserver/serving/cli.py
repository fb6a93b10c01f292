"""`pserver serve KIND` and `pserver serve token`: the options every kind of service shares, the
cluster settings and bearer token of a serving process, and running it under uvicorn (N
processes). The options travel to uvicorn's worker processes as JSON in PSERVER_SERVE_SETTINGS,
so every process builds its own app and its own KVWorker (each kind's app_from_env)."""

from __future__ import annotations

import argparse
import json
import logging
import os

from ..errors import ConfigError

log = logging.getLogger(__name__)

SETTINGS_ENV = "PSERVER_SERVE_SETTINGS"
# node settings the service decides itself: --port is the HTTP port, ranks and counts are the
# training job's
_NOT_SETTINGS = ("port", "rank", "num_servers", "num_workers", "group", "read_only")  # own --group


def register(subparsers, add_setting, setting_names) -> None:
    """Add `serve lr`, `serve embeddings` and `serve token`. add_setting(parser, name) adds a
    PSERVER_* setting's flag (pserver/cli.py's), setting_names are those settings."""
    from ..apps.embeddings.cli import register_kind as register_embeddings
    from ..apps.lr.serve.cli import register_kind as register_lr

    p = subparsers.add_parser("serve", help="serve live tables over HTTP (docs/serve.md)")
    kinds = p.add_subparsers(dest="model_kind", required=True)
    for register_kind in (register_lr, register_embeddings):
        kind = register_kind(kinds)
        for name in setting_names:
            if name not in _NOT_SETTINGS:
                add_setting(kind, name)
        add_service_options(kind)
        kind.set_defaults(setting_names=tuple(setting_names))

    t = kinds.add_parser("token", help="print the bearer token of the cluster's keys")
    t.add_argument("--keys", default=os.environ.get("PSERVER_KEYS"),
                   help="the `pserver keygen` directory (PSERVER_KEYS)")
    t.set_defaults(fn=cmd_token)


def add_service_options(p: argparse.ArgumentParser) -> None:
    """The options of every kind: HTTP address, group, processes, body limit, pull timeout, TLS."""
    p.add_argument("--port", type=int, default=8080, help="HTTP port (default 8080)")
    p.add_argument("--bind", default="127.0.0.1", help="HTTP address (default 127.0.0.1)")
    p.add_argument("--group", default="serve", help="worker group of the service (read-only)")
    p.add_argument("--workers", type=int, default=1, help="serving processes (default 1)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="bytes per request body")
    p.add_argument("--pull-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="a pull slower than this answers 503 (default 5)")
    p.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--tls-key", help="... and this private key (PEM)")


def cmd_token(args: argparse.Namespace) -> int:
    from ..bearer import cluster_token

    if not args.keys:
        raise ConfigError("pass --keys DIR (the `pserver keygen` directory) or set PSERVER_KEYS")
    print(cluster_token(args.keys))
    return 0


def cluster_settings(args: argparse.Namespace) -> tuple[dict, str | None]:
    """(PSERVER_* overrides given on the command line, the bearer token or None if insecure).

    Raises ConfigError: bad shared options, or secure (the default) without the cluster's keys."""
    from ..bearer import cluster_token
    from ..config import Config

    if args.workers < 1 or args.max_body_bytes < 1:
        raise ConfigError("--workers and --max-body-bytes must be >= 1")
    if args.pull_timeout <= 0:
        raise ConfigError("--pull-timeout must be > 0")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("HTTPS needs both --tls-cert and --tls-key")
    overrides = {n: getattr(args, n) for n in args.setting_names
                 if getattr(args, n, None) is not None}
    cfg = Config.from_env(**overrides)
    if cfg.insecure:
        return overrides, None
    if not cfg.keys:
        raise ConfigError("the service requires the cluster's keys (secure by default): pass "
                          "--keys DIR or PSERVER_KEYS, or --insecure")
    return overrides, cluster_token(cfg.keys)


def env_settings() -> tuple[dict, object]:
    """In a serving process: (the kind's settings, ``connect() -> KVWorker`` joining the
    service's read-only group), from PSERVER_SERVE_SETTINGS."""
    from .. import logs
    from ..config import Config
    from ..kv.worker import KVWorker

    raw = json.loads(os.environ[SETTINGS_ENV])
    overrides, group = raw["config"], raw["group"]
    logs.set_node("serve", os.getpid())

    def connect():   # a read-only group: never counted by the training's rounds or barriers
        return KVWorker(Config.from_env(**overrides), group=group, read_only=True)

    return raw["serve"], connect


def run(args: argparse.Namespace, raw: dict, factory: str) -> int:
    """Serve ``raw`` ({"serve": the kind's settings, "config", "group"}) with the ASGI app made
    by ``factory`` ("module:function") under uvicorn until SIGTERM or Ctrl-C."""
    import uvicorn

    from .. import logs

    logs.setup_logging(args.log_level or "INFO", None)
    if raw["serve"]["token"] is None:
        log.warning("serving WITHOUT authentication (--insecure): anyone who can reach "
                    "%s:%d can query the model", args.bind, args.port)
    os.environ[SETTINGS_ENV] = json.dumps(raw)
    tls = dict(ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key) if args.tls_cert else {}
    uvicorn.run(factory, factory=True, host=args.bind, port=args.port, workers=args.workers,
                log_level="warning", timeout_graceful_shutdown=10, access_log=False, **tls)
    return 0
