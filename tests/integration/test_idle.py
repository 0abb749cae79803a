"""Idle culling where activity cannot be read: KWOK pods run no server. Nothing is culled for want
of an answer (setting idle.unknown: keep); the environment says activity is unknown. And a policy
that cannot be enforced as written (a timeout shorter than two checks) says so and culls nothing."""

from __future__ import annotations

import contextlib
import time

import kubernetes
import pytest

from tests.integration.conftest import GROUP, VERSION
from tests.waiting import wait_for

SETTINGS = {
    "ANALYSIS_OPERATOR_IDLE_CHECK_INTERVAL_SECONDS": "2",
    "ANALYSIS_OPERATOR_IDLE_REQUEST_TIMEOUT_SECONDS": "1",
}


def flavor(custom, name, **spec):
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "EnvironmentFlavor",
        "metadata": {"name": name},
        "spec": {
            "backend": "kubernetes",
            "resources": {"cpu": 0.5, "memory": "1Gi"},
            "image": "quay.io/jupyter/base-notebook:2025-10-20",
            "maxLifetime": "1h",
            **spec,
        },
    }
    with contextlib.suppress(kubernetes.client.ApiException):
        custom.delete_cluster_custom_object(GROUP, VERSION, "environmentflavors", name)
    custom.create_cluster_custom_object(GROUP, VERSION, "environmentflavors", body)


@pytest.fixture
def idle_flavors(operator, custom):
    operator.configure(**SETTINGS)
    flavor(custom, "test-idle-pod", idleTimeout="8s", idleWarnBefore="4s")
    flavor(custom, "test-idle-too-short", idleTimeout="3s")
    yield
    for name in ("test-idle-pod", "test-idle-too-short"):
        custom.delete_cluster_custom_object(GROUP, VERSION, "environmentflavors", name)


def idle_condition(environments, name):
    conditions = {c["type"]: c for c in environments.get(name)["status"].get("conditions") or ()}
    return conditions.get("Idle")


def test_a_server_that_cannot_be_read_is_not_culled_and_says_so(idle_flavors, environments):
    environments.create("dark", flavor="test-idle-pod", lifetime="1h")
    environments.wait_phase("dark", "Ready")
    wait_for(lambda: idle_condition(environments, "dark"), timeout=20, what="the Idle condition")
    condition = idle_condition(environments, "dark")
    assert condition["status"] == "Unknown" and condition["reason"] == "ActivityUnknown"
    assert "not culled" in condition["message"] and "cannot be read" in condition["message"]
    time.sleep(12)  # past the timeout
    environment = environments.get("dark")
    assert environment["status"]["phase"] == "Ready" and not environment["spec"].get("suspend")


def test_a_timeout_shorter_than_two_checks_is_named_and_culls_nothing(idle_flavors, environments):
    environments.create("hasty", flavor="test-idle-too-short", lifetime="1h")
    environments.wait_phase("hasty", "Ready")
    wait_for(lambda: idle_condition(environments, "hasty"), timeout=20, what="the Idle condition")
    condition = idle_condition(environments, "hasty")
    assert condition["reason"] == "IdlePolicyInvalid" and "shorter than two activity checks" in condition["message"]
    time.sleep(6)
    assert environments.get("hasty")["status"]["phase"] == "Ready"
