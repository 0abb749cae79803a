"""The budget ledger: serialized, optimistic writes to a ComputeBudget's status.

Every write to a budget goes through `Ledger.update`: one writer per budget in
this process, then read -> decide -> PUT status guarded by the resourceVersion
read, and on 409 read again and decide again. So racing creates cannot both
take the last slot, a charge tick and a grant cannot overwrite each other, and
a restart finds the ledger exactly as the last successful write left it.
`decide` may run more than once (after a 409): it must be a pure function of
the budget it is given.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.rest import ApiException

from analysis_operator.backends.base import Retry
from analysis_operator.engine.views import Index, Singles, first, member_of
from analysis_operator.infra.kube import KubeClient
from analysis_operator.policy.budgets import Budget, select_budget
from analysis_operator.policy.refusal import Refusal

BUDGETS = "computebudgets"


@dataclass
class Views:
    """The kopf indexes budget decisions read (in memory, current with the watch streams)."""

    budgets: Index
    personal: Index
    groups: Index
    entries: Index = field(default_factory=dict)  # environment uid -> the budgets whose ledgers hold it

    def select(self, environment_owner: str, named: str, uid: str = "") -> Budget | Refusal:
        """The budget an environment draws on (policy/budgets.select_budget). `uid`: the environment's,
        when it may hold a slot already (reconcile; a create holds none)."""
        personal = self.personal_budget(environment_owner, uid)
        return select_budget(
            environment_owner,
            named,
            Singles(self.budgets),
            {environment_owner: personal} if personal else {},
            lambda group, user: member_of(self.groups, group, user),
        )

    def personal_budget(self, user: str, uid: str = "") -> str | None:
        """The name of the user's personal budget. A user may have two by mistake (a new one added
        before the old one is removed; nothing refuses it): then the one whose ledger holds the
        environment `uid` already, else the first by name. Not the first the index lists: that order
        changes with a restart, and the environment would be reserved and charged in both."""
        names = sorted(str(name) for name in self.personal.get(user, ()))
        held = sorted(name for name in self.entries.get(uid, ()) if name in names) if uid else []
        return next(iter(held or names), None)


@dataclass
class _Waiting:
    decide: Callable[[Budget], Any]
    status_of: Callable[[Any], dict[str, Any] | None]
    result: asyncio.Future[Any]


class Ledger:
    """Serialized, optimistic writes to budget status (see the module docstring).

    Group commit: callers that arrive while a write to the same budget is in flight are
    decided together, each on the status the previous one produced, and written in one
    PUT. A burst of creates then costs a few writes instead of one each, in turn.

    The writes of a budget are made by one task of their own (its committer), which every
    caller awaits; a batch's callers all have their answer when its write does. (With a lock
    that each caller took in turn, to find its answer already there, the last of a batch of 50
    waited for 50 turns of a busy event loop: stop 44, as budget_gate.confirm's rounds.)"""

    def __init__(self, kube: KubeClient, views: Views) -> None:
        self.kube, self.views = kube, views
        self._waiting: dict[str, list[_Waiting]] = {}
        self._committers: dict[str, asyncio.Task[None]] = {}  # budget name -> the task writing it
        self._bodies: dict[str, dict[str, Any]] = {}  # the last version this process read or wrote

    async def update(
        self,
        name: str,
        decide: Callable[[Budget], Any],
        status_of: Callable[[Any], dict[str, Any] | None] = lambda result: result if isinstance(result, dict) else None,
    ) -> Any:
        """Run `decide` on the budget and write the status it returns; None if the budget is gone.
        A caller cancelled before its batch is taken is left out of it."""
        mine = _Waiting(decide, status_of, asyncio.get_running_loop().create_future())
        self._waiting.setdefault(name, []).append(mine)
        if name not in self._committers:
            self._committers[name] = asyncio.get_running_loop().create_task(self._commit_all(name))
        return await mine.result

    async def _commit_all(self, name: str) -> None:
        """Write batch after batch of this budget's callers until none waits."""
        batch: list[_Waiting] = []
        try:
            while batch := [waiting for waiting in self._waiting.pop(name, []) if not waiting.result.done()]:
                try:
                    results = await self._commit(name, batch)
                except Exception as error:
                    for waiting in batch:
                        if not waiting.result.done():
                            waiting.result.set_exception(error)
                else:
                    for waiting, result in zip(batch, results, strict=True):
                        if not waiting.result.done():
                            waiting.result.set_result(result)
        except asyncio.CancelledError:  # the operator stops: nobody waits for an answer that will not come
            for waiting in [*batch, *self._waiting.pop(name, [])]:
                waiting.result.cancel()
            raise
        finally:
            del self._committers[name]

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
                    body, cached = None, False  # decided on our copy while the index moved on: re-read
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
        raise Retry(f"ComputeBudget {name!r} keeps changing; retrying", delay=1)

    def _stale(self, budget: Budget) -> bool:
        seen = first(self.views.budgets, budget.name)
        return seen is not None and seen.resource_version != budget.resource_version
