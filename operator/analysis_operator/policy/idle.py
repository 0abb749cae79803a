"""Idle culling as pure decisions: when is an environment idle, when is it warned, when culled.

Activity means the same on every backend: the latest of
  - the server's own report (JupyterLab's /api/status `last_activity`: API calls, kernel and
    terminal messages), and "now" while a kernel is busy (a long cell prints nothing, yet works);
  - the last request the gateway let through to it (a browser tab, a desktop connection opening);
  - for a desktop VM, its activity agent's report: the last time a desktop connection was open,
    and "now" while one is.
When the server cannot be read (unreachable, answering garbage, an image without the desktop's
activity agent), activity is unknown, and what happens then is a setting (idle.unknown: keep, the
default, never culls what it cannot see); the gateway's requests alone then prove activity but
never idleness (a long cell or a desktop connection sends it nothing). A server clock ahead of the
operator's by more than the allowed skew is not believed to be idle: it is treated as active now,
and said so.

For a flavor with `idleTimeout` T and `idleWarnBefore` W (default 15m, less than T):
  idle for >= T - W  -> warned once (condition Idle=True IdleSoon, Warning Event IdleSoon)
  idle for >= T      -> culled: `idleAction` Suspend (default: spec.suspend set, home, record,
                        URL and token kept; resume with spec.suspend: false) or Stop

An environment that holds its node's CPUs and GPUs while its node says its server cannot run
(fallen back to Provisioning with a reason in CANNOT_RUN: a crash-looping JupyterLab, an image
that cannot be pulled, a container that cannot be created) is of no use to anyone and has no server
to read: it is idle since it was last usable, so idle.unknown does not apply. Not one merely not
Ready (a server slow to answer its probe under load, a Slurm job or VM the operator cannot reach):
its kernels may be working, and it is judged as unknown activity is. One that holds nothing (a job
in the queue, an unschedulable pod) is never culled: it costs nothing, and waiting is normal.
"""

from __future__ import annotations

import datetime
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from analysis_operator.model.domain import Flavor, Phase, format_time, parse_time

DEFAULT_WARN_BEFORE = datetime.timedelta(minutes=15)


class Action(enum.StrEnum):
    SUSPEND = "Suspend"
    STOP = "Stop"


@dataclass(frozen=True)
class IdlePolicy:
    timeout: datetime.timedelta
    warn_before: datetime.timedelta
    action: Action


def policy_of(flavor: Flavor) -> IdlePolicy | None:
    """The flavor's culling policy; None: not culled (no idleTimeout)."""
    if flavor.idle_timeout is None:
        return None
    warn = flavor.idle_warn_before if flavor.idle_warn_before is not None else DEFAULT_WARN_BEFORE
    warn = min(warn, flavor.idle_timeout)  # a warning longer than the timeout warns at once
    return IdlePolicy(flavor.idle_timeout, warn, Action(flavor.idle_action or Action.SUSPEND))


def policy_problem(flavor: Flavor, check_interval: datetime.timedelta) -> str | None:
    """Why this flavor's policy cannot be enforced as written (nothing is culled then), or None."""
    if flavor.idle_timeout is None:
        return None
    if flavor.idle_timeout < 2 * check_interval:
        return (
            f"flavor {flavor.name!r}: idleTimeout {flavor.idle_timeout} is shorter than two activity checks "
            f"({2 * check_interval}, setting idle.check_interval_seconds): make it longer"
        )
    if flavor.idle_warn_before is not None and flavor.idle_warn_before >= flavor.idle_timeout:
        return (
            f"flavor {flavor.name!r}: idleWarnBefore {flavor.idle_warn_before} is not shorter than "
            f"idleTimeout {flavor.idle_timeout}: the warning would come before any idleness"
        )
    return None


@dataclass(frozen=True)
class ServerActivity:
    """What the server itself reported (None: it could not be read, and why)."""

    last: datetime.datetime | None = None
    busy: bool = False  # a kernel is executing
    problem: str = ""


@dataclass(frozen=True)
class Activity:
    last: datetime.datetime | None  # None: unknown
    source: str  # "server", "kernel busy", "gateway", "unknown", "clock skew"
    note: str = ""  # what people should know (an unreadable server, a skewed clock)
    partial: bool = False  # the server could not be read: `last` is the gateway's only


def latest_activity(
    server: ServerActivity | None,
    gateway: datetime.datetime | None,
    now: datetime.datetime,
    max_skew: datetime.timedelta,
) -> Activity:
    """The one activity time from every source, or unknown."""
    note = server.problem if server is not None else ""
    candidates: list[tuple[datetime.datetime, str]] = []
    if server is not None and server.busy:
        candidates.append((now, "kernel busy"))
    if server is not None and server.last is not None:
        if server.last > now + max_skew:
            skew = server.last - now
            return Activity(
                now, "clock skew", f"the server's clock is {skew} ahead of the operator's: treated as active"
            )
        candidates.append((min(server.last, now), "server"))
    if gateway is not None:
        candidates.append((gateway, "gateway"))
    if not candidates:
        return Activity(None, "unknown", note or "no activity can be read")
    last, source = max(candidates)
    unread = server is None or (server.last is None and not server.busy)
    return Activity(last, source, note, partial=unread)


class Verdict(enum.StrEnum):
    ACTIVE = "Active"
    UNKNOWN = "ActivityUnknown"
    WARN = "IdleSoon"
    CULL = "Idle"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    message: str
    cull_at: datetime.datetime | None = None


def decide(
    policy: IdlePolicy,
    activity: Activity,
    started: datetime.datetime,
    now: datetime.datetime,
    cull_unknown: bool = False,
) -> Decision:
    """Warn, cull or leave it. Idle time counts from the later of the last activity and the start
    (or resume), so a fresh environment gets its whole timeout."""
    if activity.last is None and not cull_unknown:
        return Decision(Verdict.UNKNOWN, f"activity is unknown ({activity.note}); not culled (setting idle.unknown)")
    last = max(activity.last or started, started)
    cull_at = last + policy.timeout
    idle_for = now - last
    if activity.partial and not cull_unknown and now >= cull_at - policy.warn_before:
        return Decision(
            Verdict.UNKNOWN,
            f"its server cannot be read ({activity.note or 'no answer'}) and the gateway last let a request "
            f"through at {format_time(last)}: not culled (setting idle.unknown)",
        )
    if now >= cull_at:
        return Decision(Verdict.CULL, f"idle since {format_time(last)} ({_words(idle_for)})", cull_at)
    if now >= cull_at - policy.warn_before:
        verb = "suspended" if policy.action is Action.SUSPEND else "stopped"
        return Decision(
            Verdict.WARN,
            f"idle since {format_time(last)}: will be {verb} at {format_time(cull_at)} unless it is used",
            cull_at,
        )
    return Decision(Verdict.ACTIVE, f"last active {format_time(last)} ({activity.source})", cull_at)


def holds_resources(backend: Mapping[str, Any]) -> bool:
    """Does status.backend say that CPUs or GPUs are held now (a pod on its node, a running Slurm
    job, a VM up)? Written with each transition, and absent while it waits for them."""
    return bool(backend.get("allocatedCpus") or backend.get("allocatedGpus"))


# status.reason of a pod whose node says its server cannot run (backends/kubernetes.stuck): no
# kernel can be working in it, and it holds its node's CPUs and GPUs from everyone else
CANNOT_RUN = frozenset({"ServerCrashing", "ImagePullFailed", "ContainerNotCreated"})


def holding_unready(status: Mapping[str, Any]) -> bool:
    """Provisioning while its backend holds CPUs or GPUs for it, whatever the reason (pure)."""
    return status.get("phase") == Phase.PROVISIONING.value and holds_resources(status.get("backend") or {})


def unusable_since(status: Mapping[str, Any], floor: datetime.datetime) -> datetime.datetime | None:
    """Since when an environment has held resources while its server cannot run (CANNOT_RUN); None:
    it is Ready, merely not Ready, or holds nothing. The latest of when its Ready condition turned
    False (a fall-back), when its backend started it (status.backend.startedAt, where written), and
    `floor`: when the idle check first saw it so (the caller's memory), since a resume leaves Ready's
    transition at the suspension, and a pod has no start time of its own."""
    if status.get("reason") not in CANNOT_RUN or not holding_unready(status):
        return None
    backend = status.get("backend") or {}
    ready = {c.get("type"): c for c in status.get("conditions") or ()}.get("Ready") or {}
    fell = parse_time(ready.get("lastTransitionTime")) if ready.get("status") == "False" else None
    started = parse_time(backend.get("startedAt"))
    return max(moment for moment in (fell, started, floor) if moment is not None)


def decide_unusable(
    policy: IdlePolicy,
    since: datetime.datetime,
    used: Iterable[datetime.datetime | None],
    now: datetime.datetime,
) -> Decision:
    """Warn, cull or leave an environment that holds resources without being Ready since `since`.
    `used`: status.lastActivity and the gateway's last request; no server is read (there is none
    to read), so its idle time is known and counts from the latest of these."""
    last = max([since, *(moment for moment in used if moment is not None)])
    cull_at = last + policy.timeout
    said = f"not Ready since {format_time(since)}"
    if last > since:
        said += f", last used {format_time(last)}"
    verb = "suspended" if policy.action is Action.SUSPEND else "stopped"
    if now >= cull_at:
        return Decision(Verdict.CULL, f"{said} ({_words(now - last)}): it held its resources unused", cull_at)
    if now >= cull_at - policy.warn_before:
        return Decision(
            Verdict.WARN, f"{said}: will be {verb} at {format_time(cull_at)} unless it becomes Ready", cull_at
        )
    return Decision(
        Verdict.ACTIVE,
        f"{said}: holds its resources while no one can use it; {verb} at {format_time(cull_at)} unless it "
        "becomes Ready",
        cull_at,
    )


def gpu_hours_saved(gpus: int, now: datetime.datetime, expires_at: datetime.datetime | None) -> float:
    """GPU-hours the rest of its lifetime would have held."""
    if not gpus or expires_at is None or expires_at <= now:
        return 0.0
    return round(gpus * (expires_at - now).total_seconds() / 3600, 2)


def _words(delta: datetime.timedelta) -> str:
    minutes = int(delta.total_seconds() // 60)
    return (
        f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{int(delta.total_seconds()) % 60:02d}s"
    )
