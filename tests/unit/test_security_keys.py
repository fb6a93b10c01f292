"""pserver.security's key material: keygen, loading (and its errors), no secret in a repr. Files
only: the CURVE sockets themselves are tested in tests/cluster/test_security_sockets.py."""

from __future__ import annotations

import logging
import shutil
import stat

import pytest

from pserver import security
from pserver.errors import AuthError
from pserver.security import Credentials, keygen


# ------------------------------------------------------------------------------ key material
def test_keygen_layout_and_permissions(tmp_path):
    root = keygen(tmp_path / "k")
    assert stat.S_IMODE((root / "private").stat().st_mode) == 0o700
    for role in security.ROLES:
        assert stat.S_IMODE((root / "private" / f"{role}.key_secret").stat().st_mode) == 0o600
        assert stat.S_IMODE((root / "public" / f"{role}.key").stat().st_mode) == 0o644
        assert "secret-key" not in (root / "public" / f"{role}.key").read_text()
    publics = {Credentials.load(root, r)._public for r in security.ROLES}
    assert len(publics) == 3


def test_keygen_refuses_to_overwrite_without_force(tmp_path):
    root = keygen(tmp_path / "k")
    before = (root / "public" / "worker.key").read_text()
    with pytest.raises(AuthError, match="refusing to overwrite"):
        keygen(root)
    assert (root / "public" / "worker.key").read_text() == before
    keygen(root, force=True)
    assert (root / "public" / "worker.key").read_text() != before
    Credentials.load(root, "worker")  # the replaced set is consistent


def test_ephemeral_is_private_and_complete(tmp_path):
    root = security.ephemeral(tmp_path)
    assert root.parent == tmp_path and stat.S_IMODE(root.stat().st_mode) == 0o700
    assert {Credentials.load(root, r).role for r in security.ROLES} == set(security.ROLES)


def test_a_node_needs_only_its_own_secret(tmp_path):
    root = keygen(tmp_path / "k")
    for role in ("scheduler", "server"):
        (root / "private" / f"{role}.key_secret").unlink()
    assert Credentials.load(root, "worker").role == "worker"
    with pytest.raises(AuthError, match=r"server\.key_secret"):
        Credentials.load(root, "server")


def test_load_errors(tmp_path, caplog):
    with pytest.raises(AuthError, match=r"does not exist.*pserver keygen"):
        Credentials.load(tmp_path / "nowhere", "worker")
    root = keygen(tmp_path / "k")
    with pytest.raises(AuthError, match="unknown role"):
        Credentials.load(root, "admin")
    (root / "public" / "scheduler.key").write_text('curve\n    public-key = "short"\n')
    with pytest.raises(AuthError, match=r"bad key file .*scheduler\.key"):
        Credentials.load(root, "worker")
    (root / "public" / "scheduler.key").unlink()
    with pytest.raises(AuthError, match="missing public key"):
        Credentials.load(root, "worker")


def test_load_rejects_mixed_key_sets(tmp_path):
    a, b = keygen(tmp_path / "a"), keygen(tmp_path / "b")
    shutil.copy(b / "private" / "worker.key_secret", a / "private" / "worker.key_secret")
    with pytest.raises(AuthError, match="different `pserver keygen` runs"):
        Credentials.load(a, "worker")
    shutil.copy(a / "public" / "server.key", a / "public" / "worker.key")
    with pytest.raises(AuthError, match="share a public key"):
        Credentials.load(a, "server")


def test_load_warns_on_readable_secret(tmp_path, caplog):
    root = keygen(tmp_path / "k")
    (root / "private" / "worker.key_secret").chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="pserver.security"):
        Credentials.load(root, "worker")
    assert any("chmod 600" in r.getMessage() for r in caplog.records)


def test_repr_hides_the_secret(tmp_path):
    creds = Credentials.load(keygen(tmp_path / "k"), "worker")
    assert creds._secret.decode() not in repr(creds) and "worker" in repr(creds)
