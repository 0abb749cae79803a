"""A fourth backend plugs into the engine through backends/base.py alone.

`MemoryBackend` below lives only in this file: no module of the package names
it, yet converge creates, suspends, resumes, expires, rejects and retries its
environments, the sweep polls it, and accounting charges what it reports
holding. The Kubernetes API is replaced by an in-memory stand-in for the few
calls the engine makes (token Secret, status patch, Events); the real API
server's side of these paths is in tests/integration.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import json
from collections.abc import Collection

import pytest

from analysis_operator.backends.base import (
    BackendUnavailable,
    Charging,
    Launch,
    ManagedObject,
    Observation,
    Retry,
    State,
)
from analysis_operator.engine.accounting import plan_tick
from analysis_operator.engine.converge import Context, converge
from analysis_operator.engine.decisions import Decisions
from analysis_operator.engine.reconciler import Reconciler, apply
from analysis_operator.engine.sweep import due, sweep
from analysis_operator.engine.views import EnvironmentRecord
from analysis_operator.infra.kube import KubeError
from analysis_operator.model.conditions import apply_merge_patch
from analysis_operator.model.domain import Dataset, DatasetRef, DatasetStorage, Environment, Flavor, Mount, parse_time
from analysis_operator.policy.budgets import Budget
from analysis_operator.policy.refusal import Refusal

NOW = datetime.datetime(2026, 11, 30, 12, 0, tzinfo=datetime.UTC)
FLAVOR = Flavor(name="mem", backend="memory", max_lifetime=datetime.timedelta(hours=2))
ENVIRONMENT = Environment(namespace="ns", name="lab", uid="u-1", owner="alice", flavor="mem", generation=1)


class MemoryBackend:
    kind = "memory"
    needs_finalizer = True
    polled = True
    charging = Charging.ALLOCATION

    def __init__(self) -> None:
        self.running: dict[str, str] = {}  # uid -> "starting" | "ready" | "suspended"
        self.calls: list[str] = []
        self.tokens: dict[str, str] = {}
        self.mounts: dict[str, tuple[Mount, ...]] = {}
        self.expiries: dict[str, datetime.datetime | None] = {}  # Launch.expires_at
        self.fail_next: Exception | None = None
        self.extended_until: datetime.datetime | None = None
        self.forgotten: set[str] = set()

    def _fail(self) -> None:
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error

    def validate(self, environment: Environment, flavor: Flavor) -> Refusal | None:
        return Refusal("NoPets", "no pets in memory") if environment.image == "pet" else None

    def dataset_problem(self, dataset: Dataset) -> str | None:
        return None if dataset.storage.path else f"dataset {dataset.name!r} has no path"

    def _observation(self, uid: str) -> Observation:
        state = self.running.get(uid)
        if state is None:
            return Observation(State.GONE, "NotThere")
        if state == "suspended":
            return Observation(State.SUSPENDED, "Parked")
        if state == "failed":
            return Observation(State.FAILED, "Broke", "the backend gave up on it")
        if state == "ready":
            return Observation(State.READY, "Up", "up", {"id": uid, "state": "UP"}, "mem://lab", cpus=2.0, gpus=1)
        return Observation(State.PROVISIONING, "Starting", "starting", {"id": uid, "state": "STARTING"})

    async def ensure(self, launch: Launch) -> Observation:
        self._fail()
        self.calls.append("ensure")
        uid = launch.environment.uid
        self.running.setdefault(uid, "starting")
        self.tokens[uid], self.mounts[uid] = launch.token, launch.mounts
        self.expiries[uid] = launch.expires_at
        return self._observation(uid)

    async def observe(self, environment: Environment) -> Observation:
        return self._observation(environment.uid)

    async def suspend(self, environment: Environment) -> Observation:
        self.calls.append("suspend")
        self.running[environment.uid] = "suspended"
        return self._observation(environment.uid)

    async def resume(self, launch: Launch) -> Observation:
        self.calls.append("resume")
        if launch.environment.uid in self.running:
            self.running[launch.environment.uid] = "starting"
        return self._observation(launch.environment.uid)

    async def extend(self, environment: Environment, until: datetime.datetime) -> bool:
        self.extended_until = until
        return False

    async def delete(self, environment: Environment) -> bool:
        self.calls.append("delete")
        self.running.pop(environment.uid, None)
        return True

    async def list_managed(self) -> list[ManagedObject]:
        return [ManagedObject("ns", "lab", uid, uid) for uid in self.running]

    def close(self) -> None:
        pass

    def forget(self, uids: Collection[str]) -> None:
        self.forgotten.update(uids)


class Cluster:
    """The engine's few Kubernetes calls, in memory: token Secrets, status patches, Events."""

    def __init__(self) -> None:
        self.secrets: dict[tuple[str, str], str] = {}
        self.secret_owners: dict[tuple[str, str], str] = {}  # -> the environment uid label
        self.status: dict[tuple[str, str], dict] = {}
        self.events: list[tuple[str, str]] = []

    async def create(self, kind: str, namespace: str, body: dict) -> bool:
        key = (namespace, body["metadata"]["name"])
        if key in self.secrets:
            return False
        self.secrets[key] = body["data"]["token"]
        self.secret_owners[key] = body["metadata"]["labels"]["analysis.panosc.eu/environment-uid"]
        return True

    async def read_metadata(self, kind: str, namespace: str, name: str) -> dict | None:
        owner = self.secret_owners.get((namespace, name))
        return (
            None
            if owner is None
            else {"uid": f"secret-of-{owner}", "labels": {"analysis.panosc.eu/environment-uid": owner}}
        )

    async def read_secret_value(self, namespace: str, name: str, key: str) -> str | None:
        import base64

        value = self.secrets.get((namespace, name))
        return base64.b64decode(value).decode() if value else None

    async def delete(self, kind: str, namespace: str, name: str, uid: str = "") -> bool:
        self.secret_owners.pop((namespace, name), None)
        return self.secrets.pop((namespace, name), None) is not None

    async def delete_owned(self, kind: str, namespace: str, name: str, label: str, value: str) -> bool:
        if self.secret_owners.get((namespace, name)) != value:
            return False
        return await self.delete(kind, namespace, name)

    async def patch_environment_status(self, namespace: str, name: str, status: dict) -> bool:
        self.status.setdefault((namespace, name), {}).update(status)
        return True

    async def post_event(self, involved: dict, type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason))


class Catalogue:
    """An Access that grants the datasets listed in spec, so mounts can be followed to the backend."""

    def __init__(self) -> None:
        self.recorded: list[tuple[Mount, ...]] = []  # handed to the backend (audit log)
        self.announced: list[tuple[Mount, ...]] = []  # told the owner (the Event), once Ready

    async def grant(self, environment, flavor, reach, status, now):
        datasets = [
            Dataset(name=ref.name, pid=f"10.5072/{ref.name}", storage=DatasetStorage(path=f"/gpfs/{ref.name}"))
            for ref in environment.datasets
        ]
        problems = [problem for dataset in datasets if (problem := reach(dataset))]
        if problems:
            return Refusal("DatasetNotAvailable", problems[0])
        return tuple(Mount(dataset, f"/data/{dataset.name}", "public") for dataset in datasets)

    async def handed(self, environment, mounts):
        self.recorded.append(tuple(mounts))

    async def mounted(self, environment, mounts):
        self.announced.append(tuple(mounts))


def setup(**context_fields):
    backend, cluster = MemoryBackend(), Cluster()
    context = Context(kube=cluster, backends={"memory": backend}, access=Catalogue(), **context_fields)
    return backend, cluster, context


async def run(context, environment, status, now=NOW, flavor=FLAVOR):
    outcome = await converge(context, environment, status, flavor, now)
    return {**status, **(outcome.status or {})}, outcome


def test_create_ready_suspend_resume_expire_through_the_interface_alone():
    backend, cluster, context = setup()
    environment = dataclasses.replace(ENVIRONMENT, datasets=(DatasetRef("raw"),))

    async def scenario():
        status, outcome = await run(context, environment, {})
        assert status["phase"] == "Provisioning" and backend.calls == ["ensure"]
        assert {key: value for key, value in status["backend"].items() if value is not None} == {
            "kind": "memory",
            "id": "u-1",
            "state": "STARTING",
        }
        assert backend.tokens["u-1"] and ("ns", "aenv-lab") in cluster.secrets  # token made once, handed over
        assert [mount.path for mount in backend.mounts["u-1"]] == ["/data/raw"]  # the grant, decided once
        assert context.access.recorded == [backend.mounts["u-1"]]
        assert context.access.announced == []  # nothing is mounted while it starts (a missing claim, say)

        backend.running["u-1"] = "ready"
        status, outcome = await run(context, environment, status)
        assert (status["phase"], status["connection"]["url"]) == ("Ready", "mem://lab")
        assert status["backend"]["allocatedCpus"] == 2.0 and backend.calls == ["ensure"]  # adopted, not re-made
        assert context.access.announced == [backend.mounts["u-1"]]  # at Ready, once
        status, _ = await run(context, environment, status)
        assert context.access.announced == [backend.mounts["u-1"]]
        assert backend.extended_until == NOW + datetime.timedelta(hours=2)  # its limit follows expiresAt

        suspended = dataclasses.replace(environment, suspend=True, generation=2)
        status, _ = await run(context, suspended, status)
        assert status["phase"] == "Suspended" and backend.calls[-1] == "suspend"
        assert status["backend"]["state"] is None and status["backend"]["allocatedCpus"] is None  # removed
        status, _ = await run(context, suspended, status)
        assert backend.calls.count("suspend") == 1  # idempotent

        resumed = dataclasses.replace(environment, generation=3)
        status, _ = await run(context, resumed, status)
        assert status["phase"] == "Provisioning" and backend.calls[-1] == "resume"
        assert backend.tokens["u-1"] == await cluster.read_secret_value("ns", "aenv-lab", "token")  # same token

        later = NOW + datetime.timedelta(hours=3)
        status, outcome = await run(context, resumed, status, now=later)
        assert (status["phase"], status["reason"]) == ("Expired", "LifetimeExpired")
        assert backend.calls[-1] == "delete" and "u-1" not in backend.running
        assert ("ns", "aenv-lab") not in cluster.secrets and status["connection"] is None
        assert outcome.event[:2] == ("Warning", "LifetimeExpired")

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "environment, reason",
    [
        (dataclasses.replace(ENVIRONMENT, image="pet"), "CustomImageNotAllowed"),  # the common rule first
        (dataclasses.replace(ENVIRONMENT, lifetime=datetime.timedelta(hours=3)), "LifetimeTooLong"),
    ],
)
def test_common_rules_refuse_before_the_backend_is_asked(environment, reason):
    backend, cluster, context = setup()
    status, _ = asyncio.run(run(context, environment, {}))
    assert (status["phase"], status["reason"]) == ("Rejected", reason)
    assert "ensure" not in backend.calls


def test_the_backend_adds_its_own_rules_and_its_own_view_of_data():
    backend, cluster, context = setup()
    custom = dataclasses.replace(FLAVOR, allow_custom_image=True)
    status, _ = asyncio.run(run(context, dataclasses.replace(ENVIRONMENT, image="pet"), {}, flavor=custom))
    assert (status["phase"], status["reason"]) == ("Rejected", "NoPets")


def test_a_rejected_running_environment_is_stopped_not_left_running():
    backend, cluster, context = setup()

    async def scenario():
        status, _ = await run(context, ENVIRONMENT, {})
        too_long = dataclasses.replace(ENVIRONMENT, lifetime=datetime.timedelta(hours=5), generation=2)
        status, _ = await run(context, too_long, status)
        assert status["phase"] == "Rejected" and "u-1" not in backend.running
        assert ("ns", "aenv-lab") not in cluster.secrets and status["connection"] is None

    asyncio.run(scenario())


def test_an_unknown_backend_waits_and_says_so():
    backend, cluster, context = setup()
    outcome = asyncio.run(converge(context, ENVIRONMENT, {}, dataclasses.replace(FLAVOR, backend="nomad"), NOW))
    assert outcome.status["reason"] == "BackendNotEnabled" and "nomad" in outcome.status["message"]
    assert outcome.retry_after == 60


def test_the_sweep_polls_a_polled_backend_and_only_it():
    record = EnvironmentRecord(ENVIRONMENT, {"phase": "Ready", "startedAt": "2026-11-30T11:00:00Z"})
    flavors = {"mem": [FLAVOR]}
    assert due(record, flavors, frozenset({"memory"}), NOW)
    assert not due(record, flavors, frozenset(), NOW)  # pushed: only at expiry
    assert due(record, flavors, frozenset(), NOW + datetime.timedelta(hours=2))


def test_accounting_charges_what_an_allocation_backend_reports():
    backend, cluster, context = setup()
    entry = {
        "namespace": "ns",
        "name": "lab",
        "cpus": 8,
        "gpus": 4,
        "since": "2026-11-30T11:00:00Z",
        "chargedUntil": "2026-11-30T11:00:00Z",
        "cpuHours": 0.0,
        "gpuHours": 0.0,
    }
    budget = Budget(name="b", user="alice", status={"environments": {"u-1": entry}})
    running = {
        "phase": "Ready",
        "backend": {"kind": "memory", "allocatedCpus": 2.0, "allocatedGpus": 1, "startedAt": "2026-11-30T11:30:00Z"},
    }
    environments = {("ns", "lab"): [EnvironmentRecord(ENVIRONMENT, running)]}
    result = plan_tick(budget, environments, {"mem": [FLAVOR]}, context.backends, NOW, 80.0)
    charged = result.status["environments"]["u-1"]
    assert (charged["cpuHours"], charged["gpuHours"]) == (1.0, 0.5)  # 2 CPUs, 1 GPU for 30 min, not 8 and 4


class FailOnce:
    """A grant that cannot be decided now (e.g. a budget write that keeps conflicting)."""

    def __init__(self) -> None:
        self.calls = 0

    async def check(self, environment, flavor, status, now):
        self.calls += 1
        if self.calls == 1:
            raise Retry("budget busy", delay=0.05)
        return None


@pytest.mark.parametrize("failure", ["grant", "backend-error"])
def test_a_failure_outside_kopf_is_retried_without_any_other_event(failure):
    """A pod event or the sweep converges; the first try fails; nothing else happens, and yet it
    converges again after the delay the failure asked for."""
    gate = FailOnce()
    backend, cluster, context = setup(gates=(gate,) if failure == "grant" else ())
    if failure == "backend-error":
        backend.fail_next = RuntimeError("API server said 500")
    environments = {("ns", "lab"): [EnvironmentRecord(ENVIRONMENT, {"phase": "Pending"})]}
    reconciler = Reconciler(context, environments, {"mem": [FLAVOR]}, clock=lambda: NOW, first_backoff=0.05)

    async def scenario():
        first = await reconciler.reconcile(environments[("ns", "lab")][0])
        assert first.retry_after is not None and backend.calls == [] and reconciler.pending == 1
        for _ in range(100):
            if backend.calls:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.02)
        reconciler.close()

    asyncio.run(scenario())
    assert backend.calls == ["ensure"]
    assert cluster.status[("ns", "lab")]["phase"] == "Provisioning"


def test_a_retry_for_an_environment_deleted_meanwhile_does_nothing():
    backend, cluster, context = setup(gates=(FailOnce(),))
    environments = {("ns", "lab"): [EnvironmentRecord(ENVIRONMENT, {"phase": "Pending"})]}
    reconciler = Reconciler(context, environments, {"mem": [FLAVOR]}, clock=lambda: NOW)

    async def scenario():
        await reconciler.reconcile(environments[("ns", "lab")][0])
        environments.clear()
        await asyncio.sleep(0.1)

    asyncio.run(scenario())
    assert backend.calls == [] and reconciler.pending == 0


def test_sweep_converges_every_due_environment_of_a_polled_backend():
    backend, cluster, context = setup()
    records = {
        ("ns", f"e{i}"): [
            EnvironmentRecord(
                dataclasses.replace(ENVIRONMENT, name=f"e{i}", uid=f"u{i}"),
                {"phase": "Provisioning", "startedAt": "2026-11-30T11:59:00Z"},
            )
        ]
        for i in range(5)
    }
    reconciler = Reconciler(context, records, {"mem": [FLAVOR]}, clock=lambda: NOW)
    assert asyncio.run(sweep(reconciler, NOW)) == 5
    assert backend.calls == ["ensure"] * 5


def test_a_leftover_token_of_an_earlier_namesake_is_replaced_never_adopted():
    """`kubectl delete --cascade=orphan` leaves the Secret; a new environment of the same name
    must not inherit its token."""
    backend, cluster, context = setup()
    old = dataclasses.replace(ENVIRONMENT, uid="u-old")

    async def scenario():
        await run(context, old, {})
        old_token = backend.tokens["u-old"]
        status, outcome = await run(context, ENVIRONMENT, {})  # same name, new uid
        assert outcome.retry_after is not None and "leftover Secret" in outcome.message
        assert ("ns", "aenv-lab") not in cluster.secrets  # removed, not adopted
        status, outcome = await run(context, ENVIRONMENT, {})
        assert status["phase"] == "Provisioning" and backend.tokens["u-1"] != old_token

    asyncio.run(scenario())


def test_a_backend_is_told_when_the_engine_ends_what_it_starts():
    """Launch.expires_at: the Slurm backend bounds a new job's TimeLimit by it (a resume's job too)."""
    backend, cluster, context = setup()
    later = NOW + datetime.timedelta(minutes=90)
    status = {"phase": "Suspended", "startedAt": "2026-11-30T12:00:00Z"}
    asyncio.run(converge(context, ENVIRONMENT, status, FLAVOR, later))  # resumed, nothing left to resume: ensure
    assert backend.calls == ["resume", "ensure"] and backend.expiries["u-1"] == NOW + datetime.timedelta(hours=2)


def test_an_approved_extension_reaches_the_backends_own_limit():
    """A lifetime BudgetRequest approved (status.lifetimeExtensions) moves expiresAt, and the backend is
    asked to let what runs last that long (Slurm raises the job's TimeLimit)."""
    backend, cluster, context = setup()
    backend.running["u-1"] = "ready"
    status = {"phase": "Ready", "startedAt": "2026-11-30T12:00:00Z", "lifetimeExtensions": {"request-uid": "3h"}}
    outcome = asyncio.run(converge(context, ENVIRONMENT, status, FLAVOR, NOW + datetime.timedelta(hours=1)))
    assert backend.extended_until == NOW + datetime.timedelta(hours=5)  # 2 h flavor limit + 3 h granted
    assert outcome.status["expiresAt"] == "2026-11-30T17:00:00Z"


def test_stopping_an_environment_whose_flavor_is_gone_still_removes_what_runs():
    """A budget exhausted after the flavor was deleted: the backend is found from status.backend.kind
    (before, the Secret went and the pod kept running)."""
    from analysis_operator.engine.converge import stop
    from analysis_operator.model.domain import Phase

    backend, cluster, context = setup()
    asyncio.run(run(context, ENVIRONMENT, {}))
    status = {"phase": "Ready", "backend": {"kind": "memory"}}
    outcome = asyncio.run(
        stop(context, ENVIRONMENT, None, status, Phase.BUDGET_EXHAUSTED, "BudgetExhausted", "spent", NOW)
    )
    assert "u-1" not in backend.running and ("ns", "aenv-lab") not in cluster.secrets
    assert outcome.status["phase"] == "BudgetExhausted"


def test_an_environment_its_backend_ended_holds_nothing_and_no_token():
    """Found by the chaos run: a job refused by Slurm ended Failed but kept its token Secret."""
    backend, cluster, context = setup()

    async def scenario():
        status, _ = await run(context, ENVIRONMENT, {})
        backend.running["u-1"] = "failed"
        status, outcome = await run(context, ENVIRONMENT, status)
        assert (status["phase"], status["reason"], status["message"]) == (
            "Failed",
            "Broke",
            "the backend gave up on it",
        )
        assert backend.calls[-1] == "delete" and ("ns", "aenv-lab") not in cluster.secrets
        assert status["connection"] is None and status["stoppedAt"]

    asyncio.run(scenario())


def test_mounts_are_announced_once_per_launch_however_many_converges_see_ready():
    """engine/data_access.py DataAccess: the DatasetsMounted Event once per launch (two converges that
    both see the step to Ready post one), again after a new launch (a resume)."""
    from analysis_operator.engine.data_access import DataAccess

    posted: list[str] = []

    class Kube:
        async def post_event(self, involved, type_, reason, message):
            posted.append(reason)

    access = DataAccess(Kube(), {"datasets": {}, "dataset_pids": {}, "groups": {}})
    mount = Mount(
        Dataset(name="raw", pid="10.5072/raw", storage=DatasetStorage(path="/gpfs/raw")), "/data/raw", "public"
    )

    async def scenario():
        await access.handed(ENVIRONMENT, [mount])
        await asyncio.gather(access.mounted(ENVIRONMENT, [mount]), access.mounted(ENVIRONMENT, [mount]))
        assert posted == ["DatasetsMounted"]
        await access.handed(ENVIRONMENT, [mount])  # resumed: launched again
        await access.mounted(ENVIRONMENT, [mount])
        assert posted == ["DatasetsMounted", "DatasetsMounted"]

    asyncio.run(scenario())


def test_a_step_decided_once_is_not_decided_again_from_the_status_before_it():
    """engine/decisions.py: kopf's handler and a pod event may both converge from the status before a
    write has come back; the second sees the step already taken and writes nothing (no second Ready,
    no second Event). Once the status shows it, or its write fails, the shown status is used again."""
    backend, cluster, context = setup()

    async def scenario():
        provisioning, _ = await run(context, ENVIRONMENT, {})
        backend.running["u-1"] = "ready"
        _, first = await run(context, ENVIRONMENT, provisioning)
        assert first.status["phase"] == "Ready" and first.event[1] == "Up"
        _, again = await run(context, ENVIRONMENT, provisioning)  # the index has not shown the write yet
        assert again.status is None and again.event is None
        ready = apply_merge_patch(provisioning, first.status)
        _, seen = await run(context, ENVIRONMENT, ready)  # shown back: decided from it, nothing to do
        assert seen.status is None and len(context.decisions) == 0

        suspended = dataclasses.replace(ENVIRONMENT, suspend=True, generation=2)
        _, suspending = await run(context, suspended, ready)
        assert suspending.status["phase"] == "Suspended"

        class Down(Cluster):
            async def patch_environment_status(self, namespace, name, status):
                raise ConnectionError("API server restarting")

        failing = dataclasses.replace(context, kube=Down())
        with pytest.raises(ConnectionError):
            await apply(failing, suspended, suspending)
        _, retried = await run(context, suspended, ready)  # the lost write is decided (and written) again
        assert retried.status is not None and retried.status["phase"] == "Suspended"

    asyncio.run(scenario())


def test_a_decision_never_seen_back_is_forgotten_after_a_while():
    now = [0.0]
    decisions = Decisions(clock=lambda: now[0], stale_after=30)
    seen = {"phase": "Provisioning"}
    decisions.remember("u", seen, seen, {"phase": "Ready", "reason": None})
    assert decisions.latest("u", seen) == {"phase": "Ready"}
    used = decisions.latest("u", seen)
    decisions.remember("u", seen, used, {"message": "m"})  # a second step before the first came back
    assert decisions.latest("u", {"phase": "Ready"}) == {"phase": "Ready", "message": "m"}  # first seen, not second
    assert decisions.latest("u", {"phase": "Stopped"}) == {"phase": "Stopped"}  # something else wrote: its status
    decisions.remember("u", seen, seen, {"phase": "Ready"})
    now[0] = 31
    assert decisions.latest("u", seen) == seen


def test_decisions_no_longer_used_are_not_kept():
    now = [0.0]
    decisions = Decisions(clock=lambda: now[0], stale_after=30)
    seen = {"phase": "Provisioning"}
    decisions.remember("old", seen, seen, {"phase": "Ready"})
    now[0] = 20
    decisions.remember("new", seen, seen, {"phase": "Ready"})
    now[0] = 30
    assert decisions.prune() == 1 and decisions.uids() == ["new"]
    assert decisions.latest("new", seen) == {"phase": "Ready"}  # a decision still in use stays
    now[0] = 50
    assert decisions.prune() == 1 and len(decisions) == 0


@pytest.mark.parametrize(
    "target, patch, merged",
    [
        (
            {"a": 1, "b": {"c": 2, "d": 3}},
            {"b": {"c": None, "e": 4}, "f": [1]},
            {"a": 1, "b": {"d": 3, "e": 4}, "f": [1]},
        ),
        ({"a": [1, 2]}, {"a": [3]}, {"a": [3]}),  # lists are replaced
        ({"a": 1}, {"a": {"b": None}}, {"a": {}}),
        ({}, {"a": None}, {}),
    ],
)
def test_a_merge_patch_is_applied_as_the_api_server_applies_it(target, patch, merged):
    before = repr(target)
    assert apply_merge_patch(target, patch) == merged
    assert repr(target) == before  # not changed in place


def test_the_handlers_decision_is_written_in_turn_with_pod_events_not_after_them():
    """The environment's own kopf handler writes its status itself, under the lock pod events write
    under. Left to kopf's patch (sent after the handler returns), a pod event's Ready written
    meanwhile was overwritten by the handler's older Provisioning; decisions.py then took that
    Provisioning for a status not yet caught up, and the environment stayed Provisioning (CI, stop 22)."""
    import kopf

    from analysis_operator.handlers.environments import on_environment

    backend, cluster, context = setup()
    writes: list[str] = []
    patch_status = cluster.patch_environment_status

    async def recorded(namespace, name, status):
        writes.append(status.get("phase", ""))
        return await patch_status(namespace, name, status)

    cluster.patch_environment_status = recorded
    environments = {("ns", "lab"): [EnvironmentRecord(ENVIRONMENT, {})]}
    reconciler = Reconciler(context, environments, {"mem": [FLAVOR]}, clock=lambda: NOW)
    body = kopf.Body(
        {
            "metadata": {
                "namespace": "ns",
                "name": "lab",
                "uid": "u-1",
                "generation": 1,
                "labels": {"analysis.panosc.eu/backend": "memory"},
            },
            "spec": {"owner": "alice", "flavor": "mem"},
        }
    )
    patch = kopf.Patch()

    async def scenario():
        await on_environment(
            body=body, patch=patch, memo=kopf.Memo(context=context, reconciler=reconciler), flavors={"mem": [FLAVOR]}
        )
        backend.running["u-1"] = "ready"
        # the pod event, decided from the index that has not shown the handler's write yet
        await reconciler.reconcile(EnvironmentRecord(ENVIRONMENT, {}))
        reconciler.close()

    asyncio.run(scenario())
    assert "status" not in patch  # nothing left for kopf to write after the pod event's Ready
    assert writes == ["Provisioning", "Ready"]
    assert cluster.status[("ns", "lab")]["phase"] == "Ready"


class NotC:
    """A grant that is never decided for environment c: it is retried for as long as c exists."""

    async def check(self, environment, flavor, status, now):
        if environment.name == "c":
            raise Retry("budget busy", delay=30)
        return None


def test_nothing_is_kept_for_an_environment_once_it_is_gone():
    """What the process keeps per environment (the phase it wrote, its decisions, its token, a retry)
    goes with the environment: at once on its deletion, or at the next sweep for one it did not see
    go. Kept for every environment ever made, it grew with each batch and pinned freed memory."""
    from analysis_operator.engine import tokens

    backend, cluster, context = setup(gates=(NotC(),))
    records = {
        ("ns", name): [EnvironmentRecord(dataclasses.replace(ENVIRONMENT, name=name, uid=f"u-{name}"), {})]
        for name in ("a", "b", "c", "d")
    }
    reconciler = Reconciler(context, records, {"mem": [FLAVOR]}, clock=lambda: NOW)

    def kept(uid: str) -> dict[str, bool]:
        return {
            "written": uid in context.written,
            "decision": uid in context.decisions.uids(),
            "token": uid in tokens.known_uids(),
        }

    async def scenario():
        for (record,) in records.values():
            await reconciler.reconcile(record)
        assert all(all(kept(f"u-{name}").values()) for name in "abd")
        assert reconciler.pending == 1  # c waits for its grant
        reconciler.forget({"u-a", "u-c"})  # their DELETED events
        assert kept("u-a") == {"written": False, "decision": False, "token": False}
        assert reconciler.pending == 0  # no retry for c
        assert reconciler.forgotten == 2  # counted for the sweep's garbage collection (infra/logs.py)
        assert backend.forgotten == {"u-a", "u-c"}  # and the backends told (the kubernetes one's ConfigMap)
        assert all(kept("u-b").values()) and all(kept("u-d").values())
        reconciler.retain({"u-b"})  # the sweep: d went while this process did not watch
        assert not any(kept("u-d").values())
        assert "u-d" in backend.forgotten and "u-b" not in backend.forgotten  # (tokens has other tests' too)
        assert all(kept("u-b").values())  # a live one keeps everything
        reconciler.close()

    asyncio.run(scenario())


def refused_by(message: str, code: int = 403) -> KubeError:
    body = json.dumps({"kind": "Status", "status": "Failure", "message": message, "code": code})
    return KubeError("POST", "/api/v1/namespaces/ns/pods", code, "Forbidden", body)


def test_what_a_rule_of_the_cluster_refuses_waits_said_once_and_starts_when_allowed():
    """A quota, Pod Security or a facility's policy refusing what the backend makes: Pending with the API
    server's words, one Warning, tried again every 30 s; the same refusal again writes nothing; once
    allowed it starts. Any other error is not taken for one (it stays the retry with backoff)."""
    backend, cluster, context = setup()
    quota = 'pods "aenv-lab" is forbidden: exceeded quota: compute, requested: limits.memory=16Gi'

    async def scenario():
        backend.fail_next = refused_by(quota)
        status, outcome = await run(context, ENVIRONMENT, {})
        assert (status["phase"], status["reason"]) == ("Pending", "RefusedByCluster")
        assert quota in status["message"] and "Tried again every 30 s" in status["message"]
        assert "startedAt" not in status and "ensure" not in backend.calls
        assert outcome.event[:2] == ("Warning", "RefusedByCluster") and outcome.retry_after == 30
        assert outcome.message == "KubeError(403 Forbidden: POST /api/v1/namespaces/ns/pods) refused"  # for logs

        backend.fail_next = refused_by(quota)
        again, outcome = await run(context, ENVIRONMENT, status)
        assert outcome.status is None and outcome.event is None and outcome.retry_after == 30

        status, outcome = await run(context, ENVIRONMENT, again)
        assert (status["phase"], status["reason"]) == ("Provisioning", "Starting") and status["startedAt"]

        backend.fail_next = refused_by("not found", code=404)
        with pytest.raises(KubeError):
            await run(context, dataclasses.replace(ENVIRONMENT, uid="u-2", name="other"), {})

    asyncio.run(scenario())


class EchoingCluster(Cluster):
    """A policy that refuses Secrets and quotes what they hold, as it came (the token's base64, as a
    webhook sees it) and decoded (as a CEL rule with string() might)."""

    async def create(self, kind: str, namespace: str, body: dict) -> bool:
        encoded = body["data"]["token"]
        echoed = f"not here: {encoded} = {base64.b64decode(encoded).decode()}"
        raise KubeError(
            "POST", f"/api/v1/namespaces/{namespace}/secrets", 403, "Forbidden", json.dumps({"message": echoed})
        )


def test_a_refusal_quoting_the_token_secret_says_it_without_the_token():
    backend = MemoryBackend()
    context = Context(kube=EchoingCluster(), backends={"memory": backend}, access=Catalogue())
    status, outcome = asyncio.run(run(context, ENVIRONMENT, {}))
    assert status["reason"] == "RefusedByCluster" and "not here: [token] = [token]." in status["message"]
    assert outcome.event[2] == status["message"] and "ensure" not in backend.calls


class Restarting(Cluster):
    """An API server that loses status writes while `down` (restarting); every other call answers."""

    down = False

    async def patch_environment_status(self, namespace: str, name: str, status: dict) -> bool:
        if self.down:
            raise ConnectionError("API server restarting")
        return await super().patch_environment_status(namespace, name, status)


def running_lab(cluster: Cluster):
    """A Ready environment on the memory backend, and its status as the API server shows it."""
    backend = MemoryBackend()
    context = Context(kube=cluster, backends={"memory": backend}, access=Catalogue())

    async def start():
        status, _ = await run(context, ENVIRONMENT, {})
        backend.running["u-1"] = "ready"
        status, _ = await run(context, ENVIRONMENT, status)
        assert status["phase"] == "Ready" and backend.calls == ["ensure"]
        return status

    return backend, context, asyncio.run(start())


@pytest.mark.parametrize("ended_by", ["backend", "idle"])
def test_an_end_whose_status_write_is_lost_is_decided_again_never_started_again(ended_by):
    """converge.stop writes the end before it removes anything. Removed first, a lost write (the API
    server restarting, the operator killed between the two) left the status Ready over nothing, and
    the next converge took that for a pod deleted by someone: a new pod, VM or job, with a new token."""
    from analysis_operator.engine.converge import end
    from analysis_operator.model.domain import Phase

    cluster = Restarting()
    backend, context, ready = running_lab(cluster)

    async def decide():
        if ended_by == "idle":  # engine/idle.py's cull
            outcome = await end(context, ENVIRONMENT, FLAVOR, ready, Phase.STOPPED, "IdleStopped", "idle", NOW)
        else:
            outcome = await converge(context, ENVIRONMENT, ready, FLAVOR, NOW)
        await apply(context, ENVIRONMENT, outcome)

    async def scenario():
        if ended_by == "backend":
            backend.running["u-1"] = "failed"
        cluster.down = True
        with pytest.raises(ConnectionError):
            await decide()
        assert backend.calls == ["ensure"] and "u-1" in backend.running  # nothing removed: the end is not written
        assert ("ns", "aenv-lab") in cluster.secrets
        cluster.down = False
        _, outcome = await run(context, ENVIRONMENT, ready)  # the next pass, from the status the API server shows
        assert "ensure" not in backend.calls[1:]  # not started again
        await apply(context, ENVIRONMENT, outcome)
        if ended_by == "idle":  # a sweep's pass sees it run on: the idle check decides again
            assert outcome.status is None and backend.calls == ["ensure"]
            await decide()
        assert backend.calls == ["ensure", "delete"] and "u-1" not in backend.running
        assert cluster.status[("ns", "lab")]["phase"] == ("Stopped" if ended_by == "idle" else "Failed")
        assert ("ns", "aenv-lab") not in cluster.secrets

    asyncio.run(scenario())


def test_what_goes_away_without_an_end_written_is_started_again():
    """The rule's other side: a status that says it runs over nothing (its pod deleted by someone) was
    not ended by the operator, whose ends are written first: it is started again."""
    backend, context, ready = running_lab(Cluster())
    backend.running.clear()
    status, _ = asyncio.run(run(context, ENVIRONMENT, ready))
    assert backend.calls == ["ensure", "ensure"] and status["phase"] == "Provisioning"


def test_what_an_ended_environment_still_holds_is_removed_by_the_orphan_sweep():
    """The end written, and the backend away when it was to be removed (or the operator killed just
    then): the status says Failed, the job still runs. Nothing converges an ended environment again,
    so the orphan sweep removes it, as it removes what outlived its environment; what runs for a
    live one is left alone."""
    from analysis_operator.engine.sweep import sweep_orphans

    cluster = Cluster()
    backend, context, ready = running_lab(cluster)
    remove = backend.delete

    async def unreachable(environment):
        raise BackendUnavailable("slurmrestd does not answer")

    backend.running["u-1"] = "failed"
    backend.delete = unreachable
    status, outcome = asyncio.run(run(context, ENVIRONMENT, ready))
    assert status["phase"] == "Failed" and cluster.status[("ns", "lab")]["phase"] == "Failed"
    assert "u-1" in backend.running  # still there
    backend.delete = remove

    other = dataclasses.replace(ENVIRONMENT, name="other", uid="u-2")
    backend.running["u-2"] = "ready"
    records = {
        ("ns", "lab"): [EnvironmentRecord(ENVIRONMENT, status)],
        ("ns", "other"): [EnvironmentRecord(other, ready)],
    }
    # A moment after the end, its stop's own removal may be under way (a pod terminating): left alone.
    ended_at = parse_time(status["stoppedAt"])
    soon = Reconciler(context, records, {"mem": [FLAVOR]}, clock=lambda: ended_at + datetime.timedelta(seconds=60))
    assert asyncio.run(sweep_orphans(soon)) == 0 and "u-1" in backend.running
    reconciler = Reconciler(
        context, records, {"mem": [FLAVOR]}, clock=lambda: ended_at + datetime.timedelta(seconds=121)
    )
    assert asyncio.run(sweep_orphans(reconciler)) == 1
    assert "u-1" not in backend.running and backend.running["u-2"] == "ready"
    assert ("ns", "aenv-lab") not in cluster.secrets


class Gone(Cluster):
    """The Cluster, whose API server has no AnalysisEnvironment at all: whatever a backend lists is an orphan."""

    async def environment_exists(self, namespace: str, name: str, uid: str) -> bool:
        return False


class Unlisted(MemoryBackend):
    """A backend whose listing fails: slurmrestd down, or an answer it cannot read."""

    kind = "unlisted"

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    async def list_managed(self) -> list[ManagedObject]:
        raise self.error


class Refusing(MemoryBackend):
    """A backend that will not remove some of its objects (a locked VM, a refused scancel, a 403)."""

    def __init__(self, refuse: dict[str, Exception]) -> None:
        super().__init__()
        self.refuse = refuse  # uid -> what its delete raises
        self.asked: list[str] = []

    async def delete(self, environment: Environment) -> bool:
        self.asked.append(environment.uid)
        if environment.uid in self.refuse:
            raise self.refuse[environment.uid]
        return await super().delete(environment)


def orphan_sweep(backends: dict) -> tuple[int, list[dict]]:
    """One orphan sweep over `backends`, every listed object an orphan: what it removed, what it logged."""
    from structlog.testing import capture_logs

    from analysis_operator.engine.sweep import sweep_orphans

    context = Context(kube=Gone(), backends=backends, access=Catalogue())
    with capture_logs() as logs:
        removed = asyncio.run(sweep_orphans(Reconciler(context, {}, {"mem": [FLAVOR]}, clock=lambda: NOW)))
    return removed, logs


@pytest.mark.parametrize(
    "error", [BackendUnavailable("slurmrestd does not answer"), ValueError("an answer that is not JSON")]
)
def test_a_backend_whose_listing_fails_leaves_the_others_orphans_removed(error):
    """Slurm down (or answering nonsense) before OpenStack in the list: its listing raised out of the
    sweep, and no orphan of the backends after it was removed, an ended VM running on uncharged."""
    after = MemoryBackend()
    after.running.update({"u-7": "ready", "u-8": "ready"})
    removed, logs = orphan_sweep({"unlisted": Unlisted(error), "memory": after})
    assert removed == 2 and after.running == {}
    failed = [entry for entry in logs if entry["event"] == "orphan.list_failed"]
    assert [(entry["backend"], entry["unavailable"]) for entry in failed] == [
        ("unlisted", isinstance(error, BackendUnavailable))
    ]


def test_an_orphan_whose_removal_is_refused_leaves_the_others_removed():
    """A Nova 409 on one locked server (a refused scancel, a 403 on a pod) raised out of the sweep:
    every orphan listed after it, of that backend and of the next ones, stayed."""
    refusing = Refusing({"u-2": RuntimeError("409 Conflict: server is locked")})
    refusing.running.update({"u-1": "ready", "u-2": "ready", "u-3": "ready"})
    after = MemoryBackend()
    after.running["u-9"] = "ready"
    removed, logs = orphan_sweep({"refusing": refusing, "memory": after})
    assert removed == 3 and refusing.running == {"u-2": "ready"} and after.running == {}
    failed = [entry for entry in logs if entry["event"] == "orphan.remove_failed"]
    assert [(entry["backend"], entry["backend_id"], entry["environment"]) for entry in failed] == [
        ("refusing", "u-2", "ns/lab")
    ]
    assert "409" in failed[0]["error"]


def test_a_backend_unavailable_at_removal_is_logged_once_and_the_next_backend_swept():
    """Unavailable is the backend's state, not the object's: told once per sweep, its other orphans
    left for the next sweep (each would wait on the same timeout), the next backend's removed."""
    down = Refusing({uid: BackendUnavailable("OpenStack cloud 'site' unreachable") for uid in ("u-1", "u-2")})
    down.running.update({"u-1": "ready", "u-2": "ready"})
    after = MemoryBackend()
    after.running["u-9"] = "ready"
    removed, logs = orphan_sweep({"down": down, "memory": after})
    assert removed == 1 and after.running == {} and down.asked == ["u-1"]
    assert [entry["backend"] for entry in logs if entry["event"] == "orphan.remove_failed"] == ["down"]


class Counting(Cluster):
    """The Cluster, counting its status writes."""

    def __init__(self) -> None:
        super().__init__()
        self.patches: list[dict] = []

    async def patch_environment_status(self, namespace: str, name: str, status: dict) -> bool:
        self.patches.append(dict(status))
        return await super().patch_environment_status(namespace, name, status)


def test_an_end_decided_as_the_backend_answers_again_says_it_answers():
    """The end is written by stop; the BackendReachable condition the converge adds after it (the
    backend answered again, and its job had ended meanwhile) is written too, not left saying for good
    that the backend does not answer."""
    cluster = Counting()
    backend, context, ready = running_lab(cluster)
    unreachable = {
        "type": "BackendReachable",
        "status": "False",
        "reason": "BackendUnavailable",
        "message": "slurmrestd does not answer",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }
    status = {**ready, "conditions": [*ready.get("conditions", []), unreachable]}
    backend.running["u-1"] = "failed"
    cluster.patches.clear()

    async def scenario():
        outcome = await converge(context, ENVIRONMENT, status, FLAVOR, NOW)
        await apply(context, ENVIRONMENT, outcome)

    asyncio.run(scenario())
    stored = cluster.status[("ns", "lab")]
    conditions = {c["type"]: c["status"] for c in stored["conditions"]}
    assert stored["phase"] == "Failed" and conditions["BackendReachable"] == "True", stored
    assert "u-1" not in backend.running


def test_an_end_while_a_quiet_first_status_is_held_is_one_write_with_both():
    """A quiet first status waits (reconciler.apply) to go out with the next; an end decided meanwhile
    (idle, a spent budget, a refusal) goes out in the same write, never the end alone first."""
    import time

    from analysis_operator.engine.converge import end
    from analysis_operator.model.domain import Phase

    cluster = Counting()
    backend, context, ready = running_lab(cluster)
    cluster.patches.clear()
    context.unwritten["u-1"] = (ENVIRONMENT, {"startedAt": "2026-01-01T00:00:00Z"}, time.monotonic() + 15)

    async def scenario():
        outcome = await end(context, ENVIRONMENT, FLAVOR, ready, Phase.STOPPED, "IdleStopped", "idle", NOW)
        await apply(context, ENVIRONMENT, outcome)

    asyncio.run(scenario())
    assert len(cluster.patches) == 1, cluster.patches
    assert cluster.patches[0]["phase"] == "Stopped" and cluster.patches[0]["startedAt"] == "2026-01-01T00:00:00Z"
    assert "u-1" not in context.unwritten and "u-1" not in backend.running
