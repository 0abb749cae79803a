"""Budget accounting: one tick charges a budget's running environments and stops what it no longer covers.

What runs: a pod (charged by its flavor) while its container runs, as the backend sees it at the
tick: Ready, or not Ready with its pod Running (JupyterLab starting, or stopped by its owner while
the rest of the container goes on); never while it waits for a node, an image or a missing claim,
or while its container keeps crashing. A Slurm job or VM (charged by allocation) while the backend
says it holds. A suspended one up to its suspension (the Ready condition's transition), once; one
that stopped running since the last tick likewise, up to when it left Ready, or when ticks were
missed and that is not known, up to the tick (_stopped_at).

The arithmetic is policy/budgets.charge; here the tick reads which ledger entries
still run (from the environments index and what the backends observe now), writes the
ledger through `Ledger.update`, posts the budget's Events and stops the environments a
spent budget no longer covers. Entries of environments in namespaces this operator does
not serve (several releases, each with its own watchNamespace, share the cluster-scoped
budgets) are another release's to charge and settle: they are left as they are.
"""

from __future__ import annotations

import datetime
from collections.abc import Collection, Mapping
from typing import Any

import structlog

from analysis_operator.backends.base import Backend, BackendUnavailable, Charging, Observation
from analysis_operator.engine.budget_gate import BudgetGate
from analysis_operator.engine.converge import end
from analysis_operator.engine.events import post_event
from analysis_operator.engine.reconciler import Reconciler, apply
from analysis_operator.engine.terms import flavor_for
from analysis_operator.engine.views import EnvironmentRecord, Index, first
from analysis_operator.model.domain import API_VERSION, Phase, format_time, is_terminal, parse_time
from analysis_operator.policy.budgets import Budget, Charge, Held, charge

log = structlog.get_logger("analysis_operator.accounting")


def _backend_of(record: EnvironmentRecord, flavors: Index, backends: Mapping[str, Backend]) -> Backend | None:
    """The backend that runs it: as status says, else the flavor it started on (its terms)."""
    kind = (record.status.get("backend") or {}).get("kind")
    if not kind:
        flavor = flavor_for(record.environment, record.status, flavors)
        kind = flavor.backend if flavor is not None else ""
    return backends.get(kind)


def _charges_allocation(record: EnvironmentRecord, flavors: Index, backends: Mapping[str, Backend]) -> bool:
    backend = _backend_of(record, flavors, backends)
    return backend is not None and backend.charging is Charging.ALLOCATION


def serves(namespace: str, entry: Mapping[str, Any]) -> bool:
    """Is this ledger entry's environment in the namespace this operator serves ("": all)?"""
    return not namespace or (entry.get("namespace") or namespace) == namespace


def plan_tick(
    budget: Budget,
    environments: Index,
    flavors: Index,
    backends: Mapping[str, Backend],
    moment: datetime.datetime,
    warning_percent: float,
    namespace: str = "",
    observed: Mapping[str, Observation] | None = None,
    interval: float = 60.0,
) -> Charge | None:
    """The charge for one tick (pure over what it is given); None when an idle budget needs no write.
    `namespace`: the one this operator serves ("": all); its environments index has no other, so an
    entry elsewhere is left alone rather than taken for ended. `observed`: what the backends that
    charge by the flavor say now of the entries' environments (see charge_budget). `interval`: the
    seconds between two ticks (settings: charge_interval_seconds), to tell ticks missed."""
    ended: dict[str, datetime.datetime | None] = {}
    paused: list[str] = []
    suspended: dict[str, datetime.datetime] = {}  # paused or waiting, but ran since the last tick: until then
    held: dict[str, Held] = {}
    # charged by the flavor: running (uid -> when it became Ready, None: not Ready), or not
    running: dict[str, datetime.datetime | None] = {}
    waiting: list[str] = []
    between: dict[str, datetime.datetime] = {}  # resumed and suspended between two ticks: charged from then on
    foreign: list[str] = []
    observed = observed or {}
    for uid, entry in budget.entries.items():
        if not serves(namespace, entry):
            foreign.append(uid)
            continue
        record: EnvironmentRecord | None = first(environments, (entry.get("namespace"), entry.get("name")))
        if record is None or record.environment.uid != uid:
            ended[uid] = None
        elif is_terminal(record.status.get("phase")):
            ended[uid] = parse_time(record.status.get("stoppedAt"))
        elif _charges_allocation(record, flavors, backends):
            # Charged for what Slurm allocated / the server holds, only while it holds it.
            backend = record.status.get("backend") or {}
            if record.status.get("phase") != Phase.SUSPENDED.value and "allocatedCpus" in backend:
                held[uid] = Held(
                    float(backend["allocatedCpus"]),
                    int(backend.get("allocatedGpus") or 0),
                    parse_time(backend.get("startedAt")),
                )
            else:
                paused.append(uid)
        elif record.status.get("phase") != Phase.SUSPENDED.value and runs(observed.get(uid), record.status):
            running[uid] = _ready_since(record.status)
        else:
            waiting.append(uid)  # charged by the flavor, but only while it runs
            if (at := _stopped_at(entry, record.status, moment, interval)) is not None:
                suspended[uid] = at
        if record is not None and (at := _suspended_at(entry, record.status)) is not None:
            suspended[uid] = at
            if not entry.get("heldSince"):  # ran between two ticks: from no earlier than one tick before
                between[uid] = at - datetime.timedelta(seconds=MISSED_TICK * interval)
    budget = _charged_from(budget, running, waiting, moment, between)
    paused.extend(waiting)
    result = charge(budget, ended, moment, warning_percent, paused, held, foreign, suspended)
    idle = not budget.entries and _same(budget.status, result.status)
    return None if idle else result


def runs(observation: Observation | None, status: Mapping[str, Any]) -> bool:
    """Does an environment charged by its flavor run? As its backend sees it now (Observation.runs:
    a pod Ready, or Running with nothing wrong with its container), since status.backend.state is
    written with a change of phase or reason only. Without an observation (a slot taken since they
    were read): Ready, as its status says."""
    if observation is None:
        return status.get("phase") == Phase.READY.value
    return observation.runs


def _ready_since(status: Mapping[str, Any]) -> datetime.datetime | None:
    """When the environment last became Ready (its Ready condition's transition); None if not Ready."""
    ready = {c.get("type"): c for c in status.get("conditions") or ()}.get("Ready") or {}
    return parse_time(ready.get("lastTransitionTime")) if ready.get("status") == "True" else None


def _suspended_at(entry: Mapping[str, Any], status: Mapping[str, Any]) -> datetime.datetime | None:
    """When a suspended environment stopped: the Suspended transition set Ready False, so its Ready
    condition's lastTransitionTime (exact for one suspended while Ready). It is charged from its last
    charge up to then, once, as an ended one up to stoppedAt, not for up to a tick (more when ticks were
    missed) for free. Also one the last tick saw suspended (no heldSince) and that ran since: resumed and
    suspended again between two ticks, its Ready turned False after that tick, so it was Ready in between;
    when it became Ready is not kept, so it is charged from that tick (up to one charge interval more
    than it ran, never less: before, every such run was free, and a resume and suspend around each tick
    ran most of the time uncharged; and from no earlier than one and a half intervals before the
    suspension, whatever a failed tick left in chargedUntil: _charged_from). One not Ready when
    suspended keeps its earlier time there: charged
    for nothing more, since chargedUntil never moves back."""
    if status.get("phase") != Phase.SUSPENDED.value:
        return None
    ready = {c.get("type"): c for c in status.get("conditions") or ()}.get("Ready") or {}
    return parse_time(ready.get("lastTransitionTime")) if ready.get("status") == "False" else None


# A tick was missed when the last charge is this many intervals old (one interval and a tick's own time
# is the usual gap between two ticks).
MISSED_TICK = 1.5


def _stopped_at(
    entry: Mapping[str, Any], status: Mapping[str, Any], moment: datetime.datetime, interval: float
) -> datetime.datetime | None:
    """When an environment charged by the flavor that ran at the last tick (heldSince) and runs no more
    (its container crashed, its owner ended PID 1, its pod was lost) stopped, as far as can be told: it
    is charged up to then, once. When it left Ready after the last charge, then (its Ready condition's
    transition: when the operator saw it, exact while the operator runs). Else, when ticks were missed
    (the operator was down), up to now: it may have run all that time, and a facility would rather
    charge an outage than give it away (hours for nothing to whoever crashes their pod before the
    operator is back). Else nothing: it stopped at an unknown moment within the last interval (a
    crash between two ticks). Suspended ones are _suspended_at's."""
    charged_until = parse_time(entry.get("chargedUntil"))
    if status.get("phase") == Phase.SUSPENDED.value or not entry.get("heldSince") or charged_until is None:
        return None
    ready = {c.get("type"): c for c in status.get("conditions") or ()}.get("Ready") or {}
    left = parse_time(ready.get("lastTransitionTime")) if ready.get("status") == "False" else None
    if left is not None and left > charged_until:
        return left
    if (moment - charged_until).total_seconds() > MISSED_TICK * interval:
        return moment
    return None


def _charged_from(
    budget: Budget,
    running: Mapping[str, datetime.datetime | None],
    waiting: Collection[str],
    moment: datetime.datetime,
    between: Mapping[str, datetime.datetime] | None = None,
) -> Budget:
    """Where the charge of entries charged by the flavor starts. `heldSince` marks an entry the last tick
    saw running: it is charged on from chargedUntil, whatever its Ready time says (a server stopped for
    a while and Ready again ran all along). One that starts running (the last tick saw it waiting, or
    suspended) is charged from when it became Ready, not from the tick before; or from this tick if it
    runs without being Ready yet: not for the time it may have waited for a node or an image. Time
    already charged is never charged again (chargedUntil only moves forward). One that does not run
    (`waiting`) loses the mark. One resumed and suspended again since the last tick (`between`: uid -> the
    earliest it may have started) is charged from no earlier than that: a chargedUntil left hours behind
    by a failed tick or a takeover would otherwise charge hours it never ran."""
    changed = {}
    for uid, earliest in (between or {}).items():
        entry = budget.entries[uid]
        charged_until = parse_time(entry.get("chargedUntil"))
        if charged_until is not None and charged_until < earliest:
            changed[uid] = {**entry, "chargedUntil": format_time(earliest.replace(microsecond=0))}
    for uid, ready in running.items():
        entry = budget.entries[uid]
        if entry.get("heldSince"):
            continue
        charged_until = parse_time(entry.get("chargedUntil")) or moment
        start = max(charged_until, ready.replace(microsecond=0)) if ready is not None else moment
        changed[uid] = {**entry, "chargedUntil": format_time(start), "heldSince": format_time(start)}
    for uid in waiting:
        entry = changed.get(uid) or budget.entries[uid]
        if "heldSince" in entry:
            changed[uid] = {key: value for key, value in entry.items() if key != "heldSince"}
    if not changed:
        return budget
    return Budget(**{**budget.__dict__, "status": {**budget.status, "environments": {**budget.entries, **changed}}})


def _stoppable(uid: str, result: Charge, environments: Index) -> EnvironmentRecord | None:
    """The environment of the budget's stop list as the index has it now, if a stop would end it: not
    one already ended or suspended, nor one being deleted (its deletion ends it: settled when its job
    or VM is gone)."""
    entry = (result.status.get("environments") or {}).get(uid) or {}
    record: EnvironmentRecord | None = first(environments, (entry.get("namespace"), entry.get("name")))
    if record is None or record.environment.uid != uid or _not_running(record) or record.environment.deleting:
        return None
    return record


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


async def observe_running(
    budget: Budget | None, environments: Index, flavors: Index, backends: Mapping[str, Backend], namespace: str = ""
) -> dict[str, Observation]:
    """What the backends that charge by the flavor see now of the budget's live environments (a pod: the
    pod watch's summary, in memory), by uid: the tick's `observed`. Read before the ledger, from the
    budget as the index has it: an entry added meanwhile is judged by its status this once."""
    observed: dict[str, Observation] = {}
    for uid, entry in (budget.entries if budget is not None else {}).items():
        record: EnvironmentRecord | None = first(environments, (entry.get("namespace"), entry.get("name")))
        if not serves(namespace, entry) or record is None or record.environment.uid != uid:
            continue
        backend = _backend_of(record, flavors, backends)
        if backend is None or backend.charging is not Charging.FLAVOR or _not_running(record):
            continue
        try:
            observed[uid] = await backend.observe(record.environment)
        except BackendUnavailable:
            continue
    return observed


async def charge_budget(
    gate: BudgetGate, reconciler: Reconciler, name: str, moment: datetime.datetime, namespace: str = ""
) -> None:
    """One tick of the budget `name`. `namespace`: the one this operator serves ("": all)."""
    context = reconciler.context
    environments, flavors = reconciler.environments, reconciler.flavors
    seen = first(gate.ledger.views.budgets, name)
    observed = await observe_running(seen, environments, flavors, context.backends, namespace)

    def decide(budget: Budget) -> Charge | None:
        return plan_tick(
            budget,
            environments,
            flavors,
            context.backends,
            moment,
            gate.settings.warning_percent,
            namespace,
            observed,
            gate.settings.charge_interval_seconds,
        )

    result: Charge | None = await gate.ledger.update(name, decide, lambda result: result.status if result else None)
    if result is None:
        return
    budget_reference = {
        "apiVersion": API_VERSION,
        "kind": "ComputeBudget",
        "metadata": {"name": name, "namespace": "default"},
    }
    stopping = [uid for uid in result.stop if _stoppable(uid, result, environments)]
    events = result.events
    if stopping:  # told when something stops, not every tick a suspended or deleted one holds its entry
        events += (("Warning", "BudgetExhausted", f"{result.reason}: stopping {len(stopping)} environment(s)"),)
    for type_, reason, message in events:
        await post_event(context.kube, budget_reference, type_, reason, message)
    for uid in stopping:
        # Again: stopping the ones before took time, and this one may be deleted or suspended meanwhile.
        if (record := _stoppable(uid, result, environments)) is None:
            continue
        environment = record.environment
        outcome = await end(  # holding its converge lock: never in the middle of a start
            context,
            environment,
            flavor_for(environment, record.status, flavors),  # what it started on: the backend that runs it
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
