"""One accounting tick over the indexes (engine/accounting.plan_tick): a pod is charged by its flavor
only while it runs (Ready), from the moment it became Ready; never while it waits for a node, an
image or a missing claim, and time already charged is never charged again."""

from __future__ import annotations

import datetime

import pytest

from analysis_operator.backends.base import Charging
from analysis_operator.engine.accounting import plan_tick
from analysis_operator.engine.views import EnvironmentRecord
from analysis_operator.model.domain import BackendKind, Environment, Flavor, Resources, format_time
from analysis_operator.policy.budgets import Budget

NOW = datetime.datetime(2026, 11, 30, 12, 0, tzinfo=datetime.UTC)
MINUTE = datetime.timedelta(minutes=1)
FLAVOR = Flavor(name="basic", backend=BackendKind.KUBERNETES, resources=Resources(cpu="2"))
ENVIRONMENT = Environment(namespace="ns", name="lab", uid="u-1", owner="alice", flavor="basic")


class Pods:
    charging = Charging.FLAVOR


def budget(charged_until: datetime.datetime, cpu_hours: float = 0.0) -> Budget:
    entry = {
        "namespace": "ns",
        "name": "lab",
        "cpus": 2.0,
        "gpus": 0,
        "since": format_time(NOW - 10 * MINUTE),
        "chargedUntil": format_time(charged_until),
        "cpuHours": cpu_hours,
        "gpuHours": 0.0,
    }
    return Budget(name="b", user="alice", limits={"cpuHours": 100}, status={"environments": {"u-1": entry}})


def status(phase: str, ready_at: datetime.datetime | None = None) -> dict:
    conditions = []
    if ready_at is not None:
        conditions.append({"type": "Ready", "status": "True", "lastTransitionTime": format_time(ready_at)})
    return {"phase": phase, "conditions": conditions}


def tick(budget_: Budget, status_: dict) -> dict:
    environments = {("ns", "lab"): [EnvironmentRecord(ENVIRONMENT, status_)]}
    result = plan_tick(budget_, environments, {"basic": [FLAVOR]}, {"kubernetes": Pods()}, NOW, 80)
    return result.status["environments"]["u-1"]


@pytest.mark.parametrize("phase", ["Pending", "Provisioning", "Suspended"])
def test_a_pod_that_does_not_run_is_not_charged(phase):
    entry = tick(budget(NOW - 5 * MINUTE), {**status(phase), "reason": "ClaimNotFound"})
    assert entry["cpuHours"] == 0.0 and entry["chargedUntil"] == format_time(NOW)


def test_a_pod_is_charged_from_the_moment_it_became_ready():
    # the last tick saw it starting (chargedUntil 5 min ago); it became Ready 3 min ago
    entry = tick(budget(NOW - 5 * MINUTE), status("Ready", NOW - 3 * MINUTE))
    assert entry["cpuHours"] == pytest.approx(2 * 3 / 60)


def test_time_already_charged_is_not_charged_again():
    # Ready for an hour and charged up to a minute ago (e.g. by an operator before this rule)
    entry = tick(budget(NOW - MINUTE, cpu_hours=2 * 59 / 60), status("Ready", NOW - 60 * MINUTE))
    assert entry["cpuHours"] == pytest.approx(2.0)
