"""Budget accounting: one tick charges a budget's running environments and stops what it no longer covers.

What runs: a pod (charged by its flavor) from the moment it is Ready, never while it waits for a node,
an image or a missing claim; a Slurm job or VM (charged by allocation) while the backend says it holds.

The arithmetic is policy/budgets.charge; here the tick reads which ledger entries
still run (from the environments index, and the backend's allocation where the
backend charges by allocation), writes the ledger through `Ledger.update`, posts
the budget's Events and stops the environments a spent budget no longer covers.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

import structlog

from analysis_operator.backends.base import Backend, Charging
from analysis_operator.engine.budget_gate import BudgetGate
from analysis_operator.engine.converge import stop
from analysis_operator.engine.events import post_event
from analysis_operator.engine.reconciler import Reconciler, apply
from analysis_operator.engine.views import EnvironmentRecord, Index, first
from analysis_operator.model.domain import API_VERSION, Phase, format_time, is_terminal, parse_time
from analysis_operator.policy.budgets import Budget, Charge, Held, charge

log = structlog.get_logger("analysis_operator.accounting")


def _charges_allocation(record: EnvironmentRecord, flavors: Index, backends: Mapping[str, Backend]) -> bool:
    kind = (record.status.get("backend") or {}).get("kind")
    if not kind:
        flavor = first(flavors, record.environment.flavor)
        kind = flavor.backend if flavor is not None else ""
    backend = backends.get(kind)
    return backend is not None and backend.charging is Charging.ALLOCATION


def plan_tick(
    budget: Budget,
    environments: Index,
    flavors: Index,
    backends: Mapping[str, Backend],
    moment: datetime.datetime,
    warning_percent: float,
) -> Charge | None:
    """The charge for one tick (pure over the indexes it reads); None when an idle budget needs no write."""
    ended: dict[str, datetime.datetime | None] = {}
    paused: list[str] = []
    held: dict[str, Held] = {}
    ready_since: dict[str, datetime.datetime] = {}
    for uid, entry in budget.entries.items():
        record: EnvironmentRecord | None = first(environments, (entry.get("namespace"), entry.get("name")))
        if record is None or record.environment.uid != uid:
            ended[uid] = None
        elif is_terminal(record.status.get("phase")):
            ended[uid] = parse_time(record.status.get("stoppedAt"))
        elif record.status.get("phase") == Phase.SUSPENDED.value:
            paused.append(uid)
        elif _charges_allocation(record, flavors, backends):
            # Charged for what Slurm allocated / the server holds, only while it holds it.
            backend = record.status.get("backend") or {}
            if "allocatedCpus" in backend:
                held[uid] = Held(
                    float(backend["allocatedCpus"]),
                    int(backend.get("allocatedGpus") or 0),
                    parse_time(backend.get("startedAt")),
                )
            else:
                paused.append(uid)
        elif record.status.get("phase") != Phase.READY.value:
            paused.append(uid)  # charged by the flavor, but only while it runs: not while pulling or unschedulable
        else:
            ready = _ready_since(record.status)
            if ready is not None:
                ready_since[uid] = ready
    budget = _charged_from(budget, ready_since)
    result = charge(budget, ended, moment, warning_percent, paused, held)
    idle = not budget.entries and _same(budget.status, result.status)
    return None if idle else result


def _ready_since(status: Mapping[str, Any]) -> datetime.datetime | None:
    """When the environment last became Ready (its Ready condition's transition)."""
    ready = {c.get("type"): c for c in status.get("conditions") or ()}.get("Ready") or {}
    return parse_time(ready.get("lastTransitionTime")) if ready.get("status") == "True" else None


def _charged_from(budget: Budget, ready_since: Mapping[str, datetime.datetime]) -> Budget:
    """Entries charged by the flavor start at their Ready time, not at the tick that first saw them
    Ready: chargedUntil moves forward to it (never back, so time already charged is not charged again)."""
    moved = {}
    for uid, ready in ready_since.items():
        entry = budget.entries.get(uid) or {}
        charged_until = parse_time(entry.get("chargedUntil"))
        if charged_until is not None and charged_until < ready.replace(microsecond=0):
            moved[uid] = {**entry, "chargedUntil": format_time(ready)}
    if not moved:
        return budget
    return Budget(**{**budget.__dict__, "status": {**budget.status, "environments": {**budget.entries, **moved}}})


def _not_running(record: EnvironmentRecord) -> bool:
    phase = record.status.get("phase")
    return is_terminal(phase) or phase == Phase.SUSPENDED.value


def _same(before: Mapping[str, Any], after: Mapping[str, Any]) -> bool:
    """Equal apart from the time stamps a tick always moves (no write for an idle budget)."""

    def strip(status: Mapping[str, Any]) -> dict[str, Any]:
        used = {k: v for k, v in (status.get("used") or {}).items() if k != "updatedAt"}
        conditions = [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status.get("conditions") or ()]
        return {**status, "used": used, "conditions": conditions}

    return strip(before) == strip(after)


async def charge_budget(gate: BudgetGate, reconciler: Reconciler, name: str, moment: datetime.datetime) -> None:
    context = reconciler.context
    environments, flavors = reconciler.environments, reconciler.flavors

    def decide(budget: Budget) -> Charge | None:
        return plan_tick(budget, environments, flavors, context.backends, moment, gate.settings.warning_percent)

    result: Charge | None = await gate.ledger.update(name, decide, lambda result: result.status if result else None)
    if result is None:
        return
    budget_reference = {
        "apiVersion": API_VERSION,
        "kind": "ComputeBudget",
        "metadata": {"name": name, "namespace": "default"},
    }
    for type_, reason, message in result.events:
        await post_event(context.kube, budget_reference, type_, reason, message)
    for uid in result.stop:
        entry = (result.status.get("environments") or {}).get(uid) or {}
        record: EnvironmentRecord | None = first(environments, (entry.get("namespace"), entry.get("name")))
        if record is None or record.environment.uid != uid or _not_running(record):
            continue
        environment = record.environment
        outcome = await stop(
            context,
            environment,
            first(flavors, environment.flavor),
            record.status,
            Phase.BUDGET_EXHAUSTED,
            "BudgetExhausted",
            result.reason,
            moment,
        )
        await apply(context, environment, outcome)
        log.warning(
            "budget.environment_stopped",
            budget=name,
            environment=f"{environment.namespace}/{environment.name}",
            reason=result.reason,
        )
