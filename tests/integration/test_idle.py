"""Idle culling where activity cannot be read: KWOK pods run no server. Nothing is culled for want
of an answer (setting idle.unknown: keep); the environment says activity is unknown. A policy
that cannot be enforced as written (a timeout shorter than two checks) says so and culls nothing.
One that holds its node without being Ready (there is no server to read) is culled from when it
stopped being Ready; one that never got a node is not."""

from __future__ import annotations

import contextlib
import datetime
import time
import uuid

import kubernetes
import pytest

from tests.integration.conftest import GROUP, VERSION
from tests.integration.test_datasets import PUBLIC, Catalogue
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


@pytest.fixture
def catalogue(custom):
    made = Catalogue(custom)
    yield made
    made.delete_all()


def crash_loop(core, namespace: str, pod: str) -> None:
    """What a node's kubelet writes of a JupyterLab that exits after each restart: the pod runs on its
    node (holding its CPUs) and is not Ready. KWOK readies Pending pods only: it stays so."""
    image = core.read_namespaced_pod(pod, namespace).spec.containers[0].image
    container = {
        "name": "jupyterlab",
        "image": image,
        "imageID": "",
        "ready": False,
        "restartCount": 3,
        "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off restarting failed container"}},
        "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}},
    }
    conditions = [{"type": "Ready", "status": "False"}, {"type": "ContainersReady", "status": "False"}]
    body = {"phase": "Running", "conditions": conditions, "containerStatuses": [container]}
    core.patch_namespaced_pod_status(pod, namespace, {"status": body})


def test_an_environment_holding_its_node_without_being_ready_is_culled(
    idle_flavors, catalogue, environments, core, namespace
):
    """Ready, then JupyterLab crash-loops: its pod holds the node's CPUs and no one can use it (the
    gateway sends nothing to a server that is not Ready). It is warned, then suspended at its flavor's
    idleTimeout from when it stopped being Ready, though its server cannot be read (idle.unknown: keep
    does not apply: there is no server). One of the same flavor whose pod never got a node (a
    dataset's claim is missing) holds nothing and is left waiting."""
    claim = f"raw-{uuid.uuid4().hex[:6]}"
    dataset = catalogue.dataset(
        "raw", PUBLIC, storage={"persistentVolumeClaim": {"claimName": claim}, "path": "/gpfs/raw"}
    )
    environments.create("waiting", flavor="test-idle-pod", lifetime="1h", datasets=[{"name": dataset}])
    environments.create("broken", flavor="test-idle-pod", lifetime="1h")
    environments.wait_phase("broken", "Ready")
    wait_for(lambda: idle_condition(environments, "broken"), timeout=20, what="the idle check to see it Ready")
    crash_loop(core, namespace, "aenv-broken")
    fallen = environments.wait_phase("broken", "Provisioning", timeout=15)["status"]
    assert fallen["reason"] == "ServerCrashing" and fallen["backend"].get("allocatedCpus"), fallen
    wait_for(lambda: environments.get("broken")["spec"].get("suspend"), timeout=30, what="broken suspended")
    conditions = {c["type"]: c for c in environments.get("broken")["status"]["conditions"]}
    assert conditions["Idle"]["reason"] == "IdleSuspended" and "not Ready since" in conditions["Idle"]["message"]
    wait_for(
        lambda: "IdleSuspended" in events_of(core, namespace, "broken"), timeout=10, what="the IdleSuspended Event"
    )
    said = events_of(core, namespace, "broken")
    assert "not Ready since" in said["IdleSoon"].message  # warned first
    unready = parse(conditions["Ready"]["lastTransitionTime"])
    held = said["IdleSuspended"].first_timestamp - unready
    assert held >= datetime.timedelta(seconds=8), f"culled {held} after it stopped being Ready"
    environments.wait_phase("broken", "Suspended", timeout=30)
    waiting = environments.get("waiting")
    assert waiting["status"]["phase"] == "Pending" and waiting["status"]["reason"] == "ClaimNotFound"
    assert not waiting["spec"].get("suspend") and idle_condition(environments, "waiting") is None


def events_of(core, namespace: str, name: str) -> dict:
    """The environment's Events by reason."""
    selector = f"involvedObject.kind=AnalysisEnvironment,involvedObject.name={name}"
    return {event.reason: event for event in core.list_namespaced_event(namespace, field_selector=selector).items}


def parse(moment: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(moment.replace("Z", "+00:00"))
