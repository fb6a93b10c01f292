"""`pserver k8s render`: the manifests pass the Kubernetes API schemas of two versions offline
(kubernetes-validate, strict), each role mounts only its own secret key, workers take their rank
from the Indexed Job's completion index; bad specs raise ConfigError."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml

from pserver.errors import ConfigError
from pserver.k8s import Spec, manifests, render

VERSIONS = ("1.30.0", "1.33.0")


def _spec(**kw) -> Spec:
    return Spec(**{"image": "registry.example/pserver:0.1", "command": ["python", "train.py"], **kw})


@pytest.mark.parametrize("version", VERSIONS)
def test_rendered_manifests_pass_the_api_schemas(version):
    docs = list(yaml.safe_load_all(render(_spec(servers=3, workers=4, settings={
        "PSERVER_LOG_LEVEL": "INFO"}))))
    assert [d["kind"] for d in docs] == ["ConfigMap", "Service", "Deployment", "Service",
                                         "StatefulSet", "Job"]
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_catches_a_wrong_field():
    job = manifests(_spec())[-1]
    job["spec"]["completion"] = 3          # a typo of "completions"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(job, VERSIONS[0], strict=True)


def test_each_role_mounts_every_public_key_and_only_its_own_secret():
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in manifests(_spec())}
    pods = {"scheduler": by_kind["Deployment", "pserver-scheduler"],
            "server": by_kind["StatefulSet", "pserver-server"],
            "worker": by_kind["Job", "pserver-workers"]}
    for role, obj in pods.items():
        (volume,) = obj["spec"]["template"]["spec"]["volumes"]
        paths = sorted(i["path"] for i in volume["secret"]["items"])
        assert paths == sorted(["public/scheduler.key", "public/server.key", "public/worker.key",
                                f"private/{role}.key_secret"])
        assert volume["secret"]["defaultMode"] == 0o400   # the loader warns on group/other bits


def test_workers_take_their_rank_from_the_completion_index_and_config_is_shared():
    docs = manifests(_spec(workers=5, servers=2, replication=1))
    config = docs[0]["data"]
    assert config["PSERVER_SCHEDULER"] == "pserver-scheduler.default.svc:7000"
    assert (config["PSERVER_NUM_WORKERS"], config["PSERVER_NUM_SERVERS"]) == ("5", "2")
    job = docs[-1]["spec"]
    assert job["completionMode"] == "Indexed" and job["completions"] == job["parallelism"] == 5
    env = {e["name"]: e for e in job["template"]["spec"]["containers"][0]["env"]}
    assert "job-completion-index" in env["PSERVER_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert job["template"]["spec"]["containers"][0]["command"] == ["python", "train.py"]


@pytest.mark.parametrize("bad, match", [
    (dict(image=""), "--image"), (dict(command=[]), "worker command"),
    (dict(name="Bad_Name"), "lower-case"), (dict(replication=2, servers=2), "replication"),
    (dict(settings={"PSERVER_NOPE": "1"}), "not a setting"),
    (dict(settings={"PSERVER_RANK": "1"}), "decided by the manifests")])
def test_bad_specs_say_what_to_fix(bad, match):
    with pytest.raises(ConfigError, match=match):
        manifests(_spec(**bad))
