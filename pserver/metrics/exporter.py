"""The /metrics endpoint of one node: an HTTP server in a daemon thread that builds the node's
metric families when scraped, behind the cluster's authentication (a bearer token on a secure
cluster, localhost only on an insecure one)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from ..bearer import Unauthorized, check_bearer, cluster_token
from ..config import Config
from ..errors import AuthError, ConfigError

log = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
PORT_TRIES = 64  # several nodes on one host given the same port take the next free ones


def access(cfg: Config, secure: bool) -> tuple[str, str | None]:
    """(host to bind, bearer token or None) for a node's HTTP surfaces: a secure cluster's token
    (derived from its worker key) on the node's own address; localhost only, without a token, on
    an insecure cluster or when the node cannot read the worker key."""
    if not secure:
        return LOCALHOST, None
    try:
        return cfg.bind_host(), cluster_token(cfg.keys)
    except AuthError as e:
        log.warning("metrics on localhost only: %s", e)
        return LOCALHOST, None


class _Collector:
    """Calls ``collect`` at each scrape; a failing one logs and yields nothing (never kills a node)."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        for _ in range(3):  # the node's loop may change a dict while it is read: read again
            try:
                return list(self._collect())
            except RuntimeError:
                continue
            except Exception:
                log.exception("collecting metrics failed")
                return []
        return []


class MetricsEndpoint:
    """Serves ``registry`` at GET /metrics on ``host``:``port`` (or the next free of PORT_TRIES
    ports; ``port`` holds the one bound) until :meth:`close`.

    Raises:
        ConfigError: no port of the range could be bound.
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int,
                 token: str | None = None) -> None:
        self.registry, self.token = registry, token
        handler = _handler(self)
        for p in range(port, port + PORT_TRIES) if port else (0,):
            try:
                self._http = ThreadingHTTPServer((host, p), handler)
                break
            except OSError:
                continue
        else:
            raise ConfigError(f"cannot bind the metrics endpoint on {host} ports {port}-"
                              f"{port + PORT_TRIES - 1}: choose another PSERVER_METRICS_PORT")
        self._http.daemon_threads = True
        self.host, self.port = host, self._http.server_address[1]
        self._thread = threading.Thread(target=self._http.serve_forever, name="metrics",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and release the port (idempotent)."""
        if self._thread.is_alive():
            self._http.shutdown()
        self._http.server_close()


def _handler(endpoint: MetricsEndpoint) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != "/metrics":
                return self._reply(404, b"only /metrics here\n", "text/plain")
            if endpoint.token is not None:
                try:
                    check_bearer(self.headers.get("Authorization"), endpoint.token)
                except Unauthorized as e:
                    return self._reply(401, f"{e.reason}\n".encode(), "text/plain")
            self._reply(200, generate_latest(endpoint.registry), CONTENT_TYPE_LATEST)

        def _reply(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            if code == 401:
                self.send_header("WWW-Authenticate", "Bearer")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # scrapes every few seconds: not worth a log line
            pass

    return Handler


def start_endpoint(cfg: Config, role: str, secure: bool,
                   collect: Callable[[], Iterable[Metric]]) -> MetricsEndpoint | None:
    """The node's /metrics endpoint if PSERVER_METRICS_PORT is set (None otherwise): the families
    ``collect`` returns plus the process's CPU and memory.

    Raises:
        ConfigError: no port from PSERVER_METRICS_PORT on could be bound.
    """
    if not cfg.metrics_port:
        return None
    host, token = access(cfg, secure)
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    registry.register(_Collector(collect))
    endpoint = MetricsEndpoint(registry, host, cfg.metrics_port, token)
    log.info("%s metrics at http://%s:%d/metrics%s", role, endpoint.host, endpoint.port,
                " (bearer token: `pserver serve token`)" if token else "")
    return endpoint
