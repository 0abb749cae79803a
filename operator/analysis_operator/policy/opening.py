"""OPEN: where an environment lives behind the gateway, who may open it, who it may be shared with (pure).

Every environment has one path under the gateway's host, `<prefix>/<namespace>/<name>/`.
Namespaces and names are DNS labels (no "/"), so two environments never share a path and
none is a prefix of another's (Gateway API PathPrefix matches whole path elements).

The gateway asks the operator about every request (handlers/gateway.py); the answer is
decided here from the environment, the viewer and the catalogue, in this order:
  1. the owner: allowed
  2. an admin named in settings (support staff): allowed
  3. a user named in spec.sharing.users, or a member of a FacilityGroup named in
     spec.sharing.groups: allowed if they may themselves read every dataset it mounts
     now (embargo-aware: the same rules as for an owner, policy/access.py)
  4. anyone else: 403, saying whose it is and that it is not shared with them
An allowed viewer then sees the environment only while it is Ready; otherwise a page that
says which phase it is in and what to do (never a timeout).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass

from analysis_operator.model.domain import Environment, Phase
from analysis_operator.policy.access import Catalogue, plan_access
from analysis_operator.policy.refusal import Refusal

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def base_path(prefix: str, namespace: str, name: str) -> str:
    """The environment's path under the gateway's URL, with a trailing slash."""
    return f"{prefix.rstrip('/')}/{namespace}/{name}/"


def environment_of(prefix: str, path: str) -> tuple[str, str] | None:
    """(namespace, name) of the environment a request path is for, or None if it is for none."""
    root = prefix.rstrip("/") + "/"
    if not path.startswith(root):
        return None
    parts = path[len(root) :].split("?", 1)[0].split("/")
    if len(parts) < 3 or not _LABEL.fullmatch(parts[0]) or not _LABEL.fullmatch(parts[1]):
        return None  # "/env/ns/name" without the slash is not under the base path either
    return parts[0], parts[1]


@dataclass(frozen=True)
class Viewer:
    """Who the gateway's request comes from, as the identity provider vouched for it."""

    user: str
    groups: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Verdict:
    status: int  # the HTTP status the gateway answers with (200: pass the request on)
    reason: str  # CamelCase, for logs and the X-Analysis-Reason header
    message: str  # for the page a person sees
    role: str = ""  # owner, admin, shared: why an allowed viewer is allowed

    @property
    def allowed(self) -> bool:
        return self.status == 200


_NOT_OPEN = {
    Phase.PENDING.value: "is waiting to start",
    Phase.PROVISIONING.value: "is starting",
    Phase.SUSPENDED.value: "is suspended: its owner can resume it (spec.suspend: false, or Resume in the portal)",
    Phase.STOPPING.value: "is stopping",
    Phase.STOPPED.value: "was stopped",
    Phase.EXPIRED.value: "has expired: its lifetime ended",
    Phase.FAILED.value: "failed",
    Phase.REJECTED.value: "was refused",
    Phase.BUDGET_EXHAUSTED.value: "was stopped: its budget ran out",
}


def may_open(
    environment: Environment,
    phase: str,
    viewer: Viewer,
    admins: frozenset[str],
    catalogue: Catalogue,
    now: datetime.datetime,
) -> Verdict:
    """May `viewer` open `environment` (in `phase`) now, and what do they get?"""
    where = f"{environment.namespace}/{environment.name}"
    if viewer.user == environment.owner:
        role = "owner"
    elif viewer.user in admins:
        role = "admin"
    elif viewer.user in environment.shared_users or viewer.groups & environment.shared_groups:
        refusals = sharee_refusals(environment, viewer.user, catalogue, now)
        if refusals:
            return Verdict(
                403,
                "DatasetNotReadable",
                f"{where} is shared with you, but you may not read what it mounts: "
                + "; ".join(refusal.message for refusal in refusals),
            )
        role = "shared"
    else:
        return Verdict(
            403,
            "NotShared",
            f"{where} belongs to {environment.owner} and is not shared with you ({viewer.user}); "
            f"ask its owner to share it (spec.sharing)",
        )
    if phase != Phase.READY.value:
        state = _NOT_OPEN.get(phase, "is not running")
        return Verdict(503, f"Not{phase or 'Started'}", f"{where} {state}", role)
    return Verdict(200, "Allowed", f"{viewer.user} may open {where} ({role})", role)


def sharee_refusals(
    environment: Environment, user: str, catalogue: Catalogue, now: datetime.datetime
) -> tuple[Refusal, ...]:
    """Why `user` may not see what `environment` mounts (each dataset they may not read), or ()."""
    if not environment.datasets:
        return ()
    plan = plan_access(dataclasses.replace(environment, owner=user), None, catalogue, now)
    return plan.refusals


def sharing_refusals(
    environment: Environment,
    catalogue: Catalogue,
    known_user: Callable[[str], bool],
    members: Callable[[str], frozenset[str] | None],
    now: datetime.datetime,
) -> list[Refusal]:
    """What is wrong with spec.sharing: unknown users and groups, and people it would show data
    they may not read (each named with the dataset). `members(group)` is None for an unknown group."""
    refusals: list[Refusal] = []
    for user in sorted(environment.shared_users - {environment.owner}):
        if not known_user(user):
            refusals.append(
                Refusal(
                    "UnknownUser",
                    f"spec.sharing.users: {user!r} is not a facility user (there is no FacilityUser {user!r})",
                    subject=user,
                )
            )
            continue
        refusals.extend(_shown_data(environment, user, catalogue, now, via="spec.sharing.users"))
    for group in sorted(environment.shared_groups):
        people = members(group)
        if people is None:
            refusals.append(
                Refusal(
                    "UnknownGroup",
                    f"spec.sharing.groups: {group!r} is not a FacilityGroup (see `kubectl get facilitygroups`)",
                    subject=group,
                )
            )
            continue
        for user in sorted(people - {environment.owner}):
            refusals.extend(_shown_data(environment, user, catalogue, now, via=f"spec.sharing.groups: {group!r}"))
    return refusals


def _shown_data(
    environment: Environment, user: str, catalogue: Catalogue, now: datetime.datetime, via: str
) -> list[Refusal]:
    return [
        Refusal(
            "SharingNotAllowed",
            f"{via}: {user!r} may not read dataset {refusal.subject!r}, which this environment mounts "
            f"({refusal.message}); share only with people who may read all of its datasets",
            subject=user,
        )
        for refusal in sharee_refusals(environment, user, catalogue, now)
    ]


PROBE_HEADER = "X-Analysis-Probe"


def probe_signature(token: str, uid: str) -> str:
    """What the operator's own probe through the gateway carries (engine/routes.py) and its
    forward-auth checks: only who holds the environment's token can make it (pure)."""
    return hmac.new(token.encode(), f"probe:{uid}".encode(), hashlib.sha256).hexdigest()
