"""`pserver serve embeddings --table T [--tables T1,T2]`: its options on top of those every service
shares (pserver.serving.cli), and its app factory."""

from __future__ import annotations

import argparse

from ...errors import ConfigError
from ...serving import cli as serving_cli


def register_kind(kinds) -> argparse.ArgumentParser:
    """Add the `embeddings` kind to the `serve` subcommands; returns its parser (the shared
    options are added by pserver.serving.cli.register)."""
    p = kinds.add_parser("embeddings", help="POST /lookup: the live rows of embedding tables "
                                            "(pserver.torch) for their IDs")
    p.add_argument("--table", help="the embedding table to serve")
    p.add_argument("--tables", help="several tables, comma-separated (T1,T2)")
    p.add_argument("--max-ids", type=int, default=10_000, help="IDs per request (default 10000)")
    p.set_defaults(fn=cmd_serve_embeddings)
    return p


def table_names(table: str | None, tables: str | None) -> list[str]:
    """The served tables of --table and --tables, in order, without repeats. Raises ConfigError
    when none is named."""
    names = [t.strip() for t in ([table] if table else []) + (tables or "").split(",")]
    names = list(dict.fromkeys(n for n in names if n))
    if not names:
        raise ConfigError("name the tables to serve: --table T or --tables T1,T2")
    return names


def settings_from_args(args: argparse.Namespace) -> dict:
    """The JSON-able settings of a serving process ({"serve": EmbeddingSettings fields, "config",
    "group"}). Raises ConfigError (no table, bad limits, or secure without keys)."""
    if args.max_ids < 1:
        raise ConfigError("--max-ids must be >= 1")
    names = table_names(args.table, args.tables)
    overrides, token = serving_cli.cluster_settings(args)
    serve = dict(tables=names, token=token, pull_timeout=args.pull_timeout, max_ids=args.max_ids,
                 max_body_bytes=args.max_body_bytes)
    return {"serve": serve, "config": overrides, "group": args.group}


def app_from_env():
    """The ASGI app of one serving process, from PSERVER_SERVE_SETTINGS (uvicorn's factory)."""
    from .app import EmbeddingSettings, create_app

    s, connect = serving_cli.env_settings()
    return create_app(EmbeddingSettings(**s), connect)


def cmd_serve_embeddings(args: argparse.Namespace) -> int:
    return serving_cli.run(args, settings_from_args(args),
                           "pserver.apps.embeddings.cli:app_from_env")
