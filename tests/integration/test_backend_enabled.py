"""A flavor whose backend is not enabled is refused at admission (with a cause a portal can map), the
same for a dry run; and deleting an environment of a backend disabled since never hangs for nothing.

The session's operator runs the Kubernetes backend only; the VM flavors of examples/flavors.yaml
(backend openstack) are the cards it cannot run."""

from __future__ import annotations

import json
import pathlib

import kubernetes
import pytest

from tests.integration.conftest import GROUP, VERSION, impersonating
from tests.waiting import wait_for

VM_CARD = "vm-desktop"  # examples/flavors.yaml: backend openstack


@pytest.fixture(autouse=True)
def _without_the_cloud(operator):
    """The session's operator without OpenStack: the OpenStack tests, which run first, enable it."""
    operator.configure(ANALYSIS_OPERATOR_OPENSTACK_ENABLED="false")


def create(kubeconfig: str, namespace: str, name: str, flavor: str, dry_run: bool = False, user: str = "alice"):
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AnalysisEnvironment",
        "metadata": {"name": name},
        "spec": {"flavor": flavor},
    }
    options = {"dry_run": "All"} if dry_run else {}
    return kubernetes.client.CustomObjectsApi(impersonating(kubeconfig, user)).create_namespaced_custom_object(
        GROUP, VERSION, namespace, "analysisenvironments", body, **options
    )


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_card_whose_backend_is_not_enabled_is_refused_naming_the_flavor(kubeconfig, namespace, operator, dry_run):
    with pytest.raises(kubernetes.client.ApiException) as refused:
        create(kubeconfig, namespace, "vm", VM_CARD, dry_run=dry_run)
    answer = json.loads(refused.value.body)
    assert refused.value.status == 403, answer
    [cause] = answer["details"]["causes"]
    assert (cause["reason"], cause["field"]) == ("BackendNotEnabled", "spec.flavor")
    assert f"flavor {VM_CARD!r} runs a virtual machine" in cause["message"]
    assert "choose another flavor" in answer["message"]


def test_a_card_whose_backend_is_enabled_is_admitted_and_nothing_is_left_pending(kubeconfig, namespace, environments):
    create(kubeconfig, namespace, "lab", "jupyter-basic")
    environments.wait_phase("lab", "Ready", timeout=60)
    with pytest.raises(kubernetes.client.ApiException):  # and the VM card still is not, after one that was
        create(kubeconfig, namespace, "vm", VM_CARD)
    assert not environments.exists("vm")


# ---------------------------------------------------------------- deleting when the backend is gone


@pytest.fixture
def unreachable_cloud(tmp_path_factory) -> dict[str, str]:
    """OpenStack enabled, pointing at a port where nothing answers: environments on VM cards are
    admitted and get the backend's finalizer, but no server is ever made."""
    clouds = pathlib.Path(tmp_path_factory.mktemp("clouds")) / "clouds.yaml"
    clouds.write_text(
        "clouds:\n  analysis:\n    auth:\n      auth_url: http://127.0.0.1:9/v3\n      username: x\n"
        "      password: x\n      project_name: x\n      user_domain_name: Default\n"
        "      project_domain_name: Default\n    region_name: RegionOne\n"
    )
    return {"ANALYSIS_OPERATOR_OPENSTACK_ENABLED": "true", "ANALYSIS_OPERATOR_OPENSTACK_CLOUDS_YAML": str(clouds)}


def finalized(environments, name: str) -> bool:
    return bool(environments.exists(name) and environments.get(name)["metadata"].get("finalizers"))


def test_deleting_when_the_backend_was_disabled_releases_what_never_ran_and_explains_what_did(
    kubeconfig, operator, environments, core, namespace, custom, unreachable_cloud
):
    try:
        operator.configure(**unreachable_cloud)
        environments.create("never", flavor=VM_CARD)
        environments.create("made", flavor=VM_CARD)
        for name in ("never", "made"):
            wait_for(lambda name=name: finalized(environments, name), timeout=30, what=f"{name}'s finalizer")
        operator.configure(ANALYSIS_OPERATOR_OPENSTACK_ENABLED="false")
        # As if a server had been made before the backend was disabled: its id is in the status.
        custom.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            namespace,
            "analysisenvironments",
            "made",
            {"status": {"backend": {"kind": "openstack", "id": "3f2a-server"}}},
        )

        environments.delete("never")
        wait_for(lambda: not environments.exists("never"), timeout=30, what="never to be gone at once")

        environments.delete("made")
        condition = wait_for(
            lambda: {c["type"]: c for c in environments.get("made").get("status", {}).get("conditions", [])}.get(
                "CleanedUp"
            ),
            timeout=30,
            what="the CleanedUp condition",
        )
        assert condition["status"] == "False" and condition["reason"] == "BackendNotEnabled"
        assert "OpenStack server 3f2a-server" in condition["message"]
        assert "abandon-backend" in condition["message"]
        selector = "involvedObject.kind=AnalysisEnvironment,involvedObject.name=made"
        reasons = {event.reason for event in core.list_namespaced_event(namespace, field_selector=selector).items}
        assert "BackendNotEnabled" in reasons
        assert environments.exists("made")  # the server may still run: not released silently

        # The owner may not abandon it (annotations under analysis.panosc.eu/ are the operator's and admins')
        alice = kubernetes.client.CustomObjectsApi(impersonating(kubeconfig, "alice"))
        abandon = {"metadata": {"annotations": {f"{GROUP}/abandon-backend": "true"}}}
        with pytest.raises(kubernetes.client.ApiException) as refused:
            alice.patch_namespaced_custom_object(GROUP, VERSION, namespace, "analysisenvironments", "made", abandon)
        assert refused.value.status in (403, 422), refused.value.body
        assert environments.exists("made")

        custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "analysisenvironments", "made", abandon)
        wait_for(lambda: not environments.exists("made"), timeout=45, what="made to be released once abandoned")
    finally:
        operator.configure(ANALYSIS_OPERATOR_OPENSTACK_ENABLED="false")
