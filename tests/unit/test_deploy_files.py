"""The deployment files parse and validate: Kubernetes objects against the Kubernetes
schemas (kubernetes-validate), the compose file against the compose specification
(check-jsonschema), and the parts that must agree with the worker do."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from ipaddress import ip_address
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from worker.cli import main as cli

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.31.0"


def documents(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def all_objects() -> list[dict[str, Any]]:
    return [obj for path in sorted(KUBERNETES.glob("*.yaml")) for obj in documents(path)]


def object_name(obj: dict[str, Any]) -> str:
    metadata = obj["metadata"]
    return str(metadata.get("name") or metadata["generateName"])


def by_kind(kind: str) -> dict[str, Any]:
    [found] = [obj for obj in all_objects() if obj["kind"] == kind]
    return found


@pytest.mark.parametrize(
    "obj",
    [obj for obj in all_objects() if not obj["apiVersion"].startswith("keda.sh/")],
    ids=lambda obj: f"{obj['kind']}/{object_name(obj)}",
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
    partitions = int(by_kind("ConfigMap")["data"]["TOPIC_PARTITIONS"])
    assert scaled["spec"]["maxReplicaCount"] == partitions, "one replica per agent partition"
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


DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def dockerfile_instructions() -> list[dict[str, Any]]:
    parser = DockerfileParser(fileobj=io.BytesIO(DOCKERFILE.read_bytes()))
    return list(parser.structure)


def test_the_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [str(Path(sys.executable).with_name("hadolint")), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_is_multi_stage_with_a_base_pinned_by_digest() -> None:
    parser = DockerfileParser(fileobj=io.BytesIO(DOCKERFILE.read_bytes()))
    stages = [i["value"] for i in dockerfile_instructions() if i["instruction"] == "FROM"]
    assert len(stages) >= 2, "build and runtime stages"
    [base] = [i["value"] for i in dockerfile_instructions() if i["instruction"] == "ARG"]
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11-slim@sha256:[0-9a-f]{64}", base), base
    assert all(stage.startswith("${PYTHON_IMAGE} AS ") for stage in stages), stages
    assert re.fullmatch(r"python:3\.11-slim@sha256:[0-9a-f]{64}", parser.baseimage or "")


def test_uv_comes_from_its_image_at_the_makefiles_version() -> None:
    version = re.search(r"^UV_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert version
    copies = [i["value"] for i in dockerfile_instructions() if i["instruction"] == "COPY"]
    assert f"--from=ghcr.io/astral-sh/uv:{version[1]} /uv /uvx /bin/" in copies
    runs = " ".join(i["value"] for i in dockerfile_instructions() if i["instruction"] == "RUN")
    assert "pip install" not in runs


def test_the_image_runs_as_non_root_and_its_healthcheck_is_liveness() -> None:
    instructions = dockerfile_instructions()
    [user] = [i["value"] for i in instructions if i["instruction"] == "USER"]
    assert user.split(":")[0] == "10001"
    [healthcheck] = [i["value"] for i in instructions if i["instruction"] == "HEALTHCHECK"]
    assert "/livez" in healthcheck
    assert "check" not in healthcheck.split("CMD", 1)[1], "an outage must not kill the worker"
    [entrypoint] = [i["value"] for i in instructions if i["instruction"] == "ENTRYPOINT"]
    assert entrypoint == '["license-worker"]'


def test_pods_run_with_the_default_seccomp_profile() -> None:
    for kind in ("Deployment", "Job"):
        pod = by_kind(kind)["spec"]["template"]["spec"]
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, kind
        assert pod["securityContext"]["runAsNonRoot"] is True, kind


def test_keda_owns_the_replica_count_and_disruptions_take_one_pod_at_a_time() -> None:
    deployment = by_kind("Deployment")
    assert "replicas" not in deployment["spec"], "KEDA scales: a fixed count fights it"
    budget = by_kind("PodDisruptionBudget")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] == 1
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in spread} == {
        "topology.kubernetes.io/zone",
        "kubernetes.io/hostname",
    }
    for constraint in spread:
        assert constraint["labelSelector"]["matchLabels"].items() <= labels.items()


def test_keda_reads_lag_from_the_earliest_offset_with_a_matching_credential_pair() -> None:
    [trigger] = by_kind("ScaledObject")["spec"]["triggers"]
    assert trigger["metadata"]["offsetResetPolicy"] == "earliest"
    references = {
        ref["parameter"]: ref for ref in by_kind("TriggerAuthentication")["spec"]["secretTargetRef"]
    }
    username, password = references["username"], references["password"]
    assert username["name"] == password["name"], "user name and password from one Secret"
    secrets = {obj["metadata"]["name"]: obj for obj in all_objects() if obj["kind"] == "Secret"}
    assert {username["key"], password["key"]} <= set(secrets[username["name"]]["stringData"])


def test_the_migration_job_is_new_per_release_and_gets_only_its_secrets() -> None:
    job = by_kind("Job")
    assert "name" not in job["metadata"]
    assert job["metadata"]["generateName"].endswith("-")
    assert "pre-upgrade" in job["metadata"]["annotations"]["helm.sh/hook"]
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert all("secretRef" not in source for source in container.get("envFrom", []))
    secrets = {
        volume["secret"]["secretName"]
        for volume in job["spec"]["template"]["spec"]["volumes"]
        if "secret" in volume
    }
    assert secrets == {
        "license-worker-postgres",
        "license-worker-postgres-ca",
        "license-worker-pseudonym-key",
    }


def effective_environment(kind: str) -> dict[str, str]:
    """A pod's variables: the ConfigMap, then the container's own `env` over it."""
    [container] = by_kind(kind)["spec"]["template"]["spec"]["containers"]
    environment = dict(by_kind("ConfigMap")["data"])
    environment.update({v["name"]: v["value"] for v in container.get("env", []) if "value" in v})
    return environment


@pytest.mark.parametrize("kind", ["Deployment", "Job"])
def test_every_file_a_pod_is_told_to_read_is_mounted(kind: str) -> None:
    """A path in the pod's settings that no volume provides stops the command at start-up
    (`KAFKA_SSL_CAFILE: cannot read ...`)."""
    environment = effective_environment(kind)
    paths = [
        value
        for name, value in environment.items()
        if value and (name.endswith("_FILE") or name == "KAFKA_SSL_CAFILE")
    ]
    paths += [
        value
        for name, value in parse_qsl(urlsplit(environment["DATABASE_URL"]).query)
        if name == "sslrootcert"
    ]
    pod = by_kind(kind)["spec"]["template"]["spec"]
    [container] = pod["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    provided: set[str] = set()
    for volume in pod["volumes"]:
        if volume["name"] not in mounts:
            continue
        items = volume["secret"].get("items")
        keys = [item["path"] for item in items] if items else secret_keys(volume)
        provided |= {f"{mounts[volume['name']]}/{key}" for key in keys}
    assert paths
    assert set(paths) <= provided, set(paths) - provided


def secret_keys(volume: dict[str, Any]) -> list[str]:
    """The keys of the Secret a volume mounts whole (secret.yaml), or the CA file name for
    the CA Secrets the cluster's operators provide."""
    name = volume["secret"]["secretName"]
    secrets = {obj["metadata"]["name"]: obj for obj in all_objects() if obj["kind"] == "Secret"}
    if name in secrets:
        return list(secrets[name]["stringData"])
    return ["ca.crt"]


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
