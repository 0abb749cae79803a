"""Pods run as their scientist, on the real API server: uid and gid from the owner's FacilityUser,
and as supplementary groups exactly the gids of the FacilityGroups that grant the datasets mounted.

FacilityUsers, FacilityGroups and Datasets are cluster-scoped, so every test names its own
(a suffix per test: alice-1a2b3c) and removes them afterwards. The operator runs here with
identity.require_posix_identity on, as in production (the session's default is off, so that
tests about other things need no FacilityUser); it is put back at the end of the module.
"""

from __future__ import annotations

import json
import uuid

import kubernetes
import pytest

from tests.integration.conftest import GROUP, VERSION, OperatorProcess, impersonating, kubectl
from tests.waiting import wait_for

REQUIRE = "ANALYSIS_OPERATOR_IDENTITY_REQUIRE_POSIX_IDENTITY"
FAR_FUTURE = "2099-01-01"


@pytest.fixture(scope="module", autouse=True)
def identities_required(operator: OperatorProcess):
    previous = operator.settings.get(REQUIRE, "false")
    operator.configure(**{REQUIRE: "true"})
    yield
    operator.configure(**{REQUIRE: previous})


class Directory:
    """FacilityUsers, FacilityGroups and Datasets of one test, deleted at its end."""

    def __init__(self, custom) -> None:
        self.custom, self.suffix, self.created = custom, uuid.uuid4().hex[:6], []

    def name(self, base: str) -> str:
        return f"{base}-{self.suffix}"

    def create(self, plural: str, kind: str, base: str, spec: dict) -> str:
        name = self.name(base)
        self.custom.create_cluster_custom_object(
            GROUP,
            VERSION,
            plural,
            {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name}, "spec": spec},
        )
        self.created.append((plural, name))
        return name

    def user(self, base: str, uid: int, gid: int) -> str:
        return self.create("facilityusers", "FacilityUser", base, {"uid": uid, "gid": gid})

    def group(self, base: str, members: list[str], gid: int | None = None) -> str:
        return self.create(
            "facilitygroups", "FacilityGroup", base, {"members": members, **({"gid": gid} if gid is not None else {})}
        )

    def dataset(self, base: str, groups: list[str]) -> str:
        return self.create(
            "datasets",
            "Dataset",
            base,
            {
                "pid": f"10.5072/{self.name(base)}",
                "title": base,
                "size": "1Ti",
                "storage": {"nfs": {"server": "nfs.facility.example", "path": f"/exports/{base}"}},
                "access": {"level": "embargoed", "embargoedUntil": FAR_FUTURE, "groups": groups},
            },
        )

    def patch_user(self, name: str, spec: dict) -> None:
        self.custom.patch_cluster_custom_object(GROUP, VERSION, "facilityusers", name, {"spec": spec})

    def delete(self, plural: str, name: str) -> None:
        try:
            self.custom.delete_cluster_custom_object(GROUP, VERSION, plural, name)
        except kubernetes.client.ApiException as error:
            if error.status != 404:
                raise

    def delete_all(self) -> None:
        for plural, name in reversed(self.created):
            self.delete(plural, name)


@pytest.fixture
def directory(custom) -> Directory:
    created = Directory(custom)
    yield created
    created.delete_all()


def security_context(core, namespace: str, name: str) -> dict:
    """The pod's securityContext as the API server stores it (raw JSON: no client model drops a field)."""
    response = core.read_namespaced_pod(f"aenv-{name}", namespace, _preload_content=False)
    pod = json.loads(response.data)
    return {
        "pod": pod["spec"]["securityContext"],
        "container": pod["spec"]["containers"][0]["securityContext"],
        "uid": pod["metadata"]["uid"],
    }


def refused(call) -> tuple[int, str]:
    with pytest.raises(kubernetes.client.ApiException) as refusal:
        call()
    return refusal.value.status, json.loads(refusal.value.body)["message"]


def test_each_pod_runs_as_its_owner_with_exactly_the_gids_that_grant_its_data(
    directory, environments, core, namespace, kubeconfig
):
    alice, bob = directory.user("alice", 21001, 21001), directory.user("bob", 21002, 100)
    team = directory.group("team", [alice, bob], gid=6001)  # grants the raw data to both
    analysis = directory.group("analysis", [alice], gid=6002)  # grants it to alice too
    unrelated = directory.group("unrelated", [alice, bob], gid=6003)  # grants nothing mounted here
    nogid = directory.group("nogid", [alice, bob])  # grants, but is no POSIX group
    directory.dataset("other", [unrelated])
    raw = directory.dataset("raw", [team, analysis, nogid])

    environments.create("alice-lab", owner=alice, flavor="jupyter-basic", datasets=[{"name": raw}])
    bobs_api = kubernetes.client.CustomObjectsApi(impersonating(kubeconfig, bob))  # bob himself, RBAC on
    bobs_api.create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        "analysisenvironments",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "AnalysisEnvironment",
            "metadata": {"name": "bob-lab"},
            "spec": {"owner": bob, "flavor": "jupyter-basic", "datasets": [{"name": raw}]},
        },
    )
    environments.wait_phase("alice-lab", "Ready")
    environments.wait_phase("bob-lab", "Ready")

    alices, bobs = security_context(core, namespace, "alice-lab"), security_context(core, namespace, "bob-lab")
    assert alices["pod"] == {
        "runAsNonRoot": True,
        "runAsUser": 21001,
        "runAsGroup": 21001,
        "supplementalGroups": [6001, 6002],
        "supplementalGroupsPolicy": "Strict",
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert bobs["pod"]["runAsUser"] == 21002 and bobs["pod"]["runAsGroup"] == 100
    assert bobs["pod"]["supplementalGroups"] == [6001]  # not analysis: he is not in it
    for context in (alices, bobs):
        assert context["container"]["allowPrivilegeEscalation"] is False
        assert context["container"]["capabilities"] == {"drop": ["ALL"]}
        assert "fsGroup" not in context["pod"]  # an emptyDir home needs none


def test_an_owner_without_a_facility_user_is_refused_at_admission(directory, environments, kubeconfig, namespace):
    carol = directory.name("carol")  # no FacilityUser
    status, message = refused(lambda: environments.create("carol-lab", owner=carol, flavor="jupyter-basic"))
    assert status == 403
    assert (
        f"user '{carol}' has no FacilityUser: the facility's directory sync has not registered their POSIX identity"
    ) in message and "ask the facility's user office or IT" in message
    carols_api = kubernetes.client.CustomObjectsApi(impersonating(kubeconfig, carol))
    status, message = refused(
        lambda: carols_api.create_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            "analysisenvironments",
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "AnalysisEnvironment",
                "metadata": {"name": "mine"},
                "spec": {"flavor": "jupyter-basic"},
            },
        )
    )  # owner defaulted to her by the webhook
    assert status == 403 and "has no FacilityUser" in message

    directory.user("carol", 21003, 21003)  # registered: admitted at once (no index lag)
    environments.create("carol-lab", owner=carol, flavor="jupyter-basic")
    environments.wait_phase("carol-lab", "Ready")


def test_with_the_webhook_bypassed_the_reconcile_refuses_it_too(directory, environments, operator, namespace, core):
    """No webhook (removed while the operator was down): the API server accepts anything; the operator,
    when it comes back, must still not start it."""
    dave = directory.name("dave")
    operator.stop()
    for kind in ("validatingwebhookconfiguration", "mutatingwebhookconfiguration"):
        kubectl("delete", kind, "analysis.panosc.eu", "--ignore-not-found")
    try:
        environments.create("bypassed", owner=dave, flavor="jupyter-basic")
    finally:
        operator.start()  # registers the webhooks again
    status = environments.wait_phase("bypassed", "Rejected")["status"]
    assert status["reason"] == "NoPosixIdentity" and f"user '{dave}' has no FacilityUser" in status["message"]
    assert not core.list_namespaced_pod(namespace).items


def test_an_owner_removed_from_the_directory_has_their_running_environment_stopped(
    directory, environments, namespace, core
):
    erin = directory.user("erin", 21005, 21005)
    environments.create("lab", owner=erin, flavor="jupyter-basic")
    environments.wait_phase("lab", "Ready")
    directory.delete("facilityusers", erin)  # the operator reacts to the deletion itself
    status = environments.wait_phase("lab", "Stopped")["status"]
    assert status["reason"] == "NoPosixIdentity" and status["message"].startswith("the environment was stopped")
    wait_for(lambda: not core.list_namespaced_pod(namespace).items, timeout=30, what="the pod removed")


def test_a_changed_uid_leaves_the_running_pod_alone_and_applies_at_resume(directory, environments, core, namespace):
    frank = directory.user("frank", 21006, 21006)
    environments.create("lab", owner=frank, flavor="jupyter-basic", lifetime="4h")
    environments.wait_phase("lab", "Ready")
    before = security_context(core, namespace, "lab")

    directory.patch_user(frank, {"uid": 31006, "gid": 31006})  # the directory renumbers frank
    environments.patch_spec("lab", lifetime="3h")  # a reconcile after the change
    wait_for(
        lambda: environments.get("lab")["status"].get("observedGeneration") == 2,
        timeout=30,
        what="the environment reconciled after the change",
    )
    after = security_context(core, namespace, "lab")
    assert after == before and after["pod"]["runAsUser"] == 21006  # same pod, same uid: nothing restarted

    environments.patch_spec("lab", suspend=True)
    environments.wait_phase("lab", "Suspended")
    wait_for(lambda: not core.list_namespaced_pod(namespace).items, timeout=30, what="the pod removed")
    environments.patch_spec("lab", suspend=False)
    environments.wait_phase("lab", "Ready")
    resumed = security_context(core, namespace, "lab")
    assert resumed["uid"] != before["uid"] and (resumed["pod"]["runAsUser"], resumed["pod"]["runAsGroup"]) == (
        31006,
        31006,
    )  # a new start: the directory as it is now


@pytest.mark.parametrize(
    "spec, words",
    [
        ({"uid": 0, "gid": 100}, "spec.uid: Invalid value: 0: spec.uid in body should be greater than or equal to 1"),
        ({"uid": 21007, "gid": 0}, "spec.gid in body should be greater than or equal to 1"),
        ({"uid": 2**31, "gid": 100}, "spec.uid in body should be less than or equal to 2147483647"),
        ({"uid": 21007}, "spec.gid: Required value"),
        ({"uid": 21007, "gid": 100, "username": "Root Admin"}, "spec.username in body should match"),
    ],
)
def test_the_schema_refuses_root_and_ids_no_kernel_takes(directory, spec, words):
    status, message = refused(lambda: directory.create("facilityusers", "FacilityUser", "gina", spec))
    assert status == 422 and words in message, message


def test_a_name_that_is_no_unix_account_needs_a_username(directory):
    status, message = refused(
        lambda: directory.create("facilityusers", "FacilityUser", "0042", {"uid": 21008, "gid": 100})
    )
    assert status == 422 and "not a valid Unix account name" in message
    directory.create("facilityusers", "FacilityUser", "0043", {"uid": 21008, "gid": 100, "username": "u0043"})


def test_a_facility_group_gid_of_zero_is_refused(directory):
    status, message = refused(lambda: directory.group("wheel", ["alice"], gid=0))
    assert status == 422 and "spec.gid in body should be greater than or equal to 1" in message
