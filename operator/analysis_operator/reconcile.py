"""Converge one environment towards its spec: the glue every handler shares.

Called from the environment's own handlers (create, update, resume), from
pod events, and from the periodic sweep. It reads what exists (indexes and
backends), decides with pure functions, acts through a backend, and returns
the status patch and the Event to post; callers write them. Running it twice
changes nothing the second time.
"""
from __future__ import annotations

import asyncio
import datetime
import weakref
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import structlog

from analysis_operator.backends.base import Backend, BackendUnavailable, Observation, State
from analysis_operator.backends.kubernetes import TOKEN_KEY, build_token_secret, new_token
from analysis_operator.domain import TERMINAL_PHASES, Environment, Flavor, Phase, format_time, parse_duration, \
    parse_time
from analysis_operator.kube import KubeClient
from analysis_operator.policy.requests import Rejection, check_request
from analysis_operator.status import backend_status, build_condition, build_transition, merge_conditions, \
    phase_from_observation

log = structlog.get_logger("analysis_operator.reconcile")

WARNING_PHASES = frozenset({Phase.FAILED, Phase.REJECTED, Phase.EXPIRED, Phase.BUDGET_EXHAUSTED})


@dataclass(frozen=True)
class Outcome:
    status: dict[str, Any] | None = None   # merge patch for .status, None = nothing to write
    event: tuple[str, str, str] | None = None  # (type, reason, message) to post on the environment
    retry_after: float | None = None       # ask to be called again (e.g. flavor not there yet)


class Gate(Protocol):
    """A check converge runs on every pass before it creates or keeps anything
    (data access, budgets): None lets the environment run, a Rejection ends it
    with the Rejection's phase. Must be cheap (in-memory) when nothing changes."""

    async def check(self, environment: Environment, flavor: Flavor, status: Mapping[str, Any],
                    now: datetime.datetime) -> Rejection | None: ...


@dataclass(frozen=True)
class Context:
    kube: KubeClient
    backends: Mapping[str, Backend]
    gates: tuple[Gate, ...] = ()


def _transition(environment: Environment, status: Mapping[str, Any], phase: Phase, reason: str,
                message: str, now: datetime.datetime, **fields: Any) -> Outcome:
    patch = build_transition(status, phase=phase, reason=reason, message=message,
                             generation=environment.generation, now=now, **fields)
    event = None
    if patch is not None and status.get("phase") != phase.value:
        event = ("Warning" if phase in WARNING_PHASES else "Normal", reason, message)
        log.info("environment.transition", environment=f"{environment.namespace}/{environment.name}",
                 owner=environment.owner, phase=phase.value, previous=status.get("phase"), reason=reason)
    return Outcome(status=patch, event=event)


async def _token(context: Context, environment: Environment) -> str:
    """The environment's access token, creating its Secret on first use."""
    token = new_token()
    if await context.kube.create("Secret", environment.namespace, build_token_secret(environment, token)):
        return token
    existing = await context.kube.read_secret_value(environment.namespace, environment.child_name, TOKEN_KEY)
    return existing or token


async def stop(context: Context, environment: Environment, flavor: Flavor | None, status: Mapping[str, Any],
               phase: Phase, reason: str, message: str, now: datetime.datetime) -> Outcome:
    """End the environment for good: remove what runs and the token; keep the object as the record."""
    if flavor is not None and flavor.backend.value in context.backends:
        await context.backends[flavor.backend.value].delete(environment)
    await context.kube.delete("Secret", environment.namespace, environment.child_name)
    return _transition(environment, status, phase, reason, message, now,
                       stoppedAt=status.get("stoppedAt") or format_time(now), connection=None)


def expiry(environment: Environment, flavor: Flavor, status: Mapping[str, Any],
           now: datetime.datetime) -> tuple[datetime.datetime, datetime.datetime]:
    started_at = parse_time(status.get("startedAt")) or now
    # Approved lifetime BudgetRequests, keyed by request uid so each counts once (handlers/budgets.py).
    extended = sum((parse_duration(extra) for extra in (status.get("lifetimeExtensions") or {}).values()),
                   datetime.timedelta())
    return started_at, started_at + (environment.lifetime or flavor.max_lifetime) + extended


# One converge at a time per environment: its own handler, pod events and the sweep may all
# call converge for it at once, and two of them acting on one observation would, for example,
# unshelve a VM twice (Nova then puts it in ERROR). Weak values: a lock lives while in use.
_CONVERGING: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()


async def converge(context: Context, environment: Environment, status: Mapping[str, Any],
                   flavor: Flavor | None, now: datetime.datetime) -> Outcome:
    lock = _CONVERGING.get(environment.uid)
    if lock is None:
        lock = _CONVERGING[environment.uid] = asyncio.Lock()
    async with lock:
        return await _converge(context, environment, status, flavor, now)


async def _converge(context: Context, environment: Environment, status: Mapping[str, Any],
                    flavor: Flavor | None, now: datetime.datetime) -> Outcome:
    if environment.deleting or status.get("phase") in {phase.value for phase in TERMINAL_PHASES}:
        return Outcome()  # deleting: recreating now would race the finalizer and leave an orphan
    if flavor is None:
        outcome = _transition(environment, status, Phase.PENDING, "FlavorNotFound",
                              f"EnvironmentFlavor {environment.flavor!r} does not exist: "
                              f"pick one from `kubectl get environmentflavors`", now)
        return Outcome(outcome.status, outcome.event, retry_after=30)
    rejection = check_request(environment, flavor)
    if rejection is not None:
        return _transition(environment, status, Phase.REJECTED, rejection.reason, rejection.message, now,
                           stoppedAt=format_time(now))
    for gate in context.gates:
        rejection = await gate.check(environment, flavor, status, now)
        if rejection is not None:
            try:
                return await stop(context, environment, flavor, status, rejection.phase, rejection.reason,
                                  rejection.message, now)
            except BackendUnavailable as error:
                return _unreachable(environment, status, flavor, str(error), now)
    backend = context.backends.get(flavor.backend.value)
    if backend is None:
        outcome = _transition(environment, status, Phase.PENDING, "BackendNotEnabled",
                              f"the {flavor.backend.value} backend is not enabled in this operator", now)
        return Outcome(outcome.status, outcome.event, retry_after=60)

    started_at, expires_at = expiry(environment, flavor, status, now)
    if now >= expires_at:
        try:
            return await stop(context, environment, flavor, status, Phase.EXPIRED, "LifetimeExpired",
                              f"lifetime ended at {format_time(expires_at)}; the environment was stopped", now)
        except BackendUnavailable as error:
            return _unreachable(environment, status, flavor, str(error), now)
    times = {"startedAt": format_time(started_at), "expiresAt": format_time(expires_at)}

    try:
        outcome = await _run_backend(context, backend, environment, flavor, status, now, times)
    except BackendUnavailable as error:
        return _unreachable(environment, status, flavor, str(error), now)
    return _reachable_again(outcome, status, environment, now)


async def _run_backend(context: Context, backend: Backend, environment: Environment, flavor: Flavor,
                       status: Mapping[str, Any], now: datetime.datetime, times: dict[str, str]) -> Outcome:
    observation = await backend.observe(environment)
    shelved = observation.reason == "Shelved"  # OpenStack keeps a suspended VM's disk
    if environment.suspend:
        if observation.state is not State.GONE and not shelved:
            await getattr(backend, "suspend", backend.delete)(environment)
        return _transition(environment, status, Phase.SUSPENDED, "Suspended",
                           "suspended by spec.suspend; the access token and URL are kept", now, **times)
    if shelved:
        observation = await backend.resume(environment)
    elif observation.state is State.GONE:
        token = await _token(context, environment)
        observation = await backend.ensure(environment, flavor, token)
    return _observed(environment, flavor, status, observation, now, times)


def _unreachable(environment: Environment, status: Mapping[str, Any], flavor: Flavor, message: str,
                 now: datetime.datetime) -> Outcome:
    """The backend cannot be reached: say so in a condition, keep the phase, retry later."""
    previous = {c.get("type"): c for c in status.get("conditions") or ()}.get("BackendReachable")
    condition = build_condition(previous, type_="BackendReachable", status=False, reason="BackendUnavailable",
                                message=message, generation=environment.generation, now=now)
    patch = None
    if not previous or previous.get("status") != "False" or previous.get("message") != message:
        patch = {"conditions": merge_conditions(status.get("conditions"), condition)}
        log.warning("backend.unavailable", environment=f"{environment.namespace}/{environment.name}",
                    backend=flavor.backend.value, message=message)
    return Outcome(patch, ("Warning", "BackendUnavailable", message) if patch else None, retry_after=10)


def _reachable_again(outcome: Outcome, status: Mapping[str, Any], environment: Environment,
                     now: datetime.datetime) -> Outcome:
    previous = {c.get("type"): c for c in status.get("conditions") or ()}.get("BackendReachable")
    if not previous or previous.get("status") == "True":
        return outcome
    condition = build_condition(previous, type_="BackendReachable", status=True, reason="BackendReachable",
                                message="the backend answers again", generation=environment.generation, now=now)
    patch = dict(outcome.status or {})
    patch["conditions"] = merge_conditions(patch.get("conditions") or status.get("conditions"), condition)
    return Outcome(patch, outcome.event, outcome.retry_after)


def _observed(environment: Environment, flavor: Flavor, status: Mapping[str, Any], observation: Observation,
              now: datetime.datetime, times: dict[str, str]) -> Outcome:
    phase = phase_from_observation(observation)
    connection = {"secretName": environment.child_name}
    if observation.url:
        connection["url"] = observation.url
    extra: dict[str, Any] = {"backend": backend_status(flavor.backend.value, observation), "connection": connection, **times}
    if phase is Phase.FAILED:
        extra["stoppedAt"] = format_time(now)
    message = observation.message or phase.value
    return _transition(environment, status, phase, observation.reason or phase.value, message, now, **extra)
