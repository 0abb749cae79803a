"""A dataset whose PersistentVolumeClaim is missing in the namespace, on the real stack (KWOK nodes and
the real scheduler): the environment says so with the scheduler's reason, is not charged while nothing
runs, and starts by itself once the claim exists."""

from __future__ import annotations

import uuid

import pytest

from tests.integration.conftest import GROUP, VERSION
from tests.integration.test_budgets import Budgets
from tests.integration.test_datasets import PUBLIC, Catalogue
from tests.waiting import wait_for


@pytest.fixture
def catalogue(custom):
    made = Catalogue(custom)
    yield made
    made.delete_all()


@pytest.fixture
def charged(operator):
    operator.configure(ANALYSIS_OPERATOR_BUDGETS_CHARGE_INTERVAL_SECONDS="1")
    return operator


def create_claim(core, namespace: str, name: str) -> None:
    core.create_persistent_volume(
        {
            "metadata": {"name": f"{namespace}-{name}"},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadOnlyMany"],
                "hostPath": {"path": "/data"},
                "claimRef": {"namespace": namespace, "name": name},
            },
        }
    )
    core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": name},
            "spec": {
                "accessModes": ["ReadOnlyMany"],
                "resources": {"requests": {"storage": "1Gi"}},
                "storageClassName": "",
                "volumeName": f"{namespace}-{name}",
            },
        },
    )


def test_a_missing_claim_is_named_not_charged_and_the_environment_starts_once_it_exists(
    catalogue, custom, charged, environments, core, namespace
):
    budgets = Budgets(custom)
    owner = f"u{uuid.uuid4().hex[:8]}"
    budget = budgets.create({"cpuHours": 100}, user=owner)
    try:
        claim = f"raw-{uuid.uuid4().hex[:6]}"
        dataset = catalogue.dataset(
            "raw", PUBLIC, storage={"persistentVolumeClaim": {"claimName": claim}, "path": "/gpfs/raw"}
        )
        environments.create("lab", flavor="jupyter-basic", owner=owner, datasets=[{"name": dataset}])
        status = environments.wait_phase("lab", "Pending", timeout=30)["status"]
        assert status["reason"] == "ClaimNotFound"
        assert f"(PersistentVolumeClaim {claim!r}) does not exist in namespace {namespace!r}" in status["message"]
        assert f'persistentvolumeclaim "{claim}" not found' in status["message"]  # the scheduler's own words
        [ready] = [c for c in status["conditions"] if c["type"] == "Ready"]
        assert (ready["status"], ready["reason"]) == ("False", "ClaimNotFound")
        selector = "involvedObject.kind=AnalysisEnvironment,involvedObject.name=lab"
        warnings = wait_for(
            lambda: [
                event
                for event in core.list_namespaced_event(namespace, field_selector=selector).items
                if (event.type, event.reason) == ("Warning", "ClaimNotFound")
            ],
            timeout=10,
            what="a ClaimNotFound Warning Event",
        )
        assert claim in warnings[0].message

        def ledger_entry() -> dict:
            return next(iter((budgets.status(budget).get("environments") or {}).values()), {})

        # Ticks pass (every second here) and charge nothing while the pod cannot run.
        first = wait_for(lambda: ledger_entry().get("chargedUntil"), timeout=15, what="a ledger entry")
        wait_for(lambda: ledger_entry().get("chargedUntil") != first, timeout=15, what="a later tick")
        assert ledger_entry()["cpuHours"] == 0.0
        assert environments.phase("lab") == "Pending"

        def mounted() -> list:
            events = core.list_namespaced_event(namespace, field_selector=selector).items
            return [event for event in events if event.reason == "DatasetsMounted"]

        assert mounted() == []  # nothing is mounted while the pod cannot start

        create_claim(core, namespace, claim)
        environments.wait_phase("lab", "Ready", timeout=90)
        (event,) = wait_for(mounted, timeout=10, what="the DatasetsMounted Event once it runs")
        assert event.message.startswith("mounted read-only: ") and dataset in event.message
        wait_for(lambda: ledger_entry().get("cpuHours", 0) > 0, timeout=20, what="charging once it runs")
    finally:
        for made in budgets.created:
            custom.delete_cluster_custom_object(GROUP, VERSION, "computebudgets", made)
