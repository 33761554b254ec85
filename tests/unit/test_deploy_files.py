"""The deployment files parse and validate: Kubernetes objects against the Kubernetes
schemas (kubernetes-validate), the compose file against the compose specification
(check-jsonschema), and the parts that must agree with the worker do."""

from __future__ import annotations

import subprocess
import sys
from ipaddress import ip_address
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import kubernetes_validate
import pytest
import yaml

from worker.cli import main as cli

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.31.0"


def documents(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def all_objects() -> list[dict[str, Any]]:
    return [obj for path in sorted(KUBERNETES.glob("*.yaml")) for obj in documents(path)]


def by_kind(kind: str) -> dict[str, Any]:
    [found] = [obj for obj in all_objects() if obj["kind"] == kind]
    return found


@pytest.mark.parametrize(
    "obj",
    [obj for obj in all_objects() if not obj["apiVersion"].startswith("keda.sh/")],
    ids=lambda obj: f"{obj['kind']}/{obj['metadata']['name']}",
)
def test_core_objects_validate_against_the_kubernetes_schema(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_deployment_probes_and_port_match_the_worker() -> None:
    config = by_kind("ConfigMap")["data"]
    container = by_kind("Deployment")["spec"]["template"]["spec"]["containers"][0]
    [port] = container["ports"]
    assert str(port["containerPort"]) == config["METRICS_PORT"]
    assert not ip_address(config["METRICS_HOST"]).is_loopback, "the kubelet could not probe"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["args"] == ["run"]
    assert by_kind("Job")["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate"]
    assert {"run", "migrate", "check"} <= set(cli.commands)


def test_keda_scales_the_deployment_on_the_worker_group_capped_at_the_partitions() -> None:
    scaled = by_kind("ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == by_kind("Deployment")["metadata"]["name"]
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["consumerGroup"] == by_kind("ConfigMap")["data"]["CONSUMER_GROUP"]
    assert trigger["metadata"]["allowIdleConsumers"] == "false"
    assert scaled["spec"]["maxReplicaCount"] <= 4, "no more replicas than partitions"
    assert (
        trigger["authenticationRef"]["name"] == by_kind("TriggerAuthentication")["metadata"]["name"]
    )


def test_compose_file_follows_the_compose_specification() -> None:
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("check-jsonschema")),
            "--builtin-schema",
            "vendor.compose-spec",
            str(ROOT / "deploy" / "compose.yaml"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    services = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())["services"]
    assert {"kafka", "postgres", "migrate", "worker", "prometheus", "grafana"} <= set(services)


def test_dockerfile_runs_as_non_root_with_the_check_command() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "USER app" in dockerfile
    assert 'CMD ["license-worker", "check"]' in dockerfile


def test_the_validator_rejects_a_broken_object() -> None:
    broken = by_kind("Deployment")
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def mounted_paths(pod_spec: dict[str, Any]) -> dict[str, list[str]]:
    """Every file a Secret volume puts into the pod: volume name -> paths of its keys."""
    [container] = pod_spec["containers"]
    mounts = {mount["name"]: mount["mountPath"] for mount in container.get("volumeMounts", [])}
    return {
        volume["name"]: [
            f"{mounts[volume['name']]}/{item['path']}" for item in volume["secret"].get("items", [])
        ]
        for volume in pod_spec.get("volumes", [])
        if volume["name"] in mounts
    }


def test_migrations_run_as_the_owner_role_and_the_worker_as_the_worker_role() -> None:
    config = by_kind("ConfigMap")["data"]
    job = by_kind("Job")["spec"]["template"]["spec"]
    deployment = by_kind("Deployment")["spec"]["template"]["spec"]
    job_env = {variable["name"]: variable["value"] for variable in job["containers"][0]["env"]}

    worker_url, owner_url = urlsplit(config["DATABASE_URL"]), urlsplit(job_env["DATABASE_URL"])
    assert (worker_url.username, owner_url.username) == ("license_worker", "license_owner")
    assert (worker_url.password, owner_url.password) == (None, None), "passwords are files"
    # Each pod gets its own role's password file, and only that one.
    assert mounted_paths(deployment)["postgres-password"] == [config["DATABASE_PASSWORD_FILE"]]
    assert mounted_paths(job)["postgres-password"] == [job_env["DATABASE_PASSWORD_FILE"]]
    assert config["DATABASE_PASSWORD_FILE"].endswith("/worker-password")
    assert job_env["DATABASE_PASSWORD_FILE"].endswith("/owner-password")
    for url, pod in ((worker_url, deployment), (owner_url, job)):
        query = dict(parse_qsl(url.query))
        assert query["sslmode"] == "verify-full"
        [container] = pod["containers"]
        assert any(
            query["sslrootcert"].startswith(mount["mountPath"] + "/")
            for mount in container["volumeMounts"]
        )
