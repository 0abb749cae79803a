"""ComputeBudget handlers: the budget indexes, the accounting daemon of each budget, the
release of an environment's slot the moment it is deleted or ends, and a budget's arrival
(what it is to hold is reserved in it; a user's second personal budget is warned of).

The decisions are in policy/budgets.py; the ledger, the reconcile gate and the
admission hold in engine/ (ledger.py, budget_gate.py, accounting.py).
BudgetRequests are in handlers/requests.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf
import structlog

from analysis_operator.engine.accounting import charge_budget
from analysis_operator.engine.budget_gate import BudgetGate, slot_freed_at
from analysis_operator.engine.events import post_event
from analysis_operator.engine.ledger import BUDGETS
from analysis_operator.engine.reconciler import Reconciler, utcnow
from analysis_operator.engine.views import values
from analysis_operator.handlers.indexes import never_raises, report_problems
from analysis_operator.infra.kube import KubeClient
from analysis_operator.model.domain import API_VERSION, GROUP, VERSION, finalizing, is_terminal
from analysis_operator.policy.budgets import Budget
from analysis_operator.settings import BudgetSettings

log = structlog.get_logger("analysis_operator.budgets")


@kopf.index(GROUP, VERSION, BUDGETS)
@never_raises("budgets")
def budgets(name: str, body: kopf.Body, **_: Any) -> dict[str, Budget]:
    budget = Budget.from_body(body)
    report_problems("budgets", body, [budget.problem] if budget.problem else [])
    return {name: budget}


@kopf.index(GROUP, VERSION, BUDGETS, when=lambda spec, **_: bool(spec.get("user")))
@never_raises("personal_budgets")
def personal_budgets(name: str, spec: kopf.Spec, **_: Any) -> dict[str, str]:
    """user -> the name of their personal budget."""
    return {spec["user"]: name}


@kopf.index(GROUP, VERSION, BUDGETS)
@never_raises("ledger_entries")
def ledger_entries(name: str, status: kopf.Status, **_: Any) -> dict[str, str]:
    """Environment uid -> the budget whose ledger holds a slot for it."""
    return {str(uid): name for uid in (status.get("environments") or {})}


def slot_to_release(type: str, body: Mapping[str, Any], ledger_entries: Mapping[str, Any], **_: Any) -> bool:
    """kopf's filter for release_slot (pure): an environment a ledger holds a slot for, deleted, being deleted
    (but not while its finalizer waits for its job or VM: it runs on), or ended. Every other event (nearly
    all) is not handed to the handler: kopf's invocation costs more than this."""
    metadata = body.get("metadata") or {}
    if str(metadata.get("uid") or "") not in ledger_entries:
        return False
    return (
        type == "DELETED"
        or (bool(metadata.get("deletionTimestamp")) and not finalizing(metadata))
        or is_terminal((body.get("status") or {}).get("phase"))
    )


@kopf.on.event(GROUP, VERSION, "analysisenvironments", when=slot_to_release)
async def release_slot(type: str, body: kopf.Body, memo: kopf.Memo, ledger_entries: kopf.Index, **_: Any) -> None:
    """An environment deleted, being deleted, or ended (Stopped, Expired, Failed, ...): its ledger
    entry is settled now, not at the next accounting tick, so its slot is free at once (and the
    budget's status says so). Suspended ones keep their slot: resuming never fails. One whose Slurm
    job or VM the operator's finalizer waits for keeps it, and is charged, until the finalizer goes
    (engine/budget_gate.slot_freed_at says up to when)."""
    uid = str(body.metadata.get("uid") or "")
    held = list(ledger_entries.get(uid, ()))
    freed = slot_freed_at(type == "DELETED", body)
    if not held or freed is None:
        return
    gate: BudgetGate = memo.budget_gate
    if not gate.settings.enabled:
        return
    for budget in held:
        try:
            await gate.release(str(budget), {uid: freed[0]}, utcnow())
        except Exception:  # the confirmation at the next refusal and the accounting tick settle it instead
            log.exception("budget.release_failed", budget=budget, uid=uid)


@kopf.on.event(GROUP, VERSION, BUDGETS, when=lambda type, **_: type in (None, "ADDED"))
async def on_budget_seen(type: str | None, name: str, spec: kopf.Spec, memo: kopf.Memo, **_: Any) -> None:
    """A ComputeBudget listed (at start) or created. kopf hands over none before every index is
    filled: from now on the gate may judge by them (BudgetGate.indexed). A created one may be one
    deleted and created again (kubectl replace --force, a GitOps Replace): the environments it is to
    hold are reconciled now, not at the next sweep, so its numbers count them at once; in tasks of
    the reconciler's own (Reconciler.requeue), not here: kopf hands this budget's next events (its
    index updates, the ledger those reconciles write) over only once this handler returns. A second
    personal budget of one user is said so on it (nothing refuses it at creation)."""
    gate: BudgetGate = memo.budget_gate
    gate.indexed = True
    if not gate.settings.enabled:
        return
    if spec.get("user"):
        await warn_second_personal(memo.context.kube, gate, name, str(spec["user"]))
    if type == "ADDED":
        reconciler: Reconciler = memo.reconciler
        records = list(values(reconciler.environments))
        again = gate.unheld(records, at_once=True)
        for record in records:
            if record.environment.uid in again:
                reconciler.requeue(record, 0)


@kopf.on.event(GROUP, VERSION, "analysisenvironments", when=lambda memo, **_: not memo.budget_gate.indexed)
async def on_indexes_filled(memo: kopf.Memo, **_: Any) -> None:
    """kopf hands over no event before every index is filled; with no ComputeBudget to hand over,
    the first environment's says so (BudgetGate.indexed): the sweep may then stop the environments
    whose budget was deleted while the operator was down."""
    memo.budget_gate.indexed = True


async def warn_second_personal(kube: KubeClient, gate: BudgetGate, name: str, user: str) -> None:
    """A Warning Event on this budget if its user has another personal one: which of them new
    environments draw on (engine/ledger.Views.personal_budget), and what to do."""
    names = sorted(str(each) for each in gate.ledger.views.personal.get(user, ()))
    if len(names) < 2:
        return
    chosen = gate.ledger.views.personal_budget(user)
    reference = {"apiVersion": API_VERSION, "kind": "ComputeBudget", "metadata": {"name": name, "namespace": "default"}}
    message = (
        f"user {user!r} has {len(names)} personal ComputeBudgets ({', '.join(names)}): environments that name "
        f"no spec.budget start on {chosen!r} (the first by name) and running ones stay on the one that holds "
        f"them; delete the one not meant to be used, or name the budget in spec.budget"
    )
    await post_event(kube, reference, "Warning", "SecondPersonalBudget", message)


@kopf.daemon(GROUP, VERSION, BUDGETS, id="budget-accounting", cancellation_timeout=5)
async def account(name: str, memo: kopf.Memo, stopped: kopf.DaemonStopped, **_: Any) -> None:
    """Charge the budget's running environments every interval, until the budget is deleted. Every
    operator of the cluster runs this for every budget (they are cluster-scoped); each charges and
    settles only the entries of the namespaces it serves (settings.namespace)."""
    settings: BudgetSettings = memo.config.budgets
    if not settings.enabled:
        return
    while not stopped:  # first tick at once: a new budget shows its numbers without waiting
        try:
            await charge_budget(memo.budget_gate, memo.reconciler, name, utcnow(), memo.config.namespace)
        except Exception:  # one failed tick must not end the loop; the next one charges from chargedUntil
            log.exception("budget.charge_failed", budget=name)
        await stopped.wait(settings.charge_interval_seconds)
