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

With `gateway.environment_domain` set, each environment also has a host of its own,
`<environment_label>.<environment_domain>` (environment_host), so each is a browser origin of its
own: a page of one environment is another origin to every other environment, and the forward-auth
takes an environment's requests only on its own host and from its own origin.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import hmac
import json
import re
import urllib.parse
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

from analysis_operator.model.domain import Environment, Phase
from analysis_operator.policy.access import Catalogue, plan_access
from analysis_operator.policy.refusal import Refusal

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def base_path(prefix: str, namespace: str, name: str) -> str:
    """The environment's path under the gateway's URL, with a trailing slash."""
    return f"{prefix.rstrip('/')}/{namespace}/{name}/"


def environment_label(namespace: str, name: str) -> str:
    """The DNS label of an environment's own host: `<len(name)>-<name>-<namespace>` (the length says
    where the name ends, so no two environments share it: "a--b" in "c" is 4-a--b-c, "a" in "b--c" is
    1-a-b--c), or, when that is longer than a label may be (63), "h-" and 24 hex digits of the SHA-256
    of `<namespace>/<name>` (96 bits; never the first form, which starts with a digit). Never "--" in
    its 3rd and 4th characters (what IDNA reserves), as name and namespace start with a letter or digit."""
    label = f"{len(name)}-{name}-{namespace}"
    if len(label) <= 63:
        return label
    return "h-" + hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:24]


def environment_host(domain: str, namespace: str, name: str) -> str:
    """The environment's own host under `gateway.environment_domain` ("" = none: every environment is
    under the gateway's one host)."""
    return f"{environment_label(namespace, name)}.{domain.strip('.').lower()}" if domain else ""


def forwarded_host(headers: Mapping[str, str]) -> str:
    """The host the browser asked for (X-Forwarded-Host as the gateway sets it), without its port."""
    host = headers.get("X-Forwarded-Host", "").split(",")[0].strip().lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0].rstrip(".")


def wrong_host_refusal(headers: Mapping[str, str], own_host: str, namespace: str, name: str) -> Verdict | None:
    """A request for an environment's path on a host that is not the environment's own (pure): refused
    whoever sends it, before anything is looked up. With one host per environment, another environment's
    host is another origin, whose pages must not reach this environment's server with the viewer's
    session (a page there could read the answer, being same-origin with it). 404: at that address (host
    and path) there is no environment; the page names the one where it is."""
    if forwarded_host(headers) == own_host:
        return None
    return Verdict(
        404,
        "WrongHost",
        f"{namespace}/{name} is not served at {forwarded_host(headers)[:100] or 'this host'}: "
        f"only at its own host, {own_host}",
    )


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
    if environment.deleting:  # what it ran is removed at its deletion, whatever keeps the object a while
        return Verdict(503, "Deleting", f"{where} is being deleted", role)
    if phase != Phase.READY.value:
        state = _NOT_OPEN.get(phase, "is not running")
        return Verdict(503, f"Not{phase or 'Started'}", f"{where} {state}", role)
    return Verdict(200, "Allowed", f"{viewer.user} may open {where} ({role})", role)


def sharing_digest(environment: Environment) -> str:
    """What status.viewersCheckedFor holds for the environment's spec.sharing (pure): "" when it is
    shared with nobody, so an environment never shared needs no check and carries no mark."""
    if not environment.shared_users and not environment.shared_groups:
        return ""
    text = json.dumps([sorted(environment.shared_users), sorted(environment.shared_groups)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def viewers_unchecked(environment: Environment, status: Mapping[str, object]) -> bool:
    """Ready, and its sharing is not the one whose open connections were last checked (pure): changed
    while no operator ran, whose spec handler sees no change then (a restart's resume)."""
    return status.get("phase") == Phase.READY.value and str(status.get("viewersCheckedFor") or "") != sharing_digest(
        environment
    )


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


def passed_cookies(pairs: Iterable[tuple[str, str]], allowed: Collection[str], session: str) -> str:
    """The Cookie header the environment's server gets (pure): of the browser's cookies (`pairs`, as sent),
    only those named in `allowed` (gateway.pass_cookies), in order, and never the session cookie; "" when
    none is left. An allow-list, not the session cookie taken out: the server is its owner's, who can log
    every header it is sent, and a sharee's or an admin's other cookies for the gateway's site (oauth2-proxy's
    `_oauth2_proxy`, a portal's session, JupyterLab's own login cookie `username-...`) would let the owner
    replay them and act as that person."""
    return "; ".join(f"{name}={value}" for name, value in pairs if name in allowed and name != session)


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


def cross_site_refusal(headers: Mapping[str, str], gateway_url: str, own_host: str = "") -> Verdict | None:
    """A request another site's page made a browser send, refused (pure). The gateway hands the server
    its token, so JupyterLab takes every request through it as token-authenticated and skips its own
    XSRF and Origin checks: a page elsewhere could otherwise post to an environment, or open its
    websockets, with the viewer's session cookie. Refused: an `Origin` that is not the gateway's own
    (the origin it was asked on, X-Forwarded-Proto and -Host as the gateway sets them, or that of its
    configured URL, which a TLS-terminating proxy in front of it keeps), and `Sec-Fetch-Site:
    cross-site` unless it is a top-level navigation (GET or HEAD, a link on the portal's site).
    Requests without these headers (curl, a script with a bearer token) are no browser's: they pass.
    With `own_host` (the environment's own host, gateway.environment_domain), its own origin is that
    host's (with the scheme and port of the gateway's URL, or as it was asked on that host), never the
    gateway's; and `Sec-Fetch-Site: same-site` is refused like cross-site: every other environment's
    host is the same site, but another origin."""
    origin = headers.get("Origin")
    if origin is not None:
        own = {_origin_on(gateway_url, own_host)}
        host = headers.get("X-Forwarded-Host", "").split(",")[0].strip()
        if host and (not own_host or forwarded_host(headers) == own_host):
            proto = headers.get("X-Forwarded-Proto", "https").split(",")[0].strip()
            own.add(origin_of(f"{proto}://{host}"))
        if origin_of(origin) not in own - {""}:
            return Verdict(
                403,
                "CrossSiteRequest",
                f"refused: a page of {origin[:200]!r} sent this request, and environments take requests only "
                "from their own pages; open the environment from the facility portal",
            )
    site = headers.get("Sec-Fetch-Site", "").lower()
    if site == "cross-site" and not _top_level_navigation(headers):
        return Verdict(
            403,
            "CrossSiteRequest",
            "refused: another site's page sent this request, and environments take requests only from their "
            "own pages (another site may only link to them); open the environment from the facility portal",
        )
    if own_host and site == "same-site" and not _top_level_navigation(headers):
        return Verdict(
            403,
            "CrossSiteRequest",
            "refused: a page of another host of this site (another environment's, say) sent this request, and "
            "environments take requests only from their own pages (others may only link to them)",
        )
    return None


def _origin_on(gateway_url: str, host: str) -> str:
    """The origin of `gateway_url`, or of `host` with that URL's scheme and port."""
    if not host:
        return origin_of(gateway_url)
    try:
        parts = urllib.parse.urlsplit(gateway_url.strip())
        port = parts.port
    except ValueError:
        return ""
    return origin_of(f"{parts.scheme}://{host}" + (f":{port}" if port else ""))


def _top_level_navigation(headers: Mapping[str, str]) -> bool:
    """Following a link to it (in the window, not in a frame of another site's page)."""
    return (
        headers.get("Sec-Fetch-Mode", "").lower() == "navigate"
        and headers.get("Sec-Fetch-Dest", "document").lower() == "document"
        and headers.get("X-Forwarded-Method", "").upper() in ("GET", "HEAD")
    )


@dataclass(frozen=True)
class GatewayVerdict:
    """What the gateway says of an environment's HTTPRoute (its status.parents entry for the Gateway
    the operator attaches to): taken (True), refused (False, with the gateway's reason and message),
    or nothing yet about this version of the route (None)."""

    accepted: bool | None
    reason: str = ""
    message: str = ""


def gateway_verdict(
    route: Mapping[str, object], gateway_namespace: str, gateway_name: str, section_name: str = ""
) -> GatewayVerdict:
    """The gateway's word on a route (pure), from the conditions it wrote for the route's own version in
    its entries for the Gateway (and listener, `section_name`) the operator attaches to: Accepted and
    ResolvedRefs (Gateway API). A False in any such entry wins over a True in another; Accepted True is
    taken. Conditions about an older version of the route (observedGeneration below its generation) are
    not its word on this one: a route just changed is taken as not yet decided."""
    metadata = _as_mapping(route.get("metadata"))
    generation = metadata.get("generation")
    namespace = str(metadata.get("namespace") or "")
    accepted = False
    for parent in map(_as_mapping, _as_list(_as_mapping(route.get("status")).get("parents"))):
        reference = _as_mapping(parent.get("parentRef"))
        if (reference.get("name"), reference.get("namespace") or namespace) != (gateway_name, gateway_namespace):
            continue
        if reference.get("kind", "Gateway") != "Gateway" or (
            section_name and reference.get("sectionName") != section_name
        ):
            continue
        said: dict[str, Mapping[str, object]] = {}
        for condition in map(_as_mapping, _as_list(parent.get("conditions"))):
            observed = condition.get("observedGeneration")
            if generation is None or observed is None or observed == generation:
                said[str(condition.get("type") or "")] = condition
        for kind in ("Accepted", "ResolvedRefs"):
            refusal = said.get(kind) or {}
            if refusal.get("status") == "False":
                return GatewayVerdict(
                    False, str(refusal.get("reason") or f"Not{kind}"), str(refusal.get("message") or "")
                )
        accepted = accepted or (said.get("Accepted") or {}).get("status") == "True"
    return GatewayVerdict(True, "Accepted") if accepted else GatewayVerdict(None)


def _as_mapping(value: object) -> Mapping[str, object]:
    return value if isinstance(value, Mapping) else {}


def _as_list(value: object) -> list[object]:
    return value if isinstance(value, list) else []
