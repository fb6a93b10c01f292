"""Kubernetes manifests of a pserver cluster (`pserver k8s render`): a ConfigMap of PSERVER_* settings,
the scheduler as a Deployment behind a Service, servers as a StatefulSet, workers as an Indexed Job
whose completion index is the rank, CURVE keys from a Secret (each role mounts only its own secret
key). Pure functions building dicts; YAML only at the edge. docs/kubernetes.md."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .config import ENV_VARS
from .errors import ConfigError

ROLES = ("scheduler", "server", "worker")
SCHEDULER_PORT, SERVER_PORT = 7000, 7001
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?")


@dataclass
class Spec:
    """What to render. ``command``: the worker program (argv); ``settings``: extra PSERVER_*
    variables for every node; ``keys_secret``: a Secret made from a `pserver keygen` directory."""

    image: str
    command: Sequence[str]
    name: str = "pserver"
    namespace: str = "default"
    servers: int = 2
    workers: int = 2
    replication: int = 1
    keys_secret: str = ""
    settings: Mapping[str, str] = field(default_factory=dict)
    server_cpu: str = "1"
    server_memory: str = "4Gi"
    worker_cpu: str = "1"
    worker_memory: str = "2Gi"

    def check(self) -> None:
        """Raises ConfigError naming the first unusable field."""
        if not _NAME.fullmatch(self.name) or not _NAME.fullmatch(self.namespace):
            raise ConfigError(f"--name {self.name!r} / --namespace {self.namespace!r}: use lower-case "
                              "letters, digits and '-' (at most 42 characters)")
        if not self.image:
            raise ConfigError("--image is required: an image with pserver installed")
        if not self.command:
            raise ConfigError("give the worker command after --, e.g. -- python train.py")
        if self.servers < 1 or self.workers < 1 or not 0 <= self.replication < self.servers:
            raise ConfigError("need servers >= 1, workers >= 1 and 0 <= replication < servers")
        for var in self.settings:
            if var not in ENV_VARS:
                raise ConfigError(f"--set {var}: not a setting (see `pserver env`)")
            if var in _DECIDED:
                raise ConfigError(f"--set {var}: decided by the manifests themselves")

    @property
    def secret(self) -> str:
        return self.keys_secret or f"{self.name}-keys"


_DECIDED = ("PSERVER_SCHEDULER", "PSERVER_NUM_SERVERS", "PSERVER_NUM_WORKERS", "PSERVER_KEYS",
            "PSERVER_RANK", "PSERVER_HOST", "PSERVER_PORT", "PSERVER_INSECURE")


def _meta(spec: Spec, suffix: str, role: str | None = None) -> dict:
    labels = {"app.kubernetes.io/name": "pserver", "app.kubernetes.io/instance": spec.name}
    if role:
        labels["pserver/role"] = role
    return {"name": f"{spec.name}-{suffix}", "namespace": spec.namespace, "labels": labels}


def _selector(spec: Spec, role: str) -> dict:
    return {"app.kubernetes.io/instance": spec.name, "pserver/role": role}


def _keys_volume(spec: Spec, role: str) -> dict:
    """Every role's public key, and this role's secret key only, in `pserver keygen`'s layout."""
    items = [{"key": f"{r}.key", "path": f"public/{r}.key"} for r in ROLES]
    items.append({"key": f"{role}.key_secret", "path": f"private/{role}.key_secret"})
    return {"name": "keys", "secret": {"secretName": spec.secret, "items": items, "defaultMode": 0o400}}


def _env(extra: Mapping[str, dict | str] = ()) -> list[dict]:
    out = [{"name": "PSERVER_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    for name, value in dict(extra).items():
        out.append({"name": name, **({"valueFrom": value} if isinstance(value, dict) else {"value": value})})
    return out


def _container(spec: Spec, role: str, command: Sequence[str], env: list[dict], port: int | None,
               cpu: str, memory: str) -> dict:
    c = {"name": role, "image": spec.image, "command": list(command),
         "envFrom": [{"configMapRef": {"name": f"{spec.name}-config"}}], "env": env,
         "volumeMounts": [{"name": "keys", "mountPath": "/etc/pserver/keys", "readOnly": True}],
         "resources": {"requests": {"cpu": cpu, "memory": memory}}}
    if port is not None:
        probe = {"tcpSocket": {"port": port}, "periodSeconds": 5}
        c["ports"] = [{"containerPort": port, "name": "pserver"}]
        c["readinessProbe"] = {**probe, "initialDelaySeconds": 2}
        c["livenessProbe"] = {**probe, "initialDelaySeconds": 30, "failureThreshold": 6}
    return c


def _pod(spec: Spec, role: str, container: dict, restart: str, grace: int) -> dict:
    return {"metadata": {"labels": {**_meta(spec, role, role)["labels"]}},
            "spec": {"containers": [container], "volumes": [_keys_volume(spec, role)],
                     "restartPolicy": restart, "terminationGracePeriodSeconds": grace,
                     "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001}}}


def manifests(spec: Spec) -> list[dict]:
    """The cluster's objects, in the order to apply them. Raises ConfigError (Spec.check)."""
    spec.check()
    scheduler = f"{spec.name}-scheduler.{spec.namespace}.svc:{SCHEDULER_PORT}"
    config = {"PSERVER_SCHEDULER": scheduler, "PSERVER_NUM_SERVERS": str(spec.servers),
              "PSERVER_NUM_WORKERS": str(spec.workers), "PSERVER_REPLICATION": str(spec.replication),
              "PSERVER_KEYS": "/etc/pserver/keys", **{k: str(v) for k, v in spec.settings.items()}}
    out: list[dict] = [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(spec, "config"),
                        "data": config}]
    out.append({"apiVersion": "v1", "kind": "Service", "metadata": _meta(spec, "scheduler", "scheduler"),
                "spec": {"selector": _selector(spec, "scheduler"),
                         "ports": [{"name": "pserver", "port": SCHEDULER_PORT,
                                    "targetPort": SCHEDULER_PORT}]}})
    # no PSERVER_HOST: the scheduler binds every interface (its address, the Service's, is not
    # the pod's) and takes its port from PSERVER_SCHEDULER
    sched = _container(spec, "scheduler", ["pserver", "scheduler", "--keep-alive"], [],
                       SCHEDULER_PORT, "500m", "512Mi")
    out.append({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": _meta(spec, "scheduler", "scheduler"),
                "spec": {"replicas": 1, "strategy": {"type": "Recreate"},
                         "selector": {"matchLabels": _selector(spec, "scheduler")},
                         "template": _pod(spec, "scheduler", sched, "Always", 30)}})
    out.append({"apiVersion": "v1", "kind": "Service", "metadata": _meta(spec, "servers", "server"),
                "spec": {"clusterIP": "None", "selector": _selector(spec, "server"),
                         "ports": [{"name": "pserver", "port": SERVER_PORT}]}})
    # SIGTERM = leave gracefully (hand the key ranges over), which needs time on big tables
    server = _container(spec, "server", ["pserver", "server"],
                        _env({"PSERVER_PORT": str(SERVER_PORT)}), SERVER_PORT,
                        spec.server_cpu, spec.server_memory)
    out.append({"apiVersion": "apps/v1", "kind": "StatefulSet",
                "metadata": _meta(spec, "server", "server"),
                "spec": {"replicas": spec.servers, "serviceName": f"{spec.name}-servers",
                         "podManagementPolicy": "Parallel",
                         "selector": {"matchLabels": _selector(spec, "server")},
                         "template": _pod(spec, "server", server, "Always", 300)}})
    rank = {"fieldRef": {"fieldPath":
                         "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    worker = _container(spec, "worker", spec.command, _env({"PSERVER_RANK": rank}), None,
                        spec.worker_cpu, spec.worker_memory)
    out.append({"apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(spec, "workers", "worker"),
                "spec": {"completionMode": "Indexed", "completions": spec.workers,
                         "parallelism": spec.workers, "backoffLimitPerIndex": 3,
                         "maxFailedIndexes": spec.workers,
                         "template": _pod(spec, "worker", worker, "Never", 60)}})
    return out


def render(spec: Spec) -> str:
    """The manifests as one multi-document YAML text.

    Raises:
        ConfigError: a bad spec, or PyYAML missing (install `pserver[k8s]`).
    """
    try:
        import yaml
    except ImportError:
        raise ConfigError("rendering YAML needs PyYAML: pip install 'pserver[k8s]'") from None
    return yaml.safe_dump_all(manifests(spec), sort_keys=False)


def register(sub) -> None:
    """`pserver k8s render ... -- CMD`: print (or write with -o) the manifests."""
    import argparse

    p = sub.add_parser("k8s", help="Kubernetes manifests of a cluster").add_subparsers(
        dest="k8s_cmd", required=True).add_parser(
        "render", help="write the manifests (ConfigMap, scheduler Deployment + Service, servers "
                       "StatefulSet, workers Indexed Job) for `kubectl apply -f`")
    p.add_argument("--image", required=True, help="container image with pserver installed")
    p.add_argument("--name", default="pserver", help="prefix of every object's name")
    p.add_argument("--namespace", default="default")
    p.add_argument("-s", "--servers", type=int, default=2)
    p.add_argument("-w", "--workers", type=int, default=2)
    p.add_argument("--replication", type=int, default=1, help="replicas per key range (k)")
    p.add_argument("--keys-secret", default="", help="Secret holding `pserver keygen`'s files "
                   "(default NAME-keys; see docs/kubernetes.md)")
    p.add_argument("--set", action="append", default=[], metavar="VAR=VALUE",
                   help="another PSERVER_* setting for every node; repeatable")
    p.add_argument("--server-cpu", default="1")
    p.add_argument("--server-memory", default="4Gi")
    p.add_argument("--worker-cpu", default="1")
    p.add_argument("--worker-memory", default="2Gi")
    p.add_argument("-o", "--output", help="write to this file instead of standard output")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the worker command")
    p.set_defaults(fn=_cmd_render)


def _cmd_render(args) -> int:
    settings = {}
    for item in args.set:
        var, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: use VAR=VALUE, e.g. PSERVER_LOG_LEVEL=INFO")
        settings[var] = value
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    text = render(Spec(image=args.image, command=cmd, name=args.name, namespace=args.namespace,
                       servers=args.servers, workers=args.workers, replication=args.replication,
                       keys_secret=args.keys_secret, settings=settings,
                       server_cpu=args.server_cpu, server_memory=args.server_memory,
                       worker_cpu=args.worker_cpu, worker_memory=args.worker_memory))
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        print(text, end="")
    return 0
