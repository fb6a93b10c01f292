"""`pserver serve embeddings` without sockets: the Starlette app (TestClient, in-process ASGI calls)
over real store tables (pserver.testing.TableKV) trained by pserver.torch modules - the rows of
POST /lookup, the IDs that read the initializer, bad requests, auth, the CLI's options."""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import pytest

with warnings.catch_warnings():   # starlette >= 1.0 prefers httpx2; httpx works the same here
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from pserver.apps.embeddings import cli as emb_cli
from pserver.apps.embeddings.app import EmbeddingSettings, create_app
from pserver.apps.embeddings.lookup import keys_of_ids
from pserver.errors import ConfigError, TableError
from pserver.store.init import initial_values
from pserver.testing import TableKV

TOKEN = "e" * 64
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DIM = 4


class ServingKV(TableKV):
    """TableKV answering the calls of the service: read-only declarations, clocked pulls."""

    def __init__(self) -> None:
        super().__init__()
        self.declared: list[tuple] = []
        self.clocked: set[int] = set()
        self.closed = False

    def declare_table(self, name, pushes=True, **kw):
        self.declared.append((name, pushes))
        return super().declare_table(name, **kw)

    def pull(self, keys, table=None, wait=True, clock=False, **kw):
        ts = super().pull(keys, table, wait=False)
        if clock:
            self.clocked.add(ts)
        return self.wait(ts) if wait else ts

    def wait(self, ts, timeout=None):
        out = super().wait(ts, timeout)
        return (out, {0: ts}) if ts in self.clocked else out

    def close(self):
        self.closed = True


def _spec_of(kv, table):
    if table not in kv.tables:
        raise TableError(f"table {table!r} is not declared on the servers")
    return kv.tables[table].spec


def _client(kv, tables=("items",), token=TOKEN, **settings) -> TestClient:
    app = create_app(EmbeddingSettings(tables=list(tables), token=token, **settings),
                     lambda: kv, spec_of=_spec_of)
    return TestClient(app, raise_server_exceptions=False)


def _trained(torch, table_options=None) -> tuple[ServingKV, list[int]]:
    """A table trained a few steps by pserver.torch.Embedding; returns the IDs trained."""
    from pserver.torch import Embedding

    kv = ServingKV()
    emb = Embedding(kv, "items", DIM, init="normal:0.1", updater="adagrad",
                    updater_args={"lr": 0.5}, table_options=table_options)
    trained = [3, -7, 2**40 + 1, -(2**63), 2**63 - 1]
    ids = torch.tensor(trained, dtype=torch.int64)
    for _ in range(3):
        emb(ids).pow(2).sum().backward()
    emb.flush()
    return kv, trained


def test_lookup_rows_are_the_live_rows_and_untrained_ids_are_missing():
    torch = pytest.importorskip("torch")
    from pserver.torch import ids_to_keys

    kv, trained = _trained(torch)
    unseen = [11, -12]
    ids = [trained[1], unseen[0], trained[0], trained[3], unseen[1], trained[0], trained[4]]
    with _client(kv) as c:
        r = c.post("/lookup", headers=AUTH, json={"table": "items", "ids": ids})
        assert r.status_code == 200, r.text
        body = r.json()
    keys = ids_to_keys(torch.tensor(ids, dtype=torch.int64))
    want = kv.tables["items"].pull(keys)
    rows = np.asarray(body["rows"], np.float32)
    assert rows.shape == (len(ids), DIM) and np.array_equal(rows, want)
    assert body["missing"] == [1, 4]                       # the unseen IDs' positions
    spec = kv.tables["items"].spec
    assert np.array_equal(rows[[1, 4]], initial_values(spec, keys[[1, 4]]))
    assert body["table"] == "items" and body["model_version"] >= 1
    assert kv.declared[-1] == ("items", False)            # declared read-only
    assert kv.closed


def test_ids_not_yet_admitted_read_the_initializer():
    torch = pytest.importorskip("torch")
    kv, trained = _trained(torch, table_options={"admit_after": 5})   # 3 pushes: no row yet
    with _client(kv) as c:
        body = c.post("/lookup", headers=AUTH, json={"ids": trained}).json()
    assert body["missing"] == list(range(len(trained)))
    assert kv.tables["items"].spec.admit_after == 5


def test_uint64_patterns_name_the_same_ids_as_negative_int64():
    torch = pytest.importorskip("torch")
    from pserver.torch import ids_to_keys

    ids = [-1, -(2**63), 0, 2**63 - 1, 5]
    want = ids_to_keys(torch.tensor(ids, dtype=torch.int64))
    assert np.array_equal(keys_of_ids(np.array(ids, np.int64)), want)
    patterns = np.array([i & (2**64 - 1) for i in ids], np.uint64)
    assert np.array_equal(keys_of_ids(patterns), want)
    kv, _ = _trained(torch)
    with _client(kv) as c:
        a = c.post("/lookup", headers=AUTH, json={"ids": [-7, 2**64 - 7]}).json()["rows"]
    assert a[0] == a[1]


def test_several_tables_and_the_table_list():
    kv = ServingKV()
    kv.declare_table("users", dim=2, init="constant:0.5")
    kv.declare_table("ads", dim=3)
    kv.push(keys_of_ids(np.array([4], np.int64)), np.ones((1, 2), np.float32), table="users")
    with _client(kv, tables=("users", "ads")) as c:
        u = c.post("/lookup", headers=AUTH, json={"table": "users", "ids": [4, 5]}).json()
        a = c.post("/lookup", headers=AUTH, json={"table": "ads", "ids": [4]}).json()
        r = c.post("/lookup", headers=AUTH, json={"ids": [4]})
        t = c.get("/tables", headers=AUTH).json()
    assert u["rows"] == [[1.5, 1.5], [0.5, 0.5]] and u["missing"] == [1]
    assert a["rows"] == [[0.0, 0.0, 0.0]] and a["missing"] == [0]
    assert r.status_code == 400 and "name the table" in r.json()["error"]
    assert t["tables"]["users"]["dim"] == 2 and t["tables"]["ads"]["dim"] == 3


@pytest.mark.parametrize("kw, status, text", [
    (dict(content=b"{", headers={"content-type": "application/json"}), 400, "not valid JSON"),
    (dict(content=b'{"ids": [1]}', headers={"content-type": "text/plain"}), 415,
     "Content-Type"),
    (dict(json=[1, 2]), 400, "JSON object"),
    (dict(json={"table": "items"}), 400, "JSON object"),
    (dict(json={"ids": "1,2"}), 400, "JSON object"),
    (dict(json={"ids": [1, 2.5]}), 400, "ids[1] = 2.5"),
    (dict(json={"ids": ["3"]}), 400, "ids[0] = '3'"),
    (dict(json={"ids": [True]}), 400, "ids[0] = True"),
    (dict(json={"ids": [None]}), 400, "ids[0] = None"),
    (dict(json={"ids": [2**64]}), 400, "[-2^63, 2^64)"),
    (dict(json={"ids": [-(2**63) - 1]}), 400, "[-2^63, 2^64)"),
    (dict(content=b'{"ids": [100000000000000000000000]}',     # orjson: a float
          headers={"content-type": "application/json"}), 400, "[-2^63, 2^64)"),
    (dict(json={"table": "nope", "ids": [1]}), 404, "table 'nope' is not served"),
    (dict(json={"ids": list(range(6))}), 413, "--max-ids"),
    (dict(json={"ids": [1] * 5, "pad": "x" * 200}), 413, "--max-body-bytes"),
])
def test_bad_requests_get_4xx_with_a_reason_and_change_nothing(kw, status, text):
    kv = ServingKV()
    kv.declare_table("items", dim=2, init="normal:0.1")
    kv.push(keys_of_ids(np.array([1], np.int64)), np.ones((1, 2), np.float32), table="items")
    before = kv.tables["items"].pull(keys_of_ids(np.array([1], np.int64))).copy()
    with _client(kv, max_ids=5, max_body_bytes=150) as c:
        headers = {**AUTH, **kw.pop("headers", {})}
        r = c.post("/lookup", headers=headers, **kw)
        assert r.status_code == status and text in r.json()["error"], r.text
        ok = c.post("/lookup", headers=AUTH, json={"ids": [1]})   # the service goes on
        assert ok.status_code == 200 and np.array_equal(np.float32(ok.json()["rows"]), before)
    assert len(kv.pushes) == 1


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nope"}])
def test_every_endpoint_requires_the_token(headers):
    kv = ServingKV()
    kv.declare_table("items", dim=2)
    with _client(kv) as c:
        for method, path, kw in (("post", "/lookup", {"json": {"ids": [1]}}),
                                 ("get", "/tables", {}), ("get", "/healthz", {})):
            r = getattr(c, method)(path, headers=headers, **kw)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    with _client(kv, token=None) as c:
        assert c.post("/lookup", json={"ids": [1]}).status_code == 200


def test_empty_lookup_pulls_nothing():
    kv = ServingKV()
    kv.declare_table("items", dim=2)
    with _client(kv) as c:
        body = c.post("/lookup", headers=AUTH, json={"ids": []}).json()
    assert body["rows"] == [] and body["missing"] == [] and not kv.clocked


def _args(*argv: str) -> argparse.Namespace:
    from pserver.cli import _SETTING_VAR, _add_setting
    from pserver.serving.cli import register

    p = argparse.ArgumentParser()
    register(p.add_subparsers(), _add_setting, tuple(_SETTING_VAR))
    return p.parse_args(["serve", "embeddings", *argv])


def test_cli_names_the_tables_and_is_secure_by_default(monkeypatch):
    monkeypatch.delenv("PSERVER_KEYS", raising=False)
    monkeypatch.delenv("PSERVER_INSECURE", raising=False)
    with pytest.raises(ConfigError, match=r"requires the cluster's keys.*--insecure"):
        emb_cli.settings_from_args(_args("--table", "items"))
    with pytest.raises(ConfigError, match="--table T or --tables"):
        emb_cli.settings_from_args(_args("--insecure"))
    with pytest.raises(ConfigError, match="--max-ids"):
        emb_cli.settings_from_args(_args("--insecure", "--table", "a", "--max-ids", "0"))
    raw = emb_cli.settings_from_args(_args("--insecure", "--table", "a", "--tables", "b, a,c",
                                           "--max-ids", "7", "--group", "g"))
    assert raw["serve"]["tables"] == ["a", "b", "c"] and raw["serve"]["max_ids"] == 7
    assert raw["serve"]["token"] is None and raw["group"] == "g"


def test_a_table_not_on_the_servers_yet_is_503_until_it_is(monkeypatch):
    from pserver.serving import source as source_mod

    monkeypatch.setattr(source_mod, "RECONNECT_INTERVAL_S", 0.0)
    kv = ServingKV()
    with _client(kv) as c:     # nobody declared "items" yet
        r = c.post("/lookup", headers=AUTH, json={"ids": [1]})
        assert r.status_code == 503 and "cannot declare table 'items'" in r.json()["error"]
        kv.declare_table("items", dim=2)
        r = c.post("/lookup", headers=AUTH, json={"ids": [1]})
        assert r.status_code == 200 and r.json()["missing"] == [0]
