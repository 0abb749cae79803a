"""Budgets that change under running environments (engine/budget_gate.py, engine/ledger.py): which of
a user's two personal budgets an environment draws on, the started environments the sweep must
reconcile again because their budget was deleted, or deleted and created again (BudgetGate.unheld),
and how such an environment is put back in a ledger (BudgetGate.check).
The real API server's side is in tests/integration/test_budgets.py."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import types
from typing import Any

import pytest

from analysis_operator.engine.budget_gate import UNCOVERED_GRACE_SECONDS, BudgetGate
from analysis_operator.engine.ledger import Ledger, Views
from analysis_operator.engine.views import EnvironmentRecord
from analysis_operator.handlers.budgets import on_budget_seen, on_indexes_filled
from analysis_operator.model.domain import BackendKind, Environment, Flavor, Phase, Resources, format_time
from analysis_operator.policy.budgets import Budget, Held, charge
from analysis_operator.settings import BudgetSettings

T0 = datetime.datetime(2026, 3, 10, 12, 0, tzinfo=datetime.UTC)
GPU = Flavor("gpu", BackendKind.KUBERNETES, resources=Resources(cpu="1", gpu=1))
LAB = Environment("ns", "lab", "u-1", owner="alice", flavor="gpu")
READY = {"phase": "Ready", "startedAt": format_time(T0)}


def held(name: str) -> dict[str, Any]:
    at = format_time(T0)
    return {"namespace": "ns", "name": name, "cpus": 1, "gpus": 1, "since": at, "chargedUntil": at}


class Api:
    """ComputeBudgets as the API server has them, and the kopf indexes a watch keeps of them."""

    def __init__(self) -> None:
        self.bodies: dict[str, dict[str, Any]] = {}
        self.budgets: dict[str, list[Budget]] = {}
        self.personal: dict[str, list[str]] = {}
        self.entries: dict[str, list[str]] = {}

    def add(self, name: str, limits: dict, entries: dict | None = None, **spec: str) -> None:
        self.bodies[name] = {
            "metadata": {"name": name, "resourceVersion": "1"},
            "spec": {"limits": limits, **spec},
            "status": {"environments": entries or {}},
        }
        if spec.get("user"):
            self.personal.setdefault(spec["user"], []).append(name)
        self._index(name)

    def delete(self, name: str) -> None:
        body = self.bodies.pop(name)
        self.budgets.pop(name)
        self.personal[body["spec"]["user"]].remove(name)
        self._index(name)

    def _index(self, name: str) -> None:
        for holders in self.entries.values():
            if name in holders:
                holders.remove(name)
        if name in self.bodies:
            self.budgets[name] = [Budget.from_body(self.bodies[name])]
            for uid in self.bodies[name]["status"].get("environments") or {}:
                self.entries.setdefault(uid, []).append(name)

    async def get_cluster_object(self, plural: str, name: str) -> dict | None:
        return self.bodies.get(name)

    async def replace_cluster_status(self, plural: str, body: dict) -> dict:
        name = body["metadata"]["name"]
        version = str(int(body["metadata"]["resourceVersion"]) + 1)
        self.bodies[name] = {**body, "metadata": {**body["metadata"], "resourceVersion": version}}
        self._index(name)
        return self.bodies[name]

    def holders(self, uid: str) -> list[str]:
        return sorted(name for name, body in self.bodies.items() if uid in body["status"].get("environments", {}))


def gate(api: Api, **settings: Any) -> BudgetGate:
    views = Views(api.budgets, api.personal, {}, api.entries)
    g = BudgetGate(BudgetSettings(**settings), Ledger(api, views))  # type: ignore[arg-type]
    g.indexed = True
    return g


# --- two personal budgets of one user -------------------------------------------------------------------


@pytest.mark.parametrize("listed", [["user-alice", "alice-2027"], ["alice-2027", "user-alice"]])
@pytest.mark.parametrize(
    ("holders", "chosen"),
    [
        ([], "alice-2027"),  # a create: the first by name, whatever order the index lists them in
        (["user-alice"], "user-alice"),  # the one that holds it already
        (["team"], "alice-2027"),  # held by a budget that is not hers: not a personal choice
        (["user-alice", "alice-2027"], "alice-2027"),  # held in both (before this was fixed): one of them
    ],
)
def test_of_two_personal_budgets_the_one_holding_the_environment_wins_else_the_first_by_name(listed, holders, chosen):
    views = Views({}, {"alice": listed}, {}, {"u-1": holders})
    assert views.personal_budget("alice", "u-1") == chosen
    assert views.personal_budget("bob", "u-1") is None


def test_a_resumed_environment_is_not_reserved_again_in_its_owners_other_personal_budget():
    """After a restart the index lists alice-2027 first: the check of alice's running environment
    must find it in user-alice, not reserve it in alice-2027 (both would charge it)."""
    api = Api()
    api.add("alice-2027", {"gpuHours": 20}, user="alice")
    api.add("user-alice", {"gpuHours": 20}, {"u-1": held("lab")}, user="alice")
    g = gate(api)
    assert asyncio.run(g.check(LAB, GPU, READY, T0)) is None
    assert api.holders("u-1") == ["user-alice"]
    assert g.unheld([EnvironmentRecord(LAB, READY)], 0.0) == set()


# --- a budget deleted, or deleted and created again -----------------------------------------------------


def test_a_running_environment_is_reserved_in_its_re_created_budget_and_counted_there():
    api = Api()
    api.add("user-alice", {"gpuHours": 20, "maxEnvironments": 1}, {"u-1": held("lab")}, user="alice")
    g = gate(api)
    running = [EnvironmentRecord(LAB, READY)]
    assert g.unheld(running, 0.0) == set()
    api.delete("user-alice")
    api.add("user-alice", {"gpuHours": 20, "maxEnvironments": 1}, user="alice")  # kubectl replace --force
    assert g.admit("ns", "lab2", "alice", "", GPU, {}, T0, hold=False) is None  # the ledger lost it: uncounted
    assert g.unheld(running, 0.0, at_once=True) == {"u-1"}  # the budget's arrival: reserved, not stopped
    assert g.unheld(running, 0.0) == set()  # a sweep: not at the first look (the ledger's index may lag)
    assert g.unheld(running, UNCOVERED_GRACE_SECONDS / 2) == set()
    assert g.unheld(running, UNCOVERED_GRACE_SECONDS) == {"u-1"}  # still unheld a grace later: due
    assert asyncio.run(g.check(LAB, GPU, READY, T0)) is None  # what the sweep's reconcile does
    assert api.holders("u-1") == ["user-alice"]
    assert g.unheld(running, 2 * UNCOVERED_GRACE_SECONDS) == set()
    refusal = g.admit("ns", "lab2", "alice", "", GPU, {}, T0, hold=False)
    assert refusal is not None and refusal.reason == "TooManyEnvironments"


def test_an_environment_no_budget_covers_any_more_is_stopped_after_a_grace():
    api = Api()
    api.add("user-alice", {"gpuHours": 20}, {"u-1": held("lab")}, user="alice")
    g = gate(api)
    running = [EnvironmentRecord(LAB, READY)]
    api.delete("user-alice")
    assert g.unheld(running, 100.0) == set()  # a replace creates it again in a moment
    assert g.unheld(running, 100.0 + UNCOVERED_GRACE_SECONDS / 2) == set()
    assert g.unheld(running, 100.0 + UNCOVERED_GRACE_SECONDS) == {"u-1"}
    refusal = asyncio.run(g.check(LAB, GPU, READY, T0))
    assert refusal is not None and (refusal.reason, refusal.phase) == ("NoBudget", Phase.STOPPED)
    assert refusal.message.startswith("budget withdrawn, the environment was stopped: user 'alice' has no")
    # Covered again in between (created again late): the grace starts over if it goes again.
    api.add("user-alice", {"gpuHours": 20}, {"u-1": held("lab")}, user="alice")
    assert g.unheld(running, 200.0) == set()
    api.delete("user-alice")
    assert g.unheld(running, 201.0) == set()


@pytest.mark.parametrize(
    ("environment", "status", "settings", "indexed"),
    [
        (LAB, {"phase": "Stopped"}, {}, True),  # over
        (LAB, {"phase": "Pending"}, {}, True),  # never started: its own converge decides
        (LAB, {"phase": "Stopping"}, {}, True),
        (dataclasses.replace(LAB, deleting=True), READY, {}, True),
        (LAB, READY, {"require_budget": False}, True),  # runs unmetered without a budget
        (LAB, READY, {"enabled": False}, True),
        (LAB, READY, {}, False),  # kopf has not handed a budget over yet: the indexes may be incomplete
    ],
)
def test_nothing_else_is_reconciled_again(environment, status, settings, indexed):
    api = Api()
    g = gate(api, **settings)
    g.indexed = indexed
    assert g.unheld([EnvironmentRecord(environment, status)], 0.0) == set()
    assert g.unheld([EnvironmentRecord(environment, status)], 1000.0) == set()


# --- what is put back in a ledger, and how (BudgetGate.check, rejoin) -------------------------------------


class Running(Api):
    """The API server's answer for a ledger entry's environment (BudgetGate.confirm): it runs."""

    async def get_environment(self, namespace: str, name: str, urgent: bool = False) -> dict:
        return {"metadata": {"uid": {"lab0": "u-0", "lab": "u-1"}[name]}, "status": READY}


def _two_running_on_a_grant(api: Api) -> tuple[Environment, Environment]:
    """alice was granted one more environment (status.grants): two run on a spec limit of 1."""
    api.add(
        "user-alice", {"gpuHours": 20, "maxEnvironments": 1}, {"u-1": held("lab"), "u-0": held("lab0")}, user="alice"
    )
    api.bodies["user-alice"]["status"]["grants"] = {"r-1": {"maxEnvironments": 1}}
    api._index("user-alice")
    return dataclasses.replace(LAB, name="lab0", uid="u-0"), LAB


@pytest.mark.parametrize(
    "status",
    [READY, {"phase": "Suspended"}, {"phase": "Provisioning"}, {"phase": "Pending", "startedAt": format_time(T0)}],
)
def test_running_environments_over_the_limit_of_their_re_created_budget_are_put_back_not_stopped(status):
    """kubectl replace --force takes the grants with the ledger: both run on, counted (a limit lowered
    in place never stops what runs either), and a new one is refused while they are over the limit."""
    api = Running()
    first, second = _two_running_on_a_grant(api)
    g = gate(api)
    api.delete("user-alice")
    api.add("user-alice", {"gpuHours": 20, "maxEnvironments": 1}, user="alice")
    assert asyncio.run(g.check(first, GPU, status, T0)) is None
    assert asyncio.run(g.check(second, GPU, status, T0)) is None
    assert api.holders("u-0") == api.holders("u-1") == ["user-alice"]
    assert api.bodies["user-alice"]["status"]["running"] == {"environments": 2, "gpus": 2}
    refusal = g.admit("ns", "lab2", "alice", "", GPU, {}, T0, hold=False)
    assert refusal is not None and refusal.reason == "TooManyEnvironments"
    assert "2 are running" in refusal.message
    # A start is judged as before: it does not fit.
    new = dataclasses.replace(LAB, name="lab2", uid="u-2")
    refusal = asyncio.run(g.check(new, GPU, {}, T0))
    assert refusal is not None and (refusal.reason, refusal.phase) == ("TooManyEnvironments", Phase.REJECTED)


def test_a_running_environment_put_back_in_a_spent_budget_is_stopped_as_any_that_runs_on_it():
    api = Api()
    api.add("user-alice", {"gpuHours": 20}, {"u-1": held("lab")}, user="alice")
    g = gate(api)
    api.delete("user-alice")
    api.add("user-alice", {"gpuHours": 0}, user="alice")
    refusal = asyncio.run(g.check(LAB, GPU, READY, T0))
    assert refusal is not None and (refusal.reason, refusal.phase) == ("BudgetExhausted", Phase.BUDGET_EXHAUSTED)


SLURM = Flavor("hpc", BackendKind.SLURM, resources=Resources(cpu="4"))


def test_a_slurm_job_put_back_is_charged_from_then_not_from_the_start_of_the_job():
    """A 4-CPU job that has run 3 days, put back in its re-created budget: its first tick charges the
    minute since, not 288 CPU-hours (policy/budgets.charge charges a job from its start otherwise)."""
    job = Environment("ns", "hpc", "u-9", owner="alice", flavor="hpc")
    started = T0 - datetime.timedelta(days=3)
    status = {"phase": "Ready", "startedAt": format_time(started), "backend": {"startedAt": format_time(started)}}
    api = Api()
    api.add("user-alice", {"cpuHours": 500}, user="alice")
    g = gate(api)
    assert asyncio.run(g.check(job, SLURM, status, T0)) is None
    tick = T0 + datetime.timedelta(minutes=1)
    charged = charge(Budget.from_body(api.bodies["user-alice"]), {}, tick, 80, held={"u-9": Held(4.0, 0, started)})
    assert charged.status["environments"]["u-9"]["cpuHours"] == pytest.approx(4 / 60)


# --- a budget's arrival, and the indexes filled (handlers/budgets.py) ------------------------------------


class Reconciler:
    """Reconciles that never end (a slow backend): a handler awaiting one would never return."""

    def __init__(self, records: list[EnvironmentRecord]) -> None:
        self.environments = {(r.environment.namespace, r.environment.name): [r] for r in records}
        self.requeued: list[tuple[str, float]] = []

    async def reconcile(self, record: EnvironmentRecord, now: Any = None) -> None:
        await asyncio.Event().wait()

    def requeue(self, record: EnvironmentRecord, delay: float, hold: bool = False) -> None:
        self.requeued.append((record.environment.uid, delay))


def test_a_budgets_arrival_schedules_the_reconciles_of_what_it_is_to_hold_and_returns():
    """kopf hands the budget's next events (its own index updates) over only once the handler returns."""
    api = Api()
    api.add("team", {"gpuHours": 20}, group="proposal")
    g = gate(api)
    g.indexed = False
    mine = dataclasses.replace(LAB, budget="team")
    g.ledger.views = Views(api.budgets, api.personal, {"proposal": [["alice"]]}, api.entries)
    reconciler = Reconciler([EnvironmentRecord(mine, READY)])
    memo = types.SimpleNamespace(budget_gate=g, reconciler=reconciler)

    async def arrive() -> None:
        await asyncio.wait_for(on_budget_seen(type="ADDED", name="team", spec={"group": "proposal"}, memo=memo), 2)

    asyncio.run(arrive())
    assert g.indexed
    assert reconciler.requeued == [("u-1", 0)]


def test_an_environments_event_says_the_indexes_are_filled_when_no_budget_does():
    """No ComputeBudget at start: nothing else sets it, and the sweep never stopped the environments
    whose budget was deleted while the operator was down."""
    api = Api()
    g = gate(api)
    g.indexed = False
    asyncio.run(on_indexes_filled(memo=types.SimpleNamespace(budget_gate=g)))
    assert g.indexed
    api.add("user-bob", {"gpuHours": 20}, user="bob")  # alice's is gone
    running = [EnvironmentRecord(LAB, READY)]
    assert g.unheld(running, 0.0) == set()
    assert g.unheld(running, UNCOVERED_GRACE_SECONDS) == {"u-1"}
