"""What every serving app shares over HTTP (Starlette): the bearer check, the body limit, JSON
answers and the mapping of errors to them, GET /healthz, and the lifespan that starts a service's
batchers and leaves the cluster at shutdown. The routes of a kind are its own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..bearer import Unauthorized, check_bearer
from .batcher import Batcher
from .source import Unavailable, WeightSource

log = logging.getLogger(__name__)


class BadRequest(Exception):
    """A request the service refuses: HTTP ``status`` and a message saying what to fix."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def check_content_type(content_type: str | None) -> None:
    """Raises BadRequest(415) unless the media type is application/json (parameters allowed)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise BadRequest(415, f"Content-Type must be application/json, got {content_type!r}")


def json_object(body: bytes, content_type: str | None, field: str, shape: str) -> dict:
    """The JSON object of a request body, which must hold a list under ``field`` (``shape``: the
    expected form, for the message). Raises BadRequest (415: not JSON; 400: malformed JSON, not
    such an object)."""
    check_content_type(content_type)
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise BadRequest(400, f"body is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get(field), list):
        raise BadRequest(400, f"body must be a JSON object {shape}")
    return doc


def json_response(body: dict, status: int = 200, headers: dict | None = None) -> Response:
    """``body`` as JSON (numpy arrays serialised as nested lists, without a copy to Python)."""
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status, headers,
                    media_type="application/json")


class ServiceBase:
    """State every serving process has: its token (None: no authentication), the body limit, the
    WeightSource and the one thread that uses its KVWorker. Kinds add their batchers to
    ``batchers``."""

    def __init__(self, source: WeightSource, token: str | None, max_body_bytes: int) -> None:
        self.source, self.token, self.max_body_bytes = source, token, max_body_bytes
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="pserver-serve-kv")
        self.batchers: list[Batcher] = []

    def authorise(self, request: Request) -> None:
        """Raises Unauthorized unless the request carries the bearer token (when one is set)."""
        if self.token is not None:
            check_bearer(request.headers.get("authorization"), self.token)

    async def body(self, request: Request) -> bytes:
        """The request body. Raises BadRequest(413) as soon as it exceeds the limit."""
        limit = self.max_body_bytes
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
        """fn(*args) in the KV thread (where the KVWorker lives). Raises what fn raises."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)


async def healthz(request: Request) -> Response:
    svc: ServiceBase = request.app.state.service
    svc.authorise(request)
    src = svc.source
    if src.last_error is not None:
        return json_response({"status": "unavailable", "reason": src.last_error}, 503)
    return json_response({"status": "ok", "connected": src.kv is not None})


async def _bad_request(_request: Request, e: BadRequest) -> Response:
    return json_response({"error": e.message}, e.status)


async def _unauthorized(_request: Request, e: Unauthorized) -> Response:
    return json_response({"error": e.reason}, 401, {"WWW-Authenticate": 'Bearer realm="pserver"'})


async def _unavailable(_request: Request, e: Unavailable) -> Response:
    return json_response({"error": e.reason}, 503, {"Retry-After": "1"})


async def _http(_request: Request, e: HTTPException) -> Response:
    return json_response({"error": e.detail}, e.status_code, e.headers)


async def _internal(_request: Request, e: Exception) -> Response:
    log.exception("internal error while answering a request: %s", e)
    return json_response({"error": f"internal error: {type(e).__name__}"}, 500)


def create_service_app(routes: list[Route], make_service: Callable[[], ServiceBase]
                       ) -> Starlette:
    """The ASGI app of ``routes`` plus GET /healthz. The lifespan builds the service, starts its
    batchers and joins the cluster early; on shutdown (uvicorn finished the requests in flight)
    it stops them and leaves the cluster."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        svc = make_service()
        app.state.service = svc
        for b in svc.batchers:
            b.start()
        svc.executor.submit(_join_early, svc.source)
        try:
            yield
        finally:
            for b in svc.batchers:
                await b.stop()
            await svc.run(svc.source.close)
            svc.executor.shutdown(wait=True)

    return Starlette(
        routes=[*routes, Route("/healthz", healthz, methods=["GET"])],
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
