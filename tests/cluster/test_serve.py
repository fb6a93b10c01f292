"""`pserver serve lr` with real processes: predictions over HTTP (httpx) while `pserver train lr`
workers train, equal to `pserver predict` on the exported model at the end; the bearer token;
a server SIGKILLed (k=1) with no failed request after the failover.

Until worker groups exist the service is one more worker of the cluster: it joins after the
training workers passed their table barrier and leaves before their final barrier (which counts
every live worker). With groups, the service joins its own read-only group at any time."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from pserver import KVWorker
from pserver.apps.lr import gen
from pserver.apps.lr.dbpg import DBPGConfig, weight_table_args
from pserver.apps.lr.model import auc
from pserver.apps.lr.serve.instances import feature_keys
from pserver.bearer import cluster_token
from pserver.launch import free_port

from .conftest import pserver_cli

pytestmark = pytest.mark.slow
HTTP_TIMEOUT = 60.0   # a loaded 2-core machine: generous, never a measurement


class Service:
    """One `pserver serve lr` process of a cluster, and an httpx client for it."""

    def __init__(self, cluster, *args: str, token: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "pserver", "serve", "lr", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, env=cluster.env())
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=self.url, timeout=HTTP_TIMEOUT, headers=self.headers)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, "the service exited"
            try:
                if self.client.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the service did not become healthy"
            time.sleep(0.2)

    def predict(self, instances: list[dict]) -> httpx.Response:
        return self.client.post("/predict", json={"instances": instances})

    def stop(self) -> int:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture
def services():
    made: list[Service] = []
    yield made
    for s in made:
        s.stop()


def _libsvm_instances(path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        parts = line.split(None, 1)
        out.append({"libsvm": parts[1].strip() if len(parts) > 1 else ""})
    return out


class _Lines(threading.Thread):
    """Collects a process's output lines (and echoes them for the test log)."""

    def __init__(self, proc: subprocess.Popen, name: str):
        super().__init__(daemon=True)
        self.proc, self.name, self.lines = proc, name, []
        self.start()

    def run(self) -> None:
        for line in iter(self.proc.stdout.readline, ""):
            self.lines.append(line)
            sys.stdout.write(f"[{self.name}] {line}")


def test_predictions_during_training_equal_predict_on_the_export(cluster_factory, services,
                                                                  tmp_path):
    data = tmp_path / "data"
    gen.generate(str(data), 20_000, features=1 << 14, nnz=20, noise=0.02, seed=3,
                 test_examples=400)
    cluster = cluster_factory(2, 2, insecure=False, heartbeat_timeout=5.0)
    model_dir = tmp_path / "model"
    # rank 0 is a straggler (10x slower): the passes last long enough to be watched
    cmd = [sys.executable, "-m", "pserver.apps.lr.worker", "--data", str(data / "train.libsvm"),
           "--epochs", "30", "--blocks", "8", "--l1", "1", "--straggler", "0:10:1",
           "--model-out", str(model_dir)]
    # the service first: a read-only group of its own, it may join before the training does,
    # and its first answers come from the untrained (zero) weights
    token = cluster_token(cluster.keys)
    svc = Service(cluster, "--table", "lr_w", "--l1", "1", token=token)
    services.append(svc)
    train = [subprocess.Popen(cmd, env=cluster.env(r), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    _readers = [_Lines(p, f"train {r}") for r, p in enumerate(train)]  # drain their output
    try:
        svc.wait_ready()
        refused = httpx.post(svc.url + "/predict", json={"instances": []}, timeout=HTTP_TIMEOUT)
        assert refused.status_code == 401 and "missing Authorization" in refused.json()["error"]
        wrong = httpx.post(svc.url + "/predict", json={"instances": []}, timeout=HTTP_TIMEOUT,
                           headers={"Authorization": "Bearer " + "0" * 64})
        assert wrong.status_code == 401 and wrong.json()["error"] == "invalid bearer token"

        test = _libsvm_instances(data / "test.libsvm")
        labels = np.array([1 if line.split()[0] in ("1", "+1") else -1
                           for line in (data / "test.libsvm").read_text().splitlines()])
        versions, aucs = [], []
        while not (model_dir / "model.json").exists():
            r = svc.predict(test)
            if r.status_code == 503 and not versions:   # the cluster or table not there yet
                time.sleep(0.1)
                continue
            assert r.status_code == 200, r.text
            body = r.json()
            assert len(body["probabilities"]) == len(test) and body["staleness_s"] >= 0
            versions.append(body["model_version"])
            aucs.append(auc(labels, np.array(body["probabilities"])))
            time.sleep(0.1)
        assert versions, "no prediction was served while training ran"
        assert versions == sorted(versions) and len(set(versions)) >= 2, versions
        # the served predictions follow the training: they change as the weights do, and end at
        # a trained model's AUC (not "rising": when the service's first answer comes late, the
        # held-out AUC may already be past its peak - seen 0.765 -> 0.780 -> 0.774 in CI)
        assert len(set(aucs)) >= 2 and aucs[-1] > 0.7, aucs

        served = np.array(svc.predict(test).json()["probabilities"])
        expect_file = tmp_path / "expect.txt"
        res = pserver_cli("predict", "--model", str(model_dir), "--data",
                          str(data / "test.libsvm"), "--out", str(expect_file))
        assert res.returncode == 0, res.stderr
        expect = np.loadtxt(expect_file)
        np.testing.assert_allclose(served, expect, atol=1e-6)   # predict prints 6 decimals
        info = svc.client.get("/model").json()
        assert info["table"] == "lr_w" and info["nnz"] > 0

        # the service is a read-only group of its own: the training's final barrier does not
        # count it, so training ends while it keeps serving
        assert [p.wait(300) for p in train] == [0, 0]
        assert svc.predict(test[:5]).status_code == 200
        svc.stop()
    finally:
        for p in train:
            if p.poll() is None:
                p.kill()


def test_service_survives_a_server_sigkill_with_replication(cluster_factory, services):
    cluster = cluster_factory(3, 1, replication=1, heartbeat_timeout=0.6)
    writer = KVWorker(cluster.config(0))
    try:
        writer.declare_table("lr_w", **weight_table_args(DBPGConfig(l1=1.0), 1))
        ids = np.arange(3000)
        keys = feature_keys(ids)
        order = np.argsort(keys)
        rng = np.random.default_rng(0)
        target = rng.normal(size=ids.size)
        g = -(target + np.sign(target))   # l1_prox from 0 with u = 1, l1 = 1: w = target
        writer.push(keys[order], np.stack([g[order], np.ones(ids.size)], 1).astype(np.float32),
                    table="lr_w")
        writer.wait_all()
        svc = Service(cluster, "--insecure", "--table", "lr_w", "--pull-timeout", "30")
        services.append(svc)
        svc.wait_ready()
        instances = [{"features": {str(i): 1 for i in rng.choice(ids, 10, replace=False)}}
                     for _ in range(100)]
        base = svc.predict(instances)
        assert base.status_code == 200, base.text
        base_p = base.json()["probabilities"]

        statuses: list[int] = []
        for _ in range(5):
            statuses.append(svc.predict(instances).status_code)
        cluster.kill("server 1", signal.SIGKILL)
        after_kill = len(statuses)
        ok_in_a_row, deadline = 0, time.monotonic() + 180
        while ok_in_a_row < 30:
            r = svc.predict(instances)
            statuses.append(r.status_code)
            assert r.status_code in (200, 503), r.text   # never a crash, never a wrong answer
            if r.status_code == 200:
                assert r.json()["probabilities"] == base_p
                ok_in_a_row += 1
            assert time.monotonic() < deadline, f"no recovery after the kill: {statuses}"
        first_ok = after_kill + statuses[after_kill:].index(200)
        assert set(statuses[:after_kill]) == {200}
        assert set(statuses[first_ok:]) == {200}, statuses   # nothing failed after the failover
        assert svc.client.get("/healthz").status_code == 200
    finally:
        writer.close()
