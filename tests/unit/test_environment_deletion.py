"""Deleting an environment whose backend is not enabled (handlers/environments.py): the finalizer
goes at once when nothing was made there, else the deletion waits and says what to do."""

from __future__ import annotations

import asyncio
import types

import kopf
import pytest

from analysis_operator.backends.base import BackendUnavailable
from analysis_operator.handlers.environments import (
    ABANDON,
    cleanup_blocked,
    left_behind,
    on_environment_deleted,
    what_was_made,
)
from analysis_operator.model.domain import LABEL_BACKEND


@pytest.mark.parametrize(
    "kind, status, blocked",
    [
        ("openstack", {}, False),  # never got as far as a server: nothing to wait for
        ("openstack", {"backend": {"kind": "openstack"}}, False),
        ("openstack", {"backend": {"kind": "openstack", "id": ""}}, False),
        ("openstack", {"backend": {"kind": "openstack", "id": "3f2a"}}, True),
        ("slurm", {"backend": {"kind": "slurm", "id": "4711"}}, True),
        ("slurm", {"backend": {"id": "4711"}}, True),  # kind not recorded: the label says
    ],
)
def test_deletion_waits_only_for_what_was_made(kind, status, blocked):
    message = cleanup_blocked(kind, status)
    assert (message is not None) == blocked
    if message is not None:
        assert status["backend"]["id"] in message and f"{kind} backend is not enabled" in message
        assert f'{ABANDON}="true"' in message  # what an admin can do about it


def test_what_was_made_and_left_behind_is_named():
    status = {"backend": {"kind": "slurm", "id": "4711"}}
    assert what_was_made("slurm", status) == "Slurm job 4711"
    assert what_was_made("openstack", {}) == "its OpenStack server"
    assert "Slurm job 4711 was not removed" in left_behind("slurm", status)


# --- the delete handler itself, with a stand-in backend and Event poster -------------------------------


class Events:
    def __init__(self) -> None:
        self.posted: list[tuple[str, str]] = []
        self.deleted: list[tuple[str, str, str]] = []

    async def post_event(self, involved, type_, reason, message) -> None:
        self.posted.append((type_, reason))

    async def delete_owned(self, kind, namespace, name, label, value) -> bool:
        self.deleted.append((kind, f"{namespace}/{name}", value))
        return True


class Cloud:
    kind = "openstack"

    def __init__(self, error: bool = False) -> None:
        self.error, self.asked = error, 0
        self.servers: set[str] = set()  # environment uids with a server

    async def delete(self, environment) -> bool:
        self.asked += 1
        if self.error:
            raise BackendUnavailable("keystone does not answer")
        self.servers.discard(environment.uid)
        return True


class Routes:
    def __init__(self) -> None:
        self.closed: list[str] = []

    async def close(self, environment) -> None:
        self.closed.append(environment.name)


def delete(backends: dict, status: dict, annotations: dict | None = None, in_flight=None, finalizers=(), routes=None):
    """The delete handler's answer; `in_flight`: a coroutine function run alongside, started first (a
    converge already under way when the user deletes)."""
    body = kopf.Body(
        {
            "metadata": {
                "namespace": "ns",
                "name": "vm",
                "uid": "u-1",
                "labels": {LABEL_BACKEND: "openstack"},
                "annotations": annotations or {},
                "deletionTimestamp": "2026-11-30T12:00:00Z",
                "finalizers": ["analysis.panosc.eu/finalizer", *finalizers],
            },
            "spec": {"owner": "alice", "flavor": "vm-desktop"},
            "status": status,
        }
    )
    events, patch = Events(), kopf.Patch()
    context = types.SimpleNamespace(kube=events, backends=backends, deleting=set(), routes=routes or Routes())
    memo = types.SimpleNamespace(context=context)

    async def scenario():
        running = asyncio.create_task(in_flight()) if in_flight is not None else None
        await asyncio.sleep(0)  # it has started
        try:
            await on_environment_deleted(body=body, labels=dict(body.metadata.labels), patch=patch, memo=memo)
        finally:
            if running is not None:
                await running

    try:
        asyncio.run(scenario())
        error = None
    except kopf.TemporaryError as raised:
        error = raised
    conditions = {c["type"]: c for c in (patch.get("status") or {}).get("conditions") or ()}
    return error, conditions.get("CleanedUp"), events.posted, events.deleted


RECORDED = {"backend": {"kind": "openstack", "id": "3f2a"}}
TOKEN = [("Secret", "ns/aenv-vm", "u-1")]  # the environment's own token Secret (by its uid label)


def test_nothing_made_and_no_backend_releases_at_once():
    assert delete({}, {}) == (None, None, [], TOKEN)


def test_something_made_and_no_backend_waits_and_says_so_once():
    error, condition, posted, deleted = delete({}, RECORDED)
    assert error is not None and condition["reason"] == "BackendNotEnabled" and condition["status"] == "False"
    assert posted == [("Warning", "BackendNotEnabled")] and deleted == []  # the token stays while it waits
    # the next try finds the condition already saying so: no second Event, no write
    error, condition, posted, _ = delete({}, {**RECORDED, "conditions": [dict(condition)]})
    assert error is not None and condition is None and posted == []


def test_abandoned_releases_without_asking_the_backend():
    cloud = Cloud()
    error, _, posted, deleted = delete({"openstack": cloud}, RECORDED, {ABANDON: "true"})
    assert error is None and cloud.asked == 0 and posted == [("Warning", "BackendAbandoned")] and deleted == TOKEN


def test_an_abandon_annotation_other_than_true_is_not_one():
    error, _, _, _ = delete({}, RECORDED, {ABANDON: "yes"})
    assert error is not None


def test_an_unreachable_backend_waits_with_the_reason():
    error, condition, _, deleted = delete({"openstack": Cloud(error=True)}, RECORDED)
    assert error is not None and condition["reason"] == "BackendUnavailable" and deleted == []
    assert "keystone does not answer" in condition["message"] and ABANDON in condition["message"]


def test_an_enabled_backend_deletes():
    cloud = Cloud()
    error, _, _, deleted = delete({"openstack": cloud}, RECORDED)
    assert error is None and cloud.asked == 1 and deleted == TOKEN  # the token goes with it, not after


def test_a_deletion_waits_for_a_converge_creating_the_server_and_removes_what_it_made():
    """A converge is creating the VM (Nova takes 15-30 s) when the user deletes. The deletion takes the
    converge's lock: it runs once the server exists, and removes it. Before, it found nothing, the
    finalizer went, and the VM ran on until the orphan sweep."""
    from analysis_operator.engine.converge import environment_lock

    cloud = Cloud()

    async def creating():
        async with environment_lock("u-1"):
            await asyncio.sleep(0.05)
            cloud.servers.add("u-1")

    error, _, _, deleted = delete({"openstack": cloud}, RECORDED, in_flight=creating)
    assert error is None and deleted == TOKEN
    assert cloud.servers == set()  # made, then removed: not left behind


def test_a_converge_that_waited_behind_a_deletion_creates_nothing():
    """A converge decided from a copy taken before the deletion (the sweep's) and queued behind it on the
    lock: the environment's uid is marked deleting by then, and it makes no new server."""
    import dataclasses
    import datetime

    from analysis_operator.engine.converge import Context, converge
    from analysis_operator.model.domain import Environment, Flavor

    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"converge must not call {name} here")

    context = Context(kube=Untouchable(), backends={"openstack": Untouchable()})
    context.deleting.add("u-1")
    environment = Environment(namespace="ns", name="vm", uid="u-1", owner="alice", flavor="vm-desktop")
    flavor = Flavor(name="vm-desktop", backend="openstack", max_lifetime=datetime.timedelta(hours=2))
    now = datetime.datetime(2026, 11, 30, 12, 0, tzinfo=datetime.UTC)
    outcome = asyncio.run(converge(context, environment, {"phase": "Ready"}, flavor, now))
    assert outcome.status is None and outcome.retry_after is None
    dataclasses.replace(context, backends={}).forget({"u-1"})  # its DELETED event: the mark goes too
    assert context.deleting == set()


@pytest.mark.parametrize("finalizers, closed", [((), []), (("orphan",), ["vm"]), (("x.example.org/hold",), ["vm"])])
def test_a_job_or_vm_kept_after_its_deletion_has_its_route_closed_with_it(finalizers, closed):
    """Removed by the backend, its finalizer released: the route (and an address's Service and EndpointSlice)
    is the garbage collector's, unless something else keeps the object, or an orphaning delete would leave
    them to nobody: then closed here."""
    routes = Routes()
    error, _, _, deleted = delete({"openstack": Cloud()}, RECORDED, finalizers=finalizers, routes=routes)
    assert error is None and deleted == TOKEN and routes.closed == closed


def test_the_sweep_removes_what_an_environment_kept_after_its_deletion_runs_until_it_is_done():
    """A pod's environment kept by someone's finalizer: its removal at its event failed (kopf does not retry
    an event handler), so the sweep tries again, and once done asks no more."""
    from analysis_operator.engine.views import EnvironmentRecord
    from analysis_operator.handlers.environments import remove_held_ones
    from analysis_operator.model.domain import Environment, Flavor

    class Pods:
        needs_finalizer, asked, fail = False, 0, True

        async def delete(self, environment) -> bool:
            self.asked += 1
            if self.fail:
                raise ConnectionError("the API server went away")
            return True

    pods, events = Pods(), Events()
    held = Environment(namespace="ns", name="lab", uid="u-1", owner="alice", flavor="jl", deleting=True)
    running = Environment(namespace="ns", name="up", uid="u-2", owner="alice", flavor="jl")
    context = types.SimpleNamespace(
        kube=events, backends={"kubernetes": pods}, deleting=set(), removed_held=set(), routes=Routes()
    )
    reconciler = types.SimpleNamespace(
        context=context,
        environments={("ns", "lab"): [EnvironmentRecord(held, {})], ("ns", "up"): [EnvironmentRecord(running, {})]},
        flavors={"jl": [Flavor(name="jl", backend="kubernetes")]},
    )

    async def sweeps() -> None:
        await remove_held_ones(reconciler)  # fails: logged, tried again next time
        assert (pods.asked, context.removed_held) == (1, set())
        pods.fail = False
        await remove_held_ones(reconciler)
        await remove_held_ones(reconciler)  # done: not asked again

    asyncio.run(sweeps())
    assert pods.asked == 2 and context.removed_held == {"u-1"} and context.routes.closed == ["lab"]
    assert [name for _, name, _ in events.deleted] == ["ns/aenv-lab"]  # its token; the running one untouched
