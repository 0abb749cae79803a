"""Converge one environment towards its spec: the decision every path shares.

Called for the environment's own handlers (create, update, resume), for pod
events, catalogue changes and the periodic sweep (through engine/reconciler.py).
It reads what exists (indexes and backends), decides with pure functions,
acts through the backend interface, and returns the status patch, the Event
and when to run again; callers write them. Running it twice changes nothing
the second time. It knows backends only through backends/base.py.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import weakref
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import structlog
from kubernetes.client.rest import ApiException

from analysis_operator.backends.base import Backend, BackendUnavailable, Launch, Observation, Retry, State
from analysis_operator.engine import server_certificates, tokens
from analysis_operator.engine.decisions import Decisions
from analysis_operator.engine.events import environment_reference, post_event
from analysis_operator.engine.routes import ROUTE_RETRY_SECONDS, NoRoutes, Route, Routes
from analysis_operator.engine.status import backend_status, phase_from_observation
from analysis_operator.engine.terms import build_terms, effective_flavor
from analysis_operator.engine.tokens import delete_token, ensure_token
from analysis_operator.infra import metrics
from analysis_operator.infra.kube import KubeClient, cluster_refusal
from analysis_operator.model.conditions import (
    build_condition,
    build_transition,
    compose_merge_patches,
    merge_conditions,
)
from analysis_operator.model.domain import (
    Environment,
    Flavor,
    Mount,
    Phase,
    format_time,
    is_terminal,
    parse_duration,
    parse_time,
)
from analysis_operator.model.identity import PosixIdentity
from analysis_operator.policy.access import Reach
from analysis_operator.policy.refusal import Refusal
from analysis_operator.policy.requests import check_request

log = structlog.get_logger("analysis_operator.converge")

WARNING_PHASES = frozenset({Phase.FAILED, Phase.REJECTED, Phase.EXPIRED, Phase.BUDGET_EXHAUSTED})
# Waiting for something only people can fix (a dataset's claim missing in the namespace; or whatever a
# backend's Observation.attention says, such as an image the node cannot pull): a Warning too, also
# told when only the reason changes to it.
WARNING_REASONS = frozenset({"ClaimNotFound"})
# The API server refused something an environment needs, for a rule of the cluster (_refused): tried again
# this often, since a quota may have room again.
REFUSED = "RefusedByCluster"
REFUSED_RETRY_SECONDS = 30.0
# A start (from nothing, waiting or suspended) tells a person nothing the status does not: its Normal
# Event is left out, and the next one says how the start ended (Up, or a Warning). One Event per start,
# not two. Falling back from Ready to Provisioning (its pod gone) is still told.
QUIET_STARTS = frozenset({"", Phase.PENDING.value, Phase.SUSPENDED.value})
WRITTEN_BOUND = 100_000  # phases remembered (Context.written); forgotten all at once beyond


@dataclass(frozen=True)
class Outcome:
    status: dict[str, Any] | None = None  # merge patch for .status, None = nothing to write
    event: tuple[str, str, str] | None = None  # (type, reason, message) to post on the environment
    retry_after: float | None = None  # converge again after this many seconds
    message: str = ""  # why a retry is asked for (for logs and kopf)
    # A first status that says only "starting" on a backend that reports its own progress (pods): it may
    # wait a moment (Context.quiet_start) to be written with the next one, Ready, in one write.
    quiet: bool = False
    # `status` is on the API server already: an end is written before anything is removed (stop)
    written: bool = False


class Gate(Protocol):
    """A check converge runs on every pass before it creates or keeps anything (budgets):
    None lets the environment run, a Refusal ends it in the Refusal's phase. Must be cheap
    (in-memory) when nothing changes; may raise Retry."""

    async def check(
        self, environment: Environment, flavor: Flavor, status: Mapping[str, Any], now: datetime.datetime
    ) -> Refusal | None: ...


class Access(Protocol):
    """Data permissions (engine/data_access.py): the datasets an environment may mount, decided once
    per pass and handed to the backend, or why not."""

    async def grant(
        self,
        environment: Environment,
        flavor: Flavor,
        reach: Reach,
        status: Mapping[str, Any],
        now: datetime.datetime,
    ) -> Refusal | tuple[Mount, ...]: ...

    async def handed(self, environment: Environment, mounts: Sequence[Mount]) -> None:
        """Record that a backend was handed these mounts (audit log)."""

    async def mounted(self, environment: Environment, mounts: Sequence[Mount]) -> None:
        """Tell the owner what is mounted, once the environment runs with them (an Event)."""


class Identities(Protocol):
    """Who an environment runs as (engine/identity.py): the owner's POSIX identity, or why it cannot run."""

    async def posix(self, environment: Environment, mounts: tuple[Mount, ...]) -> PosixIdentity | Refusal | None: ...


class NoIdentities:
    """No directory: backends run environments as their documented default account."""

    async def posix(self, environment: Environment, mounts: tuple[Mount, ...]) -> PosixIdentity | Refusal | None:
        return None


class NoDatasets:
    """For operators and tests without a data catalogue: nothing is ever mounted."""

    async def grant(
        self,
        environment: Environment,
        flavor: Flavor,
        reach: Reach,
        status: Mapping[str, Any],
        now: datetime.datetime,
    ) -> Refusal | tuple[Mount, ...]:
        if environment.datasets:
            return Refusal("DatasetNotFound", "this operator has no dataset catalogue: remove spec.datasets")
        return ()

    async def handed(self, environment: Environment, mounts: Sequence[Mount]) -> None:
        return None

    async def mounted(self, environment: Environment, mounts: Sequence[Mount]) -> None:
        return None


@dataclass(frozen=True)
class Context:
    kube: KubeClient
    backends: Mapping[str, Backend]
    access: Access = field(default_factory=NoDatasets)
    gates: tuple[Gate, ...] = ()
    identities: Identities = field(default_factory=NoIdentities)
    routes: Routes = field(default_factory=NoRoutes)  # OPEN: the gateway's routes (engine/routes.py)
    # uid -> the phase this process last wrote (engine/reconciler.apply): the forward-auth reads it
    # while its index has not caught up with the write (it would otherwise ask the API server)
    written: dict[str, str] = field(default_factory=dict)
    # uid -> the status last decided here, until the index and kopf's bodies show it (engine/decisions.py)
    decisions: Decisions = field(default_factory=Decisions)
    # seconds a quiet first status (Outcome.quiet) waits to be written with the next one; 0 writes it at once
    quiet_start: float = 0.0
    # uid -> (its environment, a quiet first status not written yet, when it must be: time.monotonic)
    # (engine/reconciler.apply)
    unwritten: dict[str, tuple[Environment, dict[str, Any], float]] = field(default_factory=dict)
    # uids whose deletion has begun removing what runs (handlers/environments.py): a converge decided from a
    # copy taken before (the sweep's, waiting behind the deletion on environment_lock) creates nothing
    deleting: set[str] = field(default_factory=set)
    # uids of environments kept after their deletion whose pod, Service, token and route are removed
    # (handlers/environments.remove_held): not asked about again at each of their events and sweeps
    removed_held: set[str] = field(default_factory=set)

    def forget(self, uids: Collection[str]) -> None:
        """Environments that are gone: nothing is kept for them any longer. Each store is bounded on
        its own too, but a bound is far above what a facility runs: without this, what was kept for
        every environment ever made stayed, and pinned the memory its neighbours freed."""
        for uid in uids:
            self.written.pop(uid, None)
            self.unwritten.pop(uid, None)
            self.decisions.forget(uid)
            self.deleting.discard(uid)
            self.removed_held.discard(uid)
        tokens.forget(uids)
        server_certificates.forget(uids)
        for backend in self.backends.values():
            backend.forget(uids)
        self.routes.forget(uids)

    async def repair(self, live: Collection[str]) -> None:
        """What backends and routes made for the environments `live` (uids), made again where someone
        deleted it and nothing else would: no event of an environment or a pod tells of it."""
        parts: list[Backend | Routes] = [*self.backends.values(), self.routes]
        for part in parts:
            try:
                await part.repair(live)
            except Exception as error:  # the API server away a moment: the next orphan sweep's repair
                log.warning("repair.failed", part=type(part).__name__, error=repr(error))

    def retain(self, live: Collection[str]) -> None:
        """Keep only what belongs to `live` environments (for deletions this process did not see)."""
        kept = {
            *self.written,
            *self.unwritten,
            *self.decisions.uids(),
            *self.deleting,
            *self.removed_held,
            *tokens.known_uids(),
        }
        self.forget(kept - set(live))

    async def write_status(self, environment: Environment, status: Mapping[str, Any]) -> None:
        """Write a status decided here. The phase is remembered as decided before the patch is sent:
        the forward-auth (on its own thread) may be asked about the environment by someone who saw the
        new phase before this loop has taken the patch's answer back. Not written: the next converge
        decides again from what the API server shows."""
        if "phase" in status:
            if len(self.written) >= WRITTEN_BOUND:
                self.written.clear()
            self.written[environment.uid] = str(status["phase"])
        try:
            await self.kube.patch_environment_status(environment.namespace, environment.name, dict(status))
        except BaseException:
            self.decisions.forget(environment.uid)
            self.written.pop(environment.uid, None)
            raise


def _transition(
    environment: Environment,
    status: Mapping[str, Any],
    phase: Phase,
    reason: str,
    message: str,
    now: datetime.datetime,
    **fields: Any,
) -> Outcome:
    return _told(environment, status, phase, reason, message, now, False, fields)


def _told(
    environment: Environment,
    status: Mapping[str, Any],
    phase: Phase,
    reason: str,
    message: str,
    now: datetime.datetime,
    attention: bool,
    fields: Mapping[str, Any],
) -> Outcome:
    """The transition's patch, and its Event: on a new phase (not for a start, see QUIET_STARTS), and
    also without one when it asks a person to act (`attention`, WARNING_REASONS) for a new reason."""
    patch = build_transition(
        status, phase=phase, reason=reason, message=message, generation=environment.generation, now=now, **fields
    )
    event = None
    attention = attention or reason in WARNING_REASONS
    if patch is not None and (status.get("phase") != phase.value or (attention and status.get("reason") != reason)):
        warning = phase in WARNING_PHASES or attention
        if warning or not (phase is Phase.PROVISIONING and (status.get("phase") or "") in QUIET_STARTS):
            event = ("Warning" if warning else "Normal", reason, message)
        log.info(
            "environment.transition",
            environment=f"{environment.namespace}/{environment.name}",
            owner=environment.owner,
            phase=phase.value,
            previous=status.get("phase"),
            reason=reason,
        )
    return Outcome(status=patch, event=event)


def _waiting(
    environment: Environment, status: Mapping[str, Any], reason: str, message: str, now: datetime.datetime, delay: float
) -> Outcome:
    outcome = _transition(environment, status, Phase.PENDING, reason, message, now)
    return Outcome(outcome.status, outcome.event, retry_after=delay, message=message)


async def _backend_now(context: Context, environment: Environment, status: Mapping[str, Any]) -> dict[str, Any]:
    """status.backend as its backend shows it now, where status has one: a pod that is gone and whose
    re-creation was refused is no longer shown with its node and endpoint. {} for a start that never
    had one, or a backend that cannot be asked now (the next transition says it)."""
    kind = (status.get("backend") or {}).get("kind") or ""
    backend = context.backends.get(kind)
    if backend is None:
        return {}
    try:
        return {"backend": backend_status(kind, await backend.observe(environment))}
    except BackendUnavailable:
        return {}


def _refused(
    environment: Environment,
    status: Mapping[str, Any],
    refusal: str,
    call: str,
    now: datetime.datetime,
    fields: Mapping[str, Any],
) -> Outcome:
    """A rule of the cluster refused something this environment needs (its pod, Service, token Secret or
    route: Pod Security, a ResourceQuota, a LimitRange, a facility's admission policy): Pending with the
    API server's words and a Warning Event, tried again every REFUSED_RETRY_SECONDS, since a quota may
    have room again and a policy may change. Nothing was started, so nothing is charged. The log names
    the call only (`call`: KubeError's repr), never the API server's message. `fields` ride along (the
    backend as it is now)."""
    message = (
        f"Kubernetes refused what this environment needs: {refusal}. Tried again every "
        f"{REFUSED_RETRY_SECONDS:.0f} s (it starts once a quota has room or the policy allows it): "
        "ask the platform team, or delete this environment"
    )
    outcome = _told(environment, status, Phase.PENDING, REFUSED, message, now, True, fields)
    if outcome.event is not None:
        log.warning("environment.refused", environment=f"{environment.namespace}/{environment.name}", call=call)
    return Outcome(outcome.status, outcome.event, retry_after=REFUSED_RETRY_SECONDS, message=f"{call} refused")


async def stop(
    context: Context,
    environment: Environment,
    flavor: Flavor | None,
    status: Mapping[str, Any],
    phase: Phase,
    reason: str,
    message: str,
    now: datetime.datetime,
) -> Outcome:
    """End the environment for good: remove what runs and the token; keep the object as the record.

    The end is written before anything is removed. A status that says the environment runs over a
    backend that has nothing is how someone else's deletion looks (a pod deleted by hand: started
    again), so an end removed first and written second was undone by a lost write (the API server
    restarting, the operator killed in between): the next converge started it anew. Written first, a
    lost write leaves everything as it was, and the next converge decides the end again; a removal
    that fails once the end is written is left to the orphan sweep, which removes what backends still
    hold for an ended environment (engine/sweep.py)."""
    # The flavor may be gone by now: then the backend that status says runs it.
    kind = flavor.backend if flavor is not None else (status.get("backend") or {}).get("kind", "")
    backend = context.backends.get(kind)
    outcome = _transition(
        environment,
        status,
        phase,
        reason,
        message,
        now,
        stoppedAt=status.get("stoppedAt") or format_time(now),
        connection=None,
    )
    outcome = _with_routable(outcome, environment, status, now, None)
    await _close_route(context, environment, status)  # opened again by a converge if the end is not written
    if outcome.status is not None:
        # With a quiet first status still held (reconciler.apply), in the same write: one, not two.
        held = context.unwritten.pop(environment.uid, None)
        end = outcome.status if held is None else compose_merge_patches(held[1], outcome.status)
        try:
            await context.write_status(environment, end)
        except BaseException:
            if held is not None:
                context.unwritten[environment.uid] = held
            raise
        outcome = replace(outcome, status=end, written=True)
    try:
        if backend is not None:
            await backend.delete(environment)
        await delete_token(context.kube, environment)
    except Exception as error:  # ended all the same: converge no longer acts on it, the orphan sweep removes it
        log.warning(
            "environment.removal_failed", environment=f"{environment.namespace}/{environment.name}", error=repr(error)
        )
    return outcome


def expiry(
    environment: Environment, flavor: Flavor, status: Mapping[str, Any], now: datetime.datetime
) -> tuple[datetime.datetime, datetime.datetime]:
    started_at = parse_time(status.get("startedAt")) or now
    # Approved lifetime BudgetRequests, keyed by request uid so each counts once (handlers/requests.py).
    extended = sum(
        (parse_duration(extra) for extra in (status.get("lifetimeExtensions") or {}).values()), datetime.timedelta()
    )
    lifetime = flavor.max_lifetime if environment.lifetime is None else environment.lifetime  # 0s is not "none"
    return started_at, started_at + lifetime + extended


# One converge at a time per environment: its own handler, pod events and the sweep may all
# call converge for it at once, and two of them acting on one observation would, for example,
# unshelve a VM twice (Nova then puts it in ERROR). Weak values: a lock lives while in use.
_CONVERGING: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()


def environment_lock(uid: str) -> asyncio.Lock:
    """The environment's converge lock; its deletion takes it too (handlers/environments.py), so that it
    removes a job or VM a converge is creating after that converge, not before it."""
    lock = _CONVERGING.get(uid)
    if lock is None:
        lock = _CONVERGING[uid] = asyncio.Lock()
    return lock


async def converge(
    context: Context, environment: Environment, status: Mapping[str, Any], flavor: Flavor | None, now: datetime.datetime
) -> Outcome:
    async with environment_lock(environment.uid):
        latest = context.decisions.latest(environment.uid, status)
        try:
            outcome = await _converge(context, environment, latest, flavor, now)
        except Retry as retry:
            outcome = Outcome(retry_after=retry.delay, message=str(retry))
        except BackendUnavailable as error:
            metrics.backend_reached(flavor.backend if flavor else "", False)
            outcome = _unreachable(environment, latest, flavor, str(error), now)
        except ApiException as error:
            refusal = cluster_refusal(error)
            if not refusal:
                raise
            outcome = _refused(
                environment, latest, refusal, repr(error), now, await _backend_now(context, environment, latest)
            )
        context.decisions.remember(environment.uid, status, latest, outcome.status)
        return outcome


async def end(
    context: Context,
    environment: Environment,
    flavor: Flavor | None,
    status: Mapping[str, Any],
    phase: Phase,
    reason: str,
    message: str,
    now: datetime.datetime,
) -> Outcome:
    """`stop` from outside converge (idle culling, a spent budget), holding the environment's converge lock."""
    async with environment_lock(environment.uid):
        latest = context.decisions.latest(environment.uid, status)
        outcome = await stop(context, environment, flavor, latest, phase, reason, message, now)
        context.decisions.remember(environment.uid, status, latest, outcome.status)
        return outcome


async def _converge(
    context: Context, environment: Environment, status: Mapping[str, Any], flavor: Flavor | None, now: datetime.datetime
) -> Outcome:
    if environment.deleting or environment.uid in context.deleting or is_terminal(status.get("phase")):
        return Outcome()  # deleting: recreating now would race the finalizer and leave an orphan
    flavor = effective_flavor(status, flavor)  # once started, the terms it started with (engine/terms.py)
    if flavor is None:
        return _waiting(
            environment,
            status,
            "FlavorNotFound",
            f"EnvironmentFlavor {environment.flavor!r} does not exist: pick one from `kubectl get environmentflavors`",
            now,
            delay=30,
        )
    backend = context.backends.get(flavor.backend)
    if backend is None:
        return _waiting(
            environment,
            status,
            "BackendNotEnabled",
            f"the {flavor.backend} backend that flavor {flavor.name!r} runs on is not enabled in this operator "
            f"(new ones are refused at admission): this environment waits until it is; delete it to give up",
            now,
            delay=60,
        )
    if environment.problems:  # stored before the CRD had its bounds: say what, in words
        return await stop(
            context,
            environment,
            flavor,
            status,
            Phase.REJECTED,
            "InvalidSpec",
            f"the operator cannot use this spec: {'; '.join(environment.problems)}; correct it",
            now,
        )
    refusal = check_request(environment, flavor) or backend.validate(environment, flavor)
    if refusal is not None:
        metrics.reconcile_refusal(refusal.reason, "request")
        return await stop(context, environment, flavor, status, refusal.phase, refusal.reason, refusal.message, now)
    granted = await context.access.grant(environment, flavor, backend.dataset_problem, status, now)
    if isinstance(granted, Refusal):
        metrics.reconcile_refusal(granted.reason, "datasets")
        return await stop(context, environment, flavor, status, granted.phase, granted.reason, granted.message, now)
    identity = await context.identities.posix(environment, granted)
    if isinstance(identity, Refusal):
        metrics.reconcile_refusal(identity.reason, "identity")
        return await stop(context, environment, flavor, status, identity.phase, identity.reason, identity.message, now)
    for gate in context.gates:
        refusal = await gate.check(environment, flavor, status, now)
        if refusal is not None:
            return await stop(context, environment, flavor, status, refusal.phase, refusal.reason, refusal.message, now)

    started_at, expires_at = expiry(environment, flavor, status, now)
    if now >= expires_at:
        return await stop(
            context,
            environment,
            flavor,
            status,
            Phase.EXPIRED,
            "LifetimeExpired",
            f"lifetime ended at {format_time(expires_at)}; the environment was stopped",
            now,
        )
    times = {"startedAt": format_time(started_at), "expiresAt": format_time(expires_at)}
    launch = _Launcher(context, environment, flavor, granted, identity, expires_at)
    outcome = await _run_backend(backend, environment, flavor, launch, status, now, times, expires_at)
    metrics.backend_reached(flavor.backend, True)
    return _reachable_again(outcome, status, environment, now)


async def _run_backend(
    backend: Backend,
    environment: Environment,
    flavor: Flavor,
    launcher: _Launcher,
    status: Mapping[str, Any],
    now: datetime.datetime,
    times: dict[str, str],
    expires_at: datetime.datetime,
) -> Outcome:
    observation = await backend.observe(environment)
    if environment.suspend:
        await _close_route(launcher.context, environment, status)
        if observation.state.holds:
            observation = await backend.suspend(environment)
        outcome = _transition(
            environment,
            status,
            Phase.SUSPENDED,
            "Suspended",
            "suspended by spec.suspend; the access token and URL are kept",
            now,
            **times,
            **_terms(status, flavor),
            backend=backend_status(flavor.backend, observation),
        )
        return _with_routable(outcome, environment, status, now, None)
    if observation.state is State.SUSPENDED or status.get("phase") == Phase.SUSPENDED.value:
        observation = await backend.resume(await launcher.launch())
    if observation.state is State.GONE:
        observation = await backend.ensure(await launcher.launch())
    upstream = observation.upstream
    if upstream is not None and await server_certificates.unmatched(launcher.context.kube, environment, upstream):
        observation = await _replace_server(backend, environment, launcher, observation, upstream.certificate_id)
    if observation.state.holds:  # an approved extension moved expiresAt: the backend's own limit follows
        await backend.extend(environment, expires_at)
    ended = phase_from_observation(observation)
    if ended in (Phase.FAILED, Phase.EXPIRED):  # ended on the backend's side: nothing of it may stay, nor the token
        return await stop(
            launcher.context,
            environment,
            flavor,
            status,
            ended,
            observation.reason or ended.value,
            observation.message or ended.value,
            now,
        )
    outcome = await _observed(launcher.context, environment, flavor, status, observation, now, times, launcher.mounts)
    first = not status.get("phase") or environment.uid in launcher.context.unwritten  # nothing written yet
    return replace(outcome, quiet=True) if _quiet_start(backend, first, outcome) else outcome


async def _replace_server(
    backend: Backend, environment: Environment, launcher: _Launcher, observation: Observation, stale: str
) -> Observation:
    """A server that holds a certificate other than the one stored for it: neither the gateway nor the
    operator would ever reach it (a submission whose answer was lost, another certificate stored for the
    submission that followed, and the first job found later). A new one is started in its place with a
    new certificate (the backend's ensure, told which certificate not to adopt), instead of an environment
    Ready that nothing can open."""
    replaced = await backend.ensure(await launcher.launch(stale_certificate=stale))
    before, after = str(observation.reference.get("id") or ""), str(replaced.reference.get("id") or "")
    if replaced.state is State.FAILED:
        instead = f"no other could be started ({replaced.message or replaced.reason})"
    else:
        instead = f"{after or 'another'} takes its place"
    message = (
        f"its server{f' ({before})' if before else ''} held a certificate other than the one stored in ConfigMap "
        f"{server_certificates.config_map_name(environment)}, so nothing could open it: {instead}"
    )
    log.warning("environment.server_replaced", environment=f"{environment.namespace}/{environment.name}", id=before)
    await post_event(launcher.context.kube, environment_reference(environment), "Warning", "ServerReplaced", message)
    return replaced


def _quiet_start(backend: Backend, first: bool, outcome: Outcome) -> bool:
    """A first status that only says the environment is starting (pure): nothing was written before,
    nothing waits on a person, and the backend tells the operator itself when it is Ready (its pod's
    events), so the next status follows in a moment. A polled backend's (a Slurm job, a VM) takes
    minutes, and its first status records the job or server: written at once."""
    return (
        not backend.polled
        and first
        and outcome.status is not None
        and outcome.status.get("phase") == Phase.PROVISIONING.value
        and outcome.event is None
        and outcome.retry_after is None
    )


@dataclass(frozen=True)
class _Launcher:
    """Makes the Launch a backend is handed, only when something is to be started."""

    context: Context
    environment: Environment
    flavor: Flavor
    mounts: tuple[Mount, ...]
    identity: PosixIdentity | None
    expires_at: datetime.datetime

    async def launch(self, stale_certificate: str = "") -> Launch:
        """The token (made on first use), and the mounts recorded as handed over (audit log; the
        Event comes at Ready: a pod whose claim is missing has mounted nothing)."""
        token = await ensure_token(self.context.kube, self.environment)
        if self.mounts:
            await self.context.access.handed(self.environment, self.mounts)
        # Only behind the gateway, which checks it: without one, browsers reach the server itself, and
        # would meet a certificate they cannot check.
        certificate = None
        if self.context.routes.enabled:
            certificate = functools.partial(server_certificates.issue_certificate, self.context.kube, self.environment)
        return Launch(
            self.environment,
            self.flavor,
            token,
            self.mounts,
            self.identity,
            self.expires_at,
            certificate,
            stale_certificate,
        )


def _terms(status: Mapping[str, Any], flavor: Flavor) -> dict[str, Any]:
    """Record the terms with the first transition of a started environment; never rewrite them."""
    return {} if isinstance(status.get("terms"), Mapping) else {"terms": build_terms(flavor)}


def _unreachable(
    environment: Environment, status: Mapping[str, Any], flavor: Flavor | None, message: str, now: datetime.datetime
) -> Outcome:
    """The backend cannot be reached: say so in a condition, keep the phase, retry later."""
    previous = {c.get("type"): c for c in status.get("conditions") or ()}.get("BackendReachable")
    condition = build_condition(
        previous,
        type_="BackendReachable",
        status=False,
        reason="BackendUnavailable",
        message=message,
        generation=environment.generation,
        now=now,
    )
    patch = None
    if not previous or previous.get("status") != "False" or previous.get("message") != message:
        patch = {"conditions": merge_conditions(status.get("conditions"), condition)}
        log.warning(
            "backend.unavailable",
            environment=f"{environment.namespace}/{environment.name}",
            backend=flavor.backend if flavor else "",
            message=message,
        )
    event = ("Warning", "BackendUnavailable", message) if patch else None
    return Outcome(patch, event, retry_after=10, message=message)


def _reachable_again(
    outcome: Outcome, status: Mapping[str, Any], environment: Environment, now: datetime.datetime
) -> Outcome:
    previous = {c.get("type"): c for c in status.get("conditions") or ()}.get("BackendReachable")
    if not previous or previous.get("status") == "True":
        return outcome
    condition = build_condition(
        previous,
        type_="BackendReachable",
        status=True,
        reason="BackendReachable",
        message="the backend answers again",
        generation=environment.generation,
        now=now,
    )
    patch = dict(outcome.status or {})
    patch["conditions"] = merge_conditions(patch.get("conditions") or status.get("conditions"), condition)
    return replace(outcome, status=patch, written=False)  # an end stop wrote lacks the condition: written again


async def _observed(
    context: Context,
    environment: Environment,
    flavor: Flavor,
    status: Mapping[str, Any],
    observation: Observation,
    now: datetime.datetime,
    times: dict[str, str],
    mounts: Sequence[Mount] = (),
) -> Outcome:
    phase = phase_from_observation(observation)
    connection = {"secretName": environment.child_name}
    route: Route | None = None
    starting = phase in (Phase.PROVISIONING, Phase.READY)
    reason, message = observation.reason or phase.value, observation.message or phase.value
    if starting and observation.upstream is not None and context.routes.enabled:
        # routed while it starts (the forward-auth answers "starting" until Ready), so that at Ready
        # the gateway only has to follow an endpoint becoming ready
        route = await context.routes.open(environment, observation.upstream, ready=phase is Phase.READY)
        connection["url"] = route.url
        opening = phase is Phase.READY and status.get("phase") != Phase.READY.value and route.routable
        if opening and not context.routes.served(environment, observation.upstream):
            # Ready means OPEN works: not before the gateway serves its route (settings gateway.probe_url)
            phase, reason, message = Phase.PROVISIONING, "Opening", f"running; the gateway is opening {route.url}"
    elif observation.url:
        connection["url"] = observation.url
    if route is None:  # not running, or no longer reachable where it was (a job completing, a VM shut off)
        await _close_route(context, environment, status)
    extra: dict[str, Any] = {
        "backend": backend_status(flavor.backend, observation),
        "connection": connection,
        **times,
        **_terms(status, flavor),
    }
    if phase is Phase.FAILED:
        extra["stoppedAt"] = format_time(now)
    if phase is Phase.READY and status.get("phase") != Phase.READY.value and mounts:
        await context.access.mounted(environment, mounts)
    outcome = _told(environment, status, phase, reason, message, now, observation.attention, extra)
    if (
        outcome.status is None
        and phase is Phase.READY
        and (status.get("connection") or {}).get("url") != connection.get("url")
    ):
        outcome = Outcome({"connection": connection}, outcome.event)  # the gateway came, went or moved
    outcome = _with_routable(outcome, environment, status, now, route)
    if route is not None and not route.routable and route.retry:
        return Outcome(outcome.status, outcome.event, retry_after=ROUTE_RETRY_SECONDS, message=route.message)
    return outcome


NOT_RUNNING = "NotRunning"  # Routable's reason once nothing of the route is left
NOTHING_APPLIED = (NOT_RUNNING, "GatewayNotFound", "NoAddress")  # routes.GatewayRoutes.open: said before any apply


def _routed(status: Mapping[str, Any]) -> bool:
    """Something of its route may be in place: Routable True, or False with a route the gateway refuses or one
    only partly made (a quota refused the route after its Service) - not NotRunning, nor a reason given before
    anything was applied (no Gateway, no address)."""
    condition = {c.get("type"): c for c in status.get("conditions") or ()}.get("Routable")
    return condition is not None and condition.get("reason") not in NOTHING_APPLIED


async def _close_route(context: Context, environment: Environment, status: Mapping[str, Any]) -> None:
    """Nothing is routable while it does not run (suspended, stopped, expired, revoked)."""
    if _routed(status):
        await context.routes.close(environment)


def _with_routable(
    outcome: Outcome, environment: Environment, status: Mapping[str, Any], now: datetime.datetime, route: Route | None
) -> Outcome:
    """Add the Routable condition to the patch when it changes, its message too (only where a gateway is or
    was involved)."""
    conditions = {c.get("type"): c for c in status.get("conditions") or ()}
    previous = conditions.get("Routable")
    if route is None:
        if previous is None or previous.get("reason") == NOT_RUNNING:
            return outcome
        routable, reason, message = False, NOT_RUNNING, "not routed: the environment does not run"
    else:
        routable, reason, message = route.routable, route.reason, route.message
    same = previous is not None and previous.get("status") == str(routable) and previous.get("reason") == reason
    # Its words alone count where they are the gateway's verdict (told by the watch, once per change) or
    # where it is open (the URL); not for a refusal retried every 30 s, whose words (the API server's quota
    # numbers) may change at every retry: a status write each time.
    worded = route is not None and (route.routable or not route.retry)
    if same and previous is not None and (not worded or previous.get("message") == message):
        return outcome
    condition = build_condition(
        previous,
        type_="Routable",
        status=routable,
        reason=reason,
        message=message,
        generation=environment.generation,
        now=now,
    )
    patch = dict(outcome.status or {})
    patch["conditions"] = merge_conditions(patch.get("conditions") or status.get("conditions"), condition)
    event = outcome.event
    # The same verdict in other words (the gateway's message, the API server's quota numbers, another URL):
    # the condition says them, with no second Warning.
    if not routable and not same and route is not None and (event is None or event[0] == "Normal"):
        # over a Normal one of the same pass ("Up": the status says it too): that it cannot be opened is news
        event = ("Warning", reason, message)
    return Outcome(patch, event, outcome.retry_after, outcome.message)
