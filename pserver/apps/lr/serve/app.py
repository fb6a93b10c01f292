"""The ASGI application (Starlette): routes -> handlers, the bearer check, body limits and the
mapping of errors to JSON responses. The weights come through the Batcher from a WeightSource
running in one thread; the handlers never block the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ....bearer import Unauthorized, check_bearer
from ..model import sigmoid
from .batcher import Batcher
from .cache import WeightCache
from .instances import BadRequest, Featurizer, Limits, decode_predict, margins
from .source import Unavailable, WeightSource

log = logging.getLogger(__name__)


@dataclass
class ServeSettings:
    """What one serving process needs. token None: no authentication (--insecure)."""

    table: str = "lr_w"
    table_args: dict = field(default_factory=dict)
    featurizer: Featurizer = field(default_factory=Featurizer)
    limits: Limits = field(default_factory=Limits)
    token: str | None = None
    pull_timeout: float = 5.0
    max_staleness: float = 0.0     # > 0: cache weights this many seconds
    cache_entries: int = 1 << 20
    max_batch_keys: int = 1 << 20


def _json(body: dict, status: int = 200, headers: dict | None = None) -> Response:
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


class Service:
    """State of one serving process: settings, the weight source, the batcher and its thread."""

    def __init__(self, settings: ServeSettings, connect) -> None:
        self.settings = settings
        cache = (WeightCache(settings.cache_entries, settings.max_staleness)
                 if settings.max_staleness > 0 else None)
        self.source = WeightSource(connect, settings.table, settings.table_args,
                                   settings.pull_timeout, cache)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="pserver-serve-kv")
        self.batcher = Batcher(self.source.fetch, self.executor, settings.max_batch_keys)
        self.started = time.time()

    def authorise(self, request: Request) -> None:
        if self.settings.token is not None:
            check_bearer(request.headers.get("authorization"), self.settings.token)

    async def body(self, request: Request) -> bytes:
        """The request body, refused (413) as soon as it exceeds the limit."""
        limit = self.settings.limits.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise BadRequest(413, f"body of {length} bytes exceeds the limit of {limit} "
                                  f"(--max-body-bytes)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BadRequest(413, f"body exceeds the limit of {limit} bytes "
                                      f"(--max-body-bytes)")
            chunks.append(chunk)
        return b"".join(chunks)

    async def run(self, fn, *args):
        """fn(*args) in the KV thread (where the KVWorker lives)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


async def predict(request: Request) -> Response:
    svc: Service = request.app.state.service
    svc.authorise(request)
    s = svc.settings
    batch = decode_predict(await svc.body(request), request.headers.get("content-type"),
                           s.limits, s.featurizer)
    if batch.keys.size:
        w, pulled = await svc.batcher.weights(batch.keys)
        version, staleness = pulled.version, max(0.0, time.time() - pulled.pulled_at)
    else:   # no feature at all (and no bias): nothing to pull
        w, version, staleness = np.empty(0), svc.source.last_version, 0.0
    p = sigmoid(margins(batch, w.astype(np.float64)))
    return _json({"probabilities": p.tolist(), "model_version": version,
                  "staleness_s": round(staleness, 6)})


async def healthz(request: Request) -> Response:
    svc: Service = request.app.state.service
    svc.authorise(request)
    src = svc.source
    if src.last_error is not None:
        return _json({"status": "unavailable", "reason": src.last_error}, 503)
    return _json({"status": "ok", "connected": src.kv is not None})


async def model(request: Request) -> Response:
    svc: Service = request.app.state.service
    svc.authorise(request)
    src = svc.source
    nnz = await svc.run(src.nnz)
    return _json({"table": src.table, "nnz": nnz, "model_version": src.last_version,
                  "staleness_s": round(time.time() - src.last_pull, 6) if src.last_pull else None,
                  "data_format": svc.settings.featurizer.data_format,
                  "pulls": svc.batcher.pulls, "requests": svc.batcher.requests})


async def _bad_request(_request: Request, e: BadRequest) -> Response:
    return _json({"error": e.message}, e.status)


async def _unauthorized(_request: Request, e: Unauthorized) -> Response:
    return _json({"error": e.reason}, 401, {"WWW-Authenticate": 'Bearer realm="pserver"'})


async def _unavailable(_request: Request, e: Unavailable) -> Response:
    return _json({"error": e.reason}, 503, {"Retry-After": "1"})


async def _http(_request: Request, e: HTTPException) -> Response:
    return _json({"error": e.detail}, e.status_code, e.headers)


async def _internal(_request: Request, e: Exception) -> Response:
    log.exception("internal error while answering a request: %s", e)
    return _json({"error": f"internal error: {type(e).__name__}"}, 500)


def create_app(settings: ServeSettings, connect) -> Starlette:
    """The ASGI app. ``connect() -> KVWorker`` joins the cluster (called lazily in the KV thread).
    The lifespan starts the batcher and, on shutdown (uvicorn finished the requests in flight),
    leaves the cluster."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        svc = Service(settings, connect)
        app.state.service = svc
        svc.batcher.start()
        svc.executor.submit(_join_early, svc.source)
        try:
            yield
        finally:
            await svc.batcher.stop()
            await svc.run(svc.source.close)
            svc.executor.shutdown(wait=True)

    return Starlette(
        routes=[Route("/predict", predict, methods=["POST"]),
                Route("/healthz", healthz, methods=["GET"]),
                Route("/model", model, methods=["GET"])],
        exception_handlers={BadRequest: _bad_request, Unauthorized: _unauthorized,
                            Unavailable: _unavailable, HTTPException: _http,
                            Exception: _internal},
        lifespan=lifespan)


def _join_early(source: WeightSource) -> None:
    """Join the cluster at start-up, so the first request does not wait for it."""
    try:
        source.connect()
    except Unavailable as e:
        log.warning("not connected to the cluster yet: %s", e.reason)
