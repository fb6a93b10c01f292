"""The cluster's bearer token for its HTTP surfaces (`pserver serve`, /metrics, the dashboard):
HMAC-SHA256 of a fixed label under the worker role's CURVE secret key (the cluster's key
directory), so whoever holds the worker key material can compute it and nobody needs another
secret file. `pserver serve token` prints it."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from zmq.auth import load_certificate
from zmq.utils import z85

from .errors import AuthError
from .security import PRIVATE_DIR

TOKEN_LABEL = b"pserver serve bearer token v1"
TOKEN_ROLE = "worker"   # the service joins as a worker, so it holds this key anyway


class Unauthorized(Exception):
    """A request without the right bearer token (HTTP 401); ``reason`` says what is wrong."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def cluster_token(keys_dir: str | Path) -> str:
    """The bearer token of the cluster whose keys are in ``keys_dir`` (hex, 64 characters).

    Raises AuthError (saying what to do) if the worker's secret key is missing or unreadable."""
    path = Path(keys_dir) / PRIVATE_DIR / f"{TOKEN_ROLE}.key_secret"
    try:
        _, secret = load_certificate(path)
    except (OSError, ValueError) as e:
        raise AuthError(f"cannot read {path} ({e}): the serve token is derived from the worker "
                        f"key; pass --keys DIR of `pserver keygen`, or --insecure") from None
    if secret is None:
        raise AuthError(f"{path} holds no secret key: copy private/worker.key_secret from the "
                        f"`pserver keygen` directory")
    return hmac.new(z85.decode(secret), TOKEN_LABEL, hashlib.sha256).hexdigest()


def check_bearer(header: str | None, token: str) -> None:
    """Raises Unauthorized unless ``header`` (the Authorization value) is ``Bearer <token>``;
    compared in constant time."""
    if not header:
        raise Unauthorized("missing Authorization header: send 'Authorization: Bearer TOKEN' "
                           "(TOKEN from `pserver serve token --keys DIR`)")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise Unauthorized("Authorization must be 'Bearer TOKEN'")
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise Unauthorized("invalid bearer token")
