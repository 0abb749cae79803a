"""Attacks on the invariant (tests/integration/invariant.py) that a user or a catalogue change can make:
children orphaned on purpose, a namesake created over them, a flavor changed or deleted under a
running environment. The invariant itself is also checked after every test (the namespace fixture)."""

from __future__ import annotations

import base64
import uuid

import kubernetes
import pytest

from tests.integration.conftest import GROUP, VERSION
from tests.integration.invariant import violations
from tests.waiting import wait_for

pytestmark = pytest.mark.integration


def token(core, namespace: str, name: str) -> str:
    secret = core.read_namespaced_secret(f"aenv-{name}", namespace)
    return base64.b64decode(secret.data["token"]).decode()


def child_uids(core, namespace: str, name: str) -> dict[str, str | None]:
    found = {}
    for kind, read in (
        ("pod", core.read_namespaced_pod),
        ("service", core.read_namespaced_service),
        ("secret", core.read_namespaced_secret),
    ):
        try:
            found[kind] = read(f"aenv-{name}", namespace).metadata.labels[f"{GROUP}/environment-uid"]
        except kubernetes.client.ApiException as error:
            assert error.status == 404
            found[kind] = None
    return found


def orphaned_while_no_operator_runs(operator, custom, namespace: str, name: str) -> None:
    """The environment deleted with its children orphaned (`--cascade=orphan`) while no operator runs: a
    running one removes them at the deletion (handlers/environments.remove_held), so leftovers are made
    this way, for the orphan sweep and a namesake to meet."""
    operator.stop()
    try:
        custom.delete_namespaced_custom_object(
            GROUP, VERSION, namespace, "analysisenvironments", name, propagation_policy="Orphan"
        )
        wait_for(
            lambda: (
                not any(
                    item["metadata"]["name"] == name
                    for item in custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "analysisenvironments")[
                        "items"
                    ]
                )
            ),
            timeout=30,
            what="the environment gone",
        )
    finally:
        operator.start()


def test_children_orphaned_by_the_user_are_swept_and_a_namesake_starts_clean(
    environments, core, custom, namespace, api, operator
):
    environments.create("lab", flavor="jupyter-basic")
    first = environments.wait_phase("lab", "Ready")
    old_uid, old_token = first["metadata"]["uid"], token(core, namespace, "lab")
    orphaned_while_no_operator_runs(operator, custom, namespace, "lab")
    assert child_uids(core, namespace, "lab") == {"pod": old_uid, "service": old_uid, "secret": old_uid}

    environments.create("lab", flavor="jupyter-basic")  # a namesake, over the leftovers
    second = environments.wait_phase("lab", "Ready", timeout=60)
    new_uid = second["metadata"]["uid"]
    assert child_uids(core, namespace, "lab") == {"pod": new_uid, "service": new_uid, "secret": new_uid}
    assert token(core, namespace, "lab") != old_token  # the old token was never adopted
    assert violations(api, [namespace]) == []


def test_leftovers_without_a_namesake_are_removed_within_one_orphan_sweep(
    environments, core, custom, namespace, api, operator
):
    environments.create("gone", flavor="jupyter-basic")
    environments.wait_phase("gone", "Ready")
    orphaned_while_no_operator_runs(operator, custom, namespace, "gone")
    assert child_uids(core, namespace, "gone")["pod"] is not None  # left: nobody saw the deletion
    # The tests' operator sweeps every second and looks for orphans every tenth sweep.
    wait_for(
        lambda: child_uids(core, namespace, "gone") == {"pod": None, "service": None, "secret": None},
        timeout=40,
        what="the orphaned pod, Service and token Secret removed",
    )
    assert violations(api, [namespace]) == []


@pytest.fixture
def own_flavor(custom):
    """A flavor of this test's own, to change and delete under a running environment."""
    name = f"t-{uuid.uuid4().hex[:8]}"
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
                "displayName": "test",
                "image": "jupyter/base-notebook:2024",
                "resources": {"cpu": 1, "memory": "1Gi"},
                "maxLifetime": "1h",
            },
        },
    )
    yield name
    try:
        custom.delete_cluster_custom_object(GROUP, VERSION, "environmentflavors", name)
    except kubernetes.client.ApiException as error:
        assert error.status == 404


def test_a_lowered_max_lifetime_does_not_reject_a_running_environment(environments, custom, own_flavor, namespace):
    environments.create("kept", flavor=own_flavor, lifetime="40m")
    environments.wait_phase("kept", "Ready")
    assert environments.get("kept")["status"]["terms"]["maxLifetime"] == "1h"
    custom.patch_cluster_custom_object(
        GROUP, VERSION, "environmentflavors", own_flavor, {"spec": {"maxLifetime": "30m"}}
    )
    environments.patch_spec("kept", lifetime="35m")  # a reconcile on its own terms: 35m <= 1h
    wait_for(
        lambda: (
            environments.get("kept")["status"].get("expiresAt")
            and environments.get("kept")["metadata"]["generation"]
            == environments.get("kept")["status"].get("observedGeneration")
        ),
        timeout=30,
        what="the change reconciled",
    )
    assert environments.phase("kept") == "Ready"


def test_an_environment_whose_flavor_was_deleted_still_expires(environments, core, custom, own_flavor, namespace):
    environments.create("orphaned-card", flavor=own_flavor, lifetime="1m")
    environments.wait_phase("orphaned-card", "Ready")
    custom.delete_cluster_custom_object(GROUP, VERSION, "environmentflavors", own_flavor)
    status = environments.wait_phase("orphaned-card", "Expired", timeout=100)["status"]
    assert status["reason"] == "LifetimeExpired"
    wait_for(lambda: child_uids(core, namespace, "orphaned-card")["pod"] is None, timeout=30, what="the pod removed")
