"""Idle culling against real servers: JupyterLab in a Slurm job (hack/slurm.sh), the real gateway,
the real API server. Short timeouts here (24 s, warned 12 s before, checked every 2 s); the
production defaults are minutes."""

from __future__ import annotations

import contextlib
import datetime
import json
import threading
import time
import uuid

import kubernetes
import pytest
import websockets.sync.client

from tests.integration.conftest import GROUP, VERSION
from tests.integration.test_open import directory  # noqa: F401
from tests.waiting import wait_for

IDLE_FLAVOR = "test-cluster-idle"
IDLE_SETTINGS = {
    "ANALYSIS_OPERATOR_IDLE_CHECK_INTERVAL_SECONDS": "2",
    "ANALYSIS_OPERATOR_IDLE_STATUS_INTERVAL_SECONDS": "4",
    "ANALYSIS_OPERATOR_IDLE_REQUEST_TIMEOUT_SECONDS": "3",
    "ANALYSIS_OPERATOR_BUDGETS_CHARGE_INTERVAL_SECONDS": "1",
}


@pytest.fixture(scope="module")
def idle_flavor(kubeconfig):
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "EnvironmentFlavor",
        "metadata": {"name": IDLE_FLAVOR},
        "spec": {
            "backend": "slurm",
            "resources": {"cpu": 1, "memory": "1Gi"},
            "maxLifetime": "2h",
            "slurm": {"partition": "debug"},
            "idleTimeout": "24s",
            "idleWarnBefore": "12s",
        },
    }

    custom = kubernetes.client.CustomObjectsApi(kubernetes.config.new_client_from_config(config_file=kubeconfig))
    with contextlib.suppress(kubernetes.client.ApiException):
        custom.delete_cluster_custom_object(GROUP, VERSION, "environmentflavors", IDLE_FLAVOR)
    custom.create_cluster_custom_object(GROUP, VERSION, "environmentflavors", body)
    yield IDLE_FLAVOR
    custom.delete_cluster_custom_object(GROUP, VERSION, "environmentflavors", IDLE_FLAVOR)


@pytest.fixture
def idle_lab(opened, operator, slurm_environments, idle_flavor, directory):
    operator.configure(**IDLE_SETTINGS)
    return slurm_environments


def conditions(environment):
    return {c["type"]: c for c in (environment.get("status") or {}).get("conditions") or ()}


def events(core, namespace, name):
    selector = f"involvedObject.kind=AnalysisEnvironment,involvedObject.name={name}"
    return {
        event.reason: event.message for event in core.list_namespaced_event(namespace, field_selector=selector).items
    }


def test_idle_lab_is_warned_then_suspended_job_gone_not_charged_then_resumed(idle_lab, core, custom, namespace):
    owner, budget = "carol", f"b-{uuid.uuid4().hex[:8]}"
    custom.create_cluster_custom_object(
        GROUP,
        VERSION,
        "computebudgets",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ComputeBudget",
            "metadata": {"name": budget},
            "spec": {"user": owner, "limits": {"cpuHours": 100}},
        },
    )
    try:
        wait_for(
            lambda: (
                custom.get_cluster_custom_object(GROUP, VERSION, "computebudgets", budget).get("status") or {}
            ).get("display"),
            timeout=20,
            what="the operator to see the budget",
        )
        idle_lab.create("lazy", flavor=IDLE_FLAVOR, owner=owner, lifetime="1h")
        ready = idle_lab.wait_phase("lazy", "Ready", timeout=90)
        job_id = ready["status"]["backend"]["id"]
        wait_for(lambda: "IdleSoon" in events(core, namespace, "lazy"), timeout=40, what="the IdleSoon warning")
        warned = idle_lab.get("lazy")
        assert (
            conditions(warned)["Idle"]["reason"] == "IdleSoon"
            and "will be suspended at" in events(core, namespace, "lazy")["IdleSoon"]
        )
        assert warned["status"]["lastActivity"]  # JupyterLab's own report

        suspended = idle_lab.wait_phase("lazy", "Suspended", timeout=40)
        assert suspended["spec"]["suspend"] is True  # resume is spec.suspend: false, as always
        assert conditions(suspended)["Idle"]["reason"] == "IdleSuspended"
        assert "IdleSuspended" in events(core, namespace, "lazy")
        assert suspended["status"]["backend"].get("id") in (None, job_id)  # no job holds anything now

        def ledger():
            entry = custom.get_cluster_custom_object(GROUP, VERSION, "computebudgets", budget)["status"]
            return next(iter((entry.get("environments") or {}).values()), {})

        time.sleep(3)  # a few charge ticks
        before = ledger()["cpuHours"]
        time.sleep(4)
        assert ledger()["cpuHours"] == before  # not charged while suspended

        idle_lab.patch_spec("lazy", suspend=False)
        idle_lab.wait_phase("lazy", "Ready", timeout=90)
        wait_for(
            lambda: conditions(idle_lab.get("lazy")).get("Idle", {}).get("reason") == "Active",
            timeout=20,
            what="a resumed environment counted active again",
        )
        idle_lab.delete("lazy")
        wait_for(lambda: not idle_lab.exists("lazy"), timeout=60, what="the environment to be gone")
    finally:
        custom.delete_cluster_custom_object(GROUP, VERSION, "computebudgets", budget)


def test_a_kernel_busy_with_a_long_cell_keeps_it_alive(idle_lab, opened, namespace):
    idle_lab.create("busy", flavor=IDLE_FLAVOR, owner="alice", lifetime="1h")
    idle_lab.wait_phase("busy", "Ready", timeout=90)
    base = f"/env/{namespace}/busy/"
    wait_for(lambda: opened.request(base + "api/status", "alice")[0] == 200, timeout=20, what="the route")
    status, _, body = opened.request(base + "api/kernels", "alice", method="POST")
    assert status == 201, body
    kernel = json.loads(body)["id"]
    websocket_url = opened.url.replace("http", "ws", 1) + f"{base}api/kernels/{kernel}/channels"
    cookie = {"Cookie": f"aenv_session={opened.token('alice')}"}
    with websockets.sync.client.connect(websocket_url, additional_headers=cookie, open_timeout=20) as ws:
        ws.send(
            json.dumps(
                {
                    "header": {
                        "msg_id": "run",
                        "msg_type": "execute_request",
                        "username": "",
                        "session": "s",
                        "version": "5.3",
                    },
                    "parent_header": {},
                    "metadata": {},
                    "content": {"code": "import time; time.sleep(120)", "silent": False},
                    "channel": "shell",
                }
            )
        )
    # no browser, no output: only the busy kernel says it works; past the timeout it still runs
    deadline = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=40)
    while datetime.datetime.now(datetime.UTC) < deadline:
        environment = idle_lab.get("busy")
        assert environment["status"]["phase"] == "Ready" and not environment["spec"].get("suspend")
        threading.Event().wait(2)
    assert conditions(idle_lab.get("busy"))["Idle"]["reason"] == "Active"


def test_browser_traffic_through_the_gateway_keeps_it_alive(idle_lab, opened, namespace):
    idle_lab.create("watched", flavor=IDLE_FLAVOR, owner="alice", lifetime="1h")
    idle_lab.wait_phase("watched", "Ready", timeout=90)
    base = f"/env/{namespace}/watched/"
    wait_for(lambda: opened.request(base + "api/status", "alice")[0] == 200, timeout=20, what="the route")
    deadline = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=40)
    while datetime.datetime.now(datetime.UTC) < deadline:
        # the status endpoint is no activity to JupyterLab itself: only the gateway sees this tab
        assert opened.request(base + "api/status", "alice")[0] == 200
        assert idle_lab.get("watched")["status"]["phase"] == "Ready"
        threading.Event().wait(3)
    assert conditions(idle_lab.get("watched"))["Idle"]["reason"] == "Active"
