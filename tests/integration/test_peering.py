"""Two operator processes against one cluster with kopf peering (as the chart's two
replicas run): only one handles environments; when it is killed (SIGKILL: no goodbye
in the peering object) the other takes over within the peering lifetime."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import signal
import time
import types
import uuid

import kubernetes
import pytest

from analysis_operator.handlers import lifecycle
from analysis_operator.infra.certificates import ensure_certificates
from analysis_operator.infra.kube import KubeClient
from analysis_operator.settings import Settings
from tests.integration.conftest import Environments, OperatorProcess, kubectl
from tests.integration.test_environments import StatusLog
from tests.waiting import wait_for

pytestmark = pytest.mark.integration
LIFETIME = 10  # seconds; the chart's default is 20
RETRY_SECONDS = 30  # engine/converge.py REFUSED_RETRY_SECONDS


def handled(process: OperatorProcess, environment: str) -> bool:
    """Did this process run a handler for the environment (its log says so)?"""
    return any(
        record.get("environment", "").endswith(f"/{environment}") and record.get("event") == "environment.transition"
        for record in log_lines(process)
    )


def log_lines(process: OperatorProcess) -> list[dict]:
    lines = []
    for line in process.log_path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


def acting(process: OperatorProcess) -> bool:
    """kopf starts peered operators paused and logs each resume and pause: the last one counts."""
    text = process.log_path.read_text()
    return text.rfind("Resuming operations after the pause") > text.rfind("Pausing operations")


def peers(name: str) -> dict[str, dict]:
    """The keep-alives in the peering object: identity (POD_ID) -> priority, lifetime, lastseen."""
    body = json.loads(kubectl("get", "clusterkopfpeering", name, "-o", "json").stdout)
    return body.get("status") or {}


def split(name: str, processes: list[OperatorProcess]) -> tuple[OperatorProcess, OperatorProcess]:
    """(active, standby): the live peer with the highest priority is the active one."""
    keepalives = peers(name)
    ranked = sorted(processes, key=lambda process: keepalives[process.settings["POD_ID"]]["priority"])
    return ranked[1], ranked[0]


REPLICA_LABEL = "analysis.panosc.eu/replica"
REPLICAS_NAMESPACE = "default"  # where the stand-ins for the replicas' pods are (as the chart's pods would be)


def replica_pod(name: str) -> str:
    """A pod object standing in for a replica's pod (POD_ID), which the replica labels; removed at the end."""
    kubectl("run", name, "-n", REPLICAS_NAMESPACE, "--image=analysis-operator", "--restart=Never")
    return name


def role(pod: str) -> str | None:
    labels = json.loads(kubectl("get", "pod", pod, "-n", REPLICAS_NAMESPACE, "-o", "json").stdout)["metadata"]
    return (labels.get("labels") or {}).get(REPLICA_LABEL)


def start_pair(
    tmp_path, kubeconfig: str, lifetime: int = LIFETIME, on_start=lambda name, processes: None
) -> tuple[str, list[OperatorProcess]]:
    """A peering object and two operators using it; returns when one of them has paused."""
    name = f"peering-{uuid.uuid4().hex[:6]}"
    manifest = tmp_path / f"{name}.yaml"
    manifest.write_text(f"apiVersion: kopf.dev/v1\nkind: ClusterKopfPeering\nmetadata: {{name: {name}}}\n")
    kubectl("apply", "-f", str(manifest))
    for index in range(2):
        replica_pod(f"{name}-{index}")
    certificates = tmp_path / "tls"
    ensure_certificates(str(certificates), ("localhost",))
    processes = [
        OperatorProcess(
            kubeconfig,
            tmp_path / f"{name}-{index}.log",
            ANALYSIS_OPERATOR_STANDALONE="false",
            ANALYSIS_OPERATOR_PEERING_NAME=name,
            ANALYSIS_OPERATOR_PEERING_LIFETIME_SECONDS=str(lifetime),
            ANALYSIS_OPERATOR_ADMISSION_HOST="",  # served, registered by nobody
            ANALYSIS_OPERATOR_ADMISSION_CERT_DIR=str(certificates),
            ANALYSIS_OPERATOR_POD_NAMESPACE=REPLICAS_NAMESPACE,
            POD_ID=f"{name}-{index}",
        )  # kopf's peer identity, as in the chart
        for index in range(2)
    ]
    on_start(name, processes)
    for process in processes:
        process.start()
    wait_for(lambda: len(peers(name)) == 2, timeout=30, what="both operators' keep-alives")
    active, standby = split(name, processes)
    wait_for(
        lambda: acting(active) and not acting(standby), timeout=30, what="only the higher-priority operator acting"
    )
    return name, processes


@pytest.fixture
def operator_pair(kubeconfig, other_operators_stopped, tmp_path):
    started: list[tuple[str, list[OperatorProcess]]] = []

    def start(lifetime: int = LIFETIME):
        return start_pair(tmp_path, kubeconfig, lifetime, on_start=lambda *pair: started.append(pair))

    yield start
    for name, processes in started:
        for process in processes:
            process.stop(signal.SIGKILL)
            kubectl("delete", "pod", process.settings["POD_ID"], "-n", REPLICAS_NAMESPACE, "--ignore-not-found")
        kubectl("delete", "clusterkopfpeering", name, "--ignore-not-found")


def test_one_of_two_reconciles_and_the_other_takes_over_when_it_is_killed(operator_pair, custom, namespace):
    name, processes = operator_pair()
    active, standby = split(name, processes)
    environments = Environments(custom, namespace)

    environments.create("first", flavor="jupyter-basic")
    environments.wait_phase("first", "Ready", timeout=30)
    assert handled(active, "first") and not handled(standby, "first")

    # The offer Service (the chart's) selects the pod labelled active: the active one's, not the standby's.
    pods = active.settings["POD_ID"], standby.settings["POD_ID"]
    wait_for(lambda: (role(pods[0]), role(pods[1])) == ("active", "standby"), timeout=10, what="the replicas labelled")

    active.stop(signal.SIGKILL)
    killed = time.monotonic()
    environments.create("second", flavor="jupyter-basic")
    environments.wait_phase("second", "Ready", timeout=LIFETIME + 20)
    takeover = time.monotonic() - killed
    assert handled(standby, "second") and acting(standby)
    # Bounded by the dead peer's lifetime (its last keep-alive was at most that long ago),
    # plus the standby's reaction and one reconcile.
    assert takeover <= LIFETIME + 5, f"takeover took {takeover:.1f}s with a {LIFETIME}s peering lifetime"
    # The dead one's label stays (its pod would be gone, or not ready: out of the Service either way).
    wait_for(lambda: role(pods[1]) == "active", timeout=5, what="the new active replica labelled")
    print(f"takeover after SIGKILL: {takeover:.1f}s (lifetime {LIFETIME}s)")


def test_a_clean_stop_hands_over_at_once(operator_pair, custom, namespace):
    """SIGTERM (a rolling update, a drain): the leaving replica removes its keep-alive,
    so the standby does not wait for the lifetime."""
    name, processes = operator_pair(lifetime=60)
    active, standby = split(name, processes)
    active.stop(signal.SIGTERM)
    stopped = time.monotonic()
    wait_for(lambda: acting(standby), timeout=20, what="the standby to resume after a clean stop")
    assert time.monotonic() - stopped < 10  # far below the 60 s lifetime
    environments = Environments(custom, namespace)
    environments.create("after", flavor="jupyter-basic")
    environments.wait_phase("after", "Ready", timeout=30)
    assert handled(standby, "after")


def test_a_replica_outranked_mid_retry_converges_nothing_until_it_acts_again(operator_pair, custom, core, namespace):
    """The active replica is retrying an environment on a timer of its own (its pod gone, a ResourceQuota
    refusing the new one) when a peer outranks it (a rolling update's new replica, here a keep-alive written
    by hand): kopf pauses its handlers, not that timer. The quota lifted meanwhile, the timer comes due on a
    replica whose index is stale and which must not act: nothing is made and nothing written. Once no peer
    outranks it, the same timer converges it and it runs again."""
    name, processes = operator_pair(lifetime=120)
    active, standby = split(name, processes)
    environments = Environments(custom, namespace)
    environments.create("kept", flavor="jupyter-basic")
    environments.wait_phase("kept", "Ready", timeout=30)
    core.create_namespaced_resource_quota(namespace, {"metadata": {"name": "no-pods"}, "spec": {"hard": {"pods": "0"}}})
    wait_for(
        lambda: (core.read_namespaced_resource_quota("no-pods", namespace).status.hard or {}).get("pods") == "0",
        timeout=30,
        what="the quota counted",
    )
    core.delete_namespaced_pod("aenv-kept", namespace, grace_period_seconds=0)
    status = environments.wait_phase("kept", "Pending", timeout=20)["status"]
    assert status["reason"] == "RefusedByCluster" and "no-pods" in status["message"], status

    now = datetime.datetime.now(datetime.UTC).isoformat()
    above = {"rolling-update": {"priority": 2**31, "lifetime": 120, "lastseen": now}}
    kubectl("patch", "clusterkopfpeering", name, "--type=merge", "-p", json.dumps({"status": above}))
    wait_for(lambda: not acting(active) and not acting(standby), timeout=20, what="both replicas paused")
    statuses = StatusLog(custom, namespace, environments.get("kept"))
    core.delete_namespaced_resource_quota("no-pods", namespace)
    time.sleep(RETRY_SECONDS + 5)  # the refusal's retry came due on the paused replica
    statuses.stop()
    assert statuses.statuses == [] and environments.phase("kept") == "Pending"  # nothing written
    assert not [pod for pod in core.list_namespaced_pod(namespace).items if pod.metadata.name == "aenv-kept"]
    assert [line for line in log_lines(active) if line.get("event") == "reconcile.standby"]

    remove = '[{"op": "remove", "path": "/status/rolling-update"}]'
    kubectl("patch", "clusterkopfpeering", name, "--type=json", "-p", remove)
    wait_for(lambda: acting(active), timeout=20, what="the replica acting again")
    status = environments.wait_phase("kept", "Ready", timeout=30)["status"]
    assert status["backend"]["name"] == "aenv-kept"
    again = [line for line in log_lines(active) if line.get("event") == "reconcile.acting_again"]
    assert again and all(line["environments"] >= 1 for line in again), again


def test_a_standby_acts_on_no_pod_change_and_asks_again_once_it_may_have_changed(kubeconfig, monkeypatch, tmp_path):
    """The pod watch runs on a standby too (handlers/lifecycle.py `acting`): a pod change is acted on only
    while no live peer outranks this replica, as the peering record says (not a sweep-old answer)."""
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", kubeconfig)
    name = f"peering-{uuid.uuid4().hex[:6]}"
    manifest = tmp_path / "peering.yaml"
    manifest.write_text(f"apiVersion: kopf.dev/v1\nkind: ClusterKopfPeering\nmetadata: {{name: {name}}}\n")
    kubectl("apply", "-f", str(manifest))
    now = datetime.datetime.now(datetime.UTC).isoformat()
    outranking = {"other": {"priority": 100, "lifetime": 60, "lastseen": now}}
    patch = json.dumps({"status": outranking})
    kubectl("patch", "clusterkopfpeering", name, "--type=merge", "-p", patch)
    settings = dataclasses.replace(Settings(), standalone=False, peering_name=name)

    async def scenario() -> list[bool]:
        kube = KubeClient(2)
        memo = types.SimpleNamespace(
            config=settings, context=types.SimpleNamespace(kube=kube), peering_priority=10, active=True
        )
        memo.active_at = -lifecycle.ACTIVE_FOR
        try:
            answers = [await lifecycle.acting(memo)]  # outranked: the sweep's last answer (True) is not taken
            kubectl(
                "patch",
                "clusterkopfpeering",
                name,
                "--type=json",
                "-p",
                '[{"op": "remove", "path": "/status/other"}]',
            )
            answers.append(await lifecycle.acting(memo))  # within a second: the answer just read
            answers.append(await lifecycle.acting(memo, fresh=True))  # a start of its own: asked at once
            await asyncio.sleep(lifecycle.ACTIVE_FOR + 0.1)
            answers.append(await lifecycle.acting(memo))  # asked again: nobody outranks it now
            return answers
        finally:
            await kube.close()

    try:
        assert asyncio.run(scenario()) == [False, False, True, True]
    finally:
        kubectl("delete", "clusterkopfpeering", name, "--ignore-not-found")
