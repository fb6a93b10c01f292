"""Node configuration: one dataclass filled from PSERVER_* environment variables, overridable by CLI
flags or keyword arguments. Every role reads the same variables, so a cluster engine (Kubernetes, Slurm,
Ray, ssh) starts the same roles on many hosts just by setting the environment."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .errors import ConfigError
from .groups import check_name
from .wire import Limits

SLOT_CACHE_DEFAULT = "64M"  # a server table's slot cache bound (pserver.store.slot_cache)
REPLICA_KEY_CACHE_DEFAULT = "8M"  # key lists a master may keep at each replica (pserver.ft.list_refs)

# variable name -> (field, type, help). The README's configuration table is this table.
ENV_VARS: dict[str, tuple[str, type, str]] = {
    "PSERVER_SCHEDULER": ("scheduler", str, "host:port of the scheduler (required by servers/workers)"),
    "PSERVER_NUM_SERVERS": ("num_servers", int, "servers the cluster waits for before starting"),
    "PSERVER_NUM_WORKERS": ("num_workers", int, "workers the cluster waits for before starting"),
    "PSERVER_HOST": ("host", str, "address this node binds and advertises (default: the address "
                                  "of this host that routes to the scheduler)"),
    "PSERVER_INTERFACE": ("interface", str, "network interface whose IPv4 address this node binds "
                                            "and advertises, e.g. eth1 (instead of PSERVER_HOST)"),
    "PSERVER_ADVERTISE_HOST": ("advertise_host", str, "address peers use to reach this node when it "
                                                      "differs from the bound one (NAT, containers, "
                                                      "binding 0.0.0.0)"),
    "PSERVER_PORT": ("port", int, "port to bind (0 = any free port; the scheduler's comes from "
                                  "PSERVER_SCHEDULER)"),
    "PSERVER_KEYS": ("keys", str, "directory made by `pserver keygen` (CURVE keys)"),
    "PSERVER_INSECURE": ("insecure", bool, "1 = plain-text transport, no authentication (warns)"),
    "PSERVER_RANK": ("rank", int, "requested rank within the role (-1 = assigned by the scheduler)"),
    "PSERVER_GROUP": ("group", str, "workers: the worker group to join (default 'default'; "
                                    "ranks, barriers and sync rounds are the group's)"),
    "PSERVER_READ_ONLY": ("read_only", bool, "workers: 1 = join the group as read-only (it may "
                                             "then only pull); a restriction nobody can lift"),
    "PSERVER_HEARTBEAT_INTERVAL": ("heartbeat_interval", float, "seconds between heartbeats"),
    "PSERVER_HEARTBEAT_TIMEOUT": ("heartbeat_timeout", float, "seconds of silence before a node "
                                                              "is declared dead"),
    "PSERVER_SCHEDULER_GRACE": ("scheduler_grace", float, "seconds a node serves on without the "
                                                          "scheduler (it may be restarted with "
                                                          "--recover) before it gives up"),
    "PSERVER_RECV_QUEUE": ("recv_queue", int, "servers: messages received from one peer that may "
                                              "wait unread (then that peer is slowed by TCP "
                                              "backpressure; 0 = no bound)"),
    "PSERVER_CONNECT_TIMEOUT": ("connect_timeout", float, "seconds to wait for the scheduler "
                                                          "(registration) before failing"),
    "PSERVER_REQUEST_TIMEOUT": ("request_timeout", float, "seconds a push/pull may wait "
                                                          "(0 = no limit)"),
    "PSERVER_BARRIER_TIMEOUT": ("barrier_timeout", float, "seconds a barrier may wait"),
    "PSERVER_VIRTUAL_SERVERS": ("virtual_servers", int, "virtual servers per server on the key ring"),
    "PSERVER_REPLICATION": ("replication", int, "replicas per key range (k; 0 = none); set on the "
                                                "scheduler"),
    "PSERVER_REPLICATE_AFTER_AGGREGATION": ("replicate_after_aggregation", bool,
                                            "1 = under synchronous aggregation replicate the "
                                            "aggregated update once, 0 = every worker's push"),
    "PSERVER_BUSY_POLL": ("busy_poll", float, "seconds a server keeps polling, without sleeping, "
                                              "after a request (0 = off; for servers with a core "
                                              "of their own)"),
    "PSERVER_WORKER_BUSY_POLL": ("worker_busy_poll", float, "seconds a worker waiting for a reply "
                                                            "polls without sleeping before it sleeps, "
                                                            "when one request is pending (0 = off; "
                                                            "for workers with a core of their own)"),
    "PSERVER_SLOT_CACHE": ("slot_cache", str, "servers: bytes of repeated key lists per table whose "
                                              "value slots are cached, skipping the hash index "
                                              "(k/M/G suffixes; 0 = off)"),
    "PSERVER_MAX_TABLE_BYTES": ("max_table_bytes", str, "servers: bytes each table may hold on a "
                                                        "server (k/M/G; 0 = no bound): beyond, its "
                                                        "least frequently pushed rows are evicted"),
    "PSERVER_REPLICA_KEY_CACHE": ("replica_key_cache", str, "bytes of key lists a master may keep "
                                                            "stored at each of its replicas, so that "
                                                            "repeated lists travel once (k/M/G; "
                                                            "0 = off); set on the scheduler"),
    "PSERVER_COALESCE": ("coalesce", int, "workers: unanswered requests to a server before new "
                                          "small ones wait to leave together as one batch (of up "
                                          "to 8; 0 = off; default 2; docs/performance.md)"),
    "PSERVER_SEAL_MIN": ("seal_min", str, "secure clusters: a message to or from a server whose "
                                          "arrays hold at least this many bytes carries them "
                                          "AES-256-GCM-sealed on a second connection beside "
                                          "CURVE (k/M/G; 0 = off; docs/sealed-bulk.md)"),
    "PSERVER_SEAL_CIPHER": ("seal_cipher", str, "the AEAD of sealed messages: aes-256-gcm "
                                                "(default) or aegis-128x2 (faster; needs "
                                                "`pip install pserver[aegis]` on every node)"),
    "PSERVER_MAX_MESSAGE_BYTES": ("max_message_bytes", int, "largest accepted message payload"),
    "PSERVER_MAX_KEYS": ("max_keys", int, "most keys accepted in one request"),
    "PSERVER_MAX_DIM": ("max_dim", int, "largest accepted value dimension"),
    "PSERVER_LOG_LEVEL": ("log_level", str, "DEBUG, INFO, WARNING or ERROR"),
    "PSERVER_METRICS_PORT": ("metrics_port", int, "serve Prometheus metrics at :PORT/metrics (0 = "
                                                  "off; nodes sharing a host take the next free "
                                                  "ports; docs/observability.md)"),
    "PSERVER_TRACE": ("trace", str, "write a Chrome-trace timeline to this path, with .ROLE-ID "
                                    "inserted before the suffix (docs/observability.md)"),
}


SEAL_CIPHERS = ("aes-256-gcm", "aegis-128x2")  # pserver.sealed.CIPHERS implements them


def _size_setting(value: Any, name: str, example: str) -> int:
    """Bytes of a size setting (k/M/G suffixes); ConfigError naming the setting if malformed."""
    try:
        return parse_size(str(value))
    except ConfigError:
        raise ConfigError(f"{name} {value!r} is not a size like {example}, 512k or 0 (off)") from None


@dataclass
class Config:
    """Settings of one node. Times in seconds, sizes in bytes."""

    scheduler: str = ""
    num_servers: int = 1
    num_workers: int = 1
    host: str = ""
    interface: str = ""
    advertise_host: str = ""
    port: int = 0
    keys: str = ""
    insecure: bool = False
    rank: int = -1
    group: str = "default"
    read_only: bool = False
    heartbeat_interval: float = 0.1
    heartbeat_timeout: float = 0.6
    scheduler_grace: float = 120.0
    recv_queue: int = 256
    connect_timeout: float = 30.0
    request_timeout: float = 0.0
    barrier_timeout: float = 300.0
    virtual_servers: int = 32
    replication: int = 1
    busy_poll: float = 0.0
    worker_busy_poll: float = 0.0
    replicate_after_aggregation: bool = True
    slot_cache: str = SLOT_CACHE_DEFAULT
    max_table_bytes: str = "0"
    replica_key_cache: str = REPLICA_KEY_CACHE_DEFAULT
    coalesce: int = 2
    seal_min: str = "256k"
    seal_cipher: str = "aes-256-gcm"
    max_message_bytes: int = 1 << 31
    max_keys: int = 1 << 28
    max_dim: int = 1 << 24
    log_level: str = "WARNING"
    metrics_port: int = 0
    trace: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Config:
        """Read PSERVER_* variables from ``env`` (default: os.environ), then apply non-None overrides."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for var, (name, typ, _) in ENV_VARS.items():
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            values[name] = _parse(var, raw, typ)
        cfg = cls(**values)
        known = {f.name for f in fields(cls)}
        for key, val in overrides.items():
            if key not in known:
                raise ConfigError(f"unknown setting {key!r}; known: {sorted(known)}")
            if val is not None:
                setattr(cfg, key, val)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if not 0 <= self.metrics_port < 65536:
            raise ConfigError("PSERVER_METRICS_PORT must be a port (1-65535) or 0 (off)")
        if self.coalesce < 0:
            raise ConfigError("PSERVER_COALESCE must be >= 0 (0 = no coalescing)")
        if self.host and self.interface:
            raise ConfigError("set PSERVER_HOST or PSERVER_INTERFACE, not both: the interface's "
                              "address is the host")
        if self.num_servers < 1 or self.num_workers < 0:
            raise ConfigError("PSERVER_NUM_SERVERS must be >= 1 and PSERVER_NUM_WORKERS >= 0")
        if self.heartbeat_interval <= 0 or self.heartbeat_timeout <= self.heartbeat_interval:
            raise ConfigError("PSERVER_HEARTBEAT_TIMEOUT must exceed PSERVER_HEARTBEAT_INTERVAL > 0")
        if self.recv_queue < 0:
            raise ConfigError("PSERVER_RECV_QUEUE must be >= 0 (0 = no bound)")
        if self.busy_poll < 0:
            raise ConfigError("PSERVER_BUSY_POLL (--busy-poll) is seconds of busy polling: 0 (off) "
                              "or more")
        if self.worker_busy_poll < 0:
            raise ConfigError("PSERVER_WORKER_BUSY_POLL (--worker-busy-poll) is seconds of busy "
                              "polling: 0 (off) or more")
        self.slot_cache_bytes  # noqa: B018 - raises ConfigError for a malformed size
        self.max_table_bytes_value  # noqa: B018 - the same
        self.replica_key_cache_bytes  # noqa: B018 - the same
        self.seal_min_bytes  # noqa: B018 - the same
        if self.seal_cipher not in SEAL_CIPHERS:
            raise ConfigError(f"PSERVER_SEAL_CIPHER {self.seal_cipher!r} is not one of "
                              f"{', '.join(SEAL_CIPHERS)}")
        if min(self.max_message_bytes, self.max_keys, self.max_dim) < 1:
            raise ConfigError("PSERVER_MAX_MESSAGE_BYTES, PSERVER_MAX_KEYS and PSERVER_MAX_DIM must be >= 1")
        if self.scheduler:
            split_address(self.scheduler)
        check_name(self.group)

    @property
    def slot_cache_bytes(self) -> int:
        return _size_setting(self.slot_cache, "PSERVER_SLOT_CACHE (--slot-cache)", "64M")

    @property
    def seal_min_bytes(self) -> int:
        return _size_setting(self.seal_min, "PSERVER_SEAL_MIN (--seal-min)", "256k")

    @property
    def max_table_bytes_value(self) -> int:
        return _size_setting(self.max_table_bytes, "PSERVER_MAX_TABLE_BYTES (--max-table-bytes)", "512M")

    @property
    def replica_key_cache_bytes(self) -> int:
        return _size_setting(self.replica_key_cache, "PSERVER_REPLICA_KEY_CACHE (--replica-key-cache)", "8M")

    def with_(self, **changes: Any) -> Config:
        return replace(self, **changes)

    @property
    def limits(self) -> Limits:
        return Limits(max_message_bytes=self.max_message_bytes, max_keys=self.max_keys,
                      max_dim=self.max_dim)

    def require_scheduler(self) -> tuple[str, int]:
        if not self.scheduler:
            raise ConfigError("no scheduler address: set PSERVER_SCHEDULER=host:port (or pass "
                              "--scheduler), or start a local cluster with `pserver launch`")
        return split_address(self.scheduler)

    def bind_host(self) -> str:
        """The address this node binds: PSERVER_HOST, else PSERVER_INTERFACE's address, else the
        address of the interface that routes to the scheduler.

        Raises:
            ConfigError: PSERVER_INTERFACE names no interface with an IPv4 address.
        """
        if self.host:
            return self.host
        if self.interface:
            return interface_address(self.interface)
        if self.scheduler:
            return route_address(split_address(self.scheduler)[0])
        return "127.0.0.1"

    def advertised(self, bound: str) -> str:
        """The address peers use to reach this node bound at ``bound``: PSERVER_ADVERTISE_HOST,
        else ``bound`` - or, for a wildcard bind, the address that routes to the scheduler."""
        if self.advertise_host:
            return self.advertise_host
        if bound in ("0.0.0.0", "::", "*"):
            return route_address(split_address(self.scheduler)[0]) if self.scheduler \
                else "127.0.0.1"
        return bound

    def to_env(self) -> dict[str, str]:
        """The PSERVER_* variables that reproduce this config (for child processes)."""
        out = {}
        for var, (name, typ, _) in ENV_VARS.items():
            val = getattr(self, name)
            if val == getattr(Config, name, None) and var not in ("PSERVER_SCHEDULER",):
                continue
            out[var] = ("1" if val else "0") if typ is bool else str(val)
        return out


def settings_env(settings: Mapping[str, Any]) -> dict[str, str]:
    """The PSERVER_* variables of Config fields (``{"max_keys": 10}`` -> ``{"PSERVER_MAX_KEYS": "10"}``).

    Raises:
        ConfigError: a name that is not a setting (the message lists the known ones).
    """
    var_of = {name: (var, typ) for var, (name, typ, _) in ENV_VARS.items()}
    out = {}
    for name, value in settings.items():
        if name not in var_of:
            raise ConfigError(f"unknown setting {name!r}; known: {sorted(var_of)}")
        var, typ = var_of[name]
        out[var] = ("1" if value else "0") if typ is bool else str(value)
    return out


def _parse(var: str, raw: str, typ: type) -> Any:
    try:
        if typ is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        return typ(raw)
    except ValueError:
        raise ConfigError(f"{var}={raw!r} is not a valid {typ.__name__}") from None


def parse_size(text: str) -> int:
    """Bytes from "65536", "512k", "64M" or "1G" (powers of 1024); ConfigError otherwise."""
    m = re.fullmatch(r"(\d+)([kKmMgG]?)", text.strip())
    if not m:
        raise ConfigError(f"size {text!r} is not a number of bytes like 65536, 512k, 64M or 1G")
    return int(m.group(1)) << {"": 0, "k": 10, "m": 20, "g": 30}[m.group(2).lower()]


def split_address(addr: str) -> tuple[str, int]:
    """'host:port' -> (host, port), with a clear error for anything else ('[::1]:7000' allowed)."""
    host, sep, port = addr.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"address {addr!r} is not host:port (for example 10.0.0.5:7000)")
    return host, int(port)


def route_address(peer_host: str) -> str:
    """This host's address on the interface that routes to ``peer_host`` (no packet is sent)."""
    try:
        infos = socket.getaddrinfo(peer_host, 9, type=socket.SOCK_DGRAM)
        family, _, _, _, sockaddr = infos[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(sockaddr)
            return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


def interface_address(name: str) -> str:
    """The IPv4 address of network interface ``name`` (Linux).

    Raises:
        ConfigError: no such interface, or it has no IPv4 address (the message lists the
            interfaces there are).
    """
    import fcntl
    import struct

    siocgifaddr = 0x8915
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            packed = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
        return socket.inet_ntoa(packed[20:24])
    except (OSError, UnicodeError):
        names = ", ".join(n for _, n in socket.if_nameindex())
        raise ConfigError(f"PSERVER_INTERFACE {name!r} is not an interface with an IPv4 address "
                          f"here (interfaces: {names})") from None


def zmq_endpoint(host: str, port: int | str) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
