"""Security of a pserver cluster: CURVE authentication and encryption of every ZeroMQ socket,
and the role authorisation table (which role may send which op).

Each role (scheduler, server, worker) has one CURVE key pair made by `keygen`. A node holds the
secret key of its own role and the public keys of all roles, so a peer's public key - checked by
libzmq's CURVE handshake and our ZAP handler - proves the peer's role. Threat model, key layout
and deployment: docs/security.md.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import os
import queue
import socket
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import zmq
from zmq.auth import load_certificate
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

from pserver.errors import AuthError

log = logging.getLogger(__name__)

ROLES = ("scheduler", "server", "worker")
ZAP_DOMAIN = b"pserver"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by RFC 27: one ZAP handler per context
PUBLIC_DIR = "public"
PRIVATE_DIR = "private"
REJECTION_LOG_INTERVAL_S = 60.0  # per peer and cause; rejected clients retry every ~100 ms

# ---------------------------------------------------------------------------------------------
# Authorisation: op -> roles allowed to send it. A pattern ending in "*" matches by prefix; an op
# is allowed for the union of its exact entry and every matching pattern; unknown ops are denied.
# The ops a server serves are added by its dispatch table (pserver.kv.dispatch, through allow_ops
# when it is imported); these are the rest.
_S = frozenset({"scheduler"})
_W = frozenset({"worker"})
_SV = frozenset({"server"})
_op_roles: dict[str, frozenset[str]] = {
    # cluster control: only the scheduler changes the view, the key ring or the consistency model
    "view": _S,
    "shutdown": _S,
    "ring": _S,
    "set_consistency": _S,
    "migrate_*": _S,
    # the workers' coordination
    "push_range": _W,
    "barrier": _W,
    "report": _W,
    # membership, for every node the scheduler manages
    "register": _W | _SV,
    "heartbeat": _W | _SV,
    "leave": _W | _SV,
    # read-only queries, for any member (admin tools use the scheduler's key)
    "status": _S | _W | _SV,
    # fault tolerance among servers
    "migrate_data": _SV,
}
OP_ROLES: Mapping[str, frozenset[str]] = MappingProxyType(_op_roles)
_resolved: dict[str, frozenset[str]] = {}
_RESOLVED_MAX = 1024  # op names come off the wire: bound the cache


def allow_op(op: str, *roles: str) -> None:
    """Let `roles` send `op` (added to roles already allowed). `op` may end in "*" (prefix).

    Raises ValueError on an unknown role or an empty op. Call at import time of the module that
    handles the op, so the table is complete before any message arrives.
    """
    if not op or any(r not in ROLES for r in roles):
        raise ValueError(f"allow_op({op!r}, {roles}): op must be non-empty and roles in {ROLES}")
    _op_roles[op] = _op_roles.get(op, frozenset()) | frozenset(roles)
    _resolved.clear()


def allow_ops(table: Mapping[str, frozenset[str]]) -> None:
    """Let each op of ``table`` (op -> roles) be sent by its roles: a node's dispatch table hands
    its ops over at import. Raises ValueError as :func:`allow_op` does."""
    for op, roles in table.items():
        allow_op(op, *sorted(roles))


def allowed_roles(op: str) -> frozenset[str]:
    """The roles that may send `op` (empty for an unknown op)."""
    roles = _resolved.get(op)
    if roles is None:
        roles = _op_roles.get(op, frozenset())
        for pattern, extra in _op_roles.items():
            if pattern.endswith("*") and op.startswith(pattern[:-1]):
                roles = roles | extra
        if len(_resolved) < _RESOLVED_MAX:
            _resolved[op] = roles
    return roles


def authorise(op: str, role: str | None, secure: bool) -> bool:
    """True if a peer of `role` (from Credentials.peer_role) may send `op`.

    In insecure mode peers have no proven identity, so everything is allowed. In secure mode an
    unknown role (None) or an op missing from OP_ROLES is denied.
    """
    if not secure:
        return True
    return role is not None and role in allowed_roles(op)


# ---------------------------------------------------------------------------------------------
# Key material
def _write_cert(path: Path, public: bytes, secret: bytes | None, mode: int) -> None:
    """Write a ZPL certificate (the czmq/pyzmq format) atomically with exactly `mode`."""
    kind = "Secret" if secret else "Public"
    lines = [
        f"#   ZeroMQ CURVE {kind} Certificate for a pserver role, generated {_now()}",
        "#   " + ("DO NOT SHARE: give this file only to nodes of this role."
                 if secret else "Distribute to every node of the cluster."),
        "",
        "metadata",
        f'    role = "{path.name.split(".")[0]}"',
        "curve",
        f'    public-key = "{public.decode("ascii")}"',
    ]
    if secret:
        lines.append(f'    secret-key = "{secret.decode("ascii")}"')
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # O_EXCL|O_NOFOLLOW: never write through a planted file or symlink; the mode is set before
    # any key byte is written, so a secret is never briefly readable by others.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits we want (0644 publics)
        os.write(fd, ("\n".join(lines) + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def keygen(directory: str | Path, force: bool = False) -> Path:
    """Create a key pair per role: DIR/public/<role>.key (0644), DIR/private/<role>.key_secret
    (0600, in a 0700 directory). Returns DIR.

    Raises AuthError if DIR exists and is not empty, unless force=True (then the keys are
    replaced and every node needs the new set).
    """
    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise AuthError(f"{root} exists and is not a directory: choose another key directory")
    if root.is_dir() and any(root.iterdir()) and not force:
        raise AuthError(
            f"{root} already exists and is not empty: refusing to overwrite the cluster's keys. "
            "Choose a new directory, or pass force=True (--force) to replace them; every node "
            "then needs the new keys."
        )
    root.mkdir(mode=0o755, parents=True, exist_ok=True)
    public, private = root / PUBLIC_DIR, root / PRIVATE_DIR
    public.mkdir(mode=0o755, exist_ok=True)
    private.mkdir(mode=0o700, exist_ok=True)
    os.chmod(public, 0o755)
    os.chmod(private, 0o700)
    for role in ROLES:
        pub, sec = zmq.curve_keypair()
        _write_cert(private / f"{role}.key_secret", pub, sec, 0o600)
        _write_cert(public / f"{role}.key", pub, None, 0o644)
    log.info("wrote CURVE keys for roles %s to %s", ", ".join(ROLES), root)
    return root


def ephemeral(tmpdir: str | Path | None = None) -> Path:
    """Generate a full key set in a new private (0700) directory under `tmpdir` (default: the
    system temp dir) and return it. For the local launcher; the caller deletes it when done."""
    return keygen(tempfile.mkdtemp(prefix="pserver-keys-", dir=tmpdir))


def _load_key(path: Path, want_secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret) z85 keys of one certificate; AuthError saying what to do if unusable."""
    if not path.is_file():
        what = "secret key of this node's role" if want_secret else "public key"
        raise AuthError(
            f"missing {what}: {path}. Create keys with `pserver keygen DIR` and copy DIR/public/ "
            f"to every node and DIR/private/<role>.key_secret to the nodes of that role."
        )
    try:
        public, secret = load_certificate(path)
        for key in (public, secret) if want_secret else (public,):
            if key is None or len(key) != 40 or len(z85.decode(key)) != 32:
                raise ValueError("not a 40-character Z85 CURVE key")
    except (OSError, ValueError) as e:
        raise AuthError(f"bad key file {path}: {e}. Regenerate with `pserver keygen`.") from e
    return public, secret


# ---------------------------------------------------------------------------------------------
_insecure_warned = False
_guards: dict[int, _Guard] = {}  # id(context) -> the context's guard
_guards_lock = threading.Lock()
_monitor_ids = itertools.count()


class Credentials:
    """The keys a node uses on all its sockets; build with `load` or `insecure`.

    `secure` is False only for plain text; `role` is this node's role (None when insecure).
    """

    def __init__(self, role: str | None, secure: bool, public: bytes | None = None,
                 secret: bytes | None = None,
                 role_keys: Mapping[str, bytes] | None = None) -> None:
        self.role = role
        self.secure = secure
        self._public = public
        self._secret = secret
        self._role_keys = dict(role_keys or {})  # role -> z85 public key
        # User-Id (z85 str, set by our ZAP handler) -> role: peer_role's per-message lookup
        self._role_of_uid = {k.decode("ascii"): r for r, k in self._role_keys.items()}
        self._my_guards: list[_Guard] = []
        self._server_socks: list[weakref.ref[zmq.Socket]] = []

    def __repr__(self) -> str:  # never print the secret key
        return f"Credentials(role={self.role!r}, secure={self.secure})"

    @classmethod
    def load(cls, directory: str | Path, role: str) -> Credentials:
        """Load `role`'s secret key and every role's public key from a `keygen` directory.

        Raises AuthError if a file is missing or malformed, the secret does not match
        public/<role>.key, or two roles share a key. Warns if the secret is readable by others.
        """
        if role not in ROLES:
            raise AuthError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
        root = Path(directory)
        if not root.is_dir():
            raise AuthError(f"key directory {root} does not exist: run `pserver keygen {root}` "
                            "once and copy the keys to every node (docs/security.md)")
        role_keys = {r: _load_key(root / PUBLIC_DIR / f"{r}.key", False)[0] for r in ROLES}
        if len(set(role_keys.values())) != len(ROLES):
            raise AuthError(f"two roles share a public key in {root / PUBLIC_DIR}: roles could "
                            "not be told apart. Regenerate with `pserver keygen --force`.")
        secret_path = root / PRIVATE_DIR / f"{role}.key_secret"
        public, secret = _load_key(secret_path, True)
        assert secret is not None
        if zmq.curve_public(secret) != role_keys[role] or public != role_keys[role]:
            raise AuthError(f"{secret_path} does not match {root / PUBLIC_DIR / role}.key: the "
                            "files come from different `pserver keygen` runs; copy one set.")
        if secret_path.stat().st_mode & 0o077:
            log.warning("[%s] secret key %s is readable by other users: chmod 600 it",
                        role, secret_path)
        return cls(role, True, public, secret, role_keys)

    @classmethod
    def insecure(cls, role: str | None = None) -> Credentials:
        """Plain-text credentials: no encryption, no identities (peer_role is None, authorise
        allows everything). Logs a WARNING the first time per process."""
        global _insecure_warned
        if not _insecure_warned:
            _insecure_warned = True
            log.warning("running WITHOUT authentication or encryption: anyone who can reach "
                        "this node's ports can read and change the model and stop the cluster")
        return cls(role, False)

    def start_authenticator(self, ctx: zmq.Context) -> None:
        """Start the ZAP handler of `ctx` (idempotent): it admits only this cluster's public
        keys and logs rejected peers (address, key, time). configure_server calls it.

        Raises AuthError if `ctx` already has a handler for another key set.
        """
        if self.secure:
            guard = self._guard(ctx)
            guard.serve_zap(self._role_keys)

    def configure_server(self, sock: zmq.Socket) -> None:
        """Make a socket that binds (ROUTER) a CURVE server of this node's role. Call before
        bind(). Starts the context's authenticator if needed, so no peer skips ZAP."""
        if not self.secure:
            return
        self.start_authenticator(sock.context)
        sock.curve_secretkey = self._secret
        sock.curve_publickey = self._public
        sock.zap_domain = ZAP_DOMAIN
        # Fail closed: without this, libzmq admits any key while no ZAP handler is bound.
        try:
            sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        except (AttributeError, zmq.ZMQError):
            log.debug("libzmq lacks ZAP_ENFORCE_DOMAIN; keep the authenticator running")
        sock.curve_server = True
        self._server_socks.append(weakref.ref(sock))
        self._guard(sock.context).watch(sock, "server", self.role or "")

    def configure_client(self, sock: zmq.Socket, server_role: str) -> None:
        """Make a socket that connects to a node of `server_role` a CURVE client with this
        node's key pair. Call before connect(). Raises ValueError on an unknown role."""
        if server_role not in ROLES:
            raise ValueError(f"server_role must be one of {ROLES}, not {server_role!r}")
        if not self.secure:
            return
        sock.curve_serverkey = self._role_keys[server_role]
        sock.curve_publickey = self._public
        sock.curve_secretkey = self._secret
        self._guard(sock.context).watch(sock, "client", server_role)

    def peer_role(self, frame: zmq.Frame) -> str | None:
        """Role of the authenticated sender of `frame` (any frame of a message received with
        copy=False), or None if insecure or the sender's key is not one of ours."""
        if not self.secure:
            return None
        try:
            uid = frame.get("User-Id")
        except zmq.ZMQError:  # no metadata: not received over a CURVE socket
            return None
        return self._role_of_uid.get(uid)

    def close(self) -> None:
        """Stop the authenticator and monitors this object started. Close the CURVE server
        sockets first: a warning is logged for any still open (they then refuse all peers)."""
        still_open = sum(1 for ref in self._server_socks if (s := ref()) is not None
                         and not s.closed)
        if still_open:
            log.warning("[%s] stopping the authenticator with %d CURVE server socket(s) open: "
                        "close sockets before Credentials.close()", self.role, still_open)
        for guard in self._my_guards:
            guard.stop()
        self._my_guards.clear()
        self._server_socks.clear()

    def _guard(self, ctx: zmq.Context) -> _Guard:
        old = _guards.get(id(ctx))
        if old is not None and old.stopping:
            old.stop()  # wait (outside the lock its thread takes) until its ZAP endpoint is free
        with _guards_lock:
            guard = _guards.get(id(ctx))
            if guard is None or guard.stopping or not guard.is_alive():
                guard = _guards[id(ctx)] = _Guard(ctx, self.role or "")
                guard.start()
        if guard not in self._my_guards:
            self._my_guards.append(guard)
        return guard


class _Guard(threading.Thread):
    """Per context: answers ZAP requests and reads socket monitors, in its own thread because
    libzmq holds every handshake until the ZAP reply arrives. Owns all sockets it polls; other
    threads hand it new sockets through a queue and wake it through a socketpair."""

    def __init__(self, ctx: zmq.Context, node_role: str) -> None:
        super().__init__(name="pserver-security", daemon=True)
        self.ctx = ctx
        self.node = node_role
        self.zap_keys: dict[bytes, str] | None = None  # raw 32-byte key -> role
        self._inbox: queue.SimpleQueue[tuple[zmq.Socket, str, str]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._last_logged: dict[tuple[str, ...], tuple[float, int]] = {}

    def serve_zap(self, role_keys: Mapping[str, bytes]) -> None:
        keys = {z85.decode(k): r for r, k in role_keys.items()}
        with self._lock:
            if self.zap_keys is not None:
                if self.zap_keys != keys:
                    raise AuthError("this zmq.Context already authenticates another key set: "
                                    "use one Context per cluster")
                return
            zap = self.ctx.socket(zmq.REP)
            zap.linger = 0
            try:
                zap.bind(ZAP_ENDPOINT)  # bound here, so it is ready when the caller returns
            except zmq.ZMQError as e:
                zap.close()
                raise AuthError("another ZAP authenticator is already bound in this "
                                f"zmq.Context ({e}): let pserver own the Context's ZAP") from e
            self.zap_keys = keys
        self._hand_over(zap, "zap", "")

    def watch(self, sock: zmq.Socket, side: str, peer_or_self: str) -> None:
        addr = f"inproc://pserver.monitor.{next(_monitor_ids)}"  # unique for the process
        sock.monitor(addr, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                     | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        mon = self.ctx.socket(zmq.PAIR)
        mon.linger = 0
        mon.connect(addr)  # connected now, so events queue up until the thread adopts it
        self._hand_over(mon, side, peer_or_self)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=5.0)

    def _hand_over(self, sock: zmq.Socket, kind: str, label: str) -> None:
        self._inbox.put((sock, kind, label))  # the queue's lock is the memory barrier zmq needs
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:  # thread already gone, or buffer full: it is awake anyway
            pass

    def run(self) -> None:
        poller = zmq.Poller()
        wake_fd = self._wake_r.fileno()
        poller.register(wake_fd, zmq.POLLIN)
        owned: dict[zmq.Socket, tuple[str, str]] = {}
        try:
            while not self._stopping.is_set():
                while not self._inbox.empty():
                    sock, kind, label = self._inbox.get()
                    owned[sock] = (kind, label)
                    poller.register(sock, zmq.POLLIN)
                for sock, _ in poller.poll():
                    if sock == wake_fd:
                        self._drain_wake()
                    elif owned[sock][0] == "zap":
                        self._answer_zap(sock)
                    elif self._read_monitor(sock, *owned[sock]):
                        poller.unregister(sock)
                        del owned[sock]
                        sock.close()
        except zmq.ContextTerminated:
            pass  # the owner terminated the context: release our sockets so term() returns
        except Exception:  # a dead guard fails closed (ZAP_ENFORCE_DOMAIN): say why
            log.exception("[%s] security thread failed; CURVE peers are refused", self.node)
        finally:
            while not self._inbox.empty():
                owned[self._inbox.get()[0]] = ("", "")
            for sock in owned:
                sock.close(linger=0)
            self._wake_r.close()
            self._wake_w.close()
            with _guards_lock:
                if _guards.get(id(self.ctx)) is self:
                    del _guards[id(self.ctx)]

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    def _answer_zap(self, zap: zmq.Socket) -> None:
        msg = zap.recv_multipart()
        request_id = msg[1] if len(msg) > 1 else b""
        role, key = None, b""
        if len(msg) >= 6:
            _version, _, _domain, address, _, mechanism = msg[:6]
            if mechanism == b"CURVE" and len(msg) == 7:
                key = msg[6]
                role = (self.zap_keys or {}).get(key)
            if role is None:
                who = z85.encode(key).decode() if len(key) == 32 else "-"
                self._log_rejection(
                    ("zap", address.decode(errors="replace"), who),
                    "rejected a %s connection from %s at %s: public key %s is not one of this "
                    "cluster's keys (a node with keys from another `pserver keygen` run, or an "
                    "intruder)", mechanism.decode(errors="replace"),
                    address.decode(errors="replace"), _now(), who)
        if role is None:
            zap.send_multipart([b"1.0", request_id, b"400", b"Unknown key", b"", b""])
        else:
            zap.send_multipart([b"1.0", request_id, b"200", b"OK", z85.encode(key), b""])

    def _read_monitor(self, mon: zmq.Socket, side: str, label: str) -> bool:
        """Log one handshake failure; True when the monitored socket is gone."""
        ev = parse_monitor_message(mon.recv_multipart())
        event, value = ev["event"], ev["value"]
        endpoint = ev["endpoint"].decode(errors="replace")
        if event == zmq.EVENT_MONITOR_STOPPED:
            return True
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            cause = "one side does not use CURVE (plain text, or a node started without keys)"
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            cause = f"the server refused this node's key (ZAP status {value})"
        elif value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
            cause = "the handshake did not decrypt: the client uses another server public key"
        elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            cause = f"ZMTP protocol error 0x{value:x}"
        elif side == "server":  # the client hung up first: it saw a mechanism or key it rejects
            cause = (f"the client closed the connection during the handshake ({os.strerror(value)}); "
                     "a plain-text node, or one without this cluster's keys, does that")
        else:
            cause = f"handshake aborted ({os.strerror(value)})"
        if side == "server":
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                return False  # _answer_zap already logged who it was
            self._log_rejection(("mon", endpoint, cause), "rejected a connection on %s at %s: %s",
                                endpoint, _now(), cause)
        else:
            self._log_rejection(("cli", endpoint, cause), "handshake with the %s at %s failed at "
                                "%s: %s. Check that this node has the cluster's keys.",
                                label, endpoint, _now(), cause)
        return False

    def _log_rejection(self, key: tuple[str, ...], fmt: str, *args: object) -> None:
        """WARNING, at most once per REJECTION_LOG_INTERVAL_S per (peer, cause) - a refused
        client reconnects every ~100 ms - with the count of suppressed repeats."""
        now = time.monotonic()
        last, suppressed = self._last_logged.get(key, (-1e18, 0))
        if now - last < REJECTION_LOG_INTERVAL_S:
            self._last_logged[key] = (last, suppressed + 1)
            return
        if len(self._last_logged) > 10_000:  # scanners come from many addresses: stay bounded
            self._last_logged.clear()
        self._last_logged[key] = (now, 0)
        tail = f" ({suppressed} similar since the last report)" if suppressed else ""
        log.warning("[%s] " + fmt + tail, self.node, *args)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
