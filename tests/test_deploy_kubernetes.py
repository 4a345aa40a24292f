"""The Kubernetes example of a sharded fleet (deploy/kubernetes/) is valid against Kubernetes' schemas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate.utils import ValidationError, validate

MANIFEST = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes" / "omsd-fleet.yaml"
VERSION = "1.30"  # the schemas kubernetes-validate bundles (offline); pod-index labels since 1.28


def documents() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def test_every_resource_validates_strictly() -> None:
    """Each document is a valid resource of its kind (unknown fields refused)."""
    kinds = [d["kind"] for d in documents()]
    assert kinds.count("StatefulSet") == 1 and "Ingress" in kinds
    for doc in documents():
        validate(doc, VERSION, strict=True)


def test_the_validator_refuses_a_misspelt_field() -> None:
    """The check is real: a typo in the StatefulSet is refused."""
    [sts] = [d for d in documents() if d["kind"] == "StatefulSet"]
    sts["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = sts["spec"]["template"]["spec"]["containers"][
        0
    ].pop("readinessProbe")
    with pytest.raises(ValidationError):
        validate(sts, VERSION, strict=True)


def test_each_pod_serves_its_own_shard_with_its_own_public_host() -> None:
    """OMSD_ACCOUNTS_DIR and OMSD_CONNECTOR_ENDPOINT follow the pod's index; one Secret volume and
    one Service per shard, as many as replicas; readiness on /readyz, liveness on /healthz."""
    docs = documents()
    [sts] = [d for d in docs if d["kind"] == "StatefulSet"]
    pod = sts["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["OMSD_ACCOUNTS_DIR"] == "/etc/omsd/shards/$(POD_INDEX)"
    assert "$(POD_INDEX)" in env["OMSD_CONNECTOR_ENDPOINT"]
    shards = sts["spec"]["replicas"]
    secrets = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    for k in range(shards):
        assert f"omsd-shard-{k}" in secrets and f"omsd-shard-{k}" in services
        assert {"name": f"shard-{k}", "mountPath": f"/etc/omsd/shards/{k}", "readOnly": True} in container[
            "volumeMounts"
        ]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for doc in docs:
        if doc["kind"] == "Secret":
            names = [k for k in doc["stringData"] if k.endswith(".env")]
            assert all(n.removesuffix(".env").replace("-", "").isalnum() for n in names)
