"""The user's writable space: one home claim per user, shared by their environments, kept after them."""

from __future__ import annotations

import uuid

import pytest

from analysis_operator.backends.kubernetes import home_claim_name
from tests.waiting import wait_for


@pytest.fixture
def home_claims(operator):
    operator.configure(ANALYSIS_OPERATOR_HOME_CLAIMS="true", ANALYSIS_OPERATOR_HOME_SIZE="1Gi")
    yield
    operator.configure(ANALYSIS_OPERATOR_HOME_CLAIMS="false")


@pytest.fixture
def volume_for(core):
    """A statically provisioned volume reserved for one claim (the local stack has no StorageClass)."""
    made = []

    def make(namespace: str, claim: str) -> str:
        name = f"pv-{uuid.uuid4().hex[:8]}"
        core.create_persistent_volume(
            {
                "metadata": {"name": name},
                "spec": {
                    "capacity": {"storage": "1Gi"},
                    "accessModes": ["ReadWriteMany"],
                    "storageClassName": "",
                    "hostPath": {"path": f"/tmp/{name}"},
                    "claimRef": {"namespace": namespace, "name": claim},
                },
            }
        )
        made.append(name)
        return name

    yield make
    for name in made:
        core.delete_persistent_volume(name)


def test_a_users_environments_share_one_home_claim_that_outlives_them(
    home_claims, environments, core, namespace, volume_for
):
    claim = home_claim_name("alice")
    volume_for(namespace, claim)
    environments.create("first", flavor="jupyter-basic", owner="alice")
    environments.create("second", flavor="jupyter-basic", owner="alice")
    for name in ("first", "second"):
        environments.wait_phase(name, "Ready", timeout=60)
        pod = core.read_namespaced_pod(f"aenv-{name}", namespace)
        home = next(volume for volume in pod.spec.volumes if volume.name == "home")
        assert home.persistent_volume_claim.claim_name == claim and home.empty_dir is None
        mount = next(m for m in pod.spec.containers[0].volume_mounts if m.name == "home")
        assert mount.mount_path == "/home/jovyan" and not mount.read_only
    pvc = core.read_namespaced_persistent_volume_claim(claim, namespace)
    assert pvc.status.phase == "Bound" and pvc.spec.resources.requests["storage"] == "1Gi"
    assert pvc.metadata.labels["analysis.panosc.eu/owner"] == "alice"

    environments.delete("first")
    environments.delete("second")
    wait_for(
        lambda: (
            not core.list_namespaced_pod(
                namespace, label_selector="app.kubernetes.io/managed-by=analysis-operator"
            ).items
        ),
        timeout=60,
        what="the pods to go",
    )
    assert core.read_namespaced_persistent_volume_claim(claim, namespace).metadata.deletion_timestamp is None


def test_another_user_gets_another_home(home_claims, environments, core, namespace, volume_for):
    for owner in ("alice", "bob"):
        volume_for(namespace, home_claim_name(owner))
        environments.create(f"env-{owner}", flavor="jupyter-basic", owner=owner)
    claims = set()
    for owner in ("alice", "bob"):
        environments.wait_phase(f"env-{owner}", "Ready", timeout=60)
        pod = core.read_namespaced_pod(f"aenv-env-{owner}", namespace)
        claims.add(next(v for v in pod.spec.volumes if v.name == "home").persistent_volume_claim.claim_name)
    assert claims == {home_claim_name("alice"), home_claim_name("bob")}
