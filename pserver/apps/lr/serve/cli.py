"""`pserver serve lr`: its options (the model's table, hashing and spec, the weight cache, request
limits) on top of those every service shares (pserver.serving.cli), and its app factory."""

from __future__ import annotations

import argparse
import dataclasses

from ....errors import ConfigError
from ....serving import cli as serving_cli


def register_kind(kinds) -> argparse.ArgumentParser:
    """Add the `lr` kind to the `serve` subcommands; returns its parser (the shared options are
    added by pserver.serving.cli.register)."""
    lr = kinds.add_parser("lr", help="POST /predict with the live weights of a sparse LR table")
    lr.add_argument("--table", default="lr_w", help="weight table (train lr --table)")
    lr.add_argument("--max-staleness", type=float, default=0.0, metavar="SECONDS",
                    help="cache weights for this long (default 0: every request pulls)")
    lr.add_argument("--cache-entries", type=int, default=1 << 20, help="weights cached at most")
    lr.add_argument("--max-instances", type=int, default=1000, help="instances per request")
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
    lr.set_defaults(fn=cmd_serve_lr)
    return lr


def settings_from_args(args: argparse.Namespace) -> dict:
    """The JSON-able settings of a serving process: {"serve": ServeSettings fields, "config":
    PSERVER_* overrides, "group": name}. Raises ConfigError (bad limits, or secure without keys)."""
    from ..dbpg import DBPGConfig, weight_table_args
    from .instances import Featurizer, Limits

    if args.max_instances < 1:
        raise ConfigError("--max-instances must be >= 1")
    if args.max_staleness < 0:
        raise ConfigError("--max-staleness must be >= 0")
    overrides, token = serving_cli.cluster_settings(args)
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
    from .app import ServeSettings, create_app
    from .instances import Featurizer, Limits

    s, connect = serving_cli.env_settings()
    s = dict(s)
    s["featurizer"], s["limits"] = Featurizer(**s["featurizer"]), Limits(**s["limits"])
    return create_app(ServeSettings(**s), connect)


def cmd_serve_lr(args: argparse.Namespace) -> int:
    return serving_cli.run(args, settings_from_args(args), "pserver.apps.lr.serve.cli:app_from_env")
