"""Data-mount permissions on the real API server: exactly the datasets the owner may read, read-only.

Datasets and FacilityGroups are cluster-scoped, so every test names its own
(suffix per test) and removes them afterwards. Users are impersonated with
RBAC on; the owner the decisions use is the one the identity webhook vouches for.
"""

from __future__ import annotations

import datetime
import json
import uuid

import kubernetes
import pytest

from tests.integration.conftest import GROUP, VERSION, impersonating
from tests.waiting import wait_for

FAR_FUTURE = "2099-01-01"
PORTAL = "system:serviceaccount:portal:backend"


class Catalogue:
    """Datasets and FacilityGroups for one test, deleted at its end."""

    def __init__(self, custom) -> None:
        self.custom, self.suffix, self.created = custom, uuid.uuid4().hex[:6], []

    def name(self, base: str) -> str:
        return f"{base}-{self.suffix}"

    def _create(self, plural: str, kind: str, base: str, spec: dict) -> str:
        name = self.name(base)
        self.custom.create_cluster_custom_object(
            GROUP,
            VERSION,
            plural,
            {"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": {"name": name}, "spec": spec},
        )
        self.created.append((plural, name))
        return name

    def dataset(self, base: str, access: dict, storage: dict | None = None, pid: str = "") -> str:
        storage = storage or {
            "nfs": {"server": "nfs.facility.example", "path": f"/exports/{base}"},
            "path": f"/gpfs/{base}",
        }
        return self._create(
            "datasets",
            "Dataset",
            base,
            {
                "pid": pid or f"10.5072/{self.name(base)}",
                "title": f"Dataset {base}",
                "size": "1Ti",
                "storage": storage,
                "access": access,
            },
        )

    def group(self, base: str, members: list[str]) -> str:
        return self._create("facilitygroups", "FacilityGroup", base, {"members": members})

    def patch(self, plural: str, name: str, spec: dict) -> None:
        self.custom.patch_cluster_custom_object(GROUP, VERSION, plural, name, {"spec": spec})

    def delete_all(self) -> None:
        for plural, name in reversed(self.created):
            try:
                self.custom.delete_cluster_custom_object(GROUP, VERSION, plural, name)
            except kubernetes.client.ApiException as error:
                if error.status != 404:
                    raise


@pytest.fixture
def catalogue(custom) -> Catalogue:
    created = Catalogue(custom)
    yield created
    created.delete_all()


def embargoed(until: str = FAR_FUTURE, members: tuple[str, ...] = (), groups: tuple[str, ...] = ()) -> dict:
    return {"level": "embargoed", "embargoedUntil": until, "members": list(members), "groups": list(groups)}


PUBLIC = {"level": "public"}


def create_as(
    kubeconfig: str,
    user: str,
    namespace: str,
    name: str,
    group: str = "facility-users",
    dry_run: str | None = None,
    **spec,
) -> dict:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AnalysisEnvironment",
        "metadata": {"name": name},
        "spec": {"flavor": "jupyter-basic", **spec},
    }
    options = {"dry_run": dry_run} if dry_run else {}
    return kubernetes.client.CustomObjectsApi(impersonating(kubeconfig, user, group)).create_namespaced_custom_object(
        GROUP, VERSION, namespace, "analysisenvironments", body, **options
    )


def refusal(call) -> tuple[int, str]:
    with pytest.raises(kubernetes.client.ApiException) as refused:
        call()
    return refused.value.status, json.loads(refused.value.body)["message"]


def pod_of(core, namespace: str, name: str):
    return core.read_namespaced_pod(f"aenv-{name}", namespace)


NOT_DATA = ("home", "aenv-jupyter")


def dataset_volumes(pod) -> tuple[list[dict], list[dict]]:
    """The pod's dataset volumes and mounts as plain dicts (home and the operator's JupyterLab extension
    left out)."""
    api = kubernetes.client.ApiClient()
    volumes = [api.sanitize_for_serialization(volume) for volume in pod.spec.volumes if volume.name not in NOT_DATA]
    mounts = [
        api.sanitize_for_serialization(mount)
        for mount in pod.spec.containers[0].volume_mounts
        if mount.name not in NOT_DATA
    ]
    return volumes, mounts


def events(core, namespace: str, name: str) -> list:
    selector = f"involvedObject.kind=AnalysisEnvironment,involvedObject.name={name}"
    return core.list_namespaced_event(namespace, field_selector=selector).items


def audit_records(operator, environment: str) -> list[dict]:
    records = []
    for line in operator.log_path.read_text().splitlines():
        if '"audit.data_access"' in line:
            record = json.loads(line)
            if record.get("environment") == environment:
                records.append(record)
    return records


# ---------------------------------------------------------------- who may read what


def test_public_dataset_is_mounted_read_only_and_the_grant_recorded(
    kubeconfig, catalogue, environments, core, namespace, operator
):
    public = catalogue.dataset("reference", PUBLIC)
    create_as(kubeconfig, "bob", namespace, "public", datasets=[{"name": public}])
    environments.wait_phase("public", "Ready")
    volumes, mounts = dataset_volumes(pod_of(core, namespace, "public"))
    assert volumes == [
        {"name": "dataset-0", "nfs": {"server": "nfs.facility.example", "path": "/exports/reference", "readOnly": True}}
    ]
    assert mounts == [{"name": "dataset-0", "mountPath": f"/data/{public}", "readOnly": True}]
    mounted = [event for event in events(core, namespace, "public") if event.reason == "DatasetsMounted"]
    assert len(mounted) == 1 and f"{public} (10.5072/{public}) at /data/{public}, public" in mounted[0].message
    decisions = {
        (record["stage"], record["decision"], record["reason"], record["owner"])
        for record in audit_records(operator, f"{namespace}/public")
    }
    assert {("admission", "granted", "public", "bob"), ("mount", "granted", "public", "bob")} <= decisions


def test_embargoed_dataset_is_readable_by_its_members_and_groups(kubeconfig, catalogue, environments, core, namespace):
    team = catalogue.group("team", ["carol"])
    raw = catalogue.dataset("raw", embargoed(members=("alice",), groups=(team,)))
    create_as(kubeconfig, "alice", namespace, "member", datasets=[{"name": raw}])
    create_as(kubeconfig, "carol", namespace, "in-group", datasets=[{"name": raw}])
    for name in ("member", "in-group"):
        environments.wait_phase(name, "Ready")
        assert [mount["mountPath"] for mount in dataset_volumes(pod_of(core, namespace, name))[1]] == [f"/data/{raw}"]
    messages = [event.message for event in events(core, namespace, "in-group") if event.reason == "DatasetsMounted"]
    assert messages and f"member of group {team}" in messages[0]


def test_embargoed_dataset_is_refused_to_a_non_member_naming_dataset_and_reason(
    kubeconfig, catalogue, environments, core, namespace, operator
):
    raw = catalogue.dataset("raw", embargoed(members=("alice",)))
    status, message = refusal(lambda: create_as(kubeconfig, "eve", namespace, "outsider", datasets=[{"name": raw}]))
    assert status == 403
    assert f"dataset '{raw}' (10.5072/{raw}) is embargoed until 2099-01-01T00:00:00Z" in message
    assert "user 'eve' is not among its members" in message
    assert not environments.exists("outsider")
    wait_for(
        lambda: any(
            event.reason == "DatasetEmbargoed" and event.type == "Warning"
            for event in events(core, namespace, "outsider")
        ),
        timeout=10,
        what="the refusal Event",
    )
    (record,) = [
        record for record in audit_records(operator, f"{namespace}/outsider") if record["decision"] == "refused"
    ]
    assert (record["owner"], record["dataset"], record["reason"], record["requester"]) == (
        "eve",
        raw,
        "DatasetEmbargoed",
        "eve",
    )


def test_expired_embargo_makes_the_dataset_public(kubeconfig, catalogue, environments, namespace):
    old = catalogue.dataset("old", embargoed(until="2020-01-01", members=("alice",)))
    create_as(kubeconfig, "eve", namespace, "late", datasets=[{"name": old}])
    environments.wait_phase("late", "Ready")


def test_an_embargo_ends_without_any_edit(kubeconfig, catalogue, environments, namespace):
    end = datetime.datetime.now(datetime.UTC).replace(microsecond=0) + datetime.timedelta(seconds=4)
    raw = catalogue.dataset("raw", embargoed(until=end.strftime("%Y-%m-%dT%H:%M:%SZ"), members=("alice",)))
    status, _ = refusal(lambda: create_as(kubeconfig, "eve", namespace, "early", datasets=[{"name": raw}]))
    assert status == 403

    def created_after_the_end() -> bool:
        try:
            create_as(kubeconfig, "eve", namespace, "after", datasets=[{"name": raw}])
        except kubernetes.client.ApiException as error:
            assert error.status == 403 and datetime.datetime.now(datetime.UTC) < end + datetime.timedelta(seconds=2), (
                f"still refused after the embargo ended: {error.body}"
            )
            return False
        return True

    wait_for(created_after_the_end, timeout=20, interval=0.5, what="the embargo to end")
    assert datetime.datetime.now(datetime.UTC) >= end
    environments.wait_phase("after", "Ready")


def test_unknown_dataset_is_refused(kubeconfig, namespace, operator):
    status, message = refusal(
        lambda: create_as(kubeconfig, "bob", namespace, "ghost", datasets=[{"name": "no-such-dataset"}])
    )
    assert status == 403 and "dataset 'no-such-dataset' does not exist" in message
    status, message = refusal(
        lambda: create_as(kubeconfig, "bob", namespace, "ghost", datasets=[{"pid": "10.5072/nowhere"}])
    )
    assert status == 403 and "no Dataset has the PID '10.5072/nowhere'" in message


# ---------------------------------------------------------------- mount paths


@pytest.mark.parametrize("mount_path", ["/data/../etc", "/data/a/../../etc", "/etc/passwd", "/data", "/data//x"])
def test_path_traversal_in_mount_path_is_refused(kubeconfig, catalogue, namespace, operator, mount_path):
    public = catalogue.dataset("reference", PUBLIC)
    status, message = refusal(
        lambda: create_as(kubeconfig, "bob", namespace, "escape", datasets=[{"name": public, "mountPath": mount_path}])
    )
    assert status == 422 and "spec.datasets[0].mountPath" in message


@pytest.mark.parametrize(
    "second_path, status, words",
    [
        ("/data/shared", 422, "two datasets have the same mountPath"),  # the schema sees it
        ("/data/shared/inner", 403, "mountPath /data/shared/inner is inside /data/shared"),  # the webhook does
        (None, 403, "two datasets would be mounted at"),  # a default meets an explicit path
    ],
)
def test_colliding_mount_paths_are_refused(kubeconfig, catalogue, namespace, operator, second_path, status, words):
    one, two = catalogue.dataset("one", PUBLIC), catalogue.dataset("two", PUBLIC)
    first = {"name": one, "mountPath": "/data/shared" if second_path else f"/data/{two}"}
    second = {"name": two, **({"mountPath": second_path} if second_path else {})}
    refused_status, message = refusal(
        lambda: create_as(kubeconfig, "bob", namespace, "clash", datasets=[first, second])
    )
    assert (refused_status, words in message) == (status, True), message


# ---------------------------------------------------------------- identity


def test_a_user_cannot_spoof_the_owner_to_read_someone_elses_data(kubeconfig, catalogue, environments, namespace):
    raw = catalogue.dataset("raw", embargoed(members=("alice",)))
    status, message = refusal(
        lambda: create_as(kubeconfig, "eve", namespace, "spoof", owner="alice", datasets=[{"name": raw}])
    )
    assert status == 403 and "spec.owner 'alice' is not you ('eve')" in message
    assert not environments.exists("spoof")


def test_the_portal_acts_on_behalf_of_a_user_with_that_users_rights(kubeconfig, catalogue, environments, namespace):
    raw = catalogue.dataset("raw", embargoed(members=("alice",)))
    created = create_as(
        kubeconfig, PORTAL, namespace, "for-alice", group="analysis-portal", owner="alice", datasets=[{"name": raw}]
    )
    assert created["spec"]["owner"] == "alice"
    environments.wait_phase("for-alice", "Ready")
    status, message = refusal(
        lambda: create_as(
            kubeconfig, PORTAL, namespace, "for-eve", group="analysis-portal", owner="eve", datasets=[{"name": raw}]
        )
    )
    assert status == 403 and "user 'eve' is not among its members" in message


# ---------------------------------------------------------------- the multi-dataset environment


@pytest.fixture
def facility_claim(core, namespace) -> str:
    """The facility's data store as one read-only claim in the namespace, as a site would provide it."""
    volume_name = f"facility-data-{namespace}"
    core.create_persistent_volume(
        {
            "metadata": {"name": volume_name},
            "spec": {
                "capacity": {"storage": "1Ti"},
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "",
                "nfs": {"server": "nfs.facility.example", "path": "/exports"},
                "claimRef": {"namespace": namespace, "name": "facility-data"},
            },
        }
    )
    core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": "facility-data"},
            "spec": {
                "accessModes": ["ReadOnlyMany"],
                "storageClassName": "",
                "volumeName": volume_name,
                "resources": {"requests": {"storage": "1Ti"}},
            },
        },
    )
    yield "facility-data"
    core.delete_persistent_volume(volume_name)


def test_multi_dataset_environment_mounts_exactly_its_datasets_read_only(
    kubeconfig, catalogue, environments, core, namespace, facility_claim
):
    raw = catalogue.dataset(
        "raw",
        embargoed(members=("alice",)),
        storage={"persistentVolumeClaim": {"claimName": facility_claim, "subPath": "p11/raw"}},
    )
    reference = catalogue.dataset("reference", PUBLIC, pid=f"10.5072/REF-{catalogue.suffix}")
    catalogue.dataset("unrelated", PUBLIC)  # in the catalogue, readable, but not asked for
    create_as(
        kubeconfig,
        "alice",
        namespace,
        "multi",
        datasets=[{"name": raw, "mountPath": "/data/beamtime/raw"}, {"pid": f"10.5072/ref-{catalogue.suffix}"}],
    )  # by PID; DOIs compare case-insensitively
    environments.wait_phase("multi", "Ready")
    pod = pod_of(core, namespace, "multi")
    volumes, mounts = dataset_volumes(pod)
    assert volumes == [
        {"name": "dataset-0", "persistentVolumeClaim": {"claimName": "facility-data", "readOnly": True}},
        {
            "name": "dataset-1",
            "nfs": {"server": "nfs.facility.example", "path": "/exports/reference", "readOnly": True},
        },
    ]
    assert mounts == [
        {"name": "dataset-0", "mountPath": "/data/beamtime/raw", "readOnly": True, "subPath": "p11/raw"},
        {"name": "dataset-1", "mountPath": f"/data/{reference}", "readOnly": True},
    ]
    # The only writable place is the user's own home volume, separate from the data.
    writable = [mount.mount_path for mount in pod.spec.containers[0].volume_mounts if not mount.read_only]
    assert writable == ["/home/jovyan"]
    (home,) = [volume for volume in pod.spec.volumes if volume.name == "home"]
    assert home.empty_dir is not None


# ---------------------------------------------------------------- revocation


def test_removing_a_user_from_the_team_stops_their_environments_that_mount_the_data(
    kubeconfig, catalogue, environments, core, namespace, operator
):
    team = catalogue.group("team", ["alice", "carol"])
    raw = catalogue.dataset("raw", embargoed(groups=(team,)))
    public = catalogue.dataset("reference", PUBLIC)
    create_as(kubeconfig, "alice", namespace, "alice-raw", datasets=[{"name": raw}])
    create_as(kubeconfig, "alice", namespace, "alice-public", datasets=[{"name": public}])
    create_as(kubeconfig, "carol", namespace, "carol-raw", datasets=[{"name": raw}])
    for name in ("alice-raw", "alice-public", "carol-raw"):
        environments.wait_phase(name, "Ready")

    catalogue.patch("facilitygroups", team, {"members": ["carol"]})

    stopped = environments.wait_phase("alice-raw", "Stopped", timeout=15)
    assert stopped["status"]["reason"] == "AccessRevoked"
    assert f"dataset '{raw}'" in stopped["status"]["message"] and "'alice'" in stopped["status"]["message"]
    wait_for(
        lambda: not core.list_namespaced_pod(namespace, field_selector="metadata.name=aenv-alice-raw").items,
        timeout=15,
        what="the pod of the revoked environment to go",
    )
    assert any(event.reason == "AccessRevoked" for event in events(core, namespace, "alice-raw"))
    refused = [
        record for record in audit_records(operator, f"{namespace}/alice-raw") if record["decision"] == "refused"
    ]
    assert refused and refused[0]["stage"] == "reconcile" and refused[0]["dataset"] == raw
    # The data alice may still read, and carol's access, are untouched.
    assert environments.phase("alice-public") == "Ready" and environments.phase("carol-raw") == "Ready"
    assert environments.get("alice-raw")["status"]["phase"] == "Stopped"  # and stays stopped


def test_removing_a_member_from_the_dataset_stops_a_suspended_environment_too(
    kubeconfig, catalogue, environments, namespace
):
    raw = catalogue.dataset("raw", embargoed(members=("alice", "bob")))
    create_as(kubeconfig, "alice", namespace, "paused", datasets=[{"name": raw}], suspend=True)
    environments.wait_phase("paused", "Suspended")
    catalogue.patch("datasets", raw, {"access": embargoed(members=("bob",))})
    assert environments.wait_phase("paused", "Stopped", timeout=15)["status"]["reason"] == "AccessRevoked"


# ---------------------------------------------------------------- flavors


@pytest.fixture
def staff_flavor(custom, catalogue) -> str:
    staff = catalogue.group("staff", ["carol"])
    name = f"test-gpu-staff-{catalogue.suffix}"
    custom.create_cluster_custom_object(
        GROUP,
        VERSION,
        "environmentflavors",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "EnvironmentFlavor",
            "metadata": {"name": name},
            "spec": {
                "backend": "kubernetes",
                "resources": {"cpu": 0.5, "memory": "1Gi", "gpu": 1},
                "image": "quay.io/jupyter/pytorch-notebook:cuda12-2025-10-20",
                "maxLifetime": "1h",
                "access": {"groups": [staff], "users": ["dave"]},
            },
        },
    )
    yield name
    custom.delete_cluster_custom_object(GROUP, VERSION, "environmentflavors", name)


def test_a_restricted_flavor_is_refused_naming_the_flavor_and_the_rule(
    kubeconfig, environments, namespace, staff_flavor, catalogue
):
    def refused_to_bob() -> str:  # a dry run: nothing is created while the operator learns of the flavor
        try:
            create_as(kubeconfig, "bob", namespace, "bob-gpu", flavor=staff_flavor, dry_run="All")
        except kubernetes.client.ApiException as error:
            assert error.status == 403
            return json.loads(error.body)["message"]
        return ""

    message = wait_for(refused_to_bob, timeout=10, what="the operator to know the staff flavor")
    staff = catalogue.name("staff")
    assert f"flavor '{staff_flavor}' is restricted (spec.access) to group {staff}, user dave: user 'bob'" in message
    status, _ = refusal(lambda: create_as(kubeconfig, "bob", namespace, "bob-gpu", flavor=staff_flavor))
    assert status == 403 and not environments.exists("bob-gpu")
    create_as(kubeconfig, "carol", namespace, "staff-gpu", flavor=staff_flavor)  # a member of the group
    create_as(kubeconfig, "dave", namespace, "listed-gpu", flavor=staff_flavor)  # named in the flavor
    environments.wait_phase("staff-gpu", "Ready")
    environments.wait_phase("listed-gpu", "Ready")


def test_leaving_the_group_a_flavor_requires_stops_the_environment(
    kubeconfig, environments, namespace, staff_flavor, catalogue
):
    create_as(kubeconfig, "carol", namespace, "staff-lab", flavor=staff_flavor)
    environments.wait_phase("staff-lab", "Ready")
    catalogue.patch("facilitygroups", catalogue.name("staff"), {"members": []})
    stopped = environments.wait_phase("staff-lab", "Stopped", timeout=15)["status"]
    assert stopped["reason"] == "AccessRevoked" and f"flavor '{staff_flavor}' is restricted" in stopped["message"]
