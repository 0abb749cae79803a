"""Who owns an environment: taken from the authenticated requester, not from the manifest."""

from __future__ import annotations

import kubernetes
import pytest

from tests.integration.conftest import GROUP, VERSION, impersonating


def _create(client, namespace: str, name: str, **spec) -> dict:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AnalysisEnvironment",
        "metadata": {"name": name},
        "spec": {"flavor": "jupyter-basic", **spec},
    }
    return kubernetes.client.CustomObjectsApi(client).create_namespaced_custom_object(
        GROUP, VERSION, namespace, "analysisenvironments", body
    )


def test_a_user_cannot_create_an_environment_owned_by_someone_else(kubeconfig, namespace, operator):
    bob = impersonating(kubeconfig, "bob")
    with pytest.raises(kubernetes.client.ApiException) as refused:
        _create(bob, namespace, "spoofed", owner="alice")
    assert refused.value.status == 403
    assert "spec.owner 'alice' is not you ('bob')" in refused.value.body


def test_a_user_owns_what_they_create(kubeconfig, namespace, operator):
    created = _create(impersonating(kubeconfig, "bob"), namespace, "mine", owner="bob")
    assert created["spec"]["owner"] == "bob"
    assert created["metadata"]["annotations"][f"{GROUP}/created-by"] == "bob"


def test_the_owner_defaults_to_the_requester(kubeconfig, namespace, operator):
    created = _create(impersonating(kubeconfig, "carol"), namespace, "defaulted")
    assert created["spec"]["owner"] == "carol"


def test_the_portal_acts_on_behalf_of_a_user(kubeconfig, namespace, operator):
    portal = impersonating(kubeconfig, "system:serviceaccount:portal:backend", group="analysis-portal")
    created = _create(portal, namespace, "for-alice", owner="alice")
    assert created["spec"]["owner"] == "alice"
    assert created["metadata"]["annotations"][f"{GROUP}/created-by"] == "system:serviceaccount:portal:backend"
