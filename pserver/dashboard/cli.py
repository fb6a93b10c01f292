"""`pserver dashboard`: options, the scheduler poller, uvicorn."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

from .. import logs
from ..config import Config

log = logging.getLogger(__name__)


def register(sub, node_settings: Callable[[argparse.ArgumentParser], None],
             config_of: Callable[[argparse.Namespace], Config],
             role_of: Callable[[Config], str]) -> None:
    """Add the `dashboard` command to the `pserver` subparsers ``sub``: its node settings by
    ``node_settings``, read back by ``config_of``; ``role_of`` picks the credentials to use."""
    p = sub.add_parser("dashboard", help="serve a live web page of the cluster",
                       description="A live page of the cluster from the scheduler's status: nodes "
                                   "and states, the key ring with owners and replicas, traffic "
                                   "per filter, idle share, failovers and migrations. A secure "
                                   "cluster's page asks for the bearer token (`pserver serve "
                                   "token`); an insecure cluster's is served on localhost only.")
    node_settings(p)
    p.add_argument("--dashboard-host", metavar="HOST",
                   help="address to serve on (default: localhost; on a secure cluster this "
                        "node's address)")
    p.add_argument("--dashboard-port", type=int, default=8050, metavar="PORT",
                   help="port to serve on (default 8050)")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                   help="seconds between status requests to the scheduler (default 1)")
    p.set_defaults(fn=lambda args: cmd_dashboard(args, config_of(args), role_of))


def cmd_dashboard(args: argparse.Namespace, cfg: Config, role_of: Callable[[Config], str]) -> int:
    """Serve the dashboard until interrupted.

    Raises:
        AuthError: a secure cluster, but the worker key to derive the token from is unreadable.
    """
    import uvicorn

    from ..bearer import cluster_token
    from ..membership.client import scheduler_request
    from ..transport import Transport
    from .app import Dashboard, build_app

    logs.setup_logging(cfg.log_level, "dashboard")
    secure = not cfg.insecure
    token = cluster_token(cfg.keys) if secure else None
    host = args.dashboard_host or (cfg.bind_host() if secure else "127.0.0.1")
    if not secure and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving the dashboard of an insecure cluster on %s: anyone who reaches it "
                    "sees the cluster", host)
    transport = Transport(cfg, role_of(cfg))

    def status() -> dict:
        return scheduler_request(cfg, "status", role=transport.role, timeout=5.0,
                                 transport=transport).meta

    dashboard = Dashboard(status, args.interval).start()
    print(f"pserver dashboard at http://{host}:{args.dashboard_port}/"
          + ("#token=TOKEN (TOKEN from `pserver serve token --keys DIR`)" if secure else ""),
          flush=True)
    try:
        uvicorn.run(build_app(dashboard, token), host=host, port=args.dashboard_port,
                    log_level="warning")
    finally:
        dashboard.stop()
        transport.close()
    return 0
