"""The facility's own rules for a namespace, on the real API server: Pod Security, a ResourceQuota, an
admission policy. What one of them refuses is said in the environment's status with the API server's
words, tried again, and started once the rule allows it; nothing is lost, charged or leaked meanwhile."""

from __future__ import annotations

import json
import re
import time
import uuid

import kubernetes
import pytest

from tests.integration.test_datasets import PUBLIC, catalogue, create_as  # noqa: F401 (catalogue: a fixture)
from tests.integration.test_environments import StatusLog, children, events
from tests.waiting import wait_for

RETRY_SECONDS = 30  # engine/converge.py REFUSED_RETRY_SECONDS
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}


def refusals(core, namespace: str, name: str) -> list:
    return [event for event in events(core, namespace, name) if event.reason == "RefusedByCluster"]


def operator_lines(operator, namespace: str) -> list[dict]:
    lines = [json.loads(line) for line in operator.log_path.read_text().splitlines() if line.startswith("{")]
    return [line for line in lines if namespace in json.dumps(line)]


def test_pod_security_restricted_runs_jupyterlab_and_says_what_it_refuses_until_allowed(
    kubeconfig, catalogue, environments, custom, core, namespace, operator
):
    """A namespace enforcing Pod Security "restricted" (as facilities set for user namespaces): the
    JupyterLab pod meets it. A dataset on inline NFS does not (restricted allows claims, not NFS volumes):
    the environment says so at once, Pending with the API server's words and one Warning, instead of no
    status at all and a traceback in the operator's log every few seconds; it starts by itself once the
    namespace allows it."""
    core.patch_namespace(namespace, {"metadata": {"labels": RESTRICTED}})
    public = catalogue.dataset("reference", PUBLIC)
    create_as(kubeconfig, "bob", namespace, "plain")
    created = create_as(kubeconfig, "bob", namespace, "on-nfs", datasets=[{"name": public}])
    log = StatusLog(custom, namespace, created)
    try:
        environments.wait_phase("plain", "Ready")
        status = environments.wait_phase("on-nfs", "Pending", timeout=15)["status"]
        assert status["reason"] == "RefusedByCluster", status
        assert 'violates PodSecurity "restricted:latest"' in status["message"], status["message"]
        assert 'volume "dataset-0" uses restricted volume type "nfs"' in status["message"]
        assert "startedAt" not in status and "expiresAt" not in status  # its lifetime has not begun
        assert children(core, namespace, "on-nfs")["pod"] is None
        wait_for(lambda: refusals(core, namespace, "on-nfs"), timeout=10, what="the Warning Event")
        time.sleep(RETRY_SECONDS + 5)  # tried again at least once: refused again, nothing more written
        assert [s["reason"] for s in log.statuses] == ["RefusedByCluster"], log.statuses
        (event,) = refusals(core, namespace, "on-nfs")
        assert event.type == "Warning" and event.count == 1 and event.message == status["message"]
    finally:
        log.stop()
    lines = operator_lines(operator, namespace)
    assert not [line for line in lines if line.get("level") == "error"], "refusals are not the operator's errors"
    assert not [line for line in lines if "HTTP response body" in json.dumps(line)], "no API answer in the log"
    refused = [line for line in lines if line.get("event") == "environment.refused"]
    assert len(refused) == 1 and refused[0]["call"].startswith("KubeError(403 Forbidden: POST /api/v1/namespaces/")

    core.patch_namespace(namespace, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "baseline"}}})
    status = environments.wait_phase("on-nfs", "Ready", timeout=RETRY_SECONDS + 20)["status"]
    assert status["startedAt"] and children(core, namespace, "on-nfs")["pod"] is not None


def test_a_pod_gone_whose_replacement_is_refused_is_not_shown_as_running(
    kubeconfig, catalogue, environments, core, namespace, operator
):
    """A Ready JupyterLab on an NFS dataset; the namespace then turns Pod Security "restricted" and its pod
    is deleted (by a person, a drain): making it again is refused. The status says Pending with the API
    server's words, and its backend no longer names the pod, node and endpoint that are gone (before, it
    kept showing them as running). Once the namespace allows it again, it runs and says where."""
    public = catalogue.dataset("reference", PUBLIC)
    create_as(kubeconfig, "bob", namespace, "on-nfs", datasets=[{"name": public}])
    running = environments.wait_phase("on-nfs", "Ready")["status"]["backend"]
    assert running["name"] == "aenv-on-nfs" and running["node"] and running["endpoint"], running
    core.patch_namespace(namespace, {"metadata": {"labels": RESTRICTED}})
    core.delete_namespaced_pod("aenv-on-nfs", namespace, grace_period_seconds=0)
    status = environments.wait_phase("on-nfs", "Pending", timeout=15)["status"]
    assert status["reason"] == "RefusedByCluster" and "PodSecurity" in status["message"], status
    assert status["backend"] == {"kind": "kubernetes"}, status["backend"]
    assert children(core, namespace, "on-nfs")["pod"] is None

    core.patch_namespace(namespace, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "baseline"}}})
    status = environments.wait_phase("on-nfs", "Ready", timeout=RETRY_SECONDS + 20)["status"]
    assert status["backend"]["name"] == "aenv-on-nfs" and status["backend"]["endpoint"], status["backend"]


def test_a_full_namespace_quota_keeps_an_environment_waiting_until_another_ends(environments, core, namespace):
    """A ResourceQuota with room for two JupyterLabs (16Gi each): the third waits, Pending with the
    quota's own numbers, not charged and its lifetime not begun; when the first is deleted it starts by
    itself. The others are not disturbed."""
    core.create_namespaced_resource_quota(
        namespace, {"metadata": {"name": "compute"}, "spec": {"hard": {"limits.memory": "40Gi"}}}
    )
    for name in ("first", "second"):
        environments.create(name, flavor="jupyter-basic")
        environments.wait_phase(name, "Ready")
    environments.create("third", flavor="jupyter-basic")
    status = environments.wait_phase("third", "Pending", timeout=15)["status"]
    assert status["reason"] == "RefusedByCluster"
    assert "exceeded quota: compute, requested: limits.memory=16Gi, used: limits.memory=32Gi" in status["message"]
    assert "startedAt" not in status and not (status.get("backend") or {}).get("allocatedCpus")
    environments.delete("first")
    status = environments.wait_phase("third", "Ready", timeout=RETRY_SECONDS + 20)["status"]
    assert status["startedAt"]
    assert environments.phase("second") == "Ready" and children(core, namespace, "third")["pod"] is not None


@pytest.fixture
def secrets_echoed(api, core, namespace):
    """A facility admission policy that refuses Secrets here and quotes their content in its message (a
    careless policy, or a hostile one): the worst a refusal's words can carry."""
    admission = kubernetes.client.AdmissionregistrationV1Api(api)
    name = f"echo-{uuid.uuid4().hex[:6]}"
    core.patch_namespace(namespace, {"metadata": {"labels": {"echo-secrets": name}}})
    admission.create_validating_admission_policy(
        {
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["secrets"]}
                    ]
                },
                "validations": [
                    {
                        "expression": "false",
                        "messageExpression": "'not here: ' + string(object.data['token'])",
                    }
                ],
            },
        }
    )
    admission.create_validating_admission_policy_binding(
        {
            "metadata": {"name": name},
            "spec": {
                "policyName": name,
                "validationActions": ["Deny"],
                "matchResources": {"namespaceSelector": {"matchLabels": {"echo-secrets": name}}},
            },
        }
    )
    yield name
    admission.delete_validating_admission_policy_binding(name)
    admission.delete_validating_admission_policy(name)


def test_a_policy_quoting_the_token_secret_leaks_no_token_into_status_events_or_log(
    environments, core, namespace, operator, secrets_echoed
):
    """The refusal of the environment's token Secret is said like any other, with the token taken out of
    the policy's words (CEL quotes it base64-encoded, as a webhook would; the plain form: the unit test of
    engine/tokens.py), in status, Event and log alike."""
    wait_for(lambda: _policy_active(core, namespace), timeout=20, what="the policy in force (the API server loads it)")
    environments.create("secretive", flavor="jupyter-basic")
    status = environments.wait_phase("secretive", "Pending", timeout=15)["status"]
    assert status["reason"] == "RefusedByCluster" and "not here: [token]." in status["message"], status
    said = [status["message"], *(event.message for event in events(core, namespace, "secretive"))]
    said += [json.dumps(line) for line in operator_lines(operator, namespace)]
    assert not [text for text in said if re.search(r"not here: (?!\[token\])", text)], said
    assert children(core, namespace, "secretive") == {"pod": None, "service": None, "secret": None}


def _policy_active(core, namespace: str) -> bool:
    probe = {"metadata": {"name": "probe"}, "data": {"token": "cHJvYmU="}}
    try:
        core.create_namespaced_secret(namespace, probe, dry_run="All")
    except kubernetes.client.ApiException as error:
        return error.status in (403, 422) and "not here: cHJvYmU=" in error.body  # CEL sees data as base64
    return False
