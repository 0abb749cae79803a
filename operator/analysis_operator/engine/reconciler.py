"""Converge an environment from outside its own kopf handler, and retry it on its own.

Pod events, catalogue changes, budget exhaustion and the sweep all converge
environments that kopf did not hand them; kopf would only log an error raised
there. So every such path goes through `Reconciler.reconcile`, which writes the
outcome and, when the outcome asks for it (a backend down, a grant that
failed, an API error), converges that environment again after the delay,
without waiting for some unrelated event: level-triggered. The environment's
own kopf handlers get kopf's retry instead (handlers/environments.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import time
import weakref
from collections.abc import Awaitable, Callable, Collection, Coroutine, Mapping
from typing import Any

import structlog

from analysis_operator.backends.base import Observation, State
from analysis_operator.engine.converge import Context, Outcome, converge
from analysis_operator.engine.events import environment_reference, post_event
from analysis_operator.engine.views import EnvironmentRecord, Index, first, values
from analysis_operator.infra.kube import namespace_terminating
from analysis_operator.model.conditions import compose_merge_patches
from analysis_operator.model.domain import Environment, Flavor, Phase

log = structlog.get_logger("analysis_operator.reconciler")
MAX_BACKOFF_SECONDS = 60.0
# Phases in which an environment may wait on a retry (Reconciler.acting_again); "" and None: no status yet.
WAITING_PHASES = frozenset({Phase.PENDING.value, Phase.PROVISIONING.value, "", None})
STANDBY_SECONDS = 10.0  # a timer due on a replica that is not acting now: asked again this much later


async def always_acting() -> bool:
    return True


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


async def apply(context: Context, environment: Environment, outcome: Outcome) -> float | None:
    """Write an outcome: the status patch (Context.write_status; not again where the outcome says it is
    written: converge.stop writes an end before it removes anything), then the Event.

    A quiet first status (Outcome.quiet: "starting", nothing written before) is held for up to
    context.quiet_start seconds instead, and written with the next status decided that is not quiet
    (Ready, usually a moment later: one write where there were two, and no Event: the status says it
    all), or alone once that time is up. Returns the seconds
    left until then while one is held (the caller converges again at that time), else None."""
    status = outcome.status
    held = context.unwritten.pop(environment.uid, None)
    if held is not None:
        left = held[2] - time.monotonic()
        if left > 0 and (status is None or outcome.quiet):  # still only "starting" (the gateway opening)
            patch = held[1] if status is None else compose_merge_patches(held[1], status)
            context.unwritten[environment.uid] = (environment, patch, held[2])
            return left
        status = compose_merge_patches(held[1], status or {})
        if outcome.event is not None and outcome.event[0] == "Normal" and status.get("phase") == "Ready":
            # Up within the quiet moment: its first status is Ready, with the condition's time and message;
            # nobody saw it wait, so an Event would only repeat the status (G3: Events only where they tell
            # a person something new). A start that showed Provisioning is told how it ended.
            outcome = dataclasses.replace(outcome, event=None)
    elif status is not None and outcome.quiet and context.quiet_start > 0:
        context.unwritten[environment.uid] = (environment, status, time.monotonic() + context.quiet_start)
        return context.quiet_start
    if status is not None and not (outcome.written and held is None):  # a stop's end is written already
        await context.write_status(environment, status)
    if outcome.event is not None:
        await post_event(context.kube, environment_reference(environment), *outcome.event)
    return None


class Reconciler:
    def __init__(
        self,
        context: Context,
        environments: Index,
        flavors: Index,
        clock: Callable[[], datetime.datetime] = utcnow,
        first_backoff: float = 1.0,
        acting: Callable[[], Awaitable[bool]] = always_acting,
    ) -> None:
        self.context, self.environments, self.flavors, self.clock = context, environments, flavors, clock
        self.first_backoff = first_backoff
        # Does this replica act now (kopf peering: handlers/lifecycle.acting)? kopf pauses its own handlers on
        # a replica another outranks, not this class's timers: one due there converges only once it acts again.
        self.acting = acting
        self._deferred: dict[str, tuple[str, str]] = {}  # uid -> key: due while this replica did not act
        self._recheck: asyncio.TimerHandle | None = None  # when they are asked about again
        # uid -> (when, timer, only to write a held first status: then not needed once it is written)
        self._timers: dict[str, tuple[float, asyncio.TimerHandle, bool]] = {}
        self._failures: dict[str, int] = {}  # uid -> unexpected errors in a row, for the backoff
        self._tasks: set[asyncio.Task[Any]] = set()
        # converge and its write, one at a time per environment: two converges decided in one order
        # must not be written in the other (an older "Opening" landing after "Ready")
        self._writing: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self.forgotten = 0  # environments forgotten since the sweep last reset it (its garbage collection)
        self.decided = 0  # decisions this process made (none: kopf's resume handlers have yet to run here)

    async def decide(
        self,
        environment: Environment,
        status: Mapping[str, Any],
        flavor: Flavor | None,
        now: datetime.datetime | None = None,
    ) -> Outcome:
        """Converge and write the outcome, one at a time per environment; errors are raised. The
        environment's own kopf handler writes through here too, not through kopf's patch: kopf sends
        that after the handler returns, so a pod event's later decision (Ready) could land first and
        be overwritten by the older one (Provisioning), which decisions.py would then take for a
        status not yet caught up with, and the environment would stay Provisioning."""
        self.decided += 1
        async with self._lock(environment.uid):
            outcome = await converge(self.context, environment, status, flavor, now or self.clock())
            held = await apply(self.context, environment, outcome)
        if held is not None:  # a quiet first status waits: written by the next decision, or by this one
            self.requeue(EnvironmentRecord(environment, status), held, hold=True)
        return outcome

    def _lock(self, uid: str) -> asyncio.Lock:
        lock = self._writing.get(uid)
        if lock is None:
            lock = self._writing[uid] = asyncio.Lock()
        return lock

    async def flush(self) -> None:
        """Write every quiet first status still held, now (at shutdown: the next process would decide
        it again from nothing, with a later startedAt). Not on a replica that does not act now: the one
        that does has decided those environments since, and a held "starting" would overwrite that."""
        if not await self._acts():
            if self.context.unwritten:
                log.info("reconcile.flush_skipped", unwritten=len(self.context.unwritten), why="not the acting replica")
            self.context.unwritten.clear()
            return
        for uid in list(self.context.unwritten):
            async with self._lock(uid):
                held = self.context.unwritten.get(uid)
                if held is None:
                    continue
                self.context.unwritten[uid] = (held[0], held[1], 0.0)  # due
                try:
                    await apply(self.context, held[0], Outcome())
                except Exception as error:  # the next process decides it again, from what the API shows
                    log.warning(
                        "reconcile.flush_failed", environment=f"{held[0].namespace}/{held[0].name}", error=repr(error)
                    )

    def started(self, uid: str) -> bool:
        """Is a first decision for it under way, or held unwritten (Context.unwritten)? Then a change of
        what it runs on is for this process to decide on, though no status shows it yet."""
        lock = self._writing.get(uid)
        return uid in self.context.unwritten or (lock is not None and lock.locked())

    def holds_start(self, uid: str, observation: Observation) -> bool:
        """Is its quiet first status held (Context.unwritten), decided from a start the backend still reports
        (the same reason: a pod created, then scheduled, still starting)? Then a converge could only hold the
        same status again: it is written with Ready, or by its own timer from what the backend says then. With
        the gateway on, only once the held status names the route (opened by the converge that decided it)."""
        held = self.context.unwritten.get(uid)
        if held is None or observation.state is not State.PROVISIONING or held[1].get("reason") != observation.reason:
            return False
        return not self.context.routes.enabled or bool((held[1].get("connection") or {}).get("url"))

    async def reconcile(self, record: EnvironmentRecord, now: datetime.datetime | None = None) -> Outcome:
        environment = record.environment
        try:
            outcome = await self.decide(environment, record.status, first(self.flavors, environment.flavor), now)
        except Exception as error:  # an API error, a bug: logged, and tried again with a growing delay
            if namespace_terminating(error):  # its pod went with the namespace: so will the environment
                log.debug("reconcile.namespace_terminating", environment=f"{environment.namespace}/{environment.name}")
                return Outcome()
            failures = self._failures[environment.uid] = self._failures.get(environment.uid, 0) + 1
            delay = min(MAX_BACKOFF_SECONDS, self.first_backoff * 2.0 ** (failures - 1))
            log.warning(
                "reconcile.failed",
                environment=f"{environment.namespace}/{environment.name}",
                error=repr(error),
                retry_in=delay,
            )
            outcome = Outcome(retry_after=delay, message=repr(error))
        else:
            self._failures.pop(environment.uid, None)
        if outcome.retry_after is not None:
            self.requeue(record, outcome.retry_after)
        return outcome

    def requeue(self, record: EnvironmentRecord, delay: float, hold: bool = False) -> None:
        """Converge it again in `delay` seconds (the sooner of two asks wins), from the index as it is then.
        `hold`: only to write its held first status (Context.unwritten); skipped if that is written by then."""
        loop = asyncio.get_running_loop()
        uid, key = record.environment.uid, (record.environment.namespace, record.environment.name)
        when = loop.time() + delay
        scheduled = self._timers.get(uid)
        if scheduled is not None:
            if scheduled[0] <= when:
                if scheduled[2] and not hold:  # asked for more than the held status now
                    self._timers[uid] = (scheduled[0], scheduled[1], False)
                return
            scheduled[1].cancel()
            hold = hold and scheduled[2]
        self._timers[uid] = (when, loop.call_later(delay, self._fire, uid, key), hold)

    def wake(self, environment: Environment) -> None:
        """Converge it again now (something it waits for has happened: its route is served)."""
        self.requeue(EnvironmentRecord(environment, {}), 0)

    def _fire(self, uid: str, key: tuple[str, str]) -> None:
        scheduled = self._timers.pop(uid, None)
        hold_only = scheduled is not None and scheduled[2]
        if hold_only and uid not in self.context.unwritten:
            return  # its held status went out with Ready meanwhile: nothing left to do
        self._spawn(self._fired(uid, key, hold_only))

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fired(self, uid: str, key: tuple[str, str], hold_only: bool) -> None:
        """A timer due: converged only where this replica acts now (kopf peering). Where another outranks
        it, kopf has paused its handlers and its index, and the other decides: see _defer."""
        if not await self._acts():
            self._defer(uid, key, hold_only)
            return
        current: EnvironmentRecord | None = first(self.environments, key)  # read once it may act
        if current is None or current.environment.uid != uid:
            return  # deleted (or replaced by a namesake) meanwhile: nothing to retry
        await self.reconcile(current)

    def _defer(self, uid: str, key: tuple[str, str], hold_only: bool) -> None:
        """A timer due on a replica that does not act now. Its held first status is dropped (the acting
        replica decides the environment: written later, it would overwrite that); a retry is kept, once
        per environment, and converged when this replica acts again, from the environment as the API
        server has it then (kopf lists again only after it resumes: its index is as it was at the pause).
        One look at the peering record per STANDBY_SECONDS for all of them, not one per timer."""
        self.context.unwritten.pop(uid, None)
        if hold_only:
            return
        if not self._deferred:
            log.info(
                "reconcile.standby",
                action=f"converged when this replica acts again (asked every {STANDBY_SECONDS:.0f} s)",
            )
        self._deferred[uid] = key
        self._recheck_in(STANDBY_SECONDS)

    def _recheck_in(self, delay: float) -> None:
        if self._recheck is None:
            self._recheck = asyncio.get_running_loop().call_later(delay, lambda: self._spawn(self._resume_deferred()))

    def acting_again(self) -> None:
        """This replica acts again after another outranked it (kopf peering). The retries that other one
        held (a refusal's, a route's) are not here, and kopf runs no resume handler for environments this
        process handled before: every environment that may wait on one (starting or pending) is converged
        once, from the API server's answer (_defer). Nothing where this process never decided anything:
        kopf's resume handlers converge everything there."""
        if not self.decided:
            return
        for record in values(self.environments):
            environment = record.environment
            if not environment.deleting and record.status.get("phase") in WAITING_PHASES:
                self._deferred[environment.uid] = (environment.namespace, environment.name)
        if self._deferred:
            if self._recheck is not None:
                self._recheck.cancel()
                self._recheck = None
            self._recheck_in(0)

    async def _resume_deferred(self) -> None:
        self._recheck = None
        if not await self._acts():
            if self._deferred:
                self._recheck_in(STANDBY_SECONDS)
            return
        deferred, self._deferred = self._deferred, {}
        if not deferred:
            return
        log.info("reconcile.acting_again", environments=len(deferred))
        for uid, key in deferred.items():
            self._spawn(self._converge_read(uid, key))

    async def _converge_read(self, uid: str, key: tuple[str, str]) -> None:
        """Converge it from the API server's answer, not the index (see _defer)."""
        try:
            body = await self.context.kube.get_environment(*key)
        except Exception as error:  # the API server away a moment: asked again with the others
            log.warning("reconcile.read_failed", environment=f"{key[0]}/{key[1]}", error=repr(error))
            self._defer(uid, key, False)
            return
        if body is None or (body.get("metadata") or {}).get("uid") != uid:
            return  # deleted (or replaced by a namesake) meanwhile
        await self.reconcile(EnvironmentRecord(Environment.from_body(body), body.get("status") or {}))

    async def _acts(self) -> bool:
        try:
            return await self.acting()
        except Exception as error:  # the peering record unreadable (the API server away): not now
            log.warning("reconcile.role_unknown", error=repr(error))
            return False

    @property
    def pending(self) -> int:
        return len(self._timers)

    def forget(self, uids: Collection[str]) -> None:
        """Environments that are gone: no retry for them, and nothing kept (Context.forget)."""
        self.forgotten += len(uids)
        for uid in uids:
            self._failures.pop(uid, None)
            self._deferred.pop(uid, None)
            timer = self._timers.pop(uid, None)
            if timer is not None:
                timer[1].cancel()
        self.context.forget(uids)

    def retain(self, live: Collection[str]) -> None:
        """Keep only what belongs to `live` environments (for deletions this process did not see)."""
        self.forget({*self._failures, *self._timers, *self._deferred} - set(live))
        self.context.retain(live)

    def close(self) -> None:
        for _, timer, _ in self._timers.values():
            timer.cancel()
        self._timers.clear()
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None
        for task in self._tasks:
            task.cancel()
