"""The dashboard's web app (Starlette): the page at /, its data at /api/state, and a thread that
asks the scheduler for its status once per interval. On a secure cluster /api/state requires the
cluster's bearer token (the page reads it from its URL fragment, #token=..., which browsers never
send to the server); the page itself holds no data."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from importlib.resources import files
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..bearer import Unauthorized, check_bearer
from ..errors import PServerError
from .state import DashboardState

log = logging.getLogger(__name__)


class Dashboard:
    """Polls ``status()`` (the scheduler's status report) every ``interval`` seconds into a
    DashboardState until :meth:`stop`. ``status`` raising PServerError is shown on the page."""

    def __init__(self, status: Callable[[], dict[str, Any]], interval: float = 1.0) -> None:
        self.state = DashboardState()
        self.lock = threading.Lock()
        self._status, self._interval = status, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dashboard-poll", daemon=True)

    def start(self) -> Dashboard:
        """Start polling in a daemon thread; returns self."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling after the current request (the state is kept)."""
        self._stop.set()

    def poll_once(self) -> None:
        """Ask for one status report and take it in; a PServerError (scheduler unreachable,
        refused) is kept as the state's error instead of being raised."""
        try:
            status = self._status()
        except PServerError as e:
            with self.lock:
                self.state.failed(str(e))
            return
        with self.lock:
            self.state.update(status, time.time())

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # the page shows stale data rather than the poller dying
                log.exception("polling the scheduler failed")
            self._stop.wait(self._interval)

    def snapshot(self) -> dict[str, Any]:
        """The page's data as JSON-ready dicts (DashboardState.to_json), read under the lock."""
        with self.lock:
            return self.state.to_json()


def build_app(dashboard: Dashboard, token: str | None) -> Starlette:
    """The ASGI app over ``dashboard``; ``token``: the bearer token /api/state requires (None: an
    insecure cluster, served on localhost)."""
    page = files(__package__).joinpath("static", "index.html").read_text()

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def state(request: Request) -> Response:
        if token is not None:
            try:
                check_bearer(request.headers.get("authorization"), token)
            except Unauthorized as e:
                return PlainTextResponse(e.reason, status_code=401,
                                         headers={"WWW-Authenticate": "Bearer"})
        return JSONResponse(dashboard.snapshot() | {"secure": token is not None},
                            headers={"Cache-Control": "no-store"})

    return Starlette(routes=[Route("/", index), Route("/api/state", state)])
