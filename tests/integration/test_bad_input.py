"""Objects stored before the CRDs had their bounds cannot crash a handler or poison an index.

The schema now refuses these values (tests/integration/test_schema.py), but objects written
before it did are still in etcd, and an upgrade does not re-validate them. Each test lifts
the one rule that refuses its value, stores such an object, puts the rule back at once, and
then checks that the operator reads it on the safe side, says what is wrong in words, and
that every other object goes on as before.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import uuid

import kubernetes
import pytest

from tests.integration.conftest import GROUP, REPO, VERSION, impersonating, kubectl
from tests.waiting import wait_for

SPEC = "/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties"
PYTHON_WORDS = ("Python int too large", "out of range", "OverflowError", "Traceback")


def _refused(create, words: str) -> bool:
    """Does the API server refuse this with the schema rule's words? (A webhook may refuse it too.)"""
    try:
        create()
    except kubernetes.client.ApiException as error:
        return words in (error.body or "")
    return False


@contextlib.contextmanager
def rule_lifted(crd: str, path: str, probe):
    """The CRD without the validations at `path` while the block stores its object, then as in
    crds/ again. `probe` is a dry-run create of the bad value: refused (True) or not."""
    kubectl(
        "patch",
        "crd",
        f"{crd}.{GROUP}",
        "--type=json",
        "-p",
        json.dumps([{"op": "remove", "path": f"{SPEC}{path}/x-kubernetes-validations"}]),
    )
    try:
        wait_for(lambda: not probe(), timeout=30, what=f"{crd}: the rule lifted")
        yield
    finally:
        kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / f"crds/{crd}.yaml"))
        wait_for(probe, timeout=30, what=f"{crd}: the rule back")


def operator_log(operator) -> str:
    return operator.log_path.read_text()


def _dataset_body(name: str, until: str, members: list[str]) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Dataset",
        "metadata": {"name": name},
        "spec": {
            "pid": f"10.5072/{name}",
            "storage": {"nfs": {"server": "nfs.facility.example", "path": f"/exports/{name}"}},
            "access": {"level": "embargoed", "embargoedUntil": until, "members": members},
        },
    }


@pytest.fixture
def cluster_objects(custom):
    created: list[tuple[str, str]] = []
    yield created
    for plural, name in created:
        with contextlib.suppress(kubernetes.client.ApiException):
            custom.delete_cluster_custom_object(GROUP, VERSION, plural, name)


def create_as(kubeconfig: str, user: str, namespace: str, name: str, **spec) -> dict:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AnalysisEnvironment",
        "metadata": {"name": name},
        "spec": {"flavor": "test-short", **spec},
    }
    return kubernetes.client.CustomObjectsApi(impersonating(kubeconfig, user)).create_namespaced_custom_object(
        GROUP, VERSION, namespace, "analysisenvironments", body
    )


def test_an_impossible_embargo_date_poisons_nothing(
    kubeconfig, custom, cluster_objects, environments, namespace, operator
):
    """Before: the datasets index failed ('day is out of range for month'), every later refusal said
    so, and revoking access to other datasets silently stopped working."""
    suffix = uuid.uuid4().hex[:6]
    bad, good = f"feb30-{suffix}", f"good-{suffix}"

    def probe() -> bool:
        return _refused(
            lambda: custom.create_cluster_custom_object(
                GROUP, VERSION, "datasets", _dataset_body(f"probe-{suffix}", "2026-02-30", []), dry_run="All"
            ),
            "no such date",
        )

    with rule_lifted("datasets", "/access/properties/embargoedUntil", probe):
        custom.create_cluster_custom_object(GROUP, VERSION, "datasets", _dataset_body(bad, "2026-02-30", ["alice"]))
        cluster_objects.append(("datasets", bad))
    custom.create_cluster_custom_object(GROUP, VERSION, "datasets", _dataset_body(good, "2099-01-01", ["alice"]))
    cluster_objects.append(("datasets", good))

    # The unreadable one is closed, not public: its team reads it, others are refused in words.
    create_as(kubeconfig, "alice", namespace, "team", datasets=[{"name": bad}])
    with pytest.raises(kubernetes.client.ApiException) as refused:
        create_as(kubeconfig, "bob", namespace, "outsider", datasets=[{"name": bad}])
    message = json.loads(refused.value.body)["message"]
    assert f"dataset '{bad}'" in message and "embargoed" in message
    assert not any(words in message for words in PYTHON_WORDS), message

    # Every other dataset is decided as before, and revocation still works.
    create_as(kubeconfig, "alice", namespace, "other", datasets=[{"name": good}])
    environments.wait_phase("team", "Ready")
    environments.wait_phase("other", "Ready")
    custom.patch_cluster_custom_object(GROUP, VERSION, "datasets", good, {"spec": {"access": {"members": ["carol"]}}})
    stopped = environments.wait_phase("other", "Stopped", timeout=15)["status"]
    assert stopped["reason"] == "AccessRevoked" and f"dataset '{good}'" in stopped["message"]
    assert environments.phase("team") == "Ready"

    unreadable = [
        json.loads(line) for line in operator_log(operator).splitlines() if '"index.unreadable"' in line and bad in line
    ]
    assert unreadable and "'2026-02-30' is not a real date" in unreadable[0]["problem"]
    assert unreadable[0]["logger"] == "analysis_operator.indexes"


def _lifetime_probe(custom, namespace: str, value: str, words: str):
    def probe() -> bool:
        return _refused(
            lambda: custom.create_namespaced_custom_object(
                GROUP,
                VERSION,
                namespace,
                "analysisenvironments",
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "AnalysisEnvironment",
                    "metadata": {"name": "probe"},
                    "spec": {"owner": "alice", "flavor": "test-short", "lifetime": value},
                },
                dry_run="All",
            ),
            words,
        )

    return probe


def _patch_or_refusal(custom, namespace: str, name: str, spec: dict) -> str | None:
    """None if the patch was stored, else the refusal's message (an admission webhook may refuse it)."""
    try:
        custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "analysisenvironments", name, {"spec": spec})
        return None
    except kubernetes.client.ApiException as error:
        return json.loads(error.body)["message"]


def test_a_stored_huge_lifetime_is_refused_in_words_and_harms_no_other(custom, environments, namespace, operator):
    """Before: 'Python int too large to convert to C int' at every reconcile (every 60 s), and a stale
    index that kept charging the environment after it had expired."""
    environments.create("steady", flavor="test-short", lifetime="30m")
    environments.wait_phase("steady", "Ready")
    probe = _lifetime_probe(custom, namespace, "9999999999d", "must be at most 366d")
    with rule_lifted("analysisenvironments", "/lifetime", probe):
        refusal = _patch_or_refusal(custom, namespace, "steady", {"lifetime": "9999999999d"})
    if refusal is not None:  # refused at admission: then in words
        assert "lifetime" in refusal and not any(words in refusal for words in PYTHON_WORDS), refusal
    else:
        status = wait_for(
            lambda: (s := environments.get("steady").get("status") or {}).get("reason") == "LifetimeTooLong" and s,
            timeout=30,
            what="steady refused for its lifetime",
        )
        assert "longer than" in status["message"], status
    environments.create("neighbour", flavor="test-short", lifetime="30m")
    environments.wait_phase("neighbour", "Ready")
    log = operator_log(operator)
    assert not any(words in log for words in PYTHON_WORDS[:3]), "the operator raised on the lifetime"


def test_a_stored_zero_lifetime_expires_instead_of_running_the_flavors_maximum(custom, environments, namespace):
    """Before: '0s' was read as no lifetime and the environment ran for the flavor's maxLifetime."""
    probe = _lifetime_probe(custom, namespace, "0s", "must be at least 1s")
    with rule_lifted("analysisenvironments", "/lifetime", probe):
        environments.create("zero", flavor="test-short", lifetime="0s")
    # Expired at once (read as the least lifetime, 1s), or refused for its spec: never left running.
    status = wait_for(
        lambda: (s := environments.get("zero").get("status") or {}).get("phase") in ("Expired", "Rejected") and s,
        timeout=30,
        what="zero to end",
    )
    if status["phase"] == "Expired":
        started = datetime.datetime.fromisoformat(status["startedAt"].replace("Z", "+00:00"))
        expires = datetime.datetime.fromisoformat(status["expiresAt"].replace("Z", "+00:00"))
        assert expires - started <= datetime.timedelta(seconds=1)
    else:
        assert "spec.lifetime '0s' is zero" in status["message"], status


def test_a_stored_huge_extension_is_applied_at_the_ceiling(kubeconfig, custom, environments, namespace):
    """Before: the approval of a BudgetRequest with an overflowing lifetime was never applied."""
    environments.create("long", flavor="test-short")
    before = environments.wait_phase("long", "Ready")["status"]
    request = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "BudgetRequest",
        "metadata": {"name": "forever"},
        "spec": {"environment": "long", "lifetime": "9999999999d", "reason": "beam time ran late"},
    }

    owner = kubernetes.client.CustomObjectsApi(impersonating(kubeconfig, "alice"))  # only its owner may ask

    def probe() -> bool:
        return _refused(
            lambda: owner.create_namespaced_custom_object(
                GROUP, VERSION, namespace, "budgetrequests", {**request, "metadata": {"name": "probe"}}, dry_run="All"
            ),
            "must be at most 366d",
        )

    with rule_lifted("budgetrequests", "/lifetime", probe):
        owner.create_namespaced_custom_object(GROUP, VERSION, namespace, "budgetrequests", request)
    admin = kubernetes.client.CustomObjectsApi(impersonating(kubeconfig, "dora", group="analysis-admins"))
    admin.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, "budgetrequests", "forever", {"status": {"decision": "Approved"}}
    )
    status = wait_for(
        lambda: (
            (
                s := custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "budgetrequests", "forever").get(
                    "status"
                )
                or {}
            ).get("phase")
            == "Applied"
            and s
        ),
        timeout=30,
        what="the approval applied",
    )
    assert "extended" in status["message"]
    after = environments.get("long")["status"]
    moved = datetime.datetime.fromisoformat(
        after["expiresAt"].replace("Z", "+00:00")
    ) - datetime.datetime.fromisoformat(before["expiresAt"].replace("Z", "+00:00"))
    assert moved == datetime.timedelta(days=366)


def test_an_event_about_something_in_a_terminating_namespace_is_dropped_quietly(core, kubeconfig, monkeypatch):
    """The API server refuses new content in a namespace being deleted (403): that Event has nobody to
    tell, so it is dropped without a warning, while any other refusal still raises."""
    import asyncio

    from analysis_operator.infra.kube import KubeClient
    from analysis_operator.model.domain import API_VERSION

    name = f"t-going-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    hold = {"metadata": {"name": "held", "finalizers": [f"{GROUP}/test-hold"]}}
    core.create_namespaced_config_map(name, hold)
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", kubeconfig)
    kube = KubeClient(2)  # the operator's own client, as it runs
    involved = {"apiVersion": API_VERSION, "kind": "AnalysisEnvironment", "metadata": {"namespace": name, "name": "x"}}

    async def post(namespace: str) -> None:
        try:
            await kube.post_event({**involved, "metadata": {"namespace": namespace, "name": "x"}}, "Normal", "T", "m")
        finally:
            await kube.close()

    try:
        core.delete_namespace(name)
        wait_for(lambda: core.read_namespace(name).status.phase == "Terminating", timeout=30, what="Terminating")
        asyncio.run(post(name))  # no exception
        assert not core.list_namespaced_event(name).items
        with pytest.raises(kubernetes.client.ApiException) as refused:  # a namespace that does not exist: raised
            asyncio.run(post("t-absent-x"))
        assert refused.value.status == 404
    finally:
        core.patch_namespaced_config_map("held", name, {"metadata": {"finalizers": None}})
