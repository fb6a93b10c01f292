"""The routes of `pserver serve embeddings` (POST /lookup, GET /tables) over the shared serving
app (pserver.serving.http: auth, body limit, errors, /healthz): one batcher per table, all pulling
through one WeightSource in one thread."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ...serving.batcher import Batcher
from ...serving.http import ServiceBase, create_service_app, json_response
from ...serving.source import WeightSource, servers_spec
from ...store.spec import TableSpec
from .lookup import decode_lookup, initializer_rows


@dataclass
class EmbeddingSettings:
    """What one serving process needs. tables: the served tables (their specs are read from the
    servers); token None: no authentication (--insecure)."""

    tables: list[str] = field(default_factory=lambda: ["emb"])
    token: str | None = None
    pull_timeout: float = 5.0
    max_ids: int = 10_000
    max_body_bytes: int = 1 << 20
    max_batch_keys: int = 1 << 20


class EmbeddingService(ServiceBase):
    """One serving process of embedding tables: the shared state, a batcher per table."""

    def __init__(self, settings: EmbeddingSettings, connect,
                 spec_of: Callable[[object, str], TableSpec] = servers_spec) -> None:
        super().__init__(WeightSource(connect, dict.fromkeys(settings.tables), settings.pull_timeout,
                                      spec_of=spec_of),
                         settings.token, settings.max_body_bytes)
        self.settings = settings
        self.tables = tuple(settings.tables)
        self.by_table = {t: Batcher(partial(self.source.fetch, table=t), self.executor,
                                    settings.max_batch_keys) for t in self.tables}
        self.batchers.extend(self.by_table.values())


async def lookup(request: Request) -> Response:
    svc: EmbeddingService = request.app.state.service
    svc.authorise(request)
    req = decode_lookup(await svc.body(request), request.headers.get("content-type"),
                        svc.tables, svc.settings.max_ids)
    if not req.keys.size:
        return json_response({"table": req.table, "rows": [], "missing": [],
                              "model_version": svc.source.last_version, "staleness_s": 0.0})
    rows, pulled = await svc.by_table[req.table].weights(req.keys)
    spec = svc.source.specs[req.table]
    rows = rows.reshape(req.keys.size, spec.dim)
    return json_response({"table": req.table, "rows": rows,
                          "missing": initializer_rows(spec, req.keys, rows),
                          "model_version": pulled.version,
                          "staleness_s": round(max(0.0, time.time() - pulled.pulled_at), 6)})


async def tables(request: Request) -> Response:
    svc: EmbeddingService = request.app.state.service
    svc.authorise(request)
    await svc.run(svc.source.connect)
    return json_response({
        "tables": {t: svc.source.specs[t].to_json() for t in svc.tables},
        "model_version": svc.source.last_version,
        "pulls": sum(b.pulls for b in svc.batchers),
        "requests": sum(b.requests for b in svc.batchers)})


def create_app(settings: EmbeddingSettings, connect,
               spec_of: Callable[[object, str], TableSpec] = servers_spec) -> Starlette:
    """The ASGI app. ``connect() -> KVWorker`` joins the cluster (lazily, in the KV thread);
    ``spec_of(kv, table)``: a table's spec as the servers hold it."""
    return create_service_app([Route("/lookup", lookup, methods=["POST"]),
                               Route("/tables", tables, methods=["GET"])],
                              lambda: EmbeddingService(settings, connect, spec_of))


