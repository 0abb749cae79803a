"""converge() decisions that need no server: backends here fail the test if touched."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime

import pytest

from analysis_operator.engine.converge import Context, converge
from analysis_operator.model.domain import Environment, Flavor

NOW = datetime.datetime(2026, 11, 24, 12, 0, tzinfo=datetime.UTC)
FLAVOR = Flavor.from_body(
    "vm",
    {
        "backend": "openstack",
        "resources": {"cpu": 2, "memory": "4Gi"},
        "openstack": {"flavor": "aenv.basic", "image": "desktop"},
    },
)
ENVIRONMENT = Environment(namespace="ns", name="desk", uid="u-1", owner="alice", flavor="vm")


class Untouchable:
    def __getattr__(self, name):
        raise AssertionError(f"converge must not call {name} here")


@pytest.mark.parametrize(
    "environment, status",
    [
        (dataclasses.replace(ENVIRONMENT, deleting=True), {"phase": "Ready"}),  # the finalizer's turn, not ours
        (ENVIRONMENT, {"phase": "Expired"}),
        (ENVIRONMENT, {"phase": "Rejected"}),
        (ENVIRONMENT, {"phase": "Failed"}),
    ],
)
def test_converge_leaves_deleting_and_finished_environments_alone(environment, status):
    context = Context(kube=Untouchable(), backends={"openstack": Untouchable()})
    outcome = asyncio.run(converge(context, environment, status, FLAVOR, NOW))
    assert outcome.status is None and outcome.event is None and outcome.retry_after is None


def test_converge_waits_for_a_missing_flavor_without_touching_anything():
    context = Context(kube=Untouchable(), backends={"openstack": Untouchable()})
    outcome = asyncio.run(converge(context, ENVIRONMENT, {}, None, NOW))
    assert outcome.status["phase"] == "Pending" and outcome.status["reason"] == "FlavorNotFound"
    assert outcome.retry_after == 30


def test_a_live_peer_with_a_higher_priority_outranks_us_until_its_lifetime_ends():
    from analysis_operator.handlers.lifecycle import outranked

    moment = datetime.datetime(2026, 11, 24, 12, 0, tzinfo=datetime.UTC)
    peer = {"priority": 10, "lifetime": 20, "lastseen": "2026-11-24T11:59:50+00:00"}
    assert outranked({"other": peer}, 5, moment)
    assert not outranked({"other": peer}, 10, moment)  # ourselves (same priority)
    assert not outranked({"other": peer}, 11, moment)
    assert not outranked({"other": peer}, 5, moment + datetime.timedelta(seconds=11))  # its keep-alive expired
    assert not outranked({}, 5, moment)


def test_converges_of_one_environment_never_overlap(monkeypatch):
    """Handler, pod event and sweep may converge one environment at once: they take turns."""
    from analysis_operator.engine import converge as reconcile

    active, overlaps = set(), []

    async def slow(context, environment, status, flavor, now):
        if environment.uid in active:
            overlaps.append(environment.uid)
        active.add(environment.uid)
        await asyncio.sleep(0.01)
        active.discard(environment.uid)
        return reconcile.Outcome()

    monkeypatch.setattr(reconcile, "_converge", slow)
    one = Environment("ns", "a", "uid-a", owner="alice", flavor="f")
    other = Environment("ns", "b", "uid-b", owner="alice", flavor="f")

    async def scenario():
        context = reconcile.Context(kube=None, backends={})
        await asyncio.gather(*(reconcile.converge(context, env, {}, None, None) for env in (one, one, one, other)))

    asyncio.run(scenario())
    assert overlaps == []


@pytest.mark.parametrize(
    "before, attention, event",
    [
        ({}, True, ("Warning", "ImagePullFailed")),  # the first status: a person must act
        ({"phase": "Provisioning", "reason": "PodStarting"}, True, ("Warning", "ImagePullFailed")),  # no new phase
        ({"phase": "Provisioning", "reason": "PodStarting"}, False, None),
        ({"phase": "Ready", "reason": "PodReady"}, True, ("Warning", "ImagePullFailed")),
    ],
)
def test_a_backend_waiting_on_a_person_is_a_warning_even_without_a_new_phase(before, attention, event):
    from analysis_operator.engine.converge import _told
    from analysis_operator.model.domain import Phase

    outcome = _told(ENVIRONMENT, before, Phase.PROVISIONING, "ImagePullFailed", "message", NOW, attention, {})
    assert (outcome.event[:2] if outcome.event else None) == event
    written = {**before, **(outcome.status or {})}
    again = _told(ENVIRONMENT, written, Phase.PROVISIONING, "ImagePullFailed", "message", NOW, attention, {})
    assert again.status is None and again.event is None  # said once


@pytest.mark.parametrize(
    "before, phase, reason, event",
    [
        ({}, "Provisioning", "PodStarting", None),  # a start: the status says it, Up will follow
        ({"phase": "Pending", "reason": "WaitingForBudget"}, "Provisioning", "PodStarting", None),
        ({"phase": "Suspended", "reason": "Suspended"}, "Provisioning", "PodStarting", None),  # resumed
        ({"phase": "Ready", "reason": "PodReady"}, "Provisioning", "PodStarting", ("Normal", "PodStarting")),  # fell
        ({"phase": "Provisioning", "reason": "PodStarting"}, "Ready", "PodReady", ("Normal", "PodReady")),
        ({}, "Provisioning", "ClaimNotFound", ("Warning", "ClaimNotFound")),  # people must act: always told
        ({"phase": "Ready", "reason": "PodReady"}, "Failed", "PodFailed", ("Warning", "PodFailed")),
        ({"phase": "Provisioning", "reason": "PodStarting"}, "Provisioning", "PodScheduled", None),  # no new phase
    ],
)
def test_one_event_per_start_and_one_per_anything_a_person_must_hear(before, phase, reason, event):
    from analysis_operator.engine.converge import _transition
    from analysis_operator.model.domain import Phase

    outcome = _transition(ENVIRONMENT, before, Phase(phase), reason, "message", NOW)
    assert outcome.status is not None and outcome.status["phase"] == phase
    assert (outcome.event[:2] if outcome.event else None) == event


class Observed:
    """A backend that only answers observe: what it shows now, or unreachable."""

    def __init__(self, observation):
        self.observation = observation

    async def observe(self, environment):
        if self.observation is None:
            from analysis_operator.backends.base import BackendUnavailable

            raise BackendUnavailable("the cloud does not answer")
        return self.observation


READY = {
    "phase": "Ready",
    "reason": "PodReady",
    "backend": {"kind": "openstack", "id": "vm-1", "state": "ACTIVE", "endpoint": "10.0.0.5:6080"},
}


@pytest.mark.parametrize(
    "observation, backend",
    [
        (None, None),  # the backend cannot be asked: its last word stays until the next transition
        ("gone", {"kind": "openstack", "id": None, "state": None, "endpoint": None}),
        ("running", {"kind": "openstack", "id": "vm-1", "state": "ACTIVE", "endpoint": "10.0.0.5:6080"}),
    ],
)
def test_a_refusal_shows_the_backend_as_it_is_now(monkeypatch, observation, backend):
    """A rule of the cluster refused what the environment needs: status.backend is what the backend
    shows now (a VM that is gone is no longer shown ACTIVE; one still running, refused only its route's
    Service, still is), not what it showed before."""
    from analysis_operator.backends.base import Observation, State, Upstream
    from analysis_operator.engine import converge as reconcile
    from analysis_operator.infra.kube import KubeError

    async def refused(context, environment, status, flavor, now):
        raise KubeError("POST", "/api/v1/namespaces/ns/services", 403, "Forbidden", '{"message": "exceeded quota"}')

    monkeypatch.setattr(reconcile, "_converge", refused)
    shown = {
        None: None,
        "gone": Observation(State.GONE),
        "running": Observation(
            State.READY, reference={"id": "vm-1", "state": "ACTIVE"}, upstream=Upstream(6080, address="10.0.0.5")
        ),
    }[observation]
    context = Context(kube=Untouchable(), backends={"openstack": Observed(shown)})
    outcome = asyncio.run(converge(context, ENVIRONMENT, READY, FLAVOR, NOW))
    assert outcome.status["phase"] == "Pending" and outcome.status["reason"] == "RefusedByCluster"
    assert "exceeded quota" in outcome.status["message"] and outcome.retry_after == 30
    if backend is None:
        assert "backend" not in outcome.status
    else:
        assert {key: outcome.status["backend"].get(key) for key in backend} == backend
