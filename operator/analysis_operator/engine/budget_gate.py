"""Budgets before anything runs: the reconcile gate (a slot in the ledger) and the admission hold.

The decisions are in policy/budgets.py. Admission answers from memory (the
budget index plus the creates it admitted a moment ago and the ledger does not
show yet), so a burst of creates cannot all take the last slot; the reconcile
gate then takes the slot for real, in the ledger, and is the rule that holds
even when the webhook is bypassed. A dry run is decided the same way and holds
nothing.

Slots free at once. A ledger entry stays until something settles it, so an
entry whose environment was deleted or ended must not count meanwhile. Both
gates leave out entries known to have ended: from the environments index
(terminal phase, being deleted, or replaced by a new object of that name), or
confirmed by the API server. Not one being deleted whose Slurm job or VM the
operator's finalizer still waits for: that runs on, counted and charged, until
the finalizer goes (`finalizing`). When a decision would refuse for want of a slot
(TooManyEnvironments, TooManyGpus) and some entry is not known to have ended,
the gate asks the API server about the budget's entries first, so "delete one,
create another" is admitted even before the watch shows the delete. A round of
confirmation is one list per namespace and owner (spec.owner is a selectable
field of the CRD), on connections of its own (not behind a burst of reconcile
calls), and is shared: by every refusal waiting on that budget, and by every
refusal while it is recent (started at most CONFIRMATION_REUSE_SECONDS before).
Past CONFIRMATION_REFRESH_SECONDS the next round starts in the background, and
the refusals meanwhile use the last answer: they wait for a round only when
none is recent (the first refusal after a quiet spell). So a stream of refusals
against a full budget costs the API server two lists a second and waits for
none, even when the API server is slow to answer a round (bench/budget_race.py:
with rounds of 27 x 50 GETs, admission p99 0.7-1.4 s; one list a round,
reused for 1 s, 0.45 s on a fast machine, but 1.1-1.4 s where a round takes
0.2-0.7 s and every round longer than the refresh interval kept the refusals
after it waiting; a third less there now, stop 40). The price: until the next round
answers (about a second, at most CONFIRMATION_REUSE_SECONDS), a slot freed by a
delete the watch has not shown yet is not seen, and the create is refused (never
the other way). The reconcile gate settles the ended entries in the same write
that takes the new slot; the environment handlers release them as soon as
they see the end (handlers/budgets.py), and the accounting tick remains the
backstop. A suspended environment keeps its slot, so resuming never fails. A
started environment its budget's ledger does not hold (the budget deleted and
created again, also while the operator was down) is put back without the slot
checks: it runs on, counted, as after a limit lowered (BudgetGate.check).
"""

from __future__ import annotations

import asyncio
import datetime
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog

from analysis_operator.engine.data_access import STARTED
from analysis_operator.engine.ledger import Ledger, Views
from analysis_operator.engine.views import EnvironmentRecord, Index, first
from analysis_operator.infra import metrics
from analysis_operator.infra.kube import KubeClient
from analysis_operator.model.domain import (
    LABEL_BACKEND,
    Environment,
    Flavor,
    Phase,
    finalizing,
    format_time,
    is_terminal,
    parse_time,
)
from analysis_operator.policy.budgets import (
    Budget,
    admission_refusal,
    new_entry,
    release,
    reserve,
    spent,
    summarize,
    with_entry,
)
from analysis_operator.policy.refusal import Refusal
from analysis_operator.settings import BudgetSettings

log = structlog.get_logger("analysis_operator.budgets")


# Refusals for want of a slot: worth asking the API server whether an entry has ended meanwhile.
SLOT_REASONS = frozenset({"TooManyEnvironments", "TooManyGpus"})
# A refusal reuses a round of confirmation that started this recently: its answers plus the index
# (which has every delete older than the watch's lag, milliseconds) are as good as asking again.
CONFIRMATION_REUSE_SECONDS = 3.0
# Past this age the next round starts in the background (two lists a second while refusals stream).
CONFIRMATION_REFRESH_SECONDS = 0.5
_ENDED_MAX = 100_000  # uids remembered as ended (an ended uid never runs again)
# A started environment that no budget covers any more is stopped after this long, and one its budget's
# ledger does not hold is reserved again after this long (BudgetGate.unheld).
UNCOVERED_GRACE_SECONDS = 10.0
# Phases in which an environment holds a slot in its budget's ledger.
HELD_PHASES = frozenset({Phase.PROVISIONING.value, Phase.READY.value, Phase.SUSPENDED.value})

Ended = dict[str, datetime.datetime | None]  # ledger entry uid -> when its environment ended (None: now)


def slot_freed_at(deleted: bool, body: Mapping[str, Any]) -> tuple[datetime.datetime | None] | None:
    """(when it stopped running,) if the environment `body` (`deleted`: its last state, the object is
    gone) holds no slot any more, None: now; None while it holds its slot (pure). An ended one at
    stoppedAt. A deleted one that runs nothing outside Kubernetes (a pod: the garbage collector
    removes it) at its deletionTimestamp; one with the operator's backend label (a Slurm job, a VM,
    held by the finalizer while it ran) when its finalizer is seen gone, now: up to then it may
    have run (`finalizing`)."""
    metadata = body.get("metadata") or {}
    status = body.get("status") or {}
    ended = is_terminal(status.get("phase"))
    if ended and (stopped := parse_time(status.get("stoppedAt"))) is not None:
        return (stopped,)
    if not deleted and (not metadata.get("deletionTimestamp") or finalizing(metadata)):
        return (None,) if ended else None
    if LABEL_BACKEND in (metadata.get("labels") or {}):
        return (None,)
    return (parse_time(metadata.get("deletionTimestamp")),)


def ended_at(uid: str, body: Mapping[str, Any] | None) -> tuple[datetime.datetime | None] | None:
    """(when it ended,) if the ledger entry `uid`, whose environment the API server answered with
    `body` (None: not there), is over; None while it holds its slot (pure)."""
    metadata = (body or {}).get("metadata") or {}
    if body is None or metadata.get("uid") != uid:
        return (None,)
    return slot_freed_at(False, body)


def has_started(status: Mapping[str, Any]) -> bool:
    """Has the environment passed the gate once (it ran, or was queued to)? converge writes startedAt
    and a started phase only after `check` let it start; before, the phase is none or Pending (pure)."""
    return status.get("phase") in STARTED or bool(status.get("startedAt"))


def rejoin(
    budget: Budget, environment: Environment, flavor: Flavor, status: Mapping[str, Any], now: datetime.datetime
) -> dict[str, Any] | None:
    """The budget's status with a started environment its ledger does not hold put back, charged from
    `now`; None if it holds it (pure). No slot check: it runs already, and refusing it would stop it.
    A Slurm job (charged for its allocation from its start, policy/budgets.charge) is marked as charged
    from its start already (heldSince), else the first tick would charge it back to that start: days
    that were the old ledger's to charge, or nobody's."""
    if environment.uid in budget.entries:
        return None
    entry = new_entry(environment, flavor, now)
    job_start = parse_time((status.get("backend") or {}).get("startedAt"))
    if job_start is not None:
        entry["heldSince"] = format_time(job_start)
    return summarize(budget, with_entry(budget, environment, entry), now)


@dataclass
class BudgetGate:
    """Checked by converge before anything is created or kept running (converge.Gate)."""

    settings: BudgetSettings
    ledger: Ledger
    # budget name -> uid of an admitted create -> (GPUs, hold deadline on the monotonic clock, (namespace, name))
    admitted: dict[str, dict[str, tuple[int, float, tuple[str, str]]]] = field(default_factory=dict)
    # uid -> when it ended, for ledger entries whose environment is known to be over
    ended: Ended = field(default_factory=dict)
    # budget name -> when the last round of confirmations that was answered started (monotonic clock)
    _confirmed: dict[str, float] = field(default_factory=dict)
    _rounds: dict[str, asyncio.Task[None]] = field(default_factory=dict)  # budget name -> its latest round
    # Set by the first ComputeBudget kopf hands over: it does so once every index is filled.
    indexed: bool = False
    _uncovered: dict[str, float] = field(default_factory=dict)  # uid -> since when no budget covers it (unheld)
    _unledgered: dict[str, float] = field(default_factory=dict)  # uid -> since when its budget's ledger lacks it

    async def check(
        self, environment: Environment, flavor: Flavor, status: Mapping[str, Any], now: datetime.datetime
    ) -> Refusal | None:
        if not self.settings.enabled:
            return None
        selected = self.ledger.views.select(environment.owner, environment.budget, environment.uid)
        if isinstance(selected, Refusal):
            if selected.reason == "NoBudget" and not self.settings.require_budget:
                return None
            metrics.count_refusal(selected.reason, "budget", "reconcile")
            if has_started(status):
                # the budget it runs on is no longer its owner's to use (removed from its group, say)
                message = f"budget withdrawn, the environment was stopped: {selected.message}"
                return Refusal(selected.reason, message, phase=Phase.STOPPED)
            return selected
        if environment.uid not in selected.entries:
            if not has_started(status):
                return await self._reserve(selected, environment, flavor, now)
            # Started, and its budget's ledger lost it (deleted and created again, also while the operator
            # was down; budgets turned on under it): put back as it runs, not judged as a start. Lowering
            # a limit never stops what runs either; the budget counts it, so creates are refused while over.
            put_back = await self.ledger.update(
                selected.name, lambda budget: rejoin(budget, environment, flavor, status, now)
            )
            if put_back is not None:  # None: the ledger held it after all (its index lagged a reservation)
                log.info(
                    "budget.rejoined", environment=f"{environment.namespace}/{environment.name}", budget=selected.name
                )
        over = spent(selected, flavor.resources.cpus, flavor.resources.gpu, now)  # holds a slot: only this ends it
        return Refusal("BudgetExhausted", over.message, Phase.BUDGET_EXHAUSTED) if over else None

    async def _reserve(
        self, selected: Budget, environment: Environment, flavor: Flavor, now: datetime.datetime
    ) -> Refusal | None:
        """Take a slot for a start in the ledger (policy/budgets.reserve), or say why not."""
        seen: list[Budget] = []

        def take(budget: Budget) -> Refusal | dict[str, Any] | None:
            seen[:] = [budget]
            return reserve(budget, environment, flavor, now, self._known_ended(budget))

        result = await self.ledger.update(selected.name, take)
        # An entry that ended meanwhile frees the slot: decide again, settling it in the same write.
        if isinstance(result, Refusal) and result.reason in SLOT_REASONS and seen and await self.confirm(seen[0]):
            result = await self.ledger.update(selected.name, take)
        if isinstance(result, Refusal):
            metrics.count_refusal(result.reason, "budget", "reconcile")
            log.info(
                "budget.refused",
                environment=f"{environment.namespace}/{environment.name}",
                budget=selected.name,
                reason=result.reason,
            )
            return result
        return None

    def withdrawn(self, record: EnvironmentRecord) -> bool:
        """Does this live environment draw on a budget its owner may no longer use (removed from the
        FacilityGroup of the budget it names)? In memory, for the catalogue's changes
        (handlers/datasets.py), which reconcile it: `check` then stops it."""
        environment, phase = record.environment, record.status.get("phase")
        if not self.settings.enabled or not environment.budget or environment.deleting:
            return False
        if not phase or is_terminal(phase):
            return False
        return isinstance(self.ledger.views.select(environment.owner, environment.budget, environment.uid), Refusal)

    def unheld(
        self, records: Iterable[EnvironmentRecord], moment: float | None = None, at_once: bool = False
    ) -> set[str]:
        """The uids of the started environments whose budget has gone from under them, for the sweep
        (engine/sweep.py) and a budget's creation (handlers/budgets.py) to reconcile: `check` then
        puts each back in the ledger of the budget it draws on now, without the slot checks of a start
        (`rejoin`: it runs on, and is counted), or stops it, "budget withdrawn", when none covers it.

        The ledger was the budget's status: a budget deleted (to cut a user off) or deleted and
        created again (kubectl replace --force, a GitOps Replace; spec.user and spec.group cannot
        change otherwise) takes its entries with it, and nothing else converges a Ready pod
        environment again. Uncharged and uncounted meanwhile, it let its owner start another
        maxEnvironments on top. One that no budget covers is stopped only once it has been so for
        UNCOVERED_GRACE_SECONDS: a replace deletes and creates within a moment, and must not stop
        what the new budget will hold. One its budget's ledger does not hold is named once it has
        been so as long (`at_once`: at once, for a budget just created), not at the first sweep
        that sees it: in a burst of starts the ledger's index lags the reservations a moment, and
        those would be reconciled again for nothing. Nothing until kopf has handed over a
        ComputeBudget (`indexed`): before, the budget indexes may be incomplete. `moment`: on the
        monotonic clock (now by default)."""
        if not self.settings.enabled or not self.indexed:
            return set()
        moment = time.monotonic() if moment is None else moment
        uncovered: dict[str, float] = {}
        unledgered: dict[str, float] = {}
        due: set[str] = set()
        for record in records:
            environment = record.environment
            if environment.deleting or record.status.get("phase") not in HELD_PHASES:
                continue
            selected = self.ledger.views.select(environment.owner, environment.budget, environment.uid)
            if isinstance(selected, Budget):
                if environment.uid not in selected.entries:
                    since = unledgered[environment.uid] = self._unledgered.get(environment.uid, moment)
                    if at_once or moment - since >= UNCOVERED_GRACE_SECONDS:
                        due.add(environment.uid)
            elif selected.reason != "NoBudget" or self.settings.require_budget:
                since = uncovered[environment.uid] = self._uncovered.get(environment.uid, moment)
                if moment - since >= UNCOVERED_GRACE_SECONDS:
                    due.add(environment.uid)
        self._uncovered = uncovered
        if not at_once:  # a sweep's view: a budget's arrival judges its own environments only
            self._unledgered = unledgered
        return due

    def admit(
        self,
        namespace: str,
        name: str,
        owner: str,
        budget_name: str,
        flavor: Flavor,
        environments: Index,
        now: datetime.datetime,
        hold: bool = True,
        uid: str = "",
    ) -> Refusal | None:
        """The admission decision for a create; admitted creates hold their slot in memory for a while
        (a dry run, hold False, holds nothing). `uid`: the new object's, as the validating webhook sees
        it. No await in here: the count and the hold are one step for the event loop."""
        if not self.settings.enabled or not self.settings.check_at_admission:
            return None
        selected = self.ledger.views.select(owner, budget_name)
        if isinstance(selected, Refusal):
            return None if selected.reason == "NoBudget" and not self.settings.require_budget else selected
        holding, gpus = self._holding(selected, environments, time.monotonic())
        refusal = admission_refusal(selected, flavor, holding, gpus, now)
        if refusal is None and hold:
            self.admitted[selected.name][uid or f"{namespace}/{name}"] = (
                flavor.resources.gpu,
                time.monotonic() + self.settings.admission_hold_seconds,
                (namespace, name),
            )
        return refusal

    async def admit_checked(
        self,
        namespace: str,
        name: str,
        owner: str,
        budget_name: str,
        flavor: Flavor,
        environments: Index,
        now: datetime.datetime,
        hold: bool = True,
        uid: str = "",
        refused: Refusal | None = None,
    ) -> Refusal | None:
        """admit, and before refusing for want of a slot, confirm the ledger's entries with the API
        server: one that ended since (deleted a moment ago) does not count. `refused`: what admit
        answered for this create a moment ago, if it refused (then it is not decided twice)."""

        def decide() -> Refusal | None:
            return self.admit(namespace, name, owner, budget_name, flavor, environments, now, hold, uid)

        refusal = refused or decide()
        if refusal is not None and refusal.reason in SLOT_REASONS:
            selected = self.ledger.views.select(owner, budget_name)
            if isinstance(selected, Budget) and await self.confirm(selected, environments):
                refusal = decide()
        return refusal

    async def release(self, budget_name: str, ended: Ended, now: datetime.datetime) -> None:
        """Settle these entries now (their environments were deleted or ended): the slot is free."""
        self._remember(ended)
        await self.ledger.update(budget_name, lambda budget: release(budget, ended, now))

    async def confirm(self, budget: Budget, environments: Index | None = None) -> bool:
        """Ask the API server about the budget's entries not known to have ended; True if one has.

        Rounds of reads are shared: a caller uses the last round if it started less than
        CONFIRMATION_REUSE_SECONDS ago, and past CONFIRMATION_REFRESH_SECONDS starts the next one in
        the background (unless one is on its way), so a stream of refusals against a full budget
        never waits for one, however long a round takes. Otherwise it waits for a round that started
        at most CONFIRMATION_REUSE_SECONDS before it asked.

        One round per budget is on its way at a time, a task every caller awaits (all are answered
        when it is): not a lock each caller queues on. With a lock, a burst of refusals started a
        task each before the first of them ran (282-384 in a second of bench/budget_race.py), and
        each waiter was woken in turn, one per turn of a busy event loop: refusals waited 1-2 s
        behind a round of 0.1-0.5 s (G6's p99, stop 44)."""
        asked, known = time.monotonic(), set(self._known_ended(budget, environments))
        age = asked - self._confirmed.get(budget.name, -math.inf)
        while age > CONFIRMATION_REUSE_SECONDS:  # a round's answer is needed: at most two (one was on its way)
            await asyncio.shield(self._next_round(budget, environments))  # a caller given up on cancels none
            age = asked - self._confirmed.get(budget.name, -math.inf)
        if age > CONFIRMATION_REFRESH_SECONDS:
            self._next_round(budget, environments)  # in the background
        return bool(set(self._known_ended(budget, environments)) - known)

    def _next_round(self, budget: Budget, environments: Index | None) -> asyncio.Task[None]:
        """The round on its way for this budget, or a new one."""
        due = self._rounds.get(budget.name)
        if due is None or due.done():
            due = self._rounds[budget.name] = asyncio.get_running_loop().create_task(self._round(budget, environments))
        return due

    async def _round(self, budget: Budget, environments: Index | None) -> None:
        """One round of reads. When it started is recorded once its answers are known."""
        started, known = time.monotonic(), self._known_ended(budget, environments)
        unknown = [(uid, entry) for uid, entry in budget.entries.items() if uid not in known]
        found = await self._ended(unknown, environments)
        self._remember(found)
        self._confirmed[budget.name] = started  # unanswered reads too: they refuse, as before
        log.info(
            "budget.confirmed",
            budget=budget.name,
            asked=len(unknown),
            ended=sorted(found),
            seconds=round(time.monotonic() - started, 3),
        )

    async def _ended(self, entries: list[tuple[str, Mapping[str, Any]]], environments: Index | None) -> Ended:
        """Which of these ledger entries have ended, by the API server. The entries of an environment
        the index has are read as one list per namespace and owner; the rest (and all of them if the
        list cannot be had: a CRD without spec.owner as a selectable field) one GET each."""
        owners: dict[tuple[str, str], list[tuple[str, Mapping[str, Any]]]] = {}
        alone: list[tuple[str, Mapping[str, Any]]] = []
        for uid, entry in entries:
            where = (str(entry.get("namespace")), str(entry.get("name")))
            record = first(environments, where) if environments is not None else None
            if record is not None and record.environment.uid == uid and record.environment.owner:
                owners.setdefault((where[0], record.environment.owner), []).append((uid, entry))
            else:
                alone.append((uid, entry))
        found: Ended = {}
        kube = self.ledger.kube
        listings = await asyncio.gather(
            *(kube.environments_of(*key, urgent=True) for key in owners), return_exceptions=True
        )
        for (key, listed), listing in zip(owners.items(), listings, strict=True):
            if isinstance(listing, BaseException):
                log.warning("budget.confirm_list_failed", namespace=key[0], error=str(listing))
                alone.extend(listed)
                continue
            bodies = {str((item.get("metadata") or {}).get("name")): item for item in listing}
            for uid, entry in listed:
                answer = ended_at(uid, bodies.get(str(entry.get("name"))))
                if answer is not None:
                    found[uid] = answer[0]
        reads = (
            kube.get_environment(str(entry.get("namespace")), str(entry.get("name")), urgent=True) for _, entry in alone
        )
        answers = await asyncio.gather(*reads, return_exceptions=True)
        for (uid, _), body in zip(alone, answers, strict=True):
            if isinstance(body, BaseException):
                log.warning("budget.confirm_failed", uid=uid, error=str(body))
            elif (answer := ended_at(uid, body)) is not None:
                found[uid] = answer[0]
        return found

    def _remember(self, ended: Ended) -> None:
        if len(self.ended) + len(ended) > _ENDED_MAX:
            self.ended.clear()  # forgetting costs one more confirmation, never a wrong count
        self.ended.update(ended)

    def _known_ended(self, budget: Budget, environments: Index | None = None) -> Ended:
        """The budget's entries whose environments are known to be over: confirmed before, or (with
        the environments index) in a terminal phase, being deleted (but for one whose job or VM the
        operator's finalizer still waits for: `finalizing`), or replaced by a new object."""
        known: Ended = {}
        for uid, entry in budget.entries.items():
            if uid in self.ended:
                known[uid] = self.ended[uid]
            elif environments is not None:
                record = first(environments, (entry.get("namespace"), entry.get("name")))
                if record is None:
                    continue  # not seen (yet, or any more): only the API server can tell
                if record.environment.uid != uid:
                    known[uid] = None
                elif is_terminal(record.status.get("phase")):
                    known[uid] = parse_time(record.status.get("stoppedAt"))
                elif record.environment.deleting and not record.environment.finalizing:
                    known[uid] = None  # its Slurm job or VM, if it had one, is confirmed gone
        return known

    def in_use(self, budget: Budget, environments: Index) -> tuple[int, int]:
        """Environments and GPUs counted against the budget now, exactly as admission counts them."""
        return self._holding(budget, environments, time.monotonic())

    def _holding(self, budget: Budget, environments: Index, moment: float) -> tuple[int, int]:
        """Environments and GPUs on the budget: its ledger, less entries known to have ended, plus
        creates admitted but not yet in it. An admitted create leaves that list once the ledger has
        it, it ended or is being deleted, or after a hold time (another webhook may have refused it)."""
        admitted = self.admitted.setdefault(budget.name, {})
        ended = self._known_ended(budget, environments)
        live = {uid: entry for uid, entry in budget.entries.items() if uid not in ended}
        in_ledger = {(entry.get("namespace"), entry.get("name")) for entry in live.values()}
        for key, (_, deadline, where) in list(admitted.items()):
            record = first(environments, where)
            over = record is not None and (is_terminal(record.status.get("phase")) or record.environment.deleting)
            reserved = key in budget.entries if "/" not in key else where in in_ledger  # by uid, else by name
            if reserved or key in self.ended or deadline < moment or over:
                del admitted[key]
        gpus = sum(int(entry.get("gpus") or 0) for entry in live.values())
        return len(live) + len(admitted), gpus + sum(held for held, _, _ in admitted.values())


def build_budget_gate(kube: KubeClient, settings: BudgetSettings, indexes: Mapping[str, Index]) -> BudgetGate:
    """Made once at startup (handlers/lifecycle.py); the webhooks, the accounting and approvals share it."""
    views = Views(indexes["budgets"], indexes["personal_budgets"], indexes["groups"], indexes["ledger_entries"])
    return BudgetGate(settings, Ledger(kube, views))
