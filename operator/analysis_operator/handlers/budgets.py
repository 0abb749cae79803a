"""ComputeBudget handlers: the budget indexes, and the accounting daemon of each budget.

The decisions are in policy/budgets.py; the ledger, the reconcile gate and the
admission hold in engine/ (ledger.py, budget_gate.py, accounting.py).
BudgetRequests are in handlers/requests.py.
"""

from __future__ import annotations

from typing import Any

import kopf
import structlog

from analysis_operator.engine.accounting import charge_budget
from analysis_operator.engine.ledger import BUDGETS
from analysis_operator.engine.reconciler import utcnow
from analysis_operator.handlers.indexes import never_raises, report_problems
from analysis_operator.model.domain import GROUP, VERSION
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


@kopf.daemon(GROUP, VERSION, BUDGETS, id="budget-accounting", cancellation_timeout=5)
async def account(name: str, memo: kopf.Memo, stopped: kopf.DaemonStopped, **_: Any) -> None:
    """Charge the budget's running environments every interval, until the budget is deleted."""
    settings: BudgetSettings = memo.config.budgets
    if not settings.enabled:
        return
    while not stopped:  # first tick at once: a new budget shows its numbers without waiting
        try:
            await charge_budget(memo.budget_gate, memo.reconciler, name, utcnow())
        except Exception:  # one failed tick must not end the loop; the next one charges from chargedUntil
            log.exception("budget.charge_failed", budget=name)
        await stopped.wait(settings.charge_interval_seconds)
