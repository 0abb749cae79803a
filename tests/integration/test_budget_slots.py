"""Budget slots on the real API server with the operator process: a dry run holds none, a deleted
or ended environment frees its own at once (not at the next accounting tick, which is an hour away
here), and a refusal says why and where (details.causes) for a portal to show."""

from __future__ import annotations

import datetime
import json
import time

import kubernetes
import pytest

from tests.integration.conftest import GROUP, VERSION
from tests.integration.test_budgets import Budgets, user
from tests.integration.test_metrics import webhook_calls
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

SETTINGS = {
    "ANALYSIS_OPERATOR_BUDGETS_REQUIRE_BUDGET": "true",
    # No accounting tick during these tests: whatever frees a slot, it is not the tick.
    "ANALYSIS_OPERATOR_BUDGETS_CHARGE_INTERVAL_SECONDS": "3600",
}


@pytest.fixture(scope="module")
def slot_operator(operator):
    with operator.configured(**SETTINGS):
        yield operator


@pytest.fixture
def budgets(custom, slot_operator):
    made = Budgets(custom)
    yield made
    for name in made.created:
        custom.delete_cluster_custom_object(GROUP, VERSION, "computebudgets", name)


def _create(environments, name: str, dry_run: bool = False, **spec) -> dict:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AnalysisEnvironment",
        "metadata": {"name": name},
        "spec": {"flavor": "test-short", **spec},
    }
    return environments.custom.create_namespaced_custom_object(
        GROUP, VERSION, environments.namespace, "analysisenvironments", body, **({"dry_run": "All"} if dry_run else {})
    )


def _refusal(call) -> dict:
    with pytest.raises(kubernetes.client.ApiException) as refused:
        call()
    assert refused.value.status == 403, refused.value.body
    return json.loads(refused.value.body)


def _holders(budgets, name: str) -> set[str]:
    return {entry["name"] for entry in (budgets.status(name).get("environments") or {}).values()}


def test_dry_runs_hold_no_slot_and_are_decided_as_a_create_would_be(budgets, environments):
    owner = user()
    name = budgets.create({"maxEnvironments": 1}, user=owner)
    for probe in range(5):  # a portal asking about its cards, kubectl diff, Argo CD's server-side diff
        answer = _create(environments, f"probe-{probe}", dry_run=True, owner=owner)
        assert answer["metadata"]["labels"][f"{GROUP}/owner"] == owner
    _create(environments, "real", owner=owner)  # within the limit: the probes held nothing
    environments.wait_phase("real", "Ready")
    assert not any(environments.exists(f"probe-{probe}") for probe in range(5))

    body = _refusal(lambda: _create(environments, "probe-full", dry_run=True, owner=owner))
    assert body["details"]["causes"][0]["reason"] == "TooManyEnvironments"  # as the create itself would be
    assert _holders(budgets, name) == {"real"}


def test_a_deleted_environment_frees_its_slot_at_once(budgets, environments):
    owner = user()
    name = budgets.create({"maxEnvironments": 1, "cpuHours": 100}, user=owner)
    _create(environments, "first", owner=owner)
    environments.wait_phase("first", "Ready")
    wait_for(lambda: _holders(budgets, name) == {"first"}, timeout=30, what="first in the ledger")

    environments.delete("first")
    _create(environments, "second", owner=owner)  # at once: "delete one, create another"
    second = environments.wait_phase("second", "Ready")
    assert second["status"].get("reason") != "TooManyEnvironments"
    # The ledger says so too, long before the next accounting tick (an hour away).
    wait_for(lambda: _holders(budgets, name) == {"second"}, timeout=30, what="the ledger to hold only second")
    status = budgets.status(name)
    assert status["running"] == {"environments": 1, "gpus": 0} and status["display"]["environments"] == "1 / 1"
    assert "settled" in status  # first's usage is kept, not dropped with its slot


FINALIZER = f"{GROUP}/finalizer"  # the operator's (kopf's)
POD_HOLD = "tests.example.org/hold"  # the test's, on the pod: the backend cannot confirm it gone


def _time(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def test_an_environment_whose_backend_has_not_confirmed_its_deletion_keeps_its_slot_and_is_charged(
    budgets, environments, custom, core, namespace
):
    """A Slurm job or VM whose backend does not answer (or refuses the cancel) runs on after its
    environment is deleted, which the operator's finalizer holds: its budget counts it until the
    finalizer goes, then frees the slot, charged up to then, not up to the deletion. Here a pod
    environment carries the operator's backend label and finalizer as a Slurm or VM one does (as in
    test_authorization.py), and its pod a finalizer of the test's: the Kubernetes backend confirms
    the deletion once the pod is gone, which the test decides."""
    owner = user()
    name = budgets.create({"maxEnvironments": 1, "cpuHours": 100}, user=owner)
    _create(environments, "held", owner=owner)
    environments.wait_phase("held", "Ready")
    wait_for(lambda: _holders(budgets, name) == {"held"}, timeout=30, what="held in the ledger")
    labels = {"metadata": {"labels": {f"{GROUP}/backend": "kubernetes"}}}
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "analysisenvironments", "held", labels)
    wait_for(
        lambda: FINALIZER in (environments.get("held")["metadata"].get("finalizers") or ()),
        timeout=30,
        what="the operator's finalizer on held",
    )
    core.patch_namespaced_pod("aenv-held", namespace, {"metadata": {"finalizers": [POD_HOLD]}})
    try:
        [entry] = (budgets.status(name).get("environments") or {}).values()
        environments.delete("held")
        wait_for(
            lambda: core.read_namespaced_pod("aenv-held", namespace).metadata.deletion_timestamp,
            timeout=30,
            what="the operator deleting held's pod (it has seen the deletion)",
        )
        watched = time.monotonic()
        while time.monotonic() - watched < 3:  # it runs on: counted all along
            assert _holders(budgets, name) == {"held"}
            time.sleep(0.2)
        body = _refusal(lambda: _create(environments, "second", owner=owner))
        assert body["details"]["causes"][0]["reason"] == "TooManyEnvironments"
        assert _holders(budgets, name) == {"held"}
        released = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    finally:
        core.patch_namespaced_pod("aenv-held", namespace, [{"op": "remove", "path": "/metadata/finalizers"}])
    wait_for(lambda: not environments.exists("held"), timeout=60, what="held deleted once its pod is gone")
    wait_for(lambda: not _holders(budgets, name), timeout=30, what="held's slot freed")
    status = budgets.status(name)
    hours = (status["settled"]["cpuHours"] - float(entry.get("cpuHours") or 0)) / float(entry["cpus"])
    charged_until = _time(entry["chargedUntil"]) + datetime.timedelta(seconds=round(hours * 3600))
    settled_at = _time(status["used"]["updatedAt"])  # the write that freed the slot
    # Charged up to when its finalizer was seen gone, not only up to its deletionTimestamp (3 s before).
    assert released <= charged_until <= settled_at, (released, charged_until, settled_at)
    _create(environments, "second", owner=owner)
    environments.wait_phase("second", "Ready")


def test_an_expired_environment_frees_its_slot_at_once(budgets, environments):
    owner = user()
    name = budgets.create({"maxEnvironments": 1}, user=owner)
    _create(environments, "short", owner=owner, lifetime="4s")
    environments.wait_phase("short", "Expired", timeout=60)
    _create(environments, "next", owner=owner)
    environments.wait_phase("next", "Ready")
    wait_for(lambda: _holders(budgets, name) == {"next"}, timeout=30, what="the ledger to hold only next")


def test_a_suspended_environment_keeps_its_slot(budgets, environments):
    """So that resuming it never fails (README: Budgets)."""
    owner = user()
    budgets.create({"maxEnvironments": 1}, user=owner)
    _create(environments, "paused", owner=owner)
    environments.wait_phase("paused", "Ready")
    environments.patch_spec("paused", suspend=True)
    environments.wait_phase("paused", "Suspended")
    body = _refusal(lambda: _create(environments, "other", owner=owner))
    [cause] = body["details"]["causes"]
    assert (cause["reason"], cause["field"]) == ("TooManyEnvironments", "spec.budget")
    environments.patch_spec("paused", suspend=False)
    environments.wait_phase("paused", "Ready")


def _webhook_calls(operator) -> dict[str, float]:
    """Admission requests each of the operator's environment webhooks answered, whatever the answer."""
    return {webhook: count for webhook, count in webhook_calls(operator).items() if webhook.startswith("environment-")}


def test_a_full_budget_is_refused_by_one_call_to_the_operator_after_every_check_that_comes_before(
    budgets, environments, slot_operator
):
    """One call to the operator per create refused for want of a slot, not two (the mutating policy
    stamped the labels: the mutating webhook is not called, and the validating one refuses; where the
    mutating webhook is called, it refuses itself, tests/unit/test_admission.py); and a create that is
    wrong in another way too is refused for that first, exactly as with room (the portal's offer
    names the same first reason)."""
    owner = user()
    name = budgets.create({"maxEnvironments": 1}, user=owner)
    _create(environments, "holder", owner=owner)
    environments.wait_phase("holder", "Ready")
    before = _webhook_calls(slot_operator)
    body = _refusal(lambda: _create(environments, "more", owner=owner))
    assert [cause["reason"] for cause in body["details"]["causes"]] == ["TooManyEnvironments"]
    assert body["message"].startswith(f'admission webhook "environment-admission.{GROUP}" denied'), body["message"]
    after = wait_for(
        lambda: (calls := _webhook_calls(slot_operator)) != before and calls, timeout=10, what="the webhook's count"
    )
    assert sum(after.values()) - sum(before.values()) == 1, (before, after)
    with pytest.raises(kubernetes.client.ApiException) as refused:
        _create(environments, "too-long", owner=owner, lifetime="30d")  # the flavor allows 1h
    answer = json.loads(refused.value.body)
    assert refused.value.status == 422 and [cause["reason"] for cause in answer["details"]["causes"]] == [
        "LifetimeTooLong"
    ]
    body = _refusal(lambda: _create(environments, "not-theirs", owner=owner, datasets=[{"name": "no-such-dataset"}]))
    assert [cause["reason"] for cause in body["details"]["causes"]] == ["DatasetNotFound"]
    assert _holders(budgets, name) == {"holder"} and not environments.exists("more")


def test_a_generate_name_create_against_a_full_budget_is_refused_for_its_data_with_an_event_naming_it(
    budgets, environments, core
):
    """A create by generateName has no name while the mutating webhooks run: the validating webhook,
    which sees the name the API server gave it, refuses it, so the data refusal's Event names the object."""
    owner = user()
    budgets.create({"maxEnvironments": 1}, user=owner)
    _create(environments, "holder", owner=owner)
    environments.wait_phase("holder", "Ready")
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AnalysisEnvironment",
        "metadata": {"generateName": "generated-"},
        "spec": {"flavor": "test-short", "owner": owner, "datasets": [{"name": "no-such-dataset"}]},
    }
    answer = _refusal(
        lambda: environments.custom.create_namespaced_custom_object(
            GROUP, VERSION, environments.namespace, "analysisenvironments", body
        )
    )
    assert [cause["reason"] for cause in answer["details"]["causes"]] == ["DatasetNotFound"]

    def named() -> list[str]:
        listed = core.list_namespaced_event(environments.namespace, field_selector="reason=DatasetNotFound").items
        return [event.involved_object.name for event in listed]

    names = wait_for(named, timeout=10, what="the refusal's Event")
    assert len(names) == 1 and names[0].startswith("generated-") and len(names[0]) > len("generated-"), names
    assert answer["message"].startswith(f'admission webhook "environment-admission.{GROUP}" denied'), answer


def test_budget_refusals_carry_reason_and_field(budgets, environments):
    body = _refusal(lambda: _create(environments, "nobody", owner=user()))
    assert body["reason"] == "Forbidden"
    [cause] = body["details"]["causes"]
    assert (cause["reason"], cause["field"]) == ("NoBudget", "spec.budget")
    owner = user()
    budgets.create({"maxEnvironments": 1}, user=owner)
    body = _refusal(lambda: _create(environments, "elsewhere", owner=owner, budget="no-such-budget"))
    assert [(c["reason"], c["field"]) for c in body["details"]["causes"]] == [("BudgetNotFound", "spec.budget")]
