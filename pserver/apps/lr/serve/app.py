"""The routes of `pserver serve lr` (POST /predict, GET /model) over the shared serving app
(pserver.serving.http: auth, body limit, errors, /healthz). The weights come through the Batcher
from a WeightSource running in one thread; the handlers never block the event loop."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ....serving.batcher import Batcher
from ....serving.http import ServiceBase, create_service_app, json_response
from ....serving.source import WeightSource
from ..model import sigmoid
from .cache import WeightCache
from .instances import Featurizer, Limits, decode_predict, margins


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


class Service(ServiceBase):
    """One serving process of an LR table: the shared state plus the settings and one batcher."""

    def __init__(self, settings: ServeSettings, connect) -> None:
        cache = (WeightCache(settings.cache_entries, settings.max_staleness)
                 if settings.max_staleness > 0 else None)
        super().__init__(WeightSource(connect, {settings.table: settings.table_args},
                                      settings.pull_timeout, cache),
                         settings.token, settings.limits.max_body_bytes)
        self.settings = settings
        self.batcher = Batcher(self.source.fetch, self.executor, settings.max_batch_keys)
        self.batchers.append(self.batcher)
        self.started = time.time()


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
    return json_response({"probabilities": p.tolist(), "model_version": version,
                          "staleness_s": round(staleness, 6)})


async def model(request: Request) -> Response:
    svc: Service = request.app.state.service
    svc.authorise(request)
    src = svc.source
    nnz = await svc.run(src.nnz)
    return json_response({
        "table": src.table, "nnz": nnz, "model_version": src.last_version,
        "staleness_s": round(time.time() - src.last_pull, 6) if src.last_pull else None,
        "data_format": svc.settings.featurizer.data_format,
        "pulls": svc.batcher.pulls, "requests": svc.batcher.requests})


def create_app(settings: ServeSettings, connect) -> Starlette:
    """The ASGI app. ``connect() -> KVWorker`` joins the cluster (called lazily in the KV thread).
    The lifespan starts the batcher and, on shutdown (uvicorn finished the requests in flight),
    leaves the cluster."""
    return create_service_app([Route("/predict", predict, methods=["POST"]),
                               Route("/model", model, methods=["GET"])],
                              lambda: Service(settings, connect))
