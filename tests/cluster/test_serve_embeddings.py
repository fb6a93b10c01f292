"""`pserver serve embeddings` with real processes on a secure cluster: a worker trains pserver.torch
Embedding tables, the service (its own read-only group) answers POST /lookup with the live rows -
equal to kv.pull of the same keys and to the exported rows, the untrained IDs reported missing -
follows further training, refuses bad requests with 4xx, and requires the bearer token."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import pserver  # noqa: E402
from pserver.apps.export import export_table, load_exported  # noqa: E402
from pserver.bearer import cluster_token  # noqa: E402
from pserver.launch import free_port  # noqa: E402
from pserver.torch import Embedding, ids_to_keys  # noqa: E402

pytestmark = pytest.mark.slow
HTTP_TIMEOUT = 60.0   # a loaded 2-core machine: generous, never a measurement
DIM = 4


def _start_service(cluster, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "pserver", "serve", "embeddings", "--port", str(port), *args]
    return subprocess.Popen(cmd, env=cluster.env()), f"http://127.0.0.1:{port}"


def _wait_ready(proc: subprocess.Popen, client: httpx.Client, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "the service exited"
        try:
            if client.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the service did not become healthy"
        time.sleep(0.2)


def _pull(kv, keys: np.ndarray, table: str) -> np.ndarray:
    """kv.pull of keys in any order, repeats allowed (it takes sorted unique keys)."""
    uniq, inverse = np.unique(keys, return_inverse=True)
    return kv.pull(uniq, table=table).reshape(uniq.size, -1)[inverse]


def _train(emb: Embedding, ids: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        emb(ids).pow(2).sum().backward()
    emb.flush()


def test_lookup_serves_the_live_rows_of_a_trained_table(cluster_factory, tmp_path):
    cluster = cluster_factory(2, 1, insecure=False)
    token = cluster_token(cluster.keys)
    trained = torch.tensor([5, -3, 2**40 + 9, -(2**63), 2**63 - 1, *range(100, 400)],
                           dtype=torch.int64)
    with pserver.KVWorker(cluster.config(0)) as kv:
        items = Embedding(kv, "items", DIM, init="normal:0.1", updater="adagrad",
                          updater_args={"lr": 0.3})
        users = Embedding(kv, "users", 2, init="uniform:0.5", updater="sgd",
                          updater_args={"lr": 0.1})
        _train(items, trained, 3)
        _train(users, trained[:10], 1)

        proc, url = _start_service(cluster, "--tables", "items,users", "--max-ids", "1000")
        client = httpx.Client(base_url=url, timeout=HTTP_TIMEOUT,
                              headers={"Authorization": f"Bearer {token}"})
        try:
            _wait_ready(proc, client)
            refused = httpx.post(url + "/lookup", json={"table": "items", "ids": [5]},
                                 timeout=HTTP_TIMEOUT)
            assert refused.status_code == 401 and "Authorization" in refused.json()["error"]

            unseen = [7, -8, 2**50]
            ids = [*trained[:5].tolist(), *unseen, *trained[5:].tolist()]
            r = client.post("/lookup", json={"table": "items", "ids": ids})
            assert r.status_code == 200, r.text
            body = r.json()
            rows = np.asarray(body["rows"], np.float32)
            keys = ids_to_keys(torch.tensor(ids, dtype=torch.int64))
            assert np.array_equal(rows, _pull(kv, keys, "items"))
            assert body["missing"] == [5, 6, 7]

            export_table(kv, "items", tmp_path / "items")
            exported_ids, exported_rows = load_exported(tmp_path / "items")
            as_u64 = np.array(ids, np.int64).view(np.uint64)
            known = np.isin(as_u64, exported_ids)
            assert known.sum() == trained.numel() and not known[5:8].any()
            at = np.searchsorted(exported_ids, as_u64[known])
            assert np.array_equal(rows[known], exported_rows[at])

            # the live path: further training shows in the next answer
            _train(items, trained[:5], 2)
            again = np.asarray(client.post("/lookup", json={"table": "items", "ids": ids[:5]})
                               .json()["rows"], np.float32)
            assert np.array_equal(again, _pull(kv, keys[:5], "items"))
            assert not np.array_equal(again, rows[:5])

            u = client.post("/lookup", json={"table": "users", "ids": [5, 7]}).json()
            assert np.array_equal(np.asarray(u["rows"], np.float32),
                                  _pull(kv, ids_to_keys(torch.tensor([5, 7])), "users"))
            assert u["missing"] == [1]

            bad = client.post("/lookup", json={"table": "items", "ids": [1.5]})
            assert bad.status_code == 400 and "ids[0]" in bad.json()["error"]
            bad = client.post("/lookup", json={"table": "ads", "ids": [1]})
            assert bad.status_code == 404 and "not served" in bad.json()["error"]
            bad = client.post("/lookup", content=b"{", headers={"content-type": "application/json"})
            assert bad.status_code == 400 and "JSON" in bad.json()["error"]
            bad = client.post("/lookup", json={"table": "items", "ids": list(range(1001))})
            assert bad.status_code == 413 and "--max-ids" in bad.json()["error"]
            assert client.get("/tables").json()["tables"]["items"]["dim"] == DIM
            assert np.array_equal(_pull(kv, keys[:5], "items"), again)   # nothing changed
        finally:
            client.close()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                # uvicorn finishes the requests in flight, then re-raises the signal it caught
                assert proc.wait(60) in (0, -signal.SIGTERM)
            finally:
                if proc.poll() is None:
                    proc.kill()
