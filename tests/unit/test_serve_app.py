"""`pserver serve lr` without sockets: the Starlette app driven by its TestClient (in-process ASGI
calls) over a fake KVWorker - auth, limits, 503 and recovery, the batcher merging requests,
the weight cache, the CLI's secure default."""

from __future__ import annotations

import argparse
import asyncio
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

with warnings.catch_warnings():   # starlette >= 1.0 prefers httpx2; httpx works the same here
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from pserver.apps.lr.serve import cli as serve_cli
from pserver.apps.lr.serve.app import ServeSettings, create_app
from pserver.apps.lr.serve.cache import WeightCache
from pserver.apps.lr.serve.instances import Limits, feature_keys
from pserver.errors import (
    ConfigError,
    DataLostError,
    RequestTimeoutError,
    SchedulerUnreachableError,
)
from pserver.serving import source as source_mod
from pserver.serving.batcher import Batcher, Pulled, merge_keys
from pserver.serving.source import WeightSource, model_version

TOKEN = "t" * 64
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class FakeKV:
    """The KVWorker calls the service makes, over a dict of weights."""

    def __init__(self, weights: dict[int, float], fail: Exception | None = None):
        self.weights, self.fail = weights, fail
        self.declared: list[tuple] = []
        self.pulls, self.closed, self._ts = [], False, 0

    def declare_table(self, name, **kw):
        self.declared.append((name, kw))

    def pull(self, keys, table=None, wait=True, clock=False):
        assert not wait and clock
        self.pulls.append(keys.copy())
        self._ts += 1
        return self._ts

    def wait(self, ts, timeout=None):
        if self.fail is not None:
            raise self.fail
        keys = self.pulls[ts - 1]
        return np.array([self.weights.get(int(k), 0.0) for k in keys], np.float32), {7: ts}

    def pull_range(self, table=None):
        return np.array(sorted(self.weights), np.uint64), np.array(
            [self.weights[k] for k in sorted(self.weights)], np.float32)

    def close(self):
        self.closed = True


def _weights():
    keys = feature_keys([1, 2, 3])
    return {int(keys[0]): 1.0, int(keys[1]): -2.0, int(keys[2]): 0.0}


def _client(kvs, token=TOKEN, **settings):
    """TestClient of an app whose connect() hands out the FakeKVs in turn (an exception in the
    list is raised instead)."""
    it = iter(kvs)

    def connect():
        kv = next(it)
        if isinstance(kv, Exception):
            raise kv
        return kv

    app = create_app(ServeSettings(token=token, table_args={"dim": 1}, **settings), connect)
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(autouse=True)
def _no_reconnect_pause(monkeypatch):
    monkeypatch.setattr(source_mod, "RECONNECT_INTERVAL_S", 0.0)


def test_predict_uses_the_pulled_weights_and_declares_read_only():
    kv = FakeKV(_weights())
    with _client([kv]) as c:
        r = c.post("/predict", headers=AUTH, json={"instances": [
            {"features": {"1": 1, "2": 1}}, {"libsvm": "1:2"}, {"libsvm": "3:1 9:1"}]})
        assert r.status_code == 200, r.text
        body = r.json()
        np.testing.assert_allclose(body["probabilities"], 1 / (1 + np.exp(-np.array(
            [-1.0, 2.0, 0.0]))))
        assert body["model_version"] == model_version({7: len(kv.pulls)}) and \
            body["staleness_s"] >= 0
        assert kv.declared == [("lr_w", {"dim": 1, "pushes": False})]
        assert all(np.all(p[:-1] < p[1:]) for p in kv.pulls)   # sorted unique keys
        m = c.get("/model", headers=AUTH).json()
        assert m["table"] == "lr_w" and m["nnz"] == 2
    assert kv.closed   # graceful shutdown leaves the cluster


@pytest.mark.parametrize("headers, reason", [
    ({}, "missing Authorization header"),
    ({"Authorization": "Basic abc"}, "Authorization must be 'Bearer TOKEN'"),
    ({"Authorization": "Bearer nope"}, "invalid bearer token"),
])
def test_every_endpoint_requires_the_token(headers, reason):
    with _client([FakeKV(_weights())]) as c:
        for method, path in (("post", "/predict"), ("get", "/healthz"), ("get", "/model")):
            r = getattr(c, method)(path, headers=headers)
            assert r.status_code == 401 and r.json()["error"].startswith(reason)
            assert r.headers["www-authenticate"].startswith("Bearer")


def test_insecure_service_needs_no_token():
    with _client([FakeKV(_weights())], token=None) as c:
        assert c.post("/predict", json={"instances": [{"libsvm": "1:1"}]}).status_code == 200


@pytest.mark.parametrize("kw, status, text", [
    (dict(content=b"{", headers={"content-type": "application/json"}), 400, "not valid JSON"),
    (dict(content=b"{}", headers={"content-type": "text/plain"}), 415, "Content-Type"),
    (dict(json={"instances": [{"libsvm": "1:1"}] * 3}), 413, "--max-instances"),
    (dict(json={"instances": [{"libsvm": "1:1 " * 50}]}), 413, "--max-body-bytes"),
    (dict(content=iter([b'{"instances": [', b" " * 200, b"]}"]),
          headers={"content-type": "application/json"}), 413, "--max-body-bytes"),
    (dict(json={"instances": [{"libsvm": "1:a"}]}), 400, "instance 0: feature value"),
])
def test_bad_requests_get_4xx_with_a_message(kw, status, text):
    kv = FakeKV(_weights())
    with _client([kv], limits=Limits(max_instances=2, max_body_bytes=120)) as c:
        headers = {**AUTH, **kw.pop("headers", {})}
        r = c.post("/predict", headers=headers, **kw)
        assert r.status_code == status and text in r.json()["error"], r.text
        assert c.post("/predict", headers=AUTH, json={"instances": []}).status_code == 200
    assert kv.pulls == []


def test_unknown_paths_and_methods_get_json_errors():
    with _client([FakeKV(_weights())]) as c:
        r = c.get("/nope", headers=AUTH)
        assert r.status_code == 404 and r.json() == {"error": "Not Found"}
        r = c.get("/predict", headers=AUTH)
        assert r.status_code == 405 and r.json() == {"error": "Method Not Allowed"}


def test_cluster_down_is_503_and_the_service_recovers():
    kv = FakeKV(_weights())
    down = SchedulerUnreachableError("no scheduler at 127.0.0.1:1")
    with _client([down, down, kv]) as c:   # the start-up join fails, then one request's
        r = c.post("/predict", headers=AUTH, json={"instances": [{"libsvm": "1:1"}]})
        assert r.status_code == 503 and "cannot join the cluster" in r.json()["error"]
        h = c.get("/healthz", headers=AUTH)
        assert h.status_code == 503 and "no scheduler" in h.json()["reason"]
        r = c.post("/predict", headers=AUTH, json={"instances": [{"libsvm": "1:1"}]})
        assert r.status_code == 200 and r.json()["probabilities"][0] > 0.5
        assert c.get("/healthz", headers=AUTH).status_code == 200


@pytest.mark.parametrize("error, reason, reconnects", [
    (DataLostError("server 3 died without a replica"), "weights lost", False),
    (RequestTimeoutError("no reply"), "pull timed out", False),
    (SchedulerUnreachableError("lost the scheduler"), "lost the cluster's scheduler", True),
])
def test_failed_pulls_are_503_then_recover(error, reason, reconnects):
    first = FakeKV(_weights(), fail=error)
    second = FakeKV(_weights())
    with _client([first, second]) as c:
        r = c.post("/predict", headers=AUTH, json={"instances": [{"libsvm": "1:1"}]})
        assert r.status_code == 503 and reason in r.json()["error"]
        first.fail = None
        r = c.post("/predict", headers=AUTH, json={"instances": [{"libsvm": "1:1"}]})
        assert r.status_code == 200
        assert first.closed == reconnects and bool(second.pulls) == reconnects


def test_timed_out_pulls_are_collected_later(monkeypatch):
    monkeypatch.setattr(source_mod, "ABANDONED_RETRY_S", 0.0)
    kv = FakeKV(_weights(), fail=RequestTimeoutError("no reply"))
    src = WeightSource(lambda: kv, {"lr_w": {}})
    with pytest.raises(source_mod.Unavailable):
        src.fetch(np.sort(feature_keys([1])))
    assert src._abandoned == [1]
    kv.fail = None
    src.fetch(np.sort(feature_keys([1])))
    assert src._abandoned == []


def test_an_unexpected_error_is_500_json_and_the_service_goes_on():
    kv = FakeKV(_weights(), fail=ZeroDivisionError("boom"))
    with _client([kv]) as c:
        r = c.post("/predict", headers=AUTH, json={"instances": [{"libsvm": "1:1"}]})
        assert r.status_code == 500 and r.json()["error"] == "internal error: ZeroDivisionError"
        kv.fail = None
        assert c.post("/predict", headers=AUTH,
                      json={"instances": [{"libsvm": "1:1"}]}).status_code == 200


def test_merge_keys_gives_each_request_its_own_order():
    a, b = np.array([5, 1, 5], np.uint64), np.array([9, 1], np.uint64)
    union, (pa, pb) = merge_keys([a, b])
    assert union.tolist() == [1, 5, 9]
    assert union[pa].tolist() == [5, 1, 5] and union[pb].tolist() == [9, 1]


def test_batcher_merges_requests_that_arrive_during_a_pull():
    gate, calls = threading.Event(), []

    def fetch(keys):
        calls.append(keys.tolist())
        if len(calls) == 1:
            gate.wait(10)   # the first pull is slow: the next requests queue meanwhile
        return Pulled(keys, keys.astype(np.float32) * 10, len(calls), 0.0)

    async def main():
        b = Batcher(fetch, ThreadPoolExecutor(1))
        b.start()
        first = asyncio.ensure_future(b.weights(np.array([1], np.uint64)))
        while not calls:
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(b.weights(np.array(k, np.uint64)))
                for k in ([3, 2], [2], [4, 3])]
        await asyncio.sleep(0.01)
        gate.set()
        results = [await f for f in [first, *rest]]
        await b.stop()
        return results, b

    results, b = asyncio.run(main())
    assert calls == [[1], [2, 3, 4]]          # three requests, one pull
    assert [w.tolist() for w, _ in results] == [[10], [30, 20], [20], [40, 30]]
    assert (b.pulls, b.requests) == (2, 4)


def test_batcher_shares_an_error_with_the_whole_batch():
    def fetch(keys):
        raise source_mod.Unavailable("down")

    async def main():
        b = Batcher(fetch, ThreadPoolExecutor(1))
        b.start()
        got = await asyncio.gather(*(b.weights(np.array([k], np.uint64)) for k in (1, 2)),
                                   return_exceptions=True)
        await b.stop()
        return got

    assert [str(e) for e in asyncio.run(main())] == ["down", "down"]


def test_cache_serves_fresh_weights_and_evicts_the_oldest():
    c = WeightCache(max_entries=3, max_age=10.0)
    c.store(np.array([1, 5], np.uint64), np.array([0.1, 0.5]), pulled_at=100.0)
    c.store(np.array([7, 9], np.uint64), np.array([0.7, 0.9]), pulled_at=105.0)
    assert c.keys.tolist() == [5, 7, 9] or c.keys.tolist() == [1, 7, 9]
    assert len(c) == 3
    w, t, hit = c.lookup(np.array([5, 7, 8], np.uint64), now=112.0)
    assert hit.tolist() == [False, True, False]   # 5 is older than 10 s, 8 never pulled
    assert w[1] == np.float32(0.7) and t[1] == 105.0


def test_source_with_cache_pulls_only_missing_keys():
    kv = FakeKV(_weights())
    src = WeightSource(lambda: kv, {"lr_w": {}}, cache=WeightCache(100, 60.0))
    keys = np.sort(feature_keys([1, 2]))
    src.fetch(keys[:1])
    got = src.fetch(keys)
    assert [p.tolist() for p in kv.pulls] == [keys[:1].tolist(), keys[1:].tolist()]
    want = [_weights()[int(k)] for k in keys]
    assert got.weights.tolist() == want
    src.fetch(keys)
    assert len(kv.pulls) == 2   # all fresh: no pull


def _serve_args(**kw):
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    from pserver.cli import _SETTING_VAR, _add_setting
    from pserver.serving.cli import register
    register(sub, _add_setting, tuple(_SETTING_VAR))
    return p.parse_args(["serve", "lr", *kw.pop("argv", [])])


def test_secure_by_default_needs_the_keys(monkeypatch):
    monkeypatch.delenv("PSERVER_KEYS", raising=False)
    monkeypatch.delenv("PSERVER_INSECURE", raising=False)
    with pytest.raises(ConfigError, match=r"requires the cluster's keys.*--insecure"):
        serve_cli.settings_from_args(_serve_args())
    raw = serve_cli.settings_from_args(_serve_args(argv=["--insecure", "--l1", "2"]))
    assert raw["serve"]["token"] is None and raw["group"] == "serve"
    assert raw["serve"]["table_args"]["updater_args"]["l1"] == 2.0


def test_the_token_comes_from_the_cluster_keys(tmp_path, monkeypatch):
    from pserver.bearer import cluster_token
    from pserver.security import keygen

    keys = keygen(tmp_path / "keys")
    monkeypatch.delenv("PSERVER_INSECURE", raising=False)
    raw = serve_cli.settings_from_args(_serve_args(argv=["--keys", str(keys)]))
    assert raw["serve"]["token"] == cluster_token(keys) and len(cluster_token(keys)) == 64
    other = keygen(tmp_path / "other")
    assert cluster_token(other) != cluster_token(keys)
