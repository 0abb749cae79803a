"""Idle culling: read every Ready environment's activity in bounded batches, warn, then cull.

One loop (handlers/lifecycle.py) runs `IdleChecker.check` every idle.check_interval_seconds
(start to start) over the environments index. For each Ready environment whose flavor has an
idleTimeout (policy/idle.py) it reads, at most `concurrency` at a time and each server within one
`request_timeout_seconds` in all (a slow or broken server never holds up the others):
  - the server, the way the gateway reaches it (status.backend.endpoint), with the environment's
    token: JupyterLab's /api/status and /api/kernels (at once, with `no_track_activity`, so the
    check itself is not activity); a desktop VM's /api/status, which the activity agent its
    cloud-init starts keeps (the last time a desktop connection was open, and how many are);
  - the gateway: the last request the operator's forward-auth let through (GatewayActivity).
An environment that holds its node's resources while its node says its server cannot run
(policy/idle.CANNOT_RUN: crash-looping, an image that cannot be pulled) has no server to read: it
is judged on when it was last usable, and culled like an idle one when that is too long ago.
Each environment is judged at the time its server was read (a round at 10,000 takes a while, and
a server's clock runs on meanwhile). Then: status.lastActivity (written at most once per status
interval), the Idle condition (an unknown that follows a known verdict waits one status interval,
so a server that fails every other check is not written every round), one IdleSoon Warning Event
per idle period, and at the timeout the flavor's action: Suspend sets spec.suspend (the converge
that follows removes pod, job or VM and the route, and accounting stops charging it: a suspended
entry is paused), Stop ends it for good. The Events name the GPU-hours the rest of its lifetime
would have held.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import structlog

from analysis_operator.engine import server_certificates
from analysis_operator.engine.converge import Context, end
from analysis_operator.engine.events import environment_reference, post_event
from analysis_operator.engine.reconciler import always_acting, apply, utcnow
from analysis_operator.engine.server_certificates import not_stored, tls_options
from analysis_operator.engine.terms import effective_flavor
from analysis_operator.engine.tokens import read_token, token_lost
from analysis_operator.engine.views import EnvironmentRecord, Index, first, values
from analysis_operator.model.conditions import build_condition, merge_conditions
from analysis_operator.model.domain import Environment, Flavor, Phase, format_time, parse_time
from analysis_operator.policy.idle import (
    Action,
    Decision,
    IdlePolicy,
    ServerActivity,
    Verdict,
    decide,
    decide_unusable,
    gpu_hours_saved,
    holding_unready,
    latest_activity,
    policy_of,
    policy_problem,
    unusable_since,
)
from analysis_operator.policy.opening import base_path
from analysis_operator.settings import Settings

log = structlog.get_logger("analysis_operator.idle")


class GatewayActivity:
    """The last request the gateway let through, per environment uid (in memory; the forward-auth
    of the active replica sees every request, and a restart forgets nothing that matters: the
    server's own report covers it)."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}

    def saw(self, uid: str) -> None:
        self._seen[uid] = time.time()

    def last(self, uid: str) -> datetime.datetime | None:
        seen = self._seen.get(uid)
        return None if seen is None else datetime.datetime.fromtimestamp(seen, datetime.UTC)

    def forget(self, live: set[str]) -> None:
        for uid in list(self._seen):  # a copy: the forward-auth thread adds to it meanwhile
            if uid not in live:
                self._seen.pop(uid, None)


def server_url(
    environment: Environment, endpoint: str, settings: Settings, desktop: bool = False, tls: bool = False
) -> str:
    """The server's base URL from status.backend.endpoint (`address:port`, or `service:port` for pods).
    A Service name is fully qualified (a trailing dot: no walk through the pod's DNS search list);
    a desktop is served at its root (the gateway strips the prefix), JupyterLab under its base URL."""
    host, _, port = endpoint.rpartition(":")
    try:
        address = ipaddress.ip_address(host)
        host = f"[{address}]" if address.version == 6 else str(address)
    except ValueError:  # a Service of the environment's own
        host = f"{host}.{environment.namespace}.svc.{settings.cluster_domain}."
    path = "/" if desktop else base_path(settings.gateway.path_prefix, environment.namespace, environment.name)
    return f"{'https' if tls else 'http'}://{host}:{port}{path}"


def parse_server(status_answer: Any, kernels_answer: Any) -> ServerActivity:
    """JupyterLab's /api/status and /api/kernels answers, read defensively (pure)."""
    if not isinstance(status_answer, Mapping) or not isinstance(status_answer.get("last_activity"), str):
        return ServerActivity(problem="the server's /api/status has no last_activity")
    try:  # ISO 8601 with fractions and an offset or Z, as jupyter_server writes it
        last: datetime.datetime | None = datetime.datetime.fromisoformat(status_answer["last_activity"])
    except ValueError:
        last = None
    if last is not None and last.tzinfo is None:
        last = last.replace(tzinfo=datetime.UTC)
    if last is None:
        return ServerActivity(problem=f"the server's last_activity {status_answer['last_activity']!r} is not a time")
    busy = isinstance(kernels_answer, list) and any(
        isinstance(kernel, Mapping) and kernel.get("execution_state") == "busy" for kernel in kernels_answer
    )
    connections = status_answer.get("connections")  # a desktop's activity agent: open desktop connections
    busy = busy or (isinstance(connections, int) and not isinstance(connections, bool) and connections > 0)
    return ServerActivity(last=last, busy=busy)


class IdleChecker:
    def __init__(
        self,
        context: Context,
        settings: Settings,
        environments: Index,
        flavors: Index,
        gateway: GatewayActivity,
        clock: Callable[[], datetime.datetime] = utcnow,
        acting: Callable[[], Awaitable[bool]] = always_acting,
    ) -> None:
        self.context, self.settings, self.environments, self.flavors = context, settings, environments, flavors
        self.gateway, self.clock = gateway, clock
        # Asked before each write (kopf peering): a round can outlast this replica's turn, and a replica
        # another outranks decides from a paused index (engine/reconciler.py)
        self.acting = acting
        self._session: aiohttp.ClientSession | None = None
        self._unknown_since: dict[str, datetime.datetime] = {}  # uid: when its activity became unknown
        self._hanging: dict[str, tuple[int, datetime.datetime]] = {}  # uid: timeouts in a row, next read
        # uid: when this checker first saw it hold resources while not Ready (its last round's
        # start if it was Ready then: its Ready condition tells the moment); the uids Ready last round
        self._unusable_from: dict[str, datetime.datetime] = {}
        self._ready_before: set[str] = set()
        self._last_round: datetime.datetime | None = None  # when the last round began
        self._last_end: datetime.datetime | None = None  # and ended
        self.requests = 0  # server requests made (bench/idle.py reads it)

    async def check(self) -> int:
        """One round over every environment that can be culled, Ready or holding resources while its
        server cannot run; the number checked."""
        idle = self.settings.idle
        records, unusable = self._candidates()
        live = {record.environment.uid for record, _ in records} | {entry[0].environment.uid for entry in unusable}
        self.gateway.forget(live)
        for memory in (self._unknown_since, self._hanging):
            for uid in [uid for uid in memory if uid not in live]:
                del memory[uid]
        # a server that keeps timing out is read less often (2, 4, then every 8 rounds): hanging
        # servers would otherwise hold slots for a timeout each, every round, and stretch it
        horizon = self.clock() + datetime.timedelta(seconds=idle.check_interval_seconds / 2)
        records = [
            (record, flavor)
            for record, flavor in records
            if self._hanging.get(record.environment.uid, (0, horizon))[1] <= horizon
        ]
        semaphore = asyncio.Semaphore(idle.concurrency)

        async def one(record: EnvironmentRecord, flavor: Flavor, since: datetime.datetime | None = None) -> None:
            async with semaphore:
                try:
                    await self._check_one(record, flavor, since)
                except Exception:  # one environment's trouble never stops the round
                    log.exception("idle.check_failed", environment=_name(record.environment))

        await asyncio.gather(
            *(one(record, flavor) for record, flavor in records),
            *(one(record, flavor, since) for record, flavor, since in unusable),
        )
        self._last_end = self.clock()
        return len(records) + len(unusable)

    def _candidates(
        self,
    ) -> tuple[list[tuple[EnvironmentRecord, Flavor]], list[tuple[EnvironmentRecord, Flavor, datetime.datetime]]]:
        """The Ready environments whose flavor culls, and those that hold resources while their server
        cannot run, with the time since when (remembered from round to round)."""
        now = self.clock()
        # the last round, if this one follows it (not after a spell as the passive replica)
        interval = datetime.timedelta(seconds=self.settings.idle.check_interval_seconds)
        follows = self._last_end is not None and now - self._last_end <= 2 * interval
        previous = self._last_round if follows else None
        if previous is None:  # the first round, or the first after a gap: nothing remembered still holds
            self._unusable_from, self._ready_before = {}, set()
        ready: list[tuple[EnvironmentRecord, Flavor]] = []
        unusable: list[tuple[EnvironmentRecord, Flavor, datetime.datetime]] = []
        unusable_from: dict[str, datetime.datetime] = {}
        for record in values(self.environments):
            flavor: Flavor | None = first(self.flavors, record.environment.flavor)  # today's policy, not the terms
            if record.environment.suspend or flavor is None or flavor.idle_timeout is None:
                continue
            uid = record.environment.uid
            if record.status.get("phase") == Phase.READY.value:
                ready.append((record, flavor))
                continue
            # seen Ready last round: its Ready condition's transition is the fall-back; else (a resume,
            # a pod that was waiting for a node, a restart of the operator) not earlier than now
            seen = previous if previous is not None and uid in self._ready_before else now
            floor = self._unusable_from.get(uid, seen)
            if holding_unready(record.status):  # whatever its reason: a crash loop shows PodStarting a moment
                unusable_from[uid] = floor
            since = unusable_since(record.status, floor)
            if since is not None:
                unusable.append((record, flavor, since))
        self._unusable_from, self._last_round = unusable_from, now
        self._ready_before = {record.environment.uid for record, _ in ready}
        return ready, unusable

    async def _check_one(self, record: EnvironmentRecord, flavor: Flavor, since: datetime.datetime | None) -> None:
        """`since`: it holds resources while its server cannot run since then (nothing to read); None: Ready."""
        environment, status = record.environment, record.status
        interval = datetime.timedelta(seconds=self.settings.idle.check_interval_seconds)
        problem = policy_problem(flavor, interval)
        policy = policy_of(flavor)
        if problem is not None or policy is None:
            reason = "IdlePolicyInvalid"
            await self._write(environment, status, None, Verdict.UNKNOWN, reason, problem or "", self.clock())
            return
        if since is not None:
            await self._check_unusable(record, flavor, policy, since)
            return
        started_on = effective_flavor(status, flavor) or flavor  # what runs: the flavor as it started
        server = await self._server(environment, status, desktop=started_on.backend == "openstack")
        now = self.clock()  # once read: the server's clock ran on while it waited for a slot
        activity = latest_activity(
            server,
            self.gateway.last(environment.uid),
            now,
            datetime.timedelta(seconds=self.settings.idle.max_clock_skew_seconds),
        )
        started = parse_time(status.get("startedAt")) or now  # a resumed server reports its own new start
        decision = decide(policy, activity, started, now, cull_unknown=self.settings.idle.unknown == "cull")
        if decision.verdict is Verdict.CULL:
            await self._cull(record, flavor, policy.action, decision, now)
            return
        reason = {Verdict.ACTIVE: "Active", Verdict.WARN: "IdleSoon", Verdict.UNKNOWN: "ActivityUnknown"}[
            decision.verdict
        ]
        if activity.source == "clock skew":
            reason = "ClockSkew"
        await self._write(
            environment,
            status,
            activity.last,
            decision.verdict,
            reason,
            decision.message + _note(activity.note),
            now,
            decision,
        )

    async def _check_unusable(
        self, record: EnvironmentRecord, flavor: Flavor, policy: IdlePolicy, since: datetime.datetime
    ) -> None:
        """Holding resources while its server cannot run: idle since it was last usable, nothing to read."""
        environment, status = record.environment, record.status
        now = self.clock()
        gateway = self.gateway.last(environment.uid)
        decision = decide_unusable(policy, since, (parse_time(status.get("lastActivity")), gateway), now)
        if decision.verdict is Verdict.CULL:
            await self._cull(record, flavor, policy.action, decision, now)
            return
        reason = "IdleSoon" if decision.verdict is Verdict.WARN else "NotReady"
        await self._write(environment, status, gateway, decision.verdict, reason, decision.message, now, decision)

    async def _server(self, environment: Environment, status: Mapping[str, Any], desktop: bool) -> ServerActivity:
        endpoint = (status.get("backend") or {}).get("endpoint")
        if not endpoint:
            return ServerActivity(problem="its server's address is not known")
        token = await read_token(self.context.kube, environment)  # kept in memory by engine/tokens.py
        if not token:
            return ServerActivity(problem=token_lost(environment))
        tls = await tls_options(self.context.kube, environment, status.get("backend") or {})
        if tls is None:
            return ServerActivity(problem=not_stored(environment))
        url = server_url(environment, str(endpoint), self.settings, desktop=desktop, tls=bool(tls))
        headers = {"Authorization": f"token {token}"}
        if self._session is None:  # the one timeout below bounds each server
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        session = self._session

        async def read(path: str) -> Any:
            async with session.get(url + path, params={"no_track_activity": "1"}, headers=headers, **tls) as response:
                if response.status != 200:
                    raise _Refused(f"the server answered {path} with HTTP {response.status}")
                return await response.json(content_type=None)

        paths = ("api/status",) if desktop else ("api/status", "api/kernels")
        self.requests += len(paths)
        try:  # both at once, one timeout for the server in all (a timeout cancels both)
            async with asyncio.timeout(self.settings.idle.request_timeout_seconds):
                answers = await asyncio.gather(*(read(path) for path in paths), return_exceptions=True)
        except TimeoutError:
            timeouts = self._hanging.get(environment.uid, (0, None))[0] + 1
            later = datetime.timedelta(seconds=self.settings.idle.check_interval_seconds * 2 ** min(timeouts, 3))
            self._hanging[environment.uid] = (timeouts, self.clock() + later)
            again = f" ({timeouts} times in a row: read again in {later.total_seconds():g} s)" if timeouts > 1 else ""
            return ServerActivity(
                problem=f"the server did not answer within {self.settings.idle.request_timeout_seconds:g} s{again}"
            )
        self._hanging.pop(environment.uid, None)  # it answered, whatever it said
        for answer in answers:
            if isinstance(answer, _Refused):
                return ServerActivity(problem=str(answer))
            if isinstance(answer, aiohttp.ClientError | ValueError):
                if isinstance(answer, aiohttp.ClientSSLError):  # another server, or a newer certificate stored
                    server_certificates.forget(
                        [environment.uid]
                    )  # (a resume by another replica): read it again next time
                return ServerActivity(problem=f"the server cannot be read ({type(answer).__name__})")
            if isinstance(answer, BaseException):
                raise answer
        return parse_server(answers[0], answers[1] if len(answers) > 1 else None)

    async def _write(
        self,
        environment: Environment,
        status: Mapping[str, Any],
        last: datetime.datetime | None,
        verdict: Verdict,
        reason: str,
        message: str,
        now: datetime.datetime,
        decision: Decision | None = None,
    ) -> None:
        """lastActivity at most once per status interval; the Idle condition when it changes; IdleSoon once."""
        patch: dict[str, Any] = {}
        previous_last = parse_time(status.get("lastActivity"))
        every = datetime.timedelta(seconds=self.settings.idle.status_interval_seconds)
        if last is not None and (
            previous_last is None or last - previous_last >= every or (last > previous_last and verdict is Verdict.WARN)
        ):
            patch["lastActivity"] = format_time(last)
        previous = {c.get("type"): c for c in status.get("conditions") or ()}.get("Idle")
        word = "True" if verdict is Verdict.WARN else ("Unknown" if verdict is Verdict.UNKNOWN else "False")
        changed = previous is None or previous.get("status") != word or previous.get("reason") != reason
        if verdict is Verdict.UNKNOWN and previous is not None and previous.get("status") != "Unknown":
            # unknown after a known verdict: said once it has lasted a status interval (a server
            # failing every other check would otherwise be written every round)
            since = self._unknown_since.setdefault(environment.uid, now)
            changed = changed and now - since >= every
        elif verdict is not Verdict.UNKNOWN:
            self._unknown_since.pop(environment.uid, None)
        if changed:
            condition = build_condition(
                previous,
                type_="Idle",
                status=verdict is Verdict.WARN,
                reason=reason,
                message=message,
                generation=environment.generation,
                now=now,
            )
            condition["status"] = word
            patch["conditions"] = merge_conditions(status.get("conditions"), condition)
        event = None
        if verdict is Verdict.WARN and decision is not None and decision.cull_at is not None:
            warned_for = format_time(decision.cull_at)
            if status.get("idleWarnedFor") != warned_for:
                patch["idleWarnedFor"] = warned_for
                event = ("Warning", "IdleSoon", message)
        if patch and not await self._acts():
            return
        if patch:
            await self.context.kube.patch_environment_status(environment.namespace, environment.name, patch)
        if event is not None:
            await post_event(self.context.kube, environment_reference(environment), *event)
            log.info("idle.warned", environment=_name(environment), message=message)

    async def _cull(
        self, record: EnvironmentRecord, flavor: Flavor, action: Action, decision: Decision, now: datetime.datetime
    ) -> None:
        environment, status = record.environment, record.status
        if not await self._acts():
            return
        # The policy is today's flavor's; what runs, and where it is stopped, the flavor it started on
        # (status.terms): a flavor moved to another backend since must not stop it on the wrong one.
        started_on = effective_flavor(status, flavor) or flavor
        gpus = started_on.resources.gpu or int((status.get("backend") or {}).get("allocatedGpus") or 0)
        saved = gpu_hours_saved(gpus, now, parse_time(status.get("expiresAt")))
        savings = f"; {saved:g} GPU-hours of its lifetime not spent" if saved else ""
        if action is Action.SUSPEND:
            reason = "IdleSuspended"
            message = f"suspended: {decision.message}{savings}; resume with spec.suspend: false"
            previous = {c.get("type"): c for c in status.get("conditions") or ()}.get("Idle")
            condition = build_condition(
                previous,
                type_="Idle",
                status=True,
                reason=reason,
                message=message,
                generation=environment.generation,
                now=now,
            )
            await self.context.kube.patch_environment_status(
                environment.namespace,
                environment.name,
                {"conditions": merge_conditions(status.get("conditions"), condition)},
            )
            await self.context.kube.patch_environment_spec(environment.namespace, environment.name, {"suspend": True})
            await post_event(self.context.kube, environment_reference(environment), "Warning", reason, message)
        else:
            reason, message = "IdleStopped", f"stopped: {decision.message}{savings}"
            outcome = await end(self.context, environment, started_on, status, Phase.STOPPED, reason, message, now)
            await apply(self.context, environment, outcome)
        log.info("idle.culled", environment=_name(environment), action=str(action), gpu_hours_saved=saved)

    async def _acts(self) -> bool:
        try:
            return await self.acting()
        except Exception as error:  # the peering record unreadable: not now (the next round asks again)
            log.warning("idle.role_unknown", error=repr(error))
            return False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class _Refused(Exception):
    """A server answered with something other than 200."""


def _name(environment: Environment) -> str:
    return f"{environment.namespace}/{environment.name}"


def _note(note: str) -> str:
    return f" ({note})" if note else ""
