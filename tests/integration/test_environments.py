"""AnalysisEnvironments on the real API server, reconciled by the operator process."""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import signal
import threading
import time
import uuid

import kubernetes
import pytest
import urllib3

from tests.integration.conftest import CLUSTER_STATE, GROUP, VERSION, Environments, _has_default_service_account
from tests.waiting import wait_for

OWNER_KIND = "AnalysisEnvironment"


def children(core, namespace: str, name: str) -> dict[str, object]:
    """Pod, Service and Secret of an environment, or None where missing."""
    child = f"aenv-{name}"
    found = {}
    for kind, read in (
        ("pod", core.read_namespaced_pod),
        ("service", core.read_namespaced_service),
        ("secret", core.read_namespaced_secret),
    ):
        try:
            found[kind] = read(child, namespace)
        except kubernetes.client.ApiException as error:
            assert error.status == 404
            found[kind] = None
    return found


def events(core, namespace: str, name: str) -> list:
    selector = f"involvedObject.kind={OWNER_KIND},involvedObject.name={name}"
    return core.list_namespaced_event(namespace, field_selector=selector).items


def event_reasons(core, namespace: str, name: str) -> set[str]:
    return {event.reason for event in events(core, namespace, name)}


def namespace_gone(core, name: str) -> bool:
    try:
        core.read_namespace(name)
        return False
    except kubernetes.client.ApiException as error:
        return error.status == 404


def test_environment_goes_ready_with_owned_children(environments, core, namespace):
    created = environments.create("basic", flavor="jupyter-basic", lifetime="4h")
    environment = environments.wait_phase("basic", "Ready")
    status = environment["status"]
    found = children(core, namespace, "basic")

    for kind, child in found.items():
        assert child is not None, f"{kind} missing"
        (reference,) = child.metadata.owner_references
        assert (reference.kind, reference.uid, reference.controller) == (OWNER_KIND, created["metadata"]["uid"], True)
    pod = found["pod"]
    assert pod.status.phase == "Running" and pod.spec.node_name.startswith("kwok-")
    container = pod.spec.containers[0]
    assert container.image == "quay.io/jupyter/scipy-notebook:2025-10-20"
    assert container.resources.requests == {"cpu": "1", "memory": "16Gi"}
    assert pod.spec.automount_service_account_token is False

    token = base64.b64decode(found["secret"].data["token"]).decode()
    assert len(token) >= 32
    assert token not in json.dumps(environment) and token not in json.dumps(pod.to_dict(), default=str)
    assert status["connection"]["secretName"] == "aenv-basic"
    # the Service's address, or the gateway's when an earlier test turned OPEN on: the same base path
    assert status["connection"]["url"].endswith(f"/env/{namespace}/basic/lab")
    assert status["backend"]["kind"] == "kubernetes" and status["backend"]["node"] == pod.spec.node_name
    assert status["observedGeneration"] == environment["metadata"]["generation"]
    (ready,) = [c for c in status["conditions"] if c["type"] == "Ready"]
    assert ready["status"] == "True"
    start, end = status["startedAt"], status["expiresAt"]
    assert (int(end[11:13]) - int(start[11:13])) % 24 == 4 and end[14:] == start[14:]
    # Up within the quiet moment: its first status is Ready and says it all, so no Event (the slow start
    # below, seen waiting, is told how it ended). The Event would follow the status write at once.
    time.sleep(1)
    assert not {"PodStarting", "PodReady"} & event_reasons(core, namespace, "basic")


def test_gpu_flavor_requests_a_gpu_and_lands_on_the_gpu_node(environments, core, namespace):
    environments.create("gpu", flavor="jupyter-gpu")
    environments.wait_phase("gpu", "Ready")
    pod = children(core, namespace, "gpu")["pod"]
    assert pod.spec.containers[0].resources.limits["nvidia.com/gpu"] == "1"
    assert pod.spec.node_name == "kwok-gpu-0"


def test_custom_image_is_used_where_the_flavor_allows_it(environments, core, namespace):
    environments.create("custom", flavor="jupyter-custom", image="registry.example.org/xrd/jupyter:1.2")
    environments.wait_phase("custom", "Ready")
    assert children(core, namespace, "custom")["pod"].spec.containers[0].image == "registry.example.org/xrd/jupyter:1.2"


@pytest.mark.parametrize(
    "spec, words",
    [
        ({"flavor": "jupyter-basic", "image": "evil.example.org/miner:1"}, "does not allow custom images"),
        ({"flavor": "test-short", "lifetime": "2h"}, "longer than flavor 'test-short' allows (1h)"),
    ],
)
def test_request_the_flavor_forbids_is_refused_at_admission(environments, core, namespace, spec, words):
    with pytest.raises(kubernetes.client.ApiException) as refused:
        environments.create("refused", **spec)
    assert refused.value.status == 422 and words in refused.value.body
    assert children(core, namespace, "refused") == {"pod": None, "service": None, "secret": None}


def test_a_change_policy_refuses_is_refused_at_admission_and_the_environment_runs_on(environments, core, namespace):
    """Raising the lifetime of a running environment above its flavor's limit: refused when it is asked,
    not accepted and then acted on (before, it turned Rejected and left its pod, Service and Secret)."""
    environments.create("steady", flavor="test-short", lifetime="30m")
    environments.wait_phase("steady", "Ready")
    with pytest.raises(kubernetes.client.ApiException) as refused:
        environments.patch_spec("steady", lifetime="1000h")
    assert refused.value.status == 422 and "longer than flavor 'test-short' allows (1h)" in refused.value.body
    environments.patch_spec("steady", lifetime="45m")  # within the limit: accepted
    assert environments.get("steady")["spec"]["lifetime"] == "45m"
    assert environments.phase("steady") == "Ready"
    assert all(child is not None for child in children(core, namespace, "steady").values())


def test_unknown_flavor_waits_in_pending_with_a_message(environments, namespace):
    environments.create("lost", flavor="no-such-flavor")
    status = environments.wait_phase("lost", "Pending")["status"]
    assert status["reason"] == "FlavorNotFound" and "'no-such-flavor' does not exist" in status["message"]


def test_suspend_removes_the_pod_and_resume_brings_it_back(environments, core, namespace):
    environments.create("pause", flavor="test-short")
    environments.wait_phase("pause", "Ready")
    before = children(core, namespace, "pause")

    environments.patch_spec("pause", suspend=True)
    status = environments.wait_phase("pause", "Suspended")["status"]
    assert status["observedGeneration"] == 2
    wait_for(lambda: children(core, namespace, "pause")["pod"] is None, timeout=30, what="pod removed")
    kept = children(core, namespace, "pause")
    assert kept["service"].metadata.uid == before["service"].metadata.uid
    assert kept["secret"].data == before["secret"].data

    environments.patch_spec("pause", suspend=False)
    environments.wait_phase("pause", "Ready")
    after = children(core, namespace, "pause")
    assert after["pod"].metadata.uid != before["pod"].metadata.uid
    assert after["secret"].data == before["secret"].data


def test_lifetime_expiry_stops_the_environment_and_keeps_the_record(environments, core, namespace):
    environments.create("brief", flavor="test-short", lifetime="4s")
    status = environments.wait_phase("brief", "Expired", timeout=30)["status"]
    assert status["reason"] == "LifetimeExpired" and status["stoppedAt"] >= status["expiresAt"]
    assert "connection" not in status
    wait_for(
        lambda: children(core, namespace, "brief") == {"pod": None, "service": None, "secret": None},
        timeout=30,
        what="children removed",
    )
    assert any(e.type == "Warning" and e.reason == "LifetimeExpired" for e in events(core, namespace, "brief"))


def test_deleting_the_environment_lets_the_garbage_collector_remove_children(environments, core, namespace):
    environments.create("doomed", flavor="test-short")
    environments.wait_phase("doomed", "Ready")
    environments.delete("doomed")
    wait_for(
        lambda: children(core, namespace, "doomed") == {"pod": None, "service": None, "secret": None},
        timeout=30,
        what="children garbage-collected",
    )


@pytest.mark.parametrize("held_by", ["finalizer", "orphan"])
def test_an_environment_kept_after_its_deletion_runs_nothing_from_that_moment(
    environments, custom, core, namespace, held_by
):
    """Deleted, but the object stays: an admin's finalizer on it (users may set none: deploy/authorization),
    or `kubectl delete --cascade=orphan`. Its budget slot and its charge end at the deletion, so its pod,
    Service and token go then too (before, the pod ran on, uncharged, until the object went: forever with a
    finalizer nobody removes; until the orphan sweep after an orphaning delete)."""
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AnalysisEnvironment",
        "metadata": {"name": "kept", "finalizers": ["test.example.org/hold"] if held_by == "finalizer" else []},
        "spec": {"owner": "alice", "flavor": "jupyter-basic"},
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "analysisenvironments", body)
    environments.wait_phase("kept", "Ready")
    assert all(children(core, namespace, "kept").values())
    propagation = "Orphan" if held_by == "orphan" else "Background"
    custom.delete_namespaced_custom_object(
        GROUP, VERSION, namespace, "analysisenvironments", "kept", propagation_policy=propagation
    )
    wait_for(
        lambda: children(core, namespace, "kept") == {"pod": None, "service": None, "secret": None},
        timeout=20,
        what="what it ran removed at its deletion",
    )
    if held_by == "finalizer":
        assert environments.get("kept")["metadata"]["deletionTimestamp"]  # still there: the finalizer holds it
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, "analysisenvironments", "kept", {"metadata": {"finalizers": None}}
        )


def test_a_namespace_made_again_under_its_name_gets_what_the_operator_sets_up_per_namespace(
    environments, core, namespace
):
    """The operator sets some things up once per namespace: the aenv-jupyter ConfigMap every JupyterLab
    pod mounts and, with the gateway on (as the session's operator is once tests/integration/test_open.py
    ran), the forward-auth Middleware every route uses. A namespace deleted with its environments and
    made again under the same name, while the operator runs, has neither: they must be set up again.
    Without the ConfigMap a pod never starts on a real kubelet (KWOK's runs it anyway, so the ConfigMap
    is checked); without the Middleware the route is never served, and the environment stays Opening."""
    environments.create("before", flavor="jupyter-basic")
    environments.wait_phase("before", "Ready")
    assert core.read_namespaced_config_map("aenv-jupyter", namespace).data

    core.delete_namespace(namespace)
    wait_for(lambda: namespace_gone(core, namespace), timeout=90, what=f"namespace {namespace} deleted")
    core.create_namespace({"metadata": {"name": namespace}})
    wait_for(lambda: _has_default_service_account(core, namespace), timeout=30, what="default ServiceAccount")
    environments.create("after", flavor="jupyter-basic")
    environments.wait_phase("after", "Ready")
    assert core.read_namespaced_config_map("aenv-jupyter", namespace).data


def test_a_configmap_deleted_under_live_environments_is_made_again(environments, core, namespace):
    """Someone deletes the namespace's aenv-jupyter ConfigMap while an environment runs there: the
    operator's repair (with its orphan sweep) applies it again, and a pod started meanwhile starts
    (on a real kubelet it waits to mount it)."""
    environments.create("first", flavor="jupyter-basic")
    environments.wait_phase("first", "Ready")
    made = core.read_namespaced_config_map("aenv-jupyter", namespace)
    core.delete_namespaced_config_map("aenv-jupyter", namespace)
    environments.create("second", flavor="jupyter-basic")
    again = wait_for(
        lambda: found(core.read_namespaced_config_map, namespace, "aenv-jupyter"),
        timeout=60,
        what="aenv-jupyter applied again",
    )
    assert again.metadata.uid != made.metadata.uid and again.data == made.data
    environments.wait_phase("second", "Ready")


def test_the_service_of_a_running_environment_deleted_by_someone_is_made_again(environments, core, namespace):
    """OPEN reaches JupyterLab through the pod's Service, and no pod event tells of it going: the
    operator's repair (with its orphan sweep) creates it again, the same Service for the same pod."""
    environments.create("lab", flavor="jupyter-basic")
    environments.wait_phase("lab", "Ready")
    made = core.read_namespaced_service("aenv-lab", namespace)
    core.delete_namespaced_service("aenv-lab", namespace)
    again = wait_for(
        lambda: found(core.read_namespaced_service, namespace, "aenv-lab"),
        timeout=60,
        what="aenv-lab's Service made again",
    )
    assert again.metadata.uid != made.metadata.uid
    assert again.spec.selector == made.spec.selector and again.metadata.labels == made.metadata.labels
    assert [port.port for port in again.spec.ports] == [port.port for port in made.spec.ports]
    assert again.metadata.owner_references[0].uid == made.metadata.owner_references[0].uid
    assert environments.phase("lab") == "Ready"


def found(read, namespace, name):
    """What a read_namespaced_... of the core API answers, None for a 404."""
    try:
        return read(name, namespace)
    except kubernetes.client.ApiException as error:
        if error.status == 404:
            return None
        raise


def test_a_deleted_pod_is_recreated(environments, core, namespace):
    environments.create("phoenix", flavor="test-short")
    environments.wait_phase("phoenix", "Ready")
    first_uid = children(core, namespace, "phoenix")["pod"].metadata.uid
    core.delete_namespaced_pod("aenv-phoenix", namespace, grace_period_seconds=0)
    wait_for(
        lambda: (
            (children(core, namespace, "phoenix")["pod"] or first_uid) != first_uid
            and environments.phase("phoenix") == "Ready"
        ),
        timeout=30,
        what="a new pod and Ready again",
    )


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("flavor", "jupyter-gpu", "spec.flavor is immutable"),
        ("owner", "mallory", "spec.owner is immutable"),
    ],
)
def test_immutable_fields_cannot_be_edited(environments, field, value, words):
    environments.create("fixed", flavor="test-short")
    with pytest.raises(kubernetes.client.ApiException) as refused:
        environments.patch_spec("fixed", **{field: value})
    assert refused.value.status == 422 and words in json.loads(refused.value.body)["message"]


def test_restarting_the_operator_writes_nothing_to_converged_environments(environments, operator, namespace):
    environments.create("steady", flavor="test-short")
    before = environments.wait_phase("steady", "Ready")
    operator.restart(signal.SIGKILL)
    environments.create("marker", flavor="test-short")  # proves the restarted operator is working
    environments.wait_phase("marker", "Ready")
    after = environments.get("steady")
    # on failure: what changed, and who wrote it when (managedFields name the manager and the time)
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"], json.dumps(
        {"before": before, "after": after}, indent=1, sort_keys=True
    )


class StatusLog:
    """Every status the API server shows an environment from its creation on, in order (a watch)."""

    def __init__(self, custom, namespace: str, created: dict) -> None:
        self.statuses: list[dict] = []
        self._watch = kubernetes.watch.Watch()
        self._thread = threading.Thread(target=self._follow, args=(custom, namespace, created["metadata"]), daemon=True)
        self._thread.start()

    def _follow(self, custom, namespace: str, metadata: dict) -> None:
        with contextlib.suppress(urllib3.exceptions.ProtocolError):  # the connection closed by stop()
            self._collect(custom, namespace, metadata)

    def _collect(self, custom, namespace: str, metadata: dict) -> None:
        for event in self._watch.stream(
            custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            "analysisenvironments",
            field_selector=f"metadata.name={metadata['name']}",
            resource_version=metadata["resourceVersion"],
            timeout_seconds=120,
        ):
            status = event["object"].get("status") or {}
            if status and (not self.statuses or status != self.statuses[-1]):
                self.statuses.append(status)

    def phases(self) -> list[str]:
        return [status.get("phase", "") for status in self.statuses]

    def changes(self) -> list[dict]:
        """Each status as what it changed from the one before (the first in full): a failure says
        which write came on top of which, not only the phases."""
        before: dict = {}
        changed = []
        for status in self.statuses:
            changed.append({key: value for key, value in status.items() if before.get(key) != value})
            before = status
        return changed

    def stop(self) -> None:
        self._watch.stop()


@contextlib.contextmanager
def pods_held_pending():
    """KWOK (which plays every node's kubelet) stopped: pods are scheduled but none starts, as on a
    node pulling a large image. Always continued after, or every later test would wait."""
    group = int((CLUSTER_STATE / "pids" / "kwok").read_text())
    os.killpg(group, signal.SIGSTOP)
    try:
        yield
    finally:
        os.killpg(group, signal.SIGCONT)


def test_a_start_is_one_status_write_with_everything_in_it(environments, custom, namespace):
    """The first status ("starting") waits a moment (quiet_start_seconds, 15 s) for Ready and goes
    out with it: one write per start, and nothing of the first is lost. Nothing follows it either,
    watched over three sweeps (1 s apart here): a write that came a moment after Ready (an expiry
    warning left on by another module) once made this test pass or fail by which came first."""
    created = environments.create("once", flavor="test-short")
    log = StatusLog(custom, namespace, created)
    try:
        status = environments.wait_phase("once", "Ready")["status"]
        wait_for(lambda: log.phases()[-1:] == ["Ready"], timeout=5, what=lambda: f"Ready in the watch: {log.changes()}")
        time.sleep(3)
    finally:
        log.stop()
    assert log.phases() == ["Ready"], f"one status write, saw {log.changes()}"
    assert status["terms"]["flavor"] == "test-short" and status["terms"]["maxLifetime"]
    assert status["startedAt"] <= status["conditions"][0]["lastTransitionTime"] and status["expiresAt"]
    assert status["connection"]["secretName"] == "aenv-once"
    assert status["backend"]["kind"] == "kubernetes" and status["backend"]["node"].startswith("kwok-")
    # The status has one writer, so the API server records it as one field (the CRD's map-type atomic),
    # not each of its leaves: every later write and watch event of the object carries that record.
    managed = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "analysisenvironments", "once")
    statuses = [entry for entry in managed["metadata"]["managedFields"] if entry.get("subresource") == "status"]
    assert [entry["fieldsV1"] for entry in statuses] == [{"f:status": {}}], statuses


def test_a_slow_start_is_told_once_the_quiet_moment_is_over(environments, custom, core, namespace):
    """A pod that does not start within quiet_start_seconds: the status says Provisioning then, with
    the terms and start time, and Ready follows when the pod is up, keeping them."""
    with pods_held_pending():
        created = environments.create("slow", flavor="test-short")
        log = StatusLog(custom, namespace, created)
        began = datetime.datetime.now(datetime.UTC)
        try:
            starting = environments.wait_phase("slow", "Provisioning", timeout=30)["status"]
            waited = (datetime.datetime.now(datetime.UTC) - began).total_seconds()
            assert waited >= 10, f"the first status came after {waited:.1f} s: it was not held"
        except BaseException:
            log.stop()
            raise
    try:
        ready = environments.wait_phase("slow", "Ready", timeout=30)["status"]
        # Provisioning, then Ready (with the gateway on, Provisioning "Opening" may come between: the pod
        # is up and the route is being opened, a step a person is told of once a status was written)
        wait_for(lambda: log.phases()[-1:] == ["Ready"], timeout=5, what=lambda: str(log.phases()))
    finally:
        log.stop()
    assert set(log.phases()) == {"Provisioning", "Ready"} and log.statuses[0]["reason"] == "PodStarting"
    assert starting["reason"] == "PodStarting" and starting["terms"]["flavor"] == "test-short"
    assert ready["startedAt"] == starting["startedAt"] and ready["terms"] == starting["terms"]
    # seen waiting: one Event, how the start ended (entering Provisioning was told by the status alone)
    wait_for(lambda: "PodReady" in event_reasons(core, namespace, "slow"), timeout=10, what="the Event it is up")
    assert "PodStarting" not in event_reasons(core, namespace, "slow")


def kubelet_says(core, namespace: str, pod: str, image: str, reason: str, **state) -> None:
    """What a node's kubelet writes of a container it cannot start (KWOK, held, writes nothing)."""
    waiting = {"reason": reason, "message": f"{reason} for {image}"}
    container = {"name": "jupyterlab", "image": image, "imageID": "", "ready": False, "restartCount": 0}
    conditions = [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "False"}]
    body = {"phase": "Pending", "conditions": conditions}
    body["containerStatuses"] = [{**container, "state": {"waiting": waiting}, **state}]
    core.patch_namespaced_pod_status(pod, namespace, {"status": body})


def test_an_image_the_node_cannot_pull_is_told_at_once_and_once(environments, custom, core, namespace):
    """A custom image with a typo, or a registry that refuses the cluster: the status says so as soon as
    the kubelet does (not after the quiet moment: only a person can fix it), with a Warning Event; the
    kubelet's retries (ErrImagePull and ImagePullBackOff in turn) write nothing more; Ready once it runs."""
    image = "registry.example.org/xrd/jupyter:typo"
    with pods_held_pending():
        created = environments.create("typo", flavor="jupyter-custom", image=image)
        log = StatusLog(custom, namespace, created)
        try:
            wait_for(
                lambda: (pod := children(core, namespace, "typo")["pod"]) is not None and pod.spec.node_name,
                timeout=20,
                what="its pod scheduled",
            )
            began = time.monotonic()
            kubelet_says(core, namespace, "aenv-typo", image, "ErrImagePull")
            stuck = environments.wait_phase("typo", "Provisioning", timeout=10)["status"]
            assert time.monotonic() - began < 8, "held for the quiet moment, as a start that is only slow"
            assert stuck["reason"] == "ImagePullFailed" and f"cannot pull the image {image!r}" in stuck["message"]
            wait_for(
                lambda: "ImagePullFailed" in event_reasons(core, namespace, "typo"), timeout=10, what="the Warning"
            )
            (event,) = [e for e in events(core, namespace, "typo") if e.reason == "ImagePullFailed"]
            assert event.type == "Warning"
            for said in ("ImagePullBackOff", "ErrImagePull", "ImagePullBackOff"):
                kubelet_says(core, namespace, "aenv-typo", image, said)
            time.sleep(3)  # three sweeps here: nothing more to write
            assert [s["reason"] for s in log.statuses] == ["ImagePullFailed"], log.statuses
        finally:
            log.stop()
    # KWOK (the kubelet) continued: the image "came", the server runs
    environments.wait_phase("typo", "Ready", timeout=30)


def test_a_server_that_keeps_exiting_is_told_as_a_warning(environments, core, namespace):
    """Ready, then JupyterLab exits at once after each restart (CrashLoopBackOff): the status falls back to
    Provisioning saying so, with the exit code and a Warning Event, instead of "starting"."""
    environments.create("crash", flavor="test-short")
    environments.wait_phase("crash", "Ready")
    image = core.read_namespaced_pod("aenv-crash", namespace).spec.containers[0].image
    last = {"lastState": {"terminated": {"exitCode": 1, "reason": "Error"}}, "restartCount": 3}
    kubelet_says(core, namespace, "aenv-crash", image, "CrashLoopBackOff", **last)
    status = environments.wait_phase("crash", "Provisioning", timeout=15)["status"]
    assert status["reason"] == "ServerCrashing" and "last exit code 1" in status["message"], status
    wait_for(lambda: "ServerCrashing" in event_reasons(core, namespace, "crash"), timeout=10, what="the Warning")


def test_a_pod_the_node_evicted_is_replaced_with_the_same_url_and_token(environments, core, namespace):
    """The node evicts the JupyterLab pod (memory pressure; a node's shutdown ends pods the same way):
    nothing in the environment ended it, so a new pod replaces it, as a Deployment's would, with the same
    Service, URL and token, told once as a Warning; it is Ready again by itself."""
    environments.create("evicted", flavor="test-short")
    ready = environments.wait_phase("evicted", "Ready")["status"]
    before = children(core, namespace, "evicted")
    ended = {
        "phase": "Failed",
        "reason": "Evicted",
        "message": "The node was low on resource: memory. Threshold quantity: 100Mi, available: 20Mi.",
        "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "False"}],
    }
    with pods_held_pending():  # the kubelet (KWOK) writes nothing over the node's words
        core.patch_namespaced_pod_status("aenv-evicted", namespace, {"status": ended})
        warnings = wait_for(
            lambda: [event for event in events(core, namespace, "evicted") if event.reason == "PodReplaced"],
            timeout=15,
            what="the Warning that the pod is replaced",
        )
        assert "(Evicted: The node was low on resource: memory." in warnings[0].message
        assert environments.phase("evicted") == "Provisioning"  # PodReplaced, then its new pod's PodStarting
        wait_for(
            lambda: (
                (pod := children(core, namespace, "evicted")["pod"]) is not None
                and pod.metadata.uid != before["pod"].metadata.uid
            ),
            timeout=20,
            what="a new pod in place of the evicted one",
        )
    again = environments.wait_phase("evicted", "Ready", timeout=30)["status"]
    after = children(core, namespace, "evicted")
    assert after["secret"].data["token"] == before["secret"].data["token"]
    assert after["service"].metadata.uid == before["service"].metadata.uid
    assert again["connection"] == ready["connection"] and again["startedAt"] == ready["startedAt"]
    warnings = [event for event in events(core, namespace, "evicted") if event.reason == "PodReplaced"]
    assert [event.type for event in warnings] == ["Warning"]


def test_a_node_that_ends_every_pod_makes_no_loop_across_a_restart_of_the_operator(
    environments, operator, core, namespace
):
    """The node ends each new pod too: it is replaced REPLACEMENTS (3) times, then the environment is Failed in
    the node's words. The count is on the pod (analysis.panosc.eu/replaced), so killing the operator after the
    third replacement does not start it again (it was kept in memory: each restart gave three more)."""
    environments.create("ends", flavor="test-short")
    environments.wait_phase("ends", "Ready")
    ended = {
        "phase": "Failed",
        "reason": "Evicted",
        "message": "The node was low on resource: ephemeral-storage.",
        "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "False"}],
    }

    def the_node_ends_the_pod() -> str:
        uid = children(core, namespace, "ends")["pod"].metadata.uid
        core.patch_namespaced_pod_status("aenv-ends", namespace, {"status": ended})
        return uid

    with pods_held_pending():  # the kubelet (KWOK) writes nothing over the node's words
        for replaced in (1, 2, 3):
            before = the_node_ends_the_pod()
            pod = wait_for(
                lambda: (
                    (pod := children(core, namespace, "ends")["pod"]) is not None and pod.metadata.uid != before and pod
                ),
                timeout=20,
                what=f"replacement {replaced}",
            )
            assert pod.metadata.annotations == {"analysis.panosc.eu/replaced": str(replaced)}
        operator.stop(signal.SIGKILL)
        operator.start()
        last = the_node_ends_the_pod()
        status = environments.wait_phase("ends", "Failed", timeout=30)["status"]
    assert status["reason"] == "Evicted" and "(the node ended its JupyterLab pod 4 times)" in status["message"], status
    pod = children(core, namespace, "ends")["pod"]
    assert pod is None or pod.metadata.uid == last  # not replaced a fourth time


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_an_operator_stopped_while_a_first_status_is_held(environments, operator, core, namespace, sig):
    """SIGTERM: the held status is written on the way out, with the start time it had. SIGKILL: the
    next process decides it again from the pod it finds; either way no second pod, and Ready."""
    with pods_held_pending():
        environments.create("held", flavor="test-short")
        wait_for(lambda: children(core, namespace, "held")["pod"] is not None, timeout=20, what="the pod")
        pod_uid = children(core, namespace, "held")["pod"].metadata.uid
        assert not (environments.get("held").get("status") or {}).get("phase")  # held, not written yet
        stopped = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        try:
            operator.stop(sig)
            status = environments.get("held").get("status") or {}
        finally:
            operator.start()
    if sig == signal.SIGTERM:
        assert status.get("phase") == "Provisioning" and status["terms"]["flavor"] == "test-short"
        assert datetime.datetime.fromisoformat(status["startedAt"].replace("Z", "+00:00")) <= stopped
    else:
        assert not status.get("phase")  # lost with the process
    ready = environments.wait_phase("held", "Ready", timeout=60)["status"]
    assert children(core, namespace, "held")["pod"].metadata.uid == pod_uid
    if sig == signal.SIGTERM:
        assert ready["startedAt"] == status["startedAt"]


def test_a_namespace_deleted_with_its_environments_is_not_walked_back_to_provisioning(custom, core, operator):
    """Deleting a namespace deletes its pods while their environments still exist (usually first: the
    namespace controller goes kind by kind). Each environment used to be told Ready -> Provisioning
    (PodTerminating): a status write and an Event (refused: the namespace is going) per environment. Now a
    pod going asks once per namespace (a dry-run Event) whether the namespace is going; none is walked back."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    wait_for(lambda: _has_default_service_account(core, name), timeout=30, what="default ServiceAccount")
    environments = Environments(custom, name)
    names = [f"n{index}" for index in range(6)]
    for environment in names:
        environments.create(environment, flavor="test-short")
    for environment in names:
        environments.wait_phase(environment, "Ready")
    told: dict[str, list[str]] = {}
    version = custom.list_namespaced_custom_object(GROUP, VERSION, name, "analysisenvironments")["metadata"][
        "resourceVersion"
    ]
    watch = kubernetes.watch.Watch()

    def follow() -> None:
        with contextlib.suppress(urllib3.exceptions.ProtocolError, kubernetes.client.ApiException):
            for event in watch.stream(
                custom.list_namespaced_custom_object,
                GROUP,
                VERSION,
                name,
                "analysisenvironments",
                resource_version=version,
                timeout_seconds=90,
            ):
                status = event["object"].get("status") or {}
                told.setdefault(event["object"]["metadata"]["name"], []).append(str(status.get("reason")))

    following = threading.Thread(target=follow, daemon=True)
    following.start()
    pods = core.list_namespaced_pod(name, label_selector="app.kubernetes.io/managed-by=analysis-operator").items
    assert len(pods) == len(names)
    core.delete_namespace(name)
    wait_for(lambda: namespace_gone(core, name), timeout=90, what=f"namespace {name} gone")
    watch.stop()
    following.join(timeout=10)
    walked_back = sorted(environment for environment, reasons in told.items() if "PodTerminating" in reasons)
    assert walked_back == [], f"told PodTerminating while their namespace was deleted: {walked_back}"
