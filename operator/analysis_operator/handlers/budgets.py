"""ComputeBudgets and BudgetRequests: admission, the reconcile gate, accounting, approvals.

The decisions are in policy/budgets.py; this is the glue. Every write to a
budget goes through `Ledger.update`: one per-budget lock in this process,
then read -> decide -> PUT status guarded by the resourceVersion read, and
on 409 read again and decide again. So racing creates cannot both take the
last slot, a charge tick and a grant cannot overwrite each other, and a
restart finds the ledger exactly as the last successful write left it.
"""
from __future__ import annotations

import asyncio
import datetime
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import kopf
import structlog
from kubernetes.client.rest import ApiException

from analysis_operator import metrics
from analysis_operator.domain import GROUP, TERMINAL_PHASES, VERSION, Environment, Flavor, Phase, format_time, \
    parse_time
from analysis_operator.handlers.environments import apply, now, post
from analysis_operator.handlers.indexes import first, member_of
from analysis_operator.kube import KubeClient
from analysis_operator.policy.budgets import Budget, Held, admission_refusal, apply_grant, charge, expiry_warning_due, \
    reserve, select_budget, spent
from analysis_operator.policy.requests import Rejection
from analysis_operator.reconcile import Outcome, expiry, stop
from analysis_operator.settings import BudgetSettings

log = structlog.get_logger("analysis_operator.budgets")
BUDGETS = "computebudgets"
REQUESTS = "budgetrequests"
REQUESTED_BY = f"{GROUP}/requested-by"
TERMINAL = {phase.value for phase in TERMINAL_PHASES}


# --- indexes ----------------------------------------------------------------------------------------

@kopf.index(GROUP, VERSION, BUDGETS)
def budgets(name: str, body: kopf.Body, **_: Any) -> dict[str, Budget]:
    return {name: Budget.from_body(body)}


@kopf.index(GROUP, VERSION, BUDGETS, when=lambda spec, **_: bool(spec.get("user")))
def personal_budgets(name: str, spec: kopf.Spec, **_: Any) -> dict[str, str]:
    """user -> the name of their personal budget."""
    return {spec["user"]: name}


@dataclass
class Views:
    """The kopf indexes budget decisions read (in memory, current with the watch streams)."""
    budgets: kopf.Index
    personal: kopf.Index
    groups: kopf.Index

    def select(self, environment_owner: str, named: str) -> Budget | Rejection:
        budget_by_name = _Singles(self.budgets)
        return select_budget(environment_owner, named, budget_by_name, _Singles(self.personal),
                             lambda group, user: member_of(self.groups, group, user))


class _Singles(Mapping):
    """A kopf index (key -> store of values) read as key -> its one value."""

    def __init__(self, index: kopf.Index) -> None:
        self.index = index

    def __getitem__(self, key: Any) -> Any:
        value = first(self.index, key)
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self):
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


# --- the ledger -------------------------------------------------------------------------------------

@dataclass
class _Waiting:
    decide: Callable[[Budget], Any]
    status_of: Callable[[Any], dict[str, Any] | None]
    result: asyncio.Future


class Ledger:
    """Serialized, optimistic writes to budget status (see the module docstring).

    Group commit: callers that arrive while a write to the same budget is in flight are
    decided together, each on the status the previous one produced, and written in one
    PUT. A burst of creates then costs a few writes instead of one each, in turn."""

    def __init__(self, kube: KubeClient, views: Views) -> None:
        self.kube, self.views = kube, views
        self._locks: dict[str, asyncio.Lock] = {}
        self._waiting: dict[str, list[_Waiting]] = {}
        self._bodies: dict[str, dict[str, Any]] = {}   # the last version this process read or wrote

    async def update(self, name: str, decide: Callable[[Budget], Any],
                     status_of: Callable[[Any], dict[str, Any] | None] = lambda result: result
                     if isinstance(result, dict) else None) -> Any:
        """Run `decide` on the budget and write the status it returns; None if the budget is gone."""
        mine = _Waiting(decide, status_of, asyncio.get_running_loop().create_future())
        self._waiting.setdefault(name, []).append(mine)
        async with self._locks.setdefault(name, asyncio.Lock()):
            if not mine.result.done():           # nobody took us along: lead the next batch
                batch, self._waiting[name] = self._waiting[name], []
                try:
                    results = await self._commit(name, batch)
                except asyncio.CancelledError:   # our task ends; the others go with the next batch
                    self._waiting[name][:0] = [waiting for waiting in batch if waiting is not mine]
                    raise
                except Exception as error:
                    for waiting in batch:
                        if not waiting.result.done():
                            waiting.result.set_exception(error)
                else:
                    for waiting, result in zip(batch, results):
                        waiting.result.set_result(result)
        return mine.result.result()

    async def _commit(self, name: str, batch: list[_Waiting]) -> list[Any]:
        body = self._bodies.get(name)
        cached = body is not None
        for _ in range(20):
            if body is None:
                body = await self.kube.get_cluster_object(BUDGETS, name)
                if body is None:
                    self._bodies.pop(name, None)
                    return [None] * len(batch)
            first_view = budget = Budget.from_body(body)
            results, changed = [], body
            for waiting in batch:
                result = waiting.decide(budget)
                results.append(result)
                status = waiting.status_of(result)
                if status is not None:
                    changed = {**changed, "status": status}
                    budget = Budget.from_body(changed)
            if changed is body:
                if cached and self._stale(first_view):
                    body, cached = None, False   # decided on our copy while the index moved on: re-read
                    continue
                self._bodies[name] = body
                return results
            try:
                body = await self.kube.replace_cluster_status(BUDGETS, changed)
                self._bodies[name] = body
                return results
            except ApiException as error:
                if error.status not in (409, 404):
                    raise
                body, cached = None, False
        raise kopf.TemporaryError(f"ComputeBudget {name!r} keeps changing; retrying", delay=1)

    def _stale(self, budget: Budget) -> bool:
        seen = first(self.views.budgets, budget.name)
        return seen is not None and seen.resource_version != budget.resource_version


# --- the reconcile gate -----------------------------------------------------------------------------

@dataclass
class BudgetGate:
    """Checked by converge before anything is created or kept running (reconcile.Gate)."""
    settings: BudgetSettings
    ledger: Ledger
    admitted: dict[str, dict[tuple[str, str], tuple[int, float]]] = field(default_factory=dict)

    async def check(self, environment: Environment, flavor: Flavor, status: Mapping[str, Any],
                    now: datetime.datetime) -> Rejection | None:
        if not self.settings.enabled:
            return None
        selected = self.ledger.views.select(environment.owner, environment.budget)
        if isinstance(selected, Rejection):
            return None if selected.reason == "NoBudget" and not self.settings.require_budget else selected
        if environment.uid in selected.entries:   # holds a slot: only a spent budget ends it
            over = spent(selected, flavor.resources.cpus, flavor.resources.gpu, now)
            return Rejection("BudgetExhausted", over.message, Phase.BUDGET_EXHAUSTED) if over else None
        result = await self.ledger.update(selected.name, lambda budget: reserve(budget, environment, flavor, now))
        if isinstance(result, Rejection):
            metrics.ADMISSION_REFUSALS.labels(reason=result.reason, stage="reconcile").inc()
            log.info("budget.refused", environment=f"{environment.namespace}/{environment.name}",
                     budget=selected.name, reason=result.reason)
        return result if isinstance(result, Rejection) else None


def gate_for(kube: KubeClient, settings: BudgetSettings, indexes: Mapping[str, Any]) -> BudgetGate:
    """Made once at startup (lifecycle.on_startup); the webhooks, timers and approvals share it."""
    views = Views(indexes["budgets"], indexes["personal_budgets"], indexes["groups"])
    return BudgetGate(settings, Ledger(kube, views))


def _gate(memo: kopf.Memo) -> BudgetGate:
    return next(gate for gate in memo.context.gates if isinstance(gate, BudgetGate))


# --- admission --------------------------------------------------------------------------------------

def _holding(gate: BudgetGate, budget: Budget, environments: kopf.Index, moment: float) -> tuple[int, int]:
    """Environments and GPUs on the budget: its ledger plus creates admitted but not yet in it.
    An admitted create leaves that list once the ledger has it, it ended, or after a hold time
    (another webhook may have refused it)."""
    admitted = gate.admitted.setdefault(budget.name, {})
    in_ledger = {(entry.get("namespace"), entry.get("name")) for entry in budget.entries.values()}
    for key, (_, deadline) in list(admitted.items()):
        record = first(environments, key)
        if key in in_ledger or deadline < moment or (record and record.status.get("phase") in TERMINAL):
            del admitted[key]
    gpus = sum(int(entry.get("gpus") or 0) for entry in budget.entries.values())
    return len(budget.entries) + len(admitted), gpus + sum(held for held, _ in admitted.values())


async def check_budget(name: str, namespace: str, spec: kopf.Spec, memo: kopf.Memo, flavors: kopf.Index,
                       environments: kopf.Index, **_: Any) -> None:
    gate = _gate(memo)
    flavor: Flavor | None = first(flavors, spec.get("flavor"))
    if not gate.settings.enabled or not gate.settings.check_at_admission or flavor is None:
        return  # an unknown flavor is refused (and explained) elsewhere
    selected = gate.ledger.views.select(str(spec.get("owner", "")), str(spec.get("budget", "")))
    if isinstance(selected, Budget):
        # No await from here to the record below: the count and the hold are one step for the event loop.
        holding, gpus = _holding(gate, selected, environments, time.monotonic())
        refusal = admission_refusal(selected, flavor, holding, gpus, now())
        if refusal is None:
            gate.admitted[selected.name][(namespace, name)] = (
                flavor.resources.gpu, time.monotonic() + gate.settings.admission_hold_seconds)
            return
    elif selected.reason == "NoBudget" and not gate.settings.require_budget:
        return
    else:
        refusal = selected
    metrics.ADMISSION_REFUSALS.labels(reason=refusal.reason, stage="admission").inc()
    log.info("admission.budget", environment=f"{namespace}/{name}", owner=spec.get("owner"),
             decision="refused", reason=refusal.reason)
    raise kopf.AdmissionError(refusal.message, code=403)


# --- accounting -------------------------------------------------------------------------------------

@kopf.daemon(GROUP, VERSION, BUDGETS, id="budget-accounting", cancellation_timeout=5)
async def account(name: str, memo: kopf.Memo, stopped: kopf.DaemonStopped, environments: kopf.Index,
                  flavors: kopf.Index, **_: Any) -> None:
    """Charge the budget's running environments every interval, until the budget is deleted."""
    settings: BudgetSettings = memo.config.budgets
    if not settings.enabled:
        return
    while not stopped:   # first tick at once: a new budget shows its numbers without waiting
        try:
            await charge_budget(memo, name, environments, flavors, now())
        except Exception:  # one failed tick must not end the loop; the next one charges from chargedUntil
            log.exception("budget.charge_failed", budget=name)
        await stopped.wait(settings.charge_interval_seconds)


async def charge_budget(memo: kopf.Memo, name: str, environments: kopf.Index, flavors: kopf.Index,
                        moment: datetime.datetime) -> None:
    gate = _gate(memo)
    records: dict[str, Any] = {}

    def decide(budget: Budget):
        ended: dict[str, datetime.datetime | None] = {}
        paused: list[str] = []
        held: dict[str, Held] = {}
        for uid, entry in budget.entries.items():
            record = first(environments, (entry.get("namespace"), entry.get("name")))
            if record is None or record.environment.uid != uid:
                ended[uid] = None
            elif record.status.get("phase") in TERMINAL:
                ended[uid] = parse_time(record.status.get("stoppedAt"))
            elif record.status.get("phase") == Phase.SUSPENDED.value:
                paused.append(uid)
            else:
                records[uid] = record
                backend = record.status.get("backend") or {}
                flavor = first(flavors, record.environment.flavor)
                kind = backend.get("kind") or (flavor.backend.value if flavor else "kubernetes")
                if kind in ("slurm", "openstack"):
                    # Charged for what Slurm allocated / the server holds, only while it holds it.
                    if "allocatedCpus" in backend:
                        held[uid] = Held(float(backend["allocatedCpus"]), int(backend.get("allocatedGpus") or 0),
                                         parse_time(backend.get("startedAt")))
                    else:
                        paused.append(uid)
        result = charge(budget, ended, moment, gate.settings.warning_percent, paused, held)
        idle = not budget.entries and _same(budget.status, result.status)
        return None if idle else result

    result = await gate.ledger.update(name, decide, lambda result: result.status if result else None)
    if result is None:
        return
    budget_reference = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ComputeBudget",
                        "metadata": {"name": name, "namespace": "default"}}
    for type_, reason, message in result.events:
        await _post(memo, budget_reference, type_, reason, message)
    for uid in result.stop:
        record = records.get(uid)
        if record is None:
            continue
        environment = record.environment
        outcome = await stop(memo.context, environment, first(flavors, environment.flavor), record.status,
                             Phase.BUDGET_EXHAUSTED, "BudgetExhausted", result.reason, moment)
        await apply(memo.context, environment, outcome)
        log.warning("budget.environment_stopped", budget=name, environment=f"{environment.namespace}/"
                    f"{environment.name}", reason=result.reason)


def _same(before: Mapping[str, Any], after: Mapping[str, Any]) -> bool:
    """Equal apart from the time stamps a tick always moves (no write for an idle budget)."""
    def strip(status: Mapping[str, Any]) -> dict[str, Any]:
        used = {k: v for k, v in (status.get("used") or {}).items() if k != "updatedAt"}
        conditions = [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status.get("conditions") or ()]
        return {**status, "used": used, "conditions": conditions}
    return strip(before) == strip(after)


async def _post(memo: kopf.Memo, involved: dict[str, Any], type_: str, reason: str, message: str) -> None:
    try:
        await memo.context.kube.post_event(involved, type_, reason, message)
    except Exception as error:  # an Event lost must not undo the write that caused it
        log.warning("event.not_posted", reason=reason, error=repr(error))


# --- lifetime warnings (called from the sweep) ------------------------------------------------------

async def warn_expiring(memo: kopf.Memo, environments: kopf.Index, flavors: kopf.Index,
                        moment: datetime.datetime) -> None:
    """A Warning Event a configurable time before an environment expires, once per expiry time,
    so the portal can offer an extension (a lifetime BudgetRequest)."""
    warn_before = memo.config.budgets.expiry_warning_seconds
    for key in list(environments):
        record = first(environments, key)
        if record is None or record.status.get("phase") not in (Phase.READY.value, Phase.PROVISIONING.value):
            continue
        flavor = first(flavors, record.environment.flavor)
        if flavor is None:
            continue
        _, expires_at = expiry(record.environment, flavor, record.status, moment)
        if expiry_warning_due(expires_at, moment, warn_before, record.status.get("expiryWarnedFor")):
            environment = record.environment
            await memo.context.kube.patch_environment_status(environment.namespace, environment.name,
                                                             {"expiryWarnedFor": format_time(expires_at)})
            await post(memo.context, environment, Outcome(event=(
                "Warning", "ExpiresSoon", f"expires at {format_time(expires_at)}; to keep it longer, create "
                f"a BudgetRequest with spec.environment {environment.name!r} and spec.lifetime")))


# --- budget requests --------------------------------------------------------------------------------

@kopf.on.mutate(GROUP, VERSION, REQUESTS, id="budgetrequest-requester", operation="CREATE")
def stamp_requester(patch: kopf.Patch, userinfo: dict[str, Any], **_: Any) -> None:
    patch.setdefault("metadata", {}).setdefault("annotations", {})[REQUESTED_BY] = str(userinfo.get("username", ""))


# failurePolicy Fail (the default): without the operator no decision can be stamped, so none is accepted.
@kopf.on.mutate(GROUP, VERSION, REQUESTS, id="budgetrequest-decision", operation="UPDATE", subresource="status")
def stamp_decision(status: kopf.Status, old: Mapping[str, Any] | None, patch: kopf.Patch,
                   userinfo: dict[str, Any], **_: Any) -> None:
    """Who decided and when come from the authenticated request, never from the writer."""
    before = dict((old or {}).get("status") or {})
    if status.get("decision") and not before.get("decision"):
        patch.setdefault("status", {}).update(decidedBy=str(userinfo.get("username", "")),
                                              decidedAt=format_time(now()))
    elif before.get("decision"):
        patch.setdefault("status", {}).update(decidedBy=before.get("decidedBy"), decidedAt=before.get("decidedAt"))


@kopf.on.validate(GROUP, VERSION, REQUESTS, id="budgetrequest-final", operation="UPDATE", subresource="status")
def check_decision(status: kopf.Status, old: Mapping[str, Any] | None, **_: Any) -> None:
    before = dict((old or {}).get("status") or {})
    if before.get("decision") and status.get("decision") != before["decision"]:
        raise kopf.AdmissionError(f"this request was already {before['decision'].lower()} by "
                                  f"{before.get('decidedBy')} at {before.get('decidedAt')}; decisions are final: "
                                  f"create a new BudgetRequest", code=403)


@kopf.on.event(GROUP, VERSION, REQUESTS)
async def on_request(type: str, body: kopf.Body, memo: kopf.Memo, environments: kopf.Index, flavors: kopf.Index,
                     **_: Any) -> None:
    """Carry out a decision exactly once: the grant is keyed by the request's uid in the target's
    status, so a restart between the grant and `phase: Applied` repeats nothing."""
    status = body.get("status") or {}
    if type == "DELETED" or status.get("phase") in ("Applied", "Denied", "Invalid"):
        return
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    decision = status.get("decision")
    if not decision:
        if not status.get("phase"):
            await memo.context.kube.patch_namespaced_status(REQUESTS, namespace, name, {
                "phase": "Pending", "message": "waiting for an administrator's decision"})
        return
    if decision == "Denied":
        update = {"phase": "Denied", "message": f"denied by {status.get('decidedBy')}"}
    else:
        update = await _grant(memo, body, status, environments, flavors)
    await memo.context.kube.patch_namespaced_status(REQUESTS, namespace, name, {**update, "appliedAt": format_time(now())})
    log.info("budget_request.decided", request=f"{namespace}/{name}", decision=decision, phase=update["phase"],
             decided_by=status.get("decidedBy"))


async def _grant(memo: kopf.Memo, body: kopf.Body, status: Mapping[str, Any], environments: kopf.Index,
                 flavors: kopf.Index) -> dict[str, str]:
    spec, metadata = body.get("spec") or {}, body["metadata"]
    request = f"{metadata['namespace']}/{metadata['name']}"
    decided = (str(status.get("decidedBy", "")), str(status.get("decidedAt", "")))
    messages = []
    if spec.get("budget") and any((spec.get("add") or {}).values()):
        written = await _gate(memo).ledger.update(spec["budget"], lambda budget: apply_grant(
            budget, metadata["uid"], request, spec["add"], *decided, now()) or "already")
        if written is None:
            return {"phase": "Invalid", "message": f"ComputeBudget {spec['budget']!r} does not exist"}
        messages.append(f"ComputeBudget {spec['budget']!r} raised by {dict(spec['add'])}")
    if spec.get("environment") and spec.get("lifetime"):
        record = first(environments, (metadata["namespace"], spec["environment"]))
        flavor = record and first(flavors, record.environment.flavor)
        if record is None or flavor is None:
            return {"phase": "Invalid", "message": f"AnalysisEnvironment {spec['environment']!r} does not exist"}
        extensions = {**(record.status.get("lifetimeExtensions") or {}), metadata["uid"]: spec["lifetime"]}
        _, expires_at = expiry(record.environment, flavor, {**record.status, "lifetimeExtensions": extensions}, now())
        await memo.context.kube.patch_environment_status(metadata["namespace"], spec["environment"], {
            "lifetimeExtensions": extensions, "expiresAt": format_time(expires_at)})
        messages.append(f"lifetime of {spec['environment']!r} extended by {spec['lifetime']}")
    return {"phase": "Applied", "message": "; ".join(messages) or "nothing to apply"}
