"""Budgets before anything runs: the reconcile gate (a slot in the ledger) and the admission hold.

The decisions are in policy/budgets.py. Admission answers from memory (the
budget index plus the creates it admitted a moment ago and the ledger does not
show yet), so a burst of creates cannot all take the last slot; the reconcile
gate then takes the slot for real, in the ledger, and is the rule that holds
even when the webhook is bypassed.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from analysis_operator.engine.ledger import Ledger, Views
from analysis_operator.engine.views import Index, first
from analysis_operator.infra import metrics
from analysis_operator.infra.kube import KubeClient
from analysis_operator.model.domain import Environment, Flavor, Phase, is_terminal
from analysis_operator.policy.budgets import Budget, admission_refusal, reserve, spent
from analysis_operator.policy.refusal import Refusal
from analysis_operator.settings import BudgetSettings

log = structlog.get_logger("analysis_operator.budgets")


@dataclass
class BudgetGate:
    """Checked by converge before anything is created or kept running (converge.Gate)."""

    settings: BudgetSettings
    ledger: Ledger
    # budget name -> (namespace, name) -> (GPUs, hold deadline on the monotonic clock)
    admitted: dict[str, dict[tuple[str, str], tuple[int, float]]] = field(default_factory=dict)

    async def check(
        self, environment: Environment, flavor: Flavor, status: Mapping[str, Any], now: datetime.datetime
    ) -> Refusal | None:
        if not self.settings.enabled:
            return None
        selected = self.ledger.views.select(environment.owner, environment.budget)
        if isinstance(selected, Refusal):
            return None if selected.reason == "NoBudget" and not self.settings.require_budget else selected
        if environment.uid in selected.entries:  # holds a slot: only a spent budget ends it
            over = spent(selected, flavor.resources.cpus, flavor.resources.gpu, now)
            return Refusal("BudgetExhausted", over.message, Phase.BUDGET_EXHAUSTED) if over else None
        result = await self.ledger.update(selected.name, lambda budget: reserve(budget, environment, flavor, now))
        if isinstance(result, Refusal):
            metrics.ADMISSION_REFUSALS.labels(reason=result.reason, stage="reconcile").inc()
            log.info(
                "budget.refused",
                environment=f"{environment.namespace}/{environment.name}",
                budget=selected.name,
                reason=result.reason,
            )
            return result
        return None

    def admit(
        self,
        namespace: str,
        name: str,
        owner: str,
        budget_name: str,
        flavor: Flavor,
        environments: Index,
        now: datetime.datetime,
    ) -> Refusal | None:
        """The admission decision for a create; admitted creates hold their slot in memory for a while.
        No await in here: the count and the hold are one step for the event loop."""
        if not self.settings.enabled or not self.settings.check_at_admission:
            return None
        selected = self.ledger.views.select(owner, budget_name)
        if isinstance(selected, Refusal):
            return None if selected.reason == "NoBudget" and not self.settings.require_budget else selected
        holding, gpus = self._holding(selected, environments, time.monotonic())
        refusal = admission_refusal(selected, flavor, holding, gpus, now)
        if refusal is None:
            self.admitted[selected.name][(namespace, name)] = (
                flavor.resources.gpu,
                time.monotonic() + self.settings.admission_hold_seconds,
            )
        return refusal

    def _holding(self, budget: Budget, environments: Index, moment: float) -> tuple[int, int]:
        """Environments and GPUs on the budget: its ledger plus creates admitted but not yet in it.
        An admitted create leaves that list once the ledger has it, it ended, or after a hold time
        (another webhook may have refused it)."""
        admitted = self.admitted.setdefault(budget.name, {})
        in_ledger = {(entry.get("namespace"), entry.get("name")) for entry in budget.entries.values()}
        for key, (_, deadline) in list(admitted.items()):
            record = first(environments, key)
            if key in in_ledger or deadline < moment or (record and is_terminal(record.status.get("phase"))):
                del admitted[key]
        gpus = sum(int(entry.get("gpus") or 0) for entry in budget.entries.values())
        return len(budget.entries) + len(admitted), gpus + sum(held for held, _ in admitted.values())


def build_budget_gate(kube: KubeClient, settings: BudgetSettings, indexes: Mapping[str, Index]) -> BudgetGate:
    """Made once at startup (handlers/lifecycle.py); the webhooks, the accounting and approvals share it."""
    views = Views(indexes["budgets"], indexes["personal_budgets"], indexes["groups"])
    return BudgetGate(settings, Ledger(kube, views))
