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
says which phase it is in and what to do (never a timeout). Before any of this, a request that
another site's page made a browser send is refused (cross_site_refusal).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import hmac
import re
import urllib.parse
from collections.abc import Callable, Mapping
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
# The forward-auth's own answer to the operator's probe, naming the environment in PROBE_HEADER: never a
# 2xx, so the gateway returns it as it is and nothing is passed on to the server (no token, ever).
PROBE_STATUS = 403
PROBE_REASON = "ProbeAnswered"


def probe_signature(token: str, uid: str) -> str:
    """What the operator's own probe through the gateway carries (engine/routes.py) and its
    forward-auth checks: only who holds the environment's token can make it (pure)."""
    return hmac.new(token.encode(), f"probe:{uid}".encode(), hashlib.sha256).hexdigest()


def is_probe(signature: str, token: str, uid: str) -> bool:
    """Is `signature` (a request's PROBE_HEADER) this environment's? Compared as bytes: a header that is
    not ASCII is simply not it (compare_digest raises TypeError for such a str)."""
    if not signature.isascii():
        return False
    return hmac.compare_digest(signature.encode(), probe_signature(token, uid).encode())


_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_of(url: str) -> str:
    """`scheme://host[:port]` of a URL as a browser writes it in `Origin` (lower case, no default port);
    "" for what has none ("null", garbage)."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return ""
    scheme, host = parts.scheme.lower(), parts.hostname or ""
    if scheme not in _DEFAULT_PORTS or not host:
        return ""
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}" if port in (None, _DEFAULT_PORTS[scheme]) else f"{scheme}://{host}:{port}"


def cross_site_refusal(headers: Mapping[str, str], gateway_url: str) -> Verdict | None:
    """A request another site's page made a browser send, refused (pure). The gateway hands the server
    its token, so JupyterLab takes every request through it as token-authenticated and skips its own
    XSRF and Origin checks: a page elsewhere could otherwise post to an environment, or open its
    websockets, with the viewer's session cookie. Refused: an `Origin` that is not the gateway's own
    (the origin it was asked on, X-Forwarded-Proto and -Host as the gateway sets them, or that of its
    configured URL, which a TLS-terminating proxy in front of it keeps), and `Sec-Fetch-Site:
    cross-site` unless it is a top-level navigation (GET or HEAD, a link on the portal's site).
    Requests without these headers (curl, a script with a bearer token) are no browser's: they pass."""
    origin = headers.get("Origin")
    if origin is not None:
        own = {origin_of(gateway_url)}
        host = headers.get("X-Forwarded-Host", "").split(",")[0].strip()
        if host:
            proto = headers.get("X-Forwarded-Proto", "https").split(",")[0].strip()
            own.add(origin_of(f"{proto}://{host}"))
        if origin_of(origin) not in own - {""}:
            return Verdict(
                403,
                "CrossSiteRequest",
                f"refused: a page of {origin[:200]!r} sent this request, and environments take requests only "
                "from their own pages; open the environment from the facility portal",
            )
    if headers.get("Sec-Fetch-Site", "").lower() == "cross-site" and not _top_level_navigation(headers):
        return Verdict(
            403,
            "CrossSiteRequest",
            "refused: another site's page sent this request, and environments take requests only from their "
            "own pages (another site may only link to them); open the environment from the facility portal",
        )
    return None


def _top_level_navigation(headers: Mapping[str, str]) -> bool:
    """Following a link to it (in the window, not in a frame of another site's page)."""
    return (
        headers.get("Sec-Fetch-Mode", "").lower() == "navigate"
        and headers.get("Sec-Fetch-Dest", "document").lower() == "document"
        and headers.get("X-Forwarded-Method", "").upper() in ("GET", "HEAD")
    )
