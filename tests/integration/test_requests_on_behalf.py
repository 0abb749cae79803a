"""BudgetRequests filed by the portal record the scientist it acts for; only a member of a budget
(or the portal for one) may file against it, only an environment's owner for its lifetime."""

from __future__ import annotations

import json
import uuid

import kubernetes
import pytest

from tests.integration.authorization import denial
from tests.integration.conftest import GROUP, VERSION, impersonating
from tests.integration.test_budgets import Budgets
from tests.waiting import wait_for

PORTAL = "system:serviceaccount:portal:backend"
ON_BEHALF_OF = f"{GROUP}/on-behalf-of"
REQUESTED_BY = f"{GROUP}/requested-by"
FILED_BY = f"{GROUP}/filed-by"


@pytest.fixture
def alices_budget(custom, operator):
    budgets = Budgets(custom)
    alice = f"alice-{uuid.uuid4().hex[:6]}"
    name = budgets.create({"cpuHours": 100}, user=alice)
    yield alice, name
    for made in budgets.created:
        custom.delete_cluster_custom_object(GROUP, VERSION, "computebudgets", made)


def file(kubeconfig, namespace, user, group="facility-users", on_behalf_of="", **spec) -> dict:
    metadata = {"generateName": "more-"}
    if on_behalf_of:
        metadata["annotations"] = {ON_BEHALF_OF: on_behalf_of}
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "BudgetRequest",
        "metadata": metadata,
        "spec": {"reason": "beamtime extended", **spec},
    }
    return kubernetes.client.CustomObjectsApi(impersonating(kubeconfig, user, group)).create_namespaced_custom_object(
        GROUP, VERSION, namespace, "budgetrequests", body
    )


def refused(call) -> dict:
    with pytest.raises(kubernetes.client.ApiException) as error:
        call()
    assert error.value.status == 403, error.value.body
    answer = json.loads(error.value.body)
    [cause] = answer["details"]["causes"]
    return cause


def test_alice_files_against_her_budget_as_herself(kubeconfig, namespace, alices_budget):
    alice, budget = alices_budget
    annotations = file(kubeconfig, namespace, alice, budget=budget, add={"cpuHours": 10})["metadata"]["annotations"]
    assert annotations[f"{GROUP}/requested-by"] == alice and annotations[f"{GROUP}/filed-by"] == alice


def test_the_portal_files_for_alice_and_alice_is_recorded(kubeconfig, namespace, alices_budget):
    alice, budget = alices_budget
    request = file(
        kubeconfig, namespace, PORTAL, "analysis-portal", on_behalf_of=alice, budget=budget, add={"cpuHours": 10}
    )
    annotations = request["metadata"]["annotations"]
    assert annotations[f"{GROUP}/requested-by"] == alice
    assert annotations[f"{GROUP}/filed-by"] == PORTAL


def test_bob_may_not_file_against_alices_budget(kubeconfig, namespace, alices_budget):
    alice, budget = alices_budget
    cause = refused(lambda: file(kubeconfig, namespace, "bob", budget=budget, add={"cpuHours": 10}))
    assert (cause["reason"], cause["field"]) == ("NotBudgetMember", "spec.budget")
    assert "'bob' may not ask for more" in cause["message"] and alice in cause["message"]


def test_bob_may_not_pretend_to_be_the_portal_or_forge_the_record(kubeconfig, namespace, alices_budget):
    alice, budget = alices_budget
    cause = refused(lambda: file(kubeconfig, namespace, "bob", on_behalf_of=alice, budget=budget, add={"cpuHours": 10}))
    assert (cause["reason"], cause["field"]) == ("NotOwner", f"metadata.annotations[{ON_BEHALF_OF}]")
    # Writing requested-by himself changes nothing: the webhook stamps it (and then refuses bob here).
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "BudgetRequest",
        "metadata": {"generateName": "more-", "annotations": {f"{GROUP}/requested-by": alice}},
        "spec": {"reason": "x", "budget": budget, "add": {"cpuHours": 10}},
    }
    bob = kubernetes.client.CustomObjectsApi(impersonating(kubeconfig, "bob"))
    cause = refused(lambda: bob.create_namespaced_custom_object(GROUP, VERSION, namespace, "budgetrequests", body))
    assert cause["reason"] == "NotBudgetMember"


def test_the_portal_may_not_file_for_a_non_member(kubeconfig, namespace, alices_budget):
    _, budget = alices_budget
    cause = refused(
        lambda: file(
            kubeconfig, namespace, PORTAL, "analysis-portal", on_behalf_of="carol", budget=budget, add={"cpuHours": 1}
        )
    )
    assert (cause["reason"], cause["field"]) == ("NotBudgetMember", "spec.budget")
    assert "'carol'" in cause["message"]


def test_only_the_owner_asks_for_a_longer_lifetime(kubeconfig, namespace, environments, alices_budget):
    alice, _ = alices_budget
    environments.create("lab", flavor="jupyter-basic", owner=alice)
    environments.wait_phase("lab", "Ready", timeout=60)
    assert file(kubeconfig, namespace, alice, environment="lab", lifetime="1h")["metadata"]["annotations"]
    cause = refused(lambda: file(kubeconfig, namespace, "bob", environment="lab", lifetime="1h"))
    assert (cause["reason"], cause["field"]) == ("NotEnvironmentOwner", "spec.environment")
    # One created a moment ago (the operator's index may not have it yet) is found all the same.
    environments.create("fresh", flavor="jupyter-basic", owner=alice)
    assert file(kubeconfig, namespace, alice, environment="fresh", lifetime="1h")["metadata"]["annotations"]
    cause = refused(lambda: file(kubeconfig, namespace, alice, environment="no-such-lab", lifetime="1h"))
    assert (cause["reason"], cause["field"]) == ("EnvironmentNotFound", "spec.environment")


def test_with_the_operator_stopped_a_request_names_its_sender_and_is_checked_when_it_returns(
    kubeconfig, namespace, operator, alices_budget, custom
):
    """No replica runs, so no webhook stamps or checks a request: the API server's policy
    (deploy/authorization/identity-policy.yaml) lets one through only if it already says who sent it
    and whom it is for, as the webhook would have; the operator, back, checks the filing itself."""
    alice, budget = alices_budget
    bob = kubernetes.client.CustomObjectsApi(impersonating(kubeconfig, "bob"))

    def as_bob(annotations: dict) -> dict:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "BudgetRequest",
            "metadata": {"generateName": "more-", "annotations": annotations},
            "spec": {"reason": "x", "budget": budget, "add": {"cpuHours": 10}},
        }
        return bob.create_namespaced_custom_object(GROUP, VERSION, namespace, "budgetrequests", body)

    operator.stop()
    try:
        forged = denial(lambda: as_bob({REQUESTED_BY: alice, FILED_BY: PORTAL}))
        assert forged and "ValidatingAdmissionPolicy 'analysis-budgetrequest-identity'" in forged, forged
        assert f"not '{alice}' and you ('bob')" not in forged and "not 'bob' and you ('bob')" in forged
        on_behalf = denial(lambda: as_bob({ON_BEHALF_OF: alice, REQUESTED_BY: alice, FILED_BY: "bob"}))
        assert on_behalf and f"you ('bob') may not file a request on behalf of '{alice}'" in on_behalf, on_behalf
        unstamped = denial(lambda: as_bob({"note": "x"}))
        assert unstamped and "are stamped by the operator's webhook" in unstamped, unstamped
        made = as_bob({REQUESTED_BY: "bob", FILED_BY: "bob"})  # names himself: stored
    finally:
        operator.start()
    name = made["metadata"]["name"]

    def phase() -> dict | None:
        status = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "budgetrequests", name).get("status")
        return status if (status or {}).get("phase") else None

    status = wait_for(phase, timeout=30, what=f"{name} decided by the operator")
    assert status["phase"] == "Invalid" and status["message"].startswith("NotBudgetMember: "), status
    assert "'bob' may not ask for more" in status["message"]


def test_hours_approved_for_alice_on_a_monthly_budget_are_for_this_month(kubeconfig, namespace, custom, operator):
    """The grant the portal's request brings is marked with the month it raises (the API server's
    schema keeps the mark): next month alice's limit is spec.limits again (policy/budgets.py)."""
    budgets = Budgets(custom)
    alice = f"alice-{uuid.uuid4().hex[:6]}"
    budget = budgets.create({"gpuHours": 20}, user=alice, period={"reset": "Monthly"})
    try:
        request = file(
            kubeconfig, namespace, PORTAL, "analysis-portal", on_behalf_of=alice, budget=budget, add={"gpuHours": 10}
        )
        admin = kubernetes.client.CustomObjectsApi(impersonating(kubeconfig, "dora", group="analysis-admins"))
        admin.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            namespace,
            "budgetrequests",
            request["metadata"]["name"],
            {"status": {"decision": "Approved"}},
        )
        status = wait_for(
            lambda: (s := budgets.status(budget)).get("limits", {}).get("gpuHours") == 30 and s,
            timeout=10,
            what="the limit raised",
        )
        assert status["grants"][request["metadata"]["uid"]]["periodStart"] == status["periodStart"]
    finally:
        for made in budgets.created:
            custom.delete_cluster_custom_object(GROUP, VERSION, "computebudgets", made)
