"""Quotas as pure functions: which budget an environment draws on, whether it
may start, what it has used, and how an approved request raises a limit.

A ComputeBudget's status is its ledger, so every decision here takes the
status as it is and returns the status as it should be; the caller writes it
back in one update guarded by the resourceVersion it read. That one atomic
write is what makes the accounting survive restarts (no loss, no double
count) and what makes racing creates safe (only one writer wins a slot).

Ledger layout (status):
  environments.<uid>: {namespace, name, cpus, gpus, since, chargedUntil, cpuHours, gpuHours}
      one entry per environment holding resources; usage is charged up to chargedUntil
  settled: {cpuHours, gpuHours}    usage of ended environments in this period
  grants.<request uid>: {...}      approved BudgetRequests; effective limit = spec + grants (hours: those
                                   of this period, see Budget.limit)
  used / limits / remaining / running / display: derived, for people and the portal
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from analysis_operator.model.conditions import build_condition, merge_conditions
from analysis_operator.model.domain import Environment, Flavor, Phase, format_time, parse_time, parse_timestamp
from analysis_operator.policy.refusal import Refusal

HOUR = 3600.0
RESOURCES = ("cpuHours", "gpuHours")
LIMIT_FIELDS = ("cpuHours", "gpuHours", "maxEnvironments", "maxGpus")
_LIMIT_WORDS = {"cpuHours": "CPU-hours", "gpuHours": "GPU-hours"}
UNREADABLE_END = datetime.datetime.min.replace(tzinfo=datetime.UTC)


@dataclass(frozen=True)
class Budget:
    """A ComputeBudget as read from the API (spec and its status ledger)."""

    name: str
    user: str = ""
    group: str = ""
    limits: Mapping[str, float] = field(default_factory=dict)  # spec.limits; a missing key is unlimited
    reset: str = ""  # "" or "Monthly"
    valid_until: datetime.datetime | None = None
    warning_percent: float | None = None  # spec override of the operator setting
    status: Mapping[str, Any] = field(default_factory=dict)
    resource_version: str = ""

    problem: str = ""  # what from_body could not read

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Budget:
        """Never raises. A validUntil that cannot be read (stored before the CRD checked it) reads as
        already past: nothing new starts on a budget whose end nobody can tell; `problem` says why."""
        metadata = body.get("metadata") or {}
        spec = body.get("spec") or {}
        period = spec.get("period") or {}
        limits = {key: _number(value) for key, value in (spec.get("limits") or {}).items() if key in LIMIT_FIELDS}
        valid_until, problem = None, ""
        if period.get("validUntil"):
            try:
                valid_until = parse_timestamp(str(period["validUntil"]))
            except ValueError as error:
                valid_until, problem = UNREADABLE_END, f"spec.period.validUntil {error}"
        bad = sorted(key for key, value in limits.items() if value is None)
        if bad:
            problem = "; ".join([*filter(None, [problem]), f"spec.limits.{bad[0]} is not a number (read as 0)"])
        warning = _number(spec.get("warningPercent"))
        return cls(
            name=str(metadata.get("name", "")),
            user=str(spec.get("user", "")),
            group=str(spec.get("group", "")),
            limits={key: value or 0.0 for key, value in limits.items()},
            reset=str(period.get("reset", "")),
            valid_until=valid_until,
            warning_percent=warning,
            status=dict(body.get("status") or {}),
            resource_version=str(metadata.get("resourceVersion", "")),
            problem=problem,
        )

    @property
    def label(self) -> str:
        """How people name it in messages: whose budget it is, then the object."""
        whose = f"group {self.group!r}" if self.group else f"user {self.user!r}"
        return f"{whose} (ComputeBudget {self.name!r})"

    @property
    def entries(self) -> Mapping[str, Mapping[str, Any]]:
        return self.status.get("environments") or {}

    def limit(self, key: str) -> float | None:
        """spec.limits plus the approved grants: GitOps owns spec, approvals never overwrite it. Hours
        granted on a periodic budget are for the period they were approved in ("+10 GPU-hours for this
        beamtime", not for every month after it); maxEnvironments and maxGpus grants stay."""
        if key not in self.limits:
            return None
        grants = (self.status.get("grants") or {}).values()
        return self.limits[key] + sum(
            float(grant.get(key) or 0) for grant in grants if key not in RESOURCES or self._of_this_period(grant)
        )

    def _of_this_period(self, grant: Mapping[str, Any]) -> bool:
        """Does a grant's hours count in the ledger's period? Always without periods (or before the
        first tick started one); a grant whose period cannot be told counts (see charge: it is dated
        at the next new period, so it counts in one)."""
        current = self.status.get("periodStart")
        if not self.reset or not current:
            return True
        granted = grant_period(grant)
        return granted is None or granted == current

    def used(self, key: str) -> float:
        settled = float((self.status.get("settled") or {}).get(key) or 0)
        return settled + sum(float(entry.get(key) or 0) for entry in self.entries.values())


# --- which budget -----------------------------------------------------------------------------------


def select_budget(
    owner: str,
    named: str,
    budgets: Mapping[str, Budget],
    personal: Mapping[str, str],
    is_member: Callable[[str, str], bool],
) -> Budget | Refusal:
    """The budget an environment draws on: the one it names in spec.budget (the owner's own, or a
    group budget the owner is a member of), else the owner's personal budget."""
    if named:
        budget = budgets.get(named)
        if budget is None:
            return Refusal(
                "BudgetNotFound",
                f"ComputeBudget {named!r} (spec.budget) does not exist: "
                f"see `kubectl get computebudgets`, or leave spec.budget out to use your own",
            )
        if budget.user == owner or (budget.group and is_member(budget.group, owner)):
            return budget
        return Refusal(
            "NotBudgetMember",
            f"{owner!r} may not draw on {budget.label}: only "
            f"{'its user' if budget.user else 'members of the group'} may",
        )
    name = personal.get(owner)
    if name is None or name not in budgets:
        return Refusal(
            "NoBudget",
            f"user {owner!r} has no ComputeBudget: ask your facility for one, "
            f"or name a group budget you are a member of in spec.budget",
        )
    return budgets[name]


# --- may it start -----------------------------------------------------------------------------------


def _used_of(used: float, limit: float) -> str:
    """ "72.5 of 140.0": one decimal, or as many as it takes to tell the numbers apart and to show
    neither as zero when it is not (a limit of 0.001 is not "0.0", 19.96 of 20 is not "20.0 of 20.0")."""
    for digits in range(1, 7):
        texts = (f"{used:.{digits}f}", f"{limit:.{digits}f}")
        if (texts[0] != texts[1]) == (used != limit) and all(
            float(text) != 0 or value == 0 for text, value in zip(texts, (used, limit), strict=True)
        ):
            return f"{texts[0]} of {texts[1]}"
    return f"{used:g} of {limit:g}"


def _number(value: Any) -> float | None:
    """A finite number from the API, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def spent(budget: Budget, cpus: float, gpus: int, now: datetime.datetime) -> Refusal | None:
    """Is the budget expired, or out of the hours something holding `cpus` and `gpus` would use?
    The same rule refuses a new environment and stops a running one."""
    if budget.problem and budget.valid_until == UNREADABLE_END:
        return Refusal(
            "BudgetUnreadable",
            f"{budget.label} cannot be read: {budget.problem}; ask the facility to correct it",
            phase=Phase.BUDGET_EXHAUSTED,
        )
    if budget.valid_until is not None and now >= budget.valid_until:
        return Refusal(
            "BudgetExpired",
            f"{budget.label} expired at {format_time(budget.valid_until)}; ask for a new one",
            phase=Phase.BUDGET_EXHAUSTED,
        )
    for key, needed in (("cpuHours", cpus), ("gpuHours", gpus)):
        limit = budget.limit(key)
        if needed and limit is not None and budget.used(key) >= limit:
            return Refusal(
                f"{'Cpu' if key == 'cpuHours' else 'Gpu'}HoursExhausted",
                f"{_LIMIT_WORDS[key]} budget of {budget.label} exhausted: "
                f"{_used_of(budget.used(key), limit)} used; "
                f"ask for more with a BudgetRequest",
                phase=Phase.BUDGET_EXHAUSTED,
            )
    return None


def admission_refusal(
    budget: Budget, flavor: Flavor, holding: int, gpus_held: int, now: datetime.datetime
) -> Refusal | None:
    """May one more environment of `flavor` start, with `holding` environments and `gpus_held`
    GPUs already running on the budget? The refusal's phase is Rejected: nothing ran yet."""
    refusal = spent(budget, flavor.resources.cpus, flavor.resources.gpu, now)
    if refusal is not None:
        return Refusal(refusal.reason, refusal.message)
    most = budget.limit("maxEnvironments")
    if most is not None and holding + 1 > most:
        return Refusal(
            "TooManyEnvironments",
            f"budget of {budget.label} allows {int(most)} environment(s) at once and "
            f"{holding} are running: stop one, or ask for more with a BudgetRequest",
        )
    gpus = budget.limit("maxGpus")
    if flavor.resources.gpu and gpus is not None and gpus_held + flavor.resources.gpu > gpus:
        return Refusal(
            "TooManyGpus",
            f"budget of {budget.label} allows {int(gpus)} GPU(s) at once, {gpus_held} are in "
            f"use and flavor {flavor.name!r} needs {flavor.resources.gpu}: stop a GPU environment, "
            f"or ask for more with a BudgetRequest",
        )
    return None


def reserve(
    budget: Budget,
    environment: Environment,
    flavor: Flavor,
    now: datetime.datetime,
    ended: Mapping[str, datetime.datetime | None] | None = None,
) -> Refusal | dict[str, Any] | None:
    """Take a slot for the environment in the ledger: None if it holds one already, the new status
    if it may have one, a Refusal if it may not. `ended` entries (environments known to be deleted
    or over, uid -> when) hold no slot: they are settled in the same write (see release)."""
    if environment.uid in budget.entries:
        return None
    ended = {uid: end for uid, end in (ended or {}).items() if uid in budget.entries}
    released = release(budget, ended, now) if ended else None
    if released is not None:
        budget = Budget(**{**budget.__dict__, "status": released})
    live = [entry for uid, entry in budget.entries.items() if uid not in ended]
    gpus_held = sum(int(entry.get("gpus") or 0) for entry in live)
    refusal = admission_refusal(budget, flavor, len(live), gpus_held, now)
    if refusal is not None:
        return refusal
    return summarize(budget, with_entry(budget, environment, new_entry(environment, flavor, now)), now)


def new_entry(environment: Environment, flavor: Flavor, now: datetime.datetime) -> dict[str, Any]:
    """A ledger entry for an environment taking its slot now: charged from now."""
    return {
        "namespace": environment.namespace,
        "name": environment.name,
        "cpus": flavor.resources.cpus,
        "gpus": flavor.resources.gpu,
        "since": format_time(now),
        "chargedUntil": format_time(now),
        "cpuHours": 0.0,
        "gpuHours": 0.0,
    }


def with_entry(budget: Budget, environment: Environment, entry: Mapping[str, Any]) -> dict[str, Any]:
    return {**budget.status, "environments": {**budget.entries, environment.uid: entry}}


def release(
    budget: Budget, ended: Mapping[str, datetime.datetime | None], now: datetime.datetime
) -> dict[str, Any] | None:
    """The status with the entries of ended environments (uid -> when it ended, None: now) settled
    at once: charged up to their end, added to `settled`, their slot free. None when none of them
    is in the ledger, or when a new period is due: the accounting tick starts it (usage before the
    boundary is forgotten, after it kept) and settles them in the same step."""
    gone = [uid for uid in ended if uid in budget.entries]
    if not gone:
        return None
    start = period_start(budget.reset, now)
    if start is not None and budget.status.get("periodStart") != format_time(start):
        return None
    entries = dict(budget.entries)
    settled = {key: float((budget.status.get("settled") or {}).get(key) or 0) for key in RESOURCES}
    for uid in gone:
        end = ended[uid]
        entry = _charged(entries.pop(uid), min(now, end) if end is not None else now)
        settled = {key: round(settled[key] + float(entry.get(key) or 0), 9) for key in RESOURCES}
    return summarize(budget, {**budget.status, "environments": entries, "settled": settled}, now)


# --- accounting -------------------------------------------------------------------------------------


def period_start(reset: str, now: datetime.datetime) -> datetime.datetime | None:
    if reset == "Monthly":
        return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return None


def grant_period(grant: Mapping[str, Any]) -> str | None:
    """The period (its start) a grant's hours are for, marked when it was granted; None for a grant
    stored before grants were marked. Such a grant counts in the period it is found in, whenever
    it was approved (before, every grant counted for good: an upgrade mid-month must not take
    granted hours away from running environments), and is marked with that period when the next
    one starts (`_dated`), so it counts in no later one."""
    return str(grant["periodStart"]) if grant.get("periodStart") else None


def _dated(grants: Mapping[str, Mapping[str, Any]], period: str) -> dict[str, Any]:
    """The grants, each marked with its period: one whose period cannot be told was counted in the
    period now ending (`period`), and in none after it."""
    return {uid: {"periodStart": grant_period(grant) or period, **grant} for uid, grant in grants.items()}


def _charged(entry: Mapping[str, Any], until: datetime.datetime) -> dict[str, Any]:
    """The entry charged for its resources from chargedUntil to `until` (never backwards).
    Whole seconds only: chargedUntil is stored to the second, and charging past what is stored
    would count the fraction again at the next tick."""
    until = until.replace(microsecond=0)
    since = parse_time(entry.get("chargedUntil")) or until
    seconds = max(0.0, (until - since).total_seconds())
    return {
        **entry,
        "chargedUntil": format_time(max(since, until)),
        "cpuHours": round(float(entry.get("cpuHours") or 0) + float(entry.get("cpus") or 0) * seconds / HOUR, 9),
        "gpuHours": round(float(entry.get("gpuHours") or 0) + float(entry.get("gpus") or 0) * seconds / HOUR, 9),
    }


@dataclass(frozen=True)
class Charge:
    status: dict[str, Any]
    events: tuple[tuple[str, str, str], ...] = ()  # (type, reason, message) for the budget
    stop: tuple[str, ...] = ()  # uids of environments the budget no longer covers (the caller says which it stops)
    reason: str = ""  # why they stop (names the budget)


@dataclass(frozen=True)
class Held:
    """What a Slurm job or VM holds according to its backend (not the flavor), and since when."""

    cpus: float
    gpus: int
    since: datetime.datetime | None = None


def charge(
    budget: Budget,
    ended: Mapping[str, datetime.datetime | None],
    now: datetime.datetime,
    warning_percent: float,
    paused: Collection[str] = (),
    held: Mapping[str, Held] | None = None,
    foreign: Collection[str] = (),
    suspended: Mapping[str, datetime.datetime] | None = None,
) -> Charge:
    """One accounting tick. `ended` maps the uid of every ledger entry whose environment no longer
    holds resources to when it stopped (None: unknown, e.g. deleted: charged until now). Entries are
    charged from their chargedUntil, ended ones settled, and a new period starts from zero. `paused`
    entries (suspended environments, Slurm jobs still queued, VMs not yet ACTIVE) keep their slot,
    so resuming never fails, but are not charged. `held` overrides the flavor's resources with what
    the backend reports (Slurm's allocation, the Nova flavor), charged from no earlier than `since`
    (the job's start time), so the hours agree with the facility's own accounting. `foreign` entries
    are another operator's to charge, settle and stop (environments in namespaces this one does not
    serve): kept as they are, but for a new period, which forgets their usage before it too.
    `suspended`: paused entries that ran until then (uid -> when it was suspended, or stopped running)
    since their last charge: charged up to that moment, as an ended one up to when it stopped, then
    paused."""
    status = dict(budget.status)
    settled = {key: float((status.get("settled") or {}).get(key) or 0) for key in RESOURCES}
    held = held or {}
    start = period_start(budget.reset, now)
    new_period = start is not None and status.get("periodStart") != format_time(start)
    ran_until = {uid: at for uid, at in (suspended or {}).items() if uid in paused and uid in budget.entries}

    def end(uid: str) -> datetime.datetime:
        return min(now, ended.get(uid) or ran_until.get(uid) or now)

    def backend_view(uid: str, entry: dict[str, Any]) -> dict[str, Any]:
        if uid not in held:
            return entry
        view = {**entry, "cpus": held[uid].cpus, "gpus": held[uid].gpus}
        since = held[uid].since
        if since is not None and entry.get("heldSince") != format_time(since):
            # First tick of this job: charge from its start, also back over the ticks that still saw
            # it queued (paused, so nothing was charged for that time); not back into a past period
            # (another operator may have started this one already, see _from_period).
            begin = max(min(since, now), start) if start is not None else min(since, now)
            view.update(chargedUntil=format_time(begin), heldSince=format_time(since))
        return view

    ours = {uid: entry for uid, entry in budget.entries.items() if uid not in foreign}
    others = {uid: dict(entry) for uid, entry in budget.entries.items() if uid in foreign}
    entries = {
        uid: {**entry, "chargedUntil": format_time(now)}
        if uid in paused and uid not in ran_until
        else backend_view(uid, dict(entry))
        for uid, entry in ours.items()
    }
    if start is not None and new_period:
        # Usage up to the boundary belonged to the old period, which is forgotten.
        entries = {
            uid: {**_charged(entry, min(start, end(uid))), "cpuHours": 0.0, "gpuHours": 0.0}
            for uid, entry in entries.items()
        }
        others = {uid: _from_period(entry, start) for uid, entry in others.items()}
        settled = dict.fromkeys(RESOURCES, 0.0)
        if status.get("grants"):
            status["grants"] = _dated(status["grants"], status.get("periodStart") or format_time(start))
        status.update(periodStart=format_time(start), warned={})
    entries = {uid: _charged(entry, end(uid)) for uid, entry in entries.items()}
    entries.update({uid: {**entries[uid], "chargedUntil": format_time(now)} for uid in ran_until if uid in entries})
    for uid in ended:
        entry = entries.pop(uid, None)
        if entry is not None:
            settled = {key: round(settled[key] + float(entry.get(key) or 0), 9) for key in RESOURCES}
    status.update(environments={**entries, **others}, settled=settled)
    charged = Budget(**{**budget.__dict__, "status": status})
    return _exhaustion(charged, summarize(charged, status, now), now, warning_percent, foreign)


def _from_period(entry: Mapping[str, Any], start: datetime.datetime) -> dict[str, Any]:
    """Another operator's entry at a new period: its usage forgotten, and charged on from the boundary
    at the earliest (whatever its operator charges next is of the new period)."""
    charged_until = parse_time(entry.get("chargedUntil"))
    moved = {"chargedUntil": format_time(start)} if charged_until is None or charged_until < start else {}
    return {**entry, **moved, "cpuHours": 0.0, "gpuHours": 0.0}


def _exhaustion(
    budget: Budget,
    status: dict[str, Any],
    now: datetime.datetime,
    warning_percent: float,
    foreign: Collection[str] = (),
) -> Charge:
    """Which running environments must stop now (not `foreign` ones: their operator stops them), and
    the warnings due once per period."""
    events: list[tuple[str, str, str]] = []
    warned = dict(status.get("warned") or {})
    percent = budget.warning_percent if budget.warning_percent is not None else warning_percent
    for key in RESOURCES:
        limit, used = budget.limit(key), budget.used(key)
        if limit and used < limit * percent / 100:
            warned.pop(key, None)  # back under the threshold (more was granted): warn again next time
        elif limit and used < limit and not warned.get(key):
            warned[key] = format_time(now)
            events.append(
                (
                    "Warning",
                    "BudgetWarning",
                    f"{_LIMIT_WORDS[key]} budget of {budget.label}: "
                    f"{_used_of(used, limit)} used ({100 * used / limit:.0f}%)",
                )
            )
    status["warned"] = warned
    stop, reason = [], ""
    for uid, entry in budget.entries.items():
        if uid in foreign:
            continue
        over = spent(budget, float(entry.get("cpus") or 0), int(entry.get("gpus") or 0), now)
        if over is not None:
            stop.append(uid)
            reason = over.message
    status["conditions"] = exhausted_conditions(budget, status, now)
    return Charge(status, tuple(events), tuple(stop), reason)


def exhausted_conditions(budget: Budget, status: Mapping[str, Any], now: datetime.datetime) -> list[dict[str, Any]]:
    """The Exhausted condition: True while a limit is reached (new GPU or all environments refused)."""
    previous = {c.get("type"): c for c in status.get("conditions") or ()}.get("Exhausted")
    over = spent(budget, 1.0, 0, now) or spent(budget, 0.0, 1, now)
    condition = build_condition(
        previous,
        type_="Exhausted",
        status=over is not None,
        reason=over.reason if over else "WithinBudget",
        message=over.message if over else "within all limits",
        generation=0,
        now=now,
    )
    return merge_conditions(status.get("conditions"), condition)


def expiry_warning_due(
    expires_at: datetime.datetime, now: datetime.datetime, warn_before: float, warned_for: str | None
) -> bool:
    """Post the "expires soon" Event once per expiry time (an extension moves it, and warns again)."""
    remaining = (expires_at - now).total_seconds()
    return 0 < remaining <= warn_before and warned_for != format_time(expires_at)


def summarize(budget: Budget, status: Mapping[str, Any], now: datetime.datetime) -> dict[str, Any]:
    """Status with the derived numbers recomputed from the ledger: what the portal and kubectl read."""
    view = Budget(**{**budget.__dict__, "status": status})
    entries = view.entries
    used = {key: round(view.used(key), 6) for key in RESOURCES}
    limits = {key: limit for key in LIMIT_FIELDS if (limit := view.limit(key)) is not None}
    remaining = {key: round(max(0.0, limits[key] - used[key]), 6) for key in RESOURCES if key in limits}
    running = {"environments": len(entries), "gpus": sum(int(entry.get("gpus") or 0) for entry in entries.values())}

    def shown(used_value: float, key: str) -> str:
        return f"{used_value:.1f} / {limits[key]:g}" if key in limits else f"{used_value:.1f} / -"

    display = {
        "cpuHours": shown(used["cpuHours"], "cpuHours"),
        "gpuHours": shown(used["gpuHours"], "gpuHours"),
        "environments": f"{running['environments']} / "
        f"{int(limits['maxEnvironments']) if 'maxEnvironments' in limits else '-'}",
    }
    return {
        **status,
        "used": {**used, "updatedAt": format_time(now)},
        "limits": limits,
        "remaining": remaining,
        "running": running,
        "display": display,
    }


# --- requests ---------------------------------------------------------------------------------------


def apply_grant(
    budget: Budget,
    request_uid: str,
    request: str,
    extra: Mapping[str, Any],
    decided_by: str,
    decided_at: str,
    now: datetime.datetime,
) -> dict[str, Any] | None:
    """The status with an approved request's extra added, or None if it was added already: approval
    raises the limit exactly once however often this runs. On a periodic budget the grant is marked
    with the period it is applied in: its hours are for that period only (Budget.limit)."""
    grants = dict(budget.status.get("grants") or {})
    if request_uid in grants:
        return None
    start = period_start(budget.reset, now)
    grants[request_uid] = {
        "request": request,
        "approvedBy": decided_by,
        "approvedAt": decided_at,
        **({"periodStart": format_time(start)} if start is not None else {}),
        **{key: extra[key] for key in LIMIT_FIELDS if extra.get(key)},
    }
    return summarize(budget, {**budget.status, "grants": grants}, now)
