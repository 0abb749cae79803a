"""One accounting tick over the indexes (engine/accounting.plan_tick): a pod is charged by its flavor
while its container runs as the backend sees it (Ready, or Running not Ready), from the moment it
became Ready or was first seen running; never while it waits for a node, an image or a missing claim,
or while its container keeps crashing, and time already charged is never charged again. A suspended
one is charged up to its suspension. Entries of namespaces another operator serves are left to it."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import types

import pytest

from analysis_operator.backends.base import Charging, Observation, State
from analysis_operator.backends.kubernetes import observe_pod
from analysis_operator.engine.accounting import charge_budget, plan_tick
from analysis_operator.engine.budget_gate import BudgetGate
from analysis_operator.engine.converge import Context
from analysis_operator.engine.ledger import Ledger, Views
from analysis_operator.engine.terms import build_terms
from analysis_operator.engine.views import EnvironmentRecord
from analysis_operator.model.domain import BackendKind, Environment, Flavor, Resources, format_time
from analysis_operator.policy.budgets import Budget
from analysis_operator.settings import BudgetSettings
from tests.unit.test_backend_interface import Cluster
from tests.unit.test_budget_gate import Api, entry

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
    # Suspended: the last tick did not see it run (no heldSince), so there is no time before the
    # suspension to charge either (see test_the_time_it_ran_before_a_suspension_is_charged_once).
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


# --- a pod is charged while its container runs, as the backend sees it now --------------------------

RUNNING_CONTAINER = {"name": "jupyterlab", "ready": False, "state": {"running": {"startedAt": "2026-11-30T11:00:00Z"}}}


def pod(phase: str, ready: bool = False, container: dict | None = None, unscheduled: str = "") -> dict:
    """A JupyterLab pod as the API server shows it (read by backends/kubernetes.observe_pod)."""
    scheduled = {"type": "PodScheduled", "status": "False" if unscheduled else "True", "message": unscheduled}
    conditions = [scheduled, {"type": "Ready", "status": "True" if ready else "False"}]
    return {
        "metadata": {"name": "aenv-lab", "namespace": "ns"},
        "spec": {
            **({} if unscheduled else {"nodeName": "node-1"}),
            "containers": [{"name": "jupyterlab", "resources": {"requests": {"cpu": "2"}}}],
        },
        "status": {"phase": phase, "conditions": conditions, "containerStatuses": [container] if container else []},
    }


def waiting(reason: str) -> dict:
    return {"name": "jupyterlab", "ready": False, "image": "jupyter", "state": {"waiting": {"reason": reason}}}


STOPPED_SERVER = pod("Running", container=RUNNING_CONTAINER)  # `kill -STOP` of jupyter-lab: not Ready, running
PODS = {
    "crash loop": pod("Running", container=waiting("CrashLoopBackOff")),
    "image pull": pod("Pending", container=waiting("ImagePullBackOff")),
    "container not created": pod("Pending", container=waiting("CreateContainerConfigError")),
    "claim missing": pod("Pending", unscheduled='persistentvolumeclaim "raw" not found'),
    "waiting for a node": pod("Pending", unscheduled="0/3 nodes are available: 3 Insufficient cpu."),
    "container being created": pod("Pending", container=waiting("ContainerCreating")),
}


def observed_tick(budget_: Budget, status_: dict, pod_: dict | None, moment=NOW) -> Budget:
    environments = {("ns", "lab"): [EnvironmentRecord(ENVIRONMENT, status_)]}
    observed = {"u-1": observe_pod(pod_)}
    result = plan_tick(budget_, environments, {"basic": [FLAVOR]}, {"kubernetes": Pods()}, moment, 80, "", observed)
    return Budget(**{**budget_.__dict__, "status": result.status})


def provisioning(reason: str, state: str) -> dict:
    backend = {"kind": "kubernetes", "name": "aenv-lab", "state": state, "node": "node-1"}
    return {"phase": "Provisioning", "reason": reason, "backend": backend, "conditions": []}


def test_a_running_pod_that_is_not_ready_is_charged():
    """jupyter-lab stopped by its owner (kill -STOP) while a background job keeps the GPU busy: the
    pod is Running, its readiness probe fails; the status says Provisioning, PodStarting."""
    ready = budget(NOW - 10 * MINUTE)
    ready = observed_tick(ready, status("Ready", NOW - 20 * MINUTE), pod("Running", True, RUNNING_CONTAINER))
    assert ready.entries["u-1"]["cpuHours"] == pytest.approx(2 * 10 / 60)
    later = NOW + 5 * MINUTE
    entry = observed_tick(ready, provisioning("PodStarting", "Running"), STOPPED_SERVER, later).entries["u-1"]
    assert entry["cpuHours"] == pytest.approx(2 * 15 / 60) and entry["chargedUntil"] == format_time(later)


@pytest.mark.parametrize("case", PODS)
def test_a_pod_whose_container_does_not_run_is_not_charged(case):
    status_ = {"phase": "Provisioning", "reason": observe_pod(PODS[case]).reason, "conditions": []}
    entry = observed_tick(budget(NOW - 5 * MINUTE), status_, PODS[case]).entries["u-1"]
    assert entry["cpuHours"] == 0.0 and entry["chargedUntil"] == format_time(NOW)


def test_a_server_ready_again_is_charged_for_all_the_time_it_ran_not_from_its_new_ready_time():
    """kill -STOP after one tick, kill -CONT just before the next: the Ready condition's new transition
    must not move the charge past the time the container ran not Ready."""
    charged = observed_tick(budget(NOW - 2 * MINUTE), status("Ready", NOW - 30 * MINUTE), pod("Running", True))
    charged = observed_tick(charged, provisioning("PodStarting", "Running"), STOPPED_SERVER, NOW + MINUTE)
    resumed = status("Ready", NOW + 2 * MINUTE - datetime.timedelta(seconds=5))  # CONT: Ready again
    entry = observed_tick(charged, resumed, pod("Running", True), NOW + 2 * MINUTE).entries["u-1"]
    assert entry["cpuHours"] == pytest.approx(2 * 4 / 60)  # every minute from NOW - 2 min to NOW + 2 min


def test_a_start_is_charged_from_ready_or_from_the_first_tick_that_sees_it_run():
    started = observed_tick(budget(NOW - 5 * MINUTE), status("Ready", NOW - 3 * MINUTE), pod("Running", True))
    assert started.entries["u-1"]["cpuHours"] == pytest.approx(2 * 3 / 60)  # not while it was pulling
    # Seen running before it is Ready (a server that never gets Ready, say): charged from that tick on.
    first = observed_tick(budget(NOW - 5 * MINUTE), provisioning("PodStarting", "Pending"), STOPPED_SERVER)
    assert first.entries["u-1"]["cpuHours"] == 0.0
    entry = observed_tick(first, provisioning("PodStarting", "Pending"), STOPPED_SERVER, NOW + MINUTE).entries["u-1"]
    assert entry["cpuHours"] == pytest.approx(2 / 60)


def test_a_crash_between_two_ticks_starts_the_charge_again_at_ready():
    charged = observed_tick(budget(NOW - MINUTE), status("Ready", NOW - 30 * MINUTE), pod("Running", True))
    crashing = observed_tick(charged, provisioning("ServerCrashing", "Running"), PODS["crash loop"], NOW + MINUTE)
    assert crashing.entries["u-1"]["cpuHours"] == pytest.approx(2 / 60)  # nothing for the crashing minute
    back = status("Ready", NOW + 3 * MINUTE)
    entry = observed_tick(crashing, back, pod("Running", True), NOW + 5 * MINUTE).entries["u-1"]
    assert entry["cpuHours"] == pytest.approx(2 * 3 / 60)


# --- a pod seen not running after missed ticks: charged up to when it stopped, or up to now ----------


def left_ready(at: datetime.datetime) -> dict:
    """What the operator writes when it sees the pod crash: Provisioning, and Ready False since then."""
    ready = {"type": "Ready", "status": "False", "reason": "ServerCrashing", "lastTransitionTime": format_time(at)}
    return {**provisioning("ServerCrashing", "Running"), "conditions": [ready]}


HOURS = 60 * MINUTE


@pytest.mark.parametrize(
    "since_last, status_, minutes_charged",
    [
        (MINUTE, provisioning("ServerCrashing", "Running"), 0),  # one interval: stopped when, unknown
        (3 * HOURS, provisioning("ServerCrashing", "Running"), 180),  # operator down: up to now, not free
        (3 * HOURS, left_ready(NOW + 10 * MINUTE), 10),  # seen to leave Ready: up to then
        (MINUTE, left_ready(NOW + MINUTE / 2), 0.5),
        (3 * HOURS, left_ready(NOW - 30 * MINUTE), 180),  # left Ready before the last charge: no stop time
    ],
)
def test_a_pod_found_not_running_is_charged_up_to_when_it_stopped(since_last, status_, minutes_charged):
    """The operator is down for hours; the first tick after sees the pod crashing (or its owner ended
    PID 1 from the terminal to get there): the hours it ran are charged, not lost."""
    charged = observed_tick(budget(NOW - MINUTE), status("Ready", NOW - 30 * MINUTE), pod("Running", True))
    found = observed_tick(charged, status_, PODS["crash loop"], NOW + since_last)
    entry = found.entries["u-1"]
    assert entry["cpuHours"] == pytest.approx(2 / 60 + 2 * minutes_charged / 60)
    assert entry["chargedUntil"] == format_time(NOW + since_last) and "heldSince" not in entry
    again = observed_tick(found, status_, PODS["crash loop"], NOW + since_last + MINUTE).entries["u-1"]
    assert again["cpuHours"] == entry["cpuHours"]  # once


def test_missed_ticks_are_told_by_the_charge_interval():
    charged = observed_tick(budget(NOW - MINUTE), status("Ready", NOW - 30 * MINUTE), pod("Running", True))
    environments = {("ns", "lab"): [EnvironmentRecord(ENVIRONMENT, provisioning("ServerCrashing", "Running"))]}
    observed = {"u-1": observe_pod(PODS["crash loop"])}
    for interval, charged_hours in [(3600.0, 0.0), (60.0, 2.0)]:  # an hour since the last tick
        result = plan_tick(
            charged, environments, {"basic": [FLAVOR]}, {"kubernetes": Pods()}, NOW + HOURS, 80, "", observed, interval
        )
        assert result.status["environments"]["u-1"]["cpuHours"] == pytest.approx(2 / 60 + charged_hours), interval


# --- a suspension between two ticks: charged up to it, once ---------------------------------------

SECOND = datetime.timedelta(seconds=1)
BATCH = Flavor(name="basic", backend=BackendKind.SLURM, resources=Resources(cpu="2"))


class Jobs:
    charging = Charging.ALLOCATION


def ran(at: datetime.datetime, job_started: datetime.datetime | None = None) -> dict:
    """Ready since `at`; a Slurm job holding 2 CPUs since `job_started` (its start time)."""
    if job_started is None:
        return status("Ready", at)
    held = {"kind": "slurm", "allocatedCpus": 2.0, "startedAt": format_time(job_started)}
    return {**status("Ready", at), "backend": held}


def suspended(at: datetime.datetime) -> dict:
    """What the Suspended transition writes: the phase, and Ready False since then."""
    ready = {"type": "Ready", "status": "False", "reason": "Suspended", "lastTransitionTime": format_time(at)}
    return {"phase": "Suspended", "reason": "Suspended", "backend": {"kind": "slurm"}, "conditions": [ready]}


def ticked(budget_: Budget, status_: dict, moment: datetime.datetime, slurm: bool) -> Budget:
    environments = {("ns", "lab"): [EnvironmentRecord(ENVIRONMENT, status_)]}
    flavors, backends = (
        ({"basic": [BATCH]}, {"slurm": Jobs()}) if slurm else ({"basic": [FLAVOR]}, {"kubernetes": Pods()})
    )
    result = plan_tick(budget_, environments, flavors, backends, moment, 80)
    return Budget(**{**budget_.__dict__, "status": result.status})


@pytest.mark.parametrize("slurm", [False, True], ids=["pod", "slurm job"])
def test_the_time_it_ran_before_a_suspension_is_charged_once(slurm):
    """Charged up to NOW, suspended 59 s later, the next tick a second after that: the 59 s it ran
    are charged (as an ended one up to stoppedAt), and not again by the ticks that follow, nor after
    it resumes (a Slurm job: a new job, a new start time)."""
    b = ticked(budget(NOW - MINUTE), ran(NOW - 30 * MINUTE, NOW - MINUTE if slurm else None), NOW, slurm)
    assert b.entries["u-1"]["cpuHours"] == pytest.approx(2 * 60 / 3600)
    b = ticked(b, suspended(NOW + 59 * SECOND), NOW + MINUTE, slurm)
    assert b.entries["u-1"]["cpuHours"] == pytest.approx(2 * 119 / 3600)
    assert b.entries["u-1"]["chargedUntil"] == format_time(NOW + MINUTE)
    for later in (2, 5):
        b = ticked(b, suspended(NOW + 59 * SECOND), NOW + later * MINUTE, slurm)
    assert b.entries["u-1"]["cpuHours"] == pytest.approx(2 * 119 / 3600)
    resumed = NOW + 10 * MINUTE
    b = ticked(b, ran(resumed, resumed if slurm else None), resumed + MINUTE, slurm)
    assert b.entries["u-1"]["cpuHours"] == pytest.approx(2 * 179 / 3600)


@pytest.mark.parametrize("slurm", [False, True], ids=["pod", "slurm job"])
def test_a_resume_and_suspend_between_two_ticks_is_charged(slurm):
    """The last tick saw it suspended; its owner resumes it just after, and suspends it again just before
    the next tick, over and over (the tick's time is in the budget's status): each run is charged, from
    the tick before it, not given away (it was: ten such runs of 58 s charged nothing)."""
    b = ticked(budget(NOW - MINUTE), suspended(NOW - HOURS), NOW, slurm)
    runs = 10
    for cycle in range(runs):
        tick = NOW + cycle * MINUTE
        b = ticked(b, suspended(tick + 58 * SECOND), tick + MINUTE, slurm)
    assert b.entries["u-1"]["cpuHours"] == pytest.approx(2 * runs * 58 / 3600)
    b = ticked(b, suspended(NOW + (runs - 1) * MINUTE + 58 * SECOND), NOW + (runs + 3) * MINUTE, slurm)
    assert b.entries["u-1"]["cpuHours"] == pytest.approx(2 * runs * 58 / 3600)  # once each


def test_a_suspension_charges_only_what_the_last_tick_saw_running():
    """Not Ready and not seen running (pulling its image) when suspended: nothing, as before; and the
    hours before a new month stay in the old one."""
    b = ticked(budget(NOW - MINUTE), provisioning("ImagePulling", "Pending"), NOW, False)
    b = ticked(b, suspended(NOW - 5 * MINUTE), NOW + MINUTE, False)  # Ready False since it was created
    assert b.entries["u-1"]["cpuHours"] == 0.0
    monthly = Budget(**{**budget(NOW - MINUTE).__dict__, "reset": "Monthly"})
    b = ticked(monthly, ran(NOW - 30 * MINUTE), NOW, False)
    december = datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)
    b = ticked(b, suspended(december + 30 * SECOND), december + MINUTE, False)
    assert b.used("cpuHours") == pytest.approx(2 * 30 / 3600)


# --- several operators, each serving its own namespace, share the cluster's budgets -----------------


def two_namespaces() -> Budget:
    entry = budget(NOW - 5 * MINUTE).entries["u-1"]
    entries = {"u-a": {**entry, "namespace": "ns-a"}, "u-b": {**entry, "namespace": "ns-b", "cpuHours": 1.0}}
    return Budget(name="b", user="alice", limits={"cpuHours": 100}, status={"environments": entries})


def serving(budget_: Budget, namespace: str):
    lab = Environment(namespace="ns-a", name="lab", uid="u-a", owner="alice", flavor="basic")
    environments = {("ns-a", "lab"): [EnvironmentRecord(lab, status("Ready", NOW - 10 * MINUTE))]}  # no ns-b
    return plan_tick(budget_, environments, {"basic": [FLAVOR]}, {"kubernetes": Pods()}, NOW, 80, namespace)


def test_an_operator_leaves_the_entries_of_namespaces_it_does_not_serve_as_they_are():
    before = two_namespaces()
    result = serving(before, "ns-a")
    assert result.status["environments"]["u-b"] == before.entries["u-b"]  # not ended, not charged, not moved
    assert result.status["environments"]["u-a"]["cpuHours"] == pytest.approx(2 * 5 / 60)
    assert result.status["running"]["environments"] == 2 and result.status.get("settled", {}).get("cpuHours") == 0


def test_an_operator_of_every_namespace_still_ends_an_entry_whose_environment_is_gone():
    result = serving(two_namespaces(), "")
    assert list(result.status["environments"]) == ["u-a"]
    assert result.status["settled"]["cpuHours"] == pytest.approx(1.0 + 2 * 5 / 60)


def test_a_spent_budget_leaves_the_other_namespaces_environments_to_their_operator():
    spent = two_namespaces()
    spent = Budget(**{**spent.__dict__, "limits": {"cpuHours": 0.5}})
    assert serving(spent, "ns-a").stop == ("u-a",)
    assert sorted(serving(spent, "").stop) == ["u-a"]  # u-b is gone: settled, not stopped


def test_a_new_period_forgets_the_other_namespaces_usage_too():
    monthly = Budget(**{**two_namespaces().__dict__, "reset": "Monthly"})
    monthly = Budget(**{**monthly.__dict__, "status": {**monthly.status, "periodStart": "2026-10-01T00:00:00Z"}})
    result = serving(monthly, "ns-a")
    other = result.status["environments"]["u-b"]
    assert other["cpuHours"] == 0.0 and other["chargedUntil"] == format_time(NOW - 5 * MINUTE)
    assert result.status["periodStart"] == "2026-11-01T00:00:00Z"


# --- the tick as the daemon runs it: what the backends see, and stops on the backend that runs it ----


class Recorder:
    """A backend charged by the flavor: what it observes, and what it was asked to delete."""

    charging = Charging.FLAVOR

    def __init__(self, observation: Observation | None = None) -> None:
        self.observation = observation or Observation(State.GONE)
        self.deleted: list[str] = []

    async def observe(self, environment: Environment) -> Observation:
        return self.observation

    async def delete(self, environment: Environment) -> bool:
        self.deleted.append(environment.uid)
        return True


def daemon_ticks(
    limits: dict,
    status_: dict,
    backends: dict,
    flavor: Flavor = FLAVOR,
    ticks: int = 1,
    deleting: bool = False,
    kube: Cluster | None = None,
) -> Api:
    """`ticks` of handlers/budgets.account, a minute apart, the last at NOW; the entry charged until 5 min before.
    `deleting`: the environment is being deleted, its finalizer waiting for its backend. `kube`: where
    the Events go (Cluster.events)."""
    api = Api(limits, {"u-1": {**entry("lab"), "cpus": 2.0, "chargedUntil": format_time(NOW - 5 * MINUTE)}})
    gate = BudgetGate(BudgetSettings(), Ledger(api, Views(api.index, {"alice": ["b"]}, {})))  # type: ignore[arg-type]
    lab = Environment("ns", "lab", "u-1", owner="alice", flavor="basic", deleting=deleting, finalizing=deleting)
    reconciler = types.SimpleNamespace(
        context=Context(kube=kube or Cluster(), backends=backends),
        environments={("ns", "lab"): [EnvironmentRecord(lab, status_)]},
        flavors={"basic": [flavor]},
    )
    for tick in reversed(range(ticks)):
        asyncio.run(charge_budget(gate, reconciler, "b", NOW - tick * MINUTE))  # type: ignore[arg-type]
    return api


def test_the_daemon_charges_what_the_pod_watch_sees_running_though_the_status_is_old():
    """status.backend.state is written with a change of phase or reason only: a pod that went from
    Pending to Running not Ready (PodStarting both) still says Pending there."""
    pods = Recorder(observe_pod(STOPPED_SERVER))
    api = daemon_ticks({"cpuHours": 100}, provisioning("PodStarting", "Pending"), {"kubernetes": pods}, ticks=2)
    # seen running at the first tick: charged from then on, not for the minutes before (a node, an image)
    assert api.entries["u-1"]["cpuHours"] == pytest.approx(2 / 60)


def test_a_spent_budget_stops_the_environment_on_the_backend_it_started_on():
    """The flavor was moved to another backend since it started: the pod is deleted, not a Slurm job
    of the same name, or the pod would run on uncharged while the environment says BudgetExhausted."""
    pods, slurm = Recorder(observe_pod(pod("Running", True))), Recorder()
    started = {**status("Ready", NOW - 10 * MINUTE), "terms": build_terms(FLAVOR), "backend": {"kind": "kubernetes"}}
    moved = dataclasses.replace(FLAVOR, backend=BackendKind.SLURM)
    api = daemon_ticks({"cpuHours": 0.01}, started, {"kubernetes": pods, "slurm": slurm}, flavor=moved)
    assert (pods.deleted, slurm.deleted) == (["u-1"], [])
    assert api.entries["u-1"]["cpuHours"] == pytest.approx(2 * 5 / 60)


def test_a_spent_budget_says_it_stops_an_environment_only_when_it_stops_one():
    """The Warning on the budget ("stopping N environment(s)") is posted when a stop happens, not at
    every tick while a suspended or deleted environment's entry is still in its ledger (it was posted
    every minute, saying it stopped what it left alone)."""

    class Told(Cluster):
        async def post_event(self, involved: dict, type_: str, reason: str, message: str) -> None:
            self.events.append((involved["kind"], reason, message))

    running = {**status("Ready", NOW - 10 * MINUTE), "terms": build_terms(FLAVOR), "backend": {"kind": "kubernetes"}}
    kube = Told()
    daemon_ticks({"cpuHours": 0.01}, running, {"kubernetes": Recorder(observe_pod(pod("Running", True)))}, kube=kube)
    told = [message for kind, reason, message in kube.events if (kind, reason) == ("ComputeBudget", "BudgetExhausted")]
    assert len(told) == 1 and told[0].endswith("stopping 1 environment(s)"), kube.events
    for left_alone, deleting in ((status("Suspended", NOW - 10 * MINUTE), False), (running, True)):
        kube = Told()
        pods = Recorder(observe_pod(pod("Running", True)))
        daemon_ticks({"cpuHours": 0.01}, left_alone, {"kubernetes": pods}, ticks=3, deleting=deleting, kube=kube)
        assert pods.deleted == [] and not [e for e in kube.events if e[1] == "BudgetExhausted"], kube.events


def test_a_spent_budget_leaves_an_environment_being_deleted_to_its_deletion():
    """Its finalizer waits for its backend (slurmrestd or OpenStack away): the budget's stop would write
    BudgetExhausted and settle it while its job or VM runs on, and wait for the lock its deletion holds.
    It is charged on instead, until the finalizer goes."""
    pods = Recorder(observe_pod(pod("Running", True)))
    started = {**status("Ready", NOW - 10 * MINUTE), "terms": build_terms(FLAVOR), "backend": {"kind": "kubernetes"}}
    api = daemon_ticks({"cpuHours": 0.01}, started, {"kubernetes": pods}, deleting=True)
    assert pods.deleted == [] and api.entries["u-1"]["cpuHours"] == pytest.approx(2 * 5 / 60)


@pytest.mark.parametrize("slurm", [False, True], ids=["pod", "slurm job"])
def test_a_short_run_after_ticks_that_failed_is_not_charged_for_the_hours_before_it(slurm):
    """The last tick written saw it suspended three hours ago (the ticks since failed, or a takeover
    waited); its owner resumes it, runs 30 s and suspends it: charged from no earlier than one and a half
    intervals before the suspension, not for three hours it never ran."""
    b = ticked(budget(NOW - MINUTE), suspended(NOW - HOURS), NOW, slurm)
    later = NOW + 3 * HOURS
    b = ticked(b, suspended(later + 30 * SECOND), later + MINUTE, slurm)
    assert b.entries["u-1"]["cpuHours"] == pytest.approx(2 * 90 / 3600)  # the 1.5 intervals before the suspension
