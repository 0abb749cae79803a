"""OPEN: one Gateway API HTTPRoute per running environment, under the facility's one gateway.

While an environment is Ready it has an HTTPRoute `aenv-<name>` in its namespace for
`<path_prefix>/<namespace>/<name>/` (policy/opening.py), attached to the Gateway named in
settings, with the gateway's forward-auth filter in front: every request is first put to
the operator (handlers/gateway.py), which lets only the owner, the people it is shared
with and admins through, and adds the server's credential on the way (the browser needs none
of its own). The route's backend is what the backend reported (`Upstream`):
  - a pod: its own Service;
  - a compute node or a VM: an IP address and port, for which a Service without selector
    and an EndpointSlice `aenv-<name>` are made here (the gateway follows those like any
    Service's endpoints); for a server with a certificate of its own (a Slurm job's
    JupyterLab, infra/server_tls.py) the port is https and a BackendTLSPolicy `aenv-<name>`
    makes the gateway accept only that certificate.
The gateway's own word on each route (its status.parents: Accepted, ResolvedRefs) is watched: a
route it refuses (a listener that does not allow the namespace, a hostname it does not serve, a
backend it cannot resolve) makes the Routable condition False with the gateway's reason and message,
and a Warning Event, instead of a Ready environment whose URL answers 404; True again once it takes it.
With gateway.environment_domain the route also names the environment's own host (its one hostname;
the namespace's closed page takes `*.<environment_domain>`), and status.connection.url is on that
host: one browser origin per environment (policy/opening.environment_host).
Everything carries the environment's labels and an owner reference, so deleting the
environment removes it; suspend, stop, expiry and revocation remove it at once (`close`).

The manifests are built by pure functions (tested without a server) and written with
server-side apply, so writing them again is harmless; a fingerprint per environment keeps
the steady state free of writes.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import time
import urllib.parse
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import structlog
from kubernetes.client.rest import ApiException

from analysis_operator.backends.base import Upstream
from analysis_operator.engine.server_certificates import config_map_name
from analysis_operator.engine.tokens import read_token
from analysis_operator.infra.kube import KubeClient, cluster_refusal
from analysis_operator.infra.per_namespace import PerNamespace
from analysis_operator.infra.watch import Summaries, Watch
from analysis_operator.model.domain import LABEL_ENVIRONMENT_UID, MANAGED_SELECTOR, Environment
from analysis_operator.policy.opening import (
    PROBE_HEADER,
    GatewayVerdict,
    base_path,
    environment_host,
    gateway_verdict,
    probe_signature,
)
from analysis_operator.settings import GatewaySettings

log = structlog.get_logger("analysis_operator.routes")

GATEWAY_API = "gateway.networking.k8s.io/v1"
MIDDLEWARE_API = "traefik.io/v1alpha1"
FORWARD_AUTH = "aenv-forward-auth"  # the forward-auth Middleware, one per namespace
CLOSED_PAGE = "aenv-closed"  # per namespace: the route and Middleware answering for environments without a route
# What the gateway copies from the operator's answer into the request it passes on: the server's
# credential, the browser's cookies named in gateway.pass_cookies, and who the viewer is. Traefik
# removes each of these from the request first, so one the answer leaves out (no cookie allowed
# through) is not sent at all, whatever the browser sent.
AUTH_RESPONSE_HEADERS = ["Authorization", "Cookie", "X-Forwarded-User"]
PROBE_ATTEMPT_SECONDS = 1.0  # one probe request; then whether the forward-auth saw it is checked
PROBE_MAX_DELAY_SECONDS = 5.0  # between one environment's attempts (from 50 ms, doubling)
GATEWAY_WORDS = 500  # characters of the gateway's message quoted (the Event's body is cut at 1,024 in all)
ROUTE_RETRY_SECONDS = 30.0  # a route that is not routable (refused, no gateway) is tried again after this
PROBE_RATE = 100.0  # attempts per second, all environments together (a burst's probes are paced, not a flood)
GATEWAY_NOT_FOUND = b"404 page not found\n"  # Traefik's (and Go's net/http) answer when no route matches
ENDPOINTSLICE_MANAGER = "analysis-operator"  # not the endpointslice controller: it leaves these alone
ENDPOINT_SLICES = f"{MANAGED_SELECTOR},endpointslice.kubernetes.io/managed-by={ENDPOINTSLICE_MANAGER}"


_NO_BACKEND_TLS = (
    "the cluster has no Gateway API BackendTLSPolicy (v1, the standard channel of Gateway API v1.4), which makes "
    "the gateway check the server's own certificate: {url} does not answer until it is installed, or until "
    "slurm.server_tls is false (plain HTTP to the node); the environment itself runs"
)


@dataclass(frozen=True)
class RouteVerdict:
    """What is kept of each HTTPRoute the operator made (GatewayRoutes.verdicts): where it is, and the
    gateway's word on it."""

    namespace: str
    name: str
    verdict: GatewayVerdict


@dataclass(frozen=True)
class Route:
    url: str  # what OPEN navigates to
    routable: bool
    reason: str
    message: str
    retry: bool = True  # not routable: converged again in ROUTE_RETRY_SECONDS (not when the watch tells the change)


class Routes(Protocol):
    """How converge opens a Ready environment to browsers and closes it again."""

    enabled: bool

    def url(self, environment: Environment, upstream: Upstream) -> str: ...

    async def open(self, environment: Environment, upstream: Upstream, ready: bool = True) -> Route: ...

    async def close(self, environment: Environment) -> None: ...

    def served(self, environment: Environment, upstream: Upstream) -> bool: ...

    def forget(self, uids: Collection[str]) -> None:
        """These environments are gone (their objects deleted): drop what was kept for them."""

    async def repair(self, live: Collection[str]) -> None:
        """Make again what the gateway needs and someone deleted under live environments (Context.repair)."""


class NoRoutes:
    """No gateway configured: status.connection.url is the backend's own address."""

    enabled = False

    def url(self, environment: Environment, upstream: Upstream) -> str:
        return ""

    async def open(self, environment: Environment, upstream: Upstream, ready: bool = True) -> Route:
        return Route("", False, "NoGateway", "no gateway is configured")

    async def close(self, environment: Environment) -> None:
        return None

    def served(self, environment: Environment, upstream: Upstream) -> bool:
        return True

    def forget(self, uids: Collection[str]) -> None:
        return None

    async def repair(self, live: Collection[str]) -> None:
        return None


# ---------------------------------------------------------------- manifests (pure)


def public_url(settings: GatewaySettings, environment: Environment, upstream: Upstream) -> str:
    """What OPEN navigates to: under the gateway's URL, or (gateway.environment_domain) on the
    environment's own host with that URL's scheme and port."""
    path = base_path(settings.path_prefix, environment.namespace, environment.name)
    landing = upstream.landing.replace("{path}", path.lstrip("/"))
    return _origin(settings, environment) + path + landing


def _origin(settings: GatewaySettings, environment: Environment) -> str:
    host = environment_host(settings.environment_domain, environment.namespace, environment.name)
    if not host:
        return settings.url.rstrip("/")
    gateway = urllib.parse.urlsplit(settings.url)
    return f"{gateway.scheme}://{host}" + (f":{gateway.port}" if gateway.port else "")


def refusal_message(gateway: str, environment: Environment, url: str, refused: GatewayVerdict) -> str:
    """Routable's message for a route the gateway refuses (pure): its own words, and what it means."""
    words = refused.message if len(refused.message) <= GATEWAY_WORDS else refused.message[: GATEWAY_WORDS - 3] + "..."
    said = f"{refused.reason}: {words}" if words else refused.reason
    return (
        f"Gateway {gateway} does not take HTTPRoute {environment.namespace}/{environment.child_name} ({said}), so "
        f"{url} does not answer; the environment itself runs. It is opened as soon as the gateway takes the route "
        f"(the Gateway's listeners decide which namespaces and hostnames it serves)"
    )


def build_route(settings: GatewaySettings, environment: Environment, upstream: Upstream) -> dict[str, Any]:
    parent: dict[str, Any] = {
        "group": "gateway.networking.k8s.io",
        "kind": "Gateway",
        "name": settings.name,
        "namespace": settings.namespace,
    }
    if settings.section_name:
        parent["sectionName"] = settings.section_name
    filters: list[dict[str, Any]] = [
        {"type": "ExtensionRef", "extensionRef": {"group": "traefik.io", "kind": "Middleware", "name": FORWARD_AUTH}}
    ]
    if upstream.strip_prefix:
        filters.append(
            {"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}}}
        )
    spec: dict[str, Any] = {
        "parentRefs": [parent],
        "rules": [
            {
                "matches": [
                    {
                        "path": {
                            "type": "PathPrefix",
                            "value": base_path(settings.path_prefix, environment.namespace, environment.name),
                        }
                    }
                ],
                "filters": filters,
                "backendRefs": [{"name": upstream.service or environment.child_name, "port": upstream.port}],
            }
        ],
    }
    own_host = environment_host(settings.environment_domain, environment.namespace, environment.name)
    if own_host:
        spec["hostnames"] = [own_host]
    elif settings.hostname:
        spec["hostnames"] = [settings.hostname]
    return {
        "apiVersion": GATEWAY_API,
        "kind": "HTTPRoute",
        "metadata": _metadata(environment),
        "spec": spec,
    }


def build_endpoint(environment: Environment, upstream: Upstream, ready: bool = True) -> list[dict[str, Any]]:
    """A Service without selector and its EndpointSlice, for an upstream that is an address. Made
    while the environment starts, with the endpoint not ready; made ready when it is: the gateway
    then only follows an endpoint change, which it does in milliseconds (a new route takes it longer)."""
    address = ipaddress.ip_address(upstream.address)  # raises ValueError for a hostname
    # TLS to a server with a certificate of its own: https on the port (without its BackendTLSPolicy,
    # or before the gateway has read it, the gateway checks the server against its own roots, which
    # fails: nothing is passed on in plain text, and nothing to a server it cannot check)
    port: dict[str, Any] = {"name": "https", "appProtocol": "https"} if upstream.server_name else {"name": "http"}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(environment),
        "spec": {"ports": [{**port, "port": upstream.port, "targetPort": upstream.port, "protocol": "TCP"}]},
    }
    metadata = _metadata(environment)
    metadata["labels"] = {
        **metadata["labels"],
        "kubernetes.io/service-name": environment.child_name,
        "endpointslice.kubernetes.io/managed-by": ENDPOINTSLICE_MANAGER,
    }
    endpoint_slice = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": metadata,
        "addressType": "IPv6" if address.version == 6 else "IPv4",
        "endpoints": [{"addresses": [str(address)], "conditions": {"ready": ready}}],
        "ports": [{**port, "port": upstream.port, "protocol": "TCP"}],
    }
    if not upstream.server_name:
        return [service, endpoint_slice]
    return [build_backend_tls(environment, upstream.server_name), service, endpoint_slice]


def build_backend_tls(environment: Environment, server_name: str) -> dict[str, Any]:
    """Gateway API's BackendTLSPolicy for the environment's Service: the gateway speaks TLS to the server
    and accepts only the certificate in ConfigMap `aenv-<name>-tls`, for `server_name`
    (engine/server_certificates.py, infra/server_tls.py)."""
    return {
        "apiVersion": GATEWAY_API,
        "kind": "BackendTLSPolicy",
        "metadata": _metadata(environment),
        "spec": {
            "targetRefs": [{"group": "", "kind": "Service", "name": environment.child_name}],
            "validation": {
                "caCertificateRefs": [{"group": "", "kind": "ConfigMap", "name": config_map_name(environment)}],
                "hostname": server_name,
            },
        },
    }


def kind_not_served(error: ApiException) -> bool:
    """A 404 for the resource type itself (its CRD is not installed), not for a missing namespace (pure):
    the API server answers a path it does not serve with Go's plain "404 page not found", a missing
    namespace with a Status naming it."""
    if error.status != 404:
        return False
    try:
        answer = json.loads(error.body or "")
    except (TypeError, ValueError):
        return True  # not a Status: the path itself is not served
    details = answer.get("details") if isinstance(answer, dict) else None
    return not (isinstance(details, dict) and details.get("name"))


def build_forward_auth(settings: GatewaySettings, namespace: str, name: str = FORWARD_AUTH) -> dict[str, Any]:
    """Traefik's forward-auth Middleware that the routes of one namespace name in their filter
    (CLOSED_PAGE: the one asking for the page of an environment that has no route)."""
    address = settings.auth_url if name == FORWARD_AUTH else settings.auth_url.rstrip("/") + "/closed"
    return {
        "apiVersion": MIDDLEWARE_API,
        "kind": "Middleware",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "analysis-operator"},
        },
        "spec": {
            "forwardAuth": {
                "address": address,
                # X-Forwarded-Uri and -Host come from the gateway itself, never from the client.
                "trustForwardHeader": False,
                "maxResponseBodySize": 65536,  # the operator's pages are small; bounded, and Traefik stops warning
                "authResponseHeaders": AUTH_RESPONSE_HEADERS,
            }
        },
    }


def build_closed_route(settings: GatewaySettings, namespace: str) -> dict[str, Any]:
    """Everything under `<prefix>/<namespace>/` that no environment's own route (a longer prefix, so
    it wins) takes: the operator answers with a page saying why (suspended, expired, not shared,
    no such environment), never a bare 404 or a timeout. No backend: nothing is ever passed on."""
    route = build_route(
        settings, Environment(namespace=namespace, name="", uid="", owner="", flavor=""), Upstream(port=1)
    )
    rule = route["spec"]["rules"][0]
    rule["matches"][0]["path"]["value"] = f"{settings.path_prefix.rstrip('/')}/{namespace}/"
    rule["filters"][0]["extensionRef"]["name"] = CLOSED_PAGE
    del rule["backendRefs"]
    if settings.environment_domain:  # every environment's own host (an exact one wins over it)
        route["spec"]["hostnames"] = [f"*.{settings.environment_domain.strip('.').lower()}"]
    route["metadata"] = {
        "name": CLOSED_PAGE,
        "namespace": namespace,
        "labels": {"app.kubernetes.io/managed-by": "analysis-operator"},
    }
    return route


def _metadata(environment: Environment) -> dict[str, Any]:
    return {
        "name": environment.child_name,
        "namespace": environment.namespace,
        "labels": dict(environment.identity_labels),
        "ownerReferences": environment.owner_references,
    }


def fingerprint(objects: list[dict[str, Any]]) -> str:
    return hashlib.sha256(json.dumps(objects, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- the gateway's routes


@dataclass(frozen=True)
class _Applied:
    """What GatewayRoutes applied for an environment: its fingerprint, where, and whether an address
    (a Service without selector and an EndpointSlice) was applied besides the route."""

    fingerprint: str
    namespace: str
    name: str
    address: bool
    tls: bool = False  # and a BackendTLSPolicy (a server with a certificate of its own)


class GatewayRoutes:
    """Routes through the Gateway named in settings (Gateway API, Traefik's forward-auth Middleware)."""

    enabled = True
    GATEWAY_CHECK_SECONDS = 10.0

    def __init__(self, kube: KubeClient, settings: GatewaySettings) -> None:
        self._kube, self._settings = kube, settings
        self._applied: dict[str, _Applied] = {}  # environment uid -> what was applied for it
        self._namespaces = PerNamespace(self._apply_namespace)  # its forward-auth Middleware and closed page
        self._gateway_seen: tuple[float, bool] = (0.0, False)
        self._served: set[str] = set()  # uids whose route answered the probe (or it gave up)
        self._passed: set[str] = set()  # uids whose probe this process's forward-auth answered on its own route
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._next_probe = 0.0  # monotonic time of the next probe request slot (_pace)
        self.converge: Callable[[Environment], None] = lambda environment: None  # converge it again now
        # The gateway's word on each environment's route, by environment uid (start: watched), and the
        # uids whose last Route said the gateway refused it (told again when it changes its mind).
        self.verdicts: Summaries[str, RouteVerdict] = Summaries(self._verdict_of)
        self._refused: dict[str, GatewayVerdict] = {}
        self._watch: Watch[str, RouteVerdict] | None = None

    async def start(self, namespace: str, kube: KubeClient | None = None) -> None:
        """The routes' verdicts listed (before the first converge reads them), then followed on a
        connection of their own. A list refused (no Gateway API yet: every route says GatewayNotFound
        anyway) is tried again by the watch; a verdict is what the gateway adds, never what opening needs."""
        self._watch = Watch(
            kube or KubeClient(1, namespace), "HTTPRoute", MANAGED_SELECTOR, self.verdicts, self._verdict_changed
        )
        try:
            await self._watch.start()
        except Exception as error:  # the API server, RBAC or the CRD: nothing of opening waits for it
            log.warning("route.verdicts_not_listed", error=repr(error), action="listed again by the watch")

    def follow(self) -> None:
        if self._watch is not None:
            self._watch.follow()

    def _verdict_of(self, body: Mapping[str, Any]) -> tuple[str, RouteVerdict] | None:
        metadata = body.get("metadata") or {}
        uid = str((metadata.get("labels") or {}).get(LABEL_ENVIRONMENT_UID) or "")
        if not uid:
            return None  # a namespace's closed page
        verdict = gateway_verdict(body, self._settings.namespace, self._settings.name, self._settings.section_name)
        return uid, RouteVerdict(str(metadata.get("namespace") or ""), str(metadata.get("name") or ""), verdict)

    def verdict(self, environment: Environment) -> GatewayVerdict | None:
        """The gateway's word on this environment's own route (by its namespace and name: a route elsewhere
        carrying its uid label is not its route); None while that route is not seen."""
        return next(
            (
                each.verdict
                for each in self.verdicts.get(environment.uid, ())
                if (each.namespace, each.name) == (environment.namespace, environment.child_name)
            ),
            None,
        )

    def refusal(self, environment: Environment) -> GatewayVerdict | None:
        """The gateway's refusal of its route, if that is its word now; while the gateway has said nothing of
        the route's version yet (just changed, or made again), the refusal told before stands."""
        verdict = self.verdict(environment)
        if verdict is None or verdict.accepted is None:
            return self._refused.get(environment.uid)
        return verdict if verdict.accepted is False else None

    async def _verdict_changed(self, uid: str) -> None:
        """A route the gateway refuses now, or took again after a refusal this process told: its
        environment converged again (only where this process routes it), which says so in Routable. A
        refused route deleted meanwhile is made again by that converge."""
        applied = self._applied.get(uid)
        if applied is None:
            return
        environment = Environment(namespace=applied.namespace, name=applied.name, uid=uid, owner="", flavor="")
        if uid in self._refused:
            if self.verdict(environment) is None:
                del self._applied[uid]  # its route is gone: applied again, not taken for in place
        elif self.refusal(environment) is None:
            return
        self.converge(environment)

    def served(self, environment: Environment, upstream: Upstream) -> bool:
        """Has the gateway served this environment's own route yet? (settings gateway.probe_url:
        asked through the gateway, in a task of its own; converged again when it has). Without a probe
        URL, always."""
        if not self._settings.probe_url or environment.uid in self._served:
            return True
        if environment.uid not in self._probes:
            task = asyncio.get_running_loop().create_task(self._probe(environment, upstream))
            self._probes[environment.uid] = task
            task.add_done_callback(lambda _: self._probes.pop(environment.uid, None))
        return False

    async def _probe(self, environment: Environment, upstream: Upstream) -> None:
        """GET the page OPEN lands on through the gateway, with the probe signature, until the
        environment's own route answers: anything but the gateway's own "404 page not found" (no
        route yet) and a 503 (the namespace's closed page, or no ready endpoint yet). Its forward-auth
        answers the probe itself (policy/opening.PROBE_STATUS, 403, naming the environment in
        PROBE_HEADER) and passes nothing on, so the signature opens nothing for whoever else can make
        it (anyone who read the token inside the environment); this process learns of that answer at
        once (probe_passed), and one from another replica counts here like any answer of the route."""
        token = await read_token(self._kube, environment)
        path = base_path(self._settings.path_prefix, environment.namespace, environment.name)
        url = self._settings.probe_url.rstrip("/") + path + upstream.landing.replace("{path}", path.lstrip("/"))
        headers = {PROBE_HEADER: probe_signature(token or "", environment.uid)}
        own_host = environment_host(self._settings.environment_domain, environment.namespace, environment.name)
        if own_host:  # the route matches only its own host (the probe URL is the gateway's Service, say)
            headers["Host"] = own_host
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PROBE_ATTEMPT_SECONDS))
        began, delay, answer = time.monotonic(), 0.05, "nothing"
        name = f"{environment.namespace}/{environment.name}"
        while time.monotonic() - began < self._settings.probe_timeout_seconds:
            if environment.uid in self._passed:
                log.info("route.served", environment=name, seconds=round(time.monotonic() - began, 3), answer=answer)
                break
            await self._pace()
            if environment.uid in self._passed:
                continue
            try:
                async with self._session.get(url, headers=headers, allow_redirects=False) as response:
                    answer = f"HTTP {response.status}"
                    body = await response.content.read(64) if response.status == 404 else b""
                    if response.status != 503 and body != GATEWAY_NOT_FOUND:
                        log.info("route.served", environment=name, seconds=round(time.monotonic() - began, 3))
                        break
            except (aiohttp.ClientError, TimeoutError) as error:
                answer = type(error).__name__
            await asyncio.sleep(delay)
            delay = min(PROBE_MAX_DELAY_SECONDS, delay * 2)
        else:
            log.warning("route.not_served", environment=name, seconds=self._settings.probe_timeout_seconds, last=answer)
        self._served.add(environment.uid)
        self._passed.discard(environment.uid)
        self.converge(environment)

    async def shutdown(self) -> None:
        """Stop the probes and the watch, and close their connections (the operator is stopping)."""
        for probe in list(self._probes.values()):
            probe.cancel()
        if self._session is not None:
            await self._session.close()
        if self._watch is not None:
            await self._watch.stop()

    async def _pace(self) -> None:
        """At most PROBE_RATE probe requests a second in all, in the order they asked: while the
        gateway has not taken a burst's routes yet, a thousand probes each answered at once by the
        closed page would otherwise keep the gateway, the forward-auth and this loop busy."""
        now = time.monotonic()
        slot = max(now, self._next_probe)
        self._next_probe = slot + 1.0 / PROBE_RATE
        if slot > now:
            await asyncio.sleep(slot - now)

    def probe_passed(self, uid: str) -> None:
        """The forward-auth answered this operator's probe on an environment's own route."""
        if uid in self._probes:
            self._passed.add(uid)

    def url(self, environment: Environment, upstream: Upstream) -> str:
        return public_url(self._settings, environment, upstream)

    async def _gateway_exists(self) -> bool:
        checked_at, exists = self._gateway_seen
        if time.monotonic() - checked_at < self.GATEWAY_CHECK_SECONDS:
            return exists
        found = await self._kube.get_object(GATEWAY_API, "Gateway", self._settings.namespace, self._settings.name)
        self._gateway_seen = (time.monotonic(), found is not None)
        return found is not None

    async def open(self, environment: Environment, upstream: Upstream, ready: bool = True) -> Route:
        """Route it (from the moment its upstream is known, so it is in place when it is Ready)."""
        url = self.url(environment, upstream)
        gateway = f"{self._settings.namespace}/{self._settings.name}"
        if not await self._gateway_exists():
            return Route(
                url,
                False,
                "GatewayNotFound",
                f"Gateway {gateway} does not exist, so {url} does not answer yet; the environment itself is fine "
                f"(settings gateway.name and gateway.namespace name the Gateway routes attach to)",
            )
        objects = [build_route(self._settings, environment, upstream)]
        address = not upstream.service
        if address:
            try:
                objects = [*build_endpoint(environment, upstream, ready), *objects]
            except ValueError:
                return Route(url, False, "NoAddress", f"the backend reported {upstream.address!r}, not an IP address")
        wanted = fingerprint(objects)
        applied = self._applied.get(environment.uid)
        if applied is None or applied.fingerprint != wanted:
            try:
                await self._namespaces.ensure(environment.namespace, environment.uid)
                if address and not upstream.server_name and (applied is None or applied.tls):
                    # A server with a certificate replaced by one without (slurm.server_tls turned off, then a
                    # new job without a close between: a replacement, a lost submission): its policy would
                    # have the gateway speak TLS to plain HTTP, and fail. After a restart, not known: read.
                    await self._delete_backend_tls(environment)
                for body in objects:
                    try:
                        await self._kube.apply(body)
                    except ApiException as error:
                        if body["kind"] == "BackendTLSPolicy" and kind_not_served(error):
                            return Route(url, False, "BackendTLSPolicyNotInstalled", _NO_BACKEND_TLS.format(url=url))
                        raise
            except ApiException as error:  # a quota on Services, a policy on HTTPRoutes: what runs is told
                refusal = cluster_refusal(error)
                if not refusal:
                    raise
                log.warning(
                    "route.refused", environment=f"{environment.namespace}/{environment.name}", call=repr(error)
                )
                return Route(
                    url,
                    False,
                    "RefusedByCluster",
                    f"Kubernetes refused what its route needs: {refusal}. {url} does not answer until it is allowed "
                    f"(tried again every {ROUTE_RETRY_SECONDS:.0f} s); the environment itself runs",
                )
            self._applied[environment.uid] = _Applied(
                wanted, environment.namespace, environment.name, address, bool(upstream.server_name)
            )
            log.info("route.opened", environment=f"{environment.namespace}/{environment.name}", url=url)
        refused = self.refusal(environment)
        if refused is not None:
            self._refused[environment.uid] = refused
            probe = self._probes.pop(environment.uid, None)
            if probe is not None:  # nothing to wait for: the gateway has said it does not serve it
                probe.cancel()
            # not tried again every 30 s: the watch tells the gateway's change of mind
            return Route(url, False, refused.reason, refusal_message(gateway, environment, url, refused), retry=False)
        self._refused.pop(environment.uid, None)
        return Route(url, True, "Routed", f"open at {url} through Gateway {gateway}")

    async def _apply_namespace(self, namespace: str) -> None:
        """The forward-auth Middleware of a namespace, and its closed page (infra/per_namespace.py: with
        the first environment routed there, and again in a namespace made anew under its name)."""
        await self._kube.apply(build_forward_auth(self._settings, namespace))
        await self._kube.apply(build_forward_auth(self._settings, namespace, CLOSED_PAGE))
        await self._kube.apply(build_closed_route(self._settings, namespace))

    async def repair(self, live: Collection[str]) -> None:
        """What someone deleted under live environments (uids `live`), made again: a namespace's forward-auth
        Middleware and closed page, and what an environment that runs is routed by (converged again,
        which applies it): its HTTPRoute, and for an address (a compute node, a VM) the Service without
        selector and the EndpointSlice (and the BackendTLSPolicy of a server with a certificate of its
        own). Meanwhile the gateway answers there with the closed page, its 404 or a 503 (no endpoint),
        never past the forward-auth: a route naming a Middleware that does not exist is not served.
        Services and EndpointSlices are listed only while some environment is routed to an address."""
        if not (self._namespaces.done or self._applied):
            return
        # What was applied before the lists began: each list has it unless someone deleted it. What is
        # applied while they are read (a burst's starts) is not asked about: it would be converged again.
        applied_before, namespaces_before = list(self._applied.items()), self._namespaces.done
        routes = await self._kube.present(GATEWAY_API, "HTTPRoute", MANAGED_SELECTOR)
        middlewares = await self._kube.present(MIDDLEWARE_API, "Middleware", MANAGED_SELECTOR)
        services: set[tuple[str, str]] = set()
        slices: set[tuple[str, str]] = set()
        policies: set[tuple[str, str]] = set()
        if any(applied.address for applied in self._applied.values()):
            services = await self._kube.present("v1", "Service", MANAGED_SELECTOR)
            slices = await self._kube.present("discovery.k8s.io/v1", "EndpointSlice", ENDPOINT_SLICES)
        if any(applied.tls for applied in self._applied.values()):
            try:
                policies = await self._kube.present(GATEWAY_API, "BackendTLSPolicy", MANAGED_SELECTOR)
            except ApiException as error:  # its CRD removed since: converged again, the route says so
                if not kind_not_served(error):
                    raise

        def having(found: set[tuple[str, str]], name: str) -> set[str]:
            return {namespace for namespace, each in found if each == name}

        whole = having(routes, CLOSED_PAGE) & having(middlewares, FORWARD_AUTH) & having(middlewares, CLOSED_PAGE)
        await self._namespaces.restore(namespaces_before - whole, "forward-auth Middleware and closed page")
        for uid, applied in applied_before:
            if self._applied.get(uid) is not applied:  # closed, or applied again while the lists were read
                continue
            environment = Environment(namespace=applied.namespace, name=applied.name, uid=uid, owner="", flavor="")
            key = (applied.namespace, environment.child_name)
            wanted = {
                "HTTPRoute": routes,
                **({"Service": services, "EndpointSlice": slices} if applied.address else {}),
                **({"BackendTLSPolicy": policies} if applied.tls else {}),
            }
            missing = [kind for kind, found in wanted.items() if key not in found]
            if uid in live and missing:
                del self._applied[uid]  # no await since it was looked up: it is still there
                log.warning(
                    "route.missing",
                    environment=f"{applied.namespace}/{applied.name}",
                    missing=missing,
                    action="converged again",
                )
                self.converge(environment)

    def _drop(self, uid: str, keep_refusal: bool = False) -> None:
        """What this process keeps for an environment's route, and its probe (`keep_refusal`: but the
        gateway's refusal told, for when it runs again)."""
        self._applied.pop(uid, None)
        if not keep_refusal:
            self._refused.pop(uid, None)
        self._served.discard(uid)
        self._passed.discard(uid)
        probe = self._probes.pop(uid, None)
        if probe is not None:
            probe.cancel()

    def forget(self, uids: Collection[str]) -> None:
        for uid in uids:
            self._drop(uid)
        self._namespaces.forget(uids)

    async def close(self, environment: Environment) -> None:
        self._drop(environment.uid, keep_refusal=True)  # if it runs again: not "Routed" until the gateway speaks
        try:
            await self._namespaces.ensure(environment.namespace, environment.uid)  # its closed page answers now
        except ApiException as error:  # a quota or policy with no room for it, no Traefik CRD: closed all the same
            if not (cluster_refusal(error) or kind_not_served(error)):
                raise
            log.warning(
                "route.closed_page_refused", environment=f"{environment.namespace}/{environment.name}", call=repr(error)
            )
        for api_version, kind in (
            (GATEWAY_API, "HTTPRoute"),
            ("discovery.k8s.io/v1", "EndpointSlice"),
            (GATEWAY_API, "BackendTLSPolicy"),
            ("v1", "Service"),
        ):
            # A pod's Service is the Kubernetes backend's, not the route's. The policy goes whatever became
            # of the Service (a pod's environment has none: one read answered 404).
            if kind == "BackendTLSPolicy":
                await self._delete_backend_tls(environment)
            elif kind != "Service" or await self._own_endpoint_service(environment):
                await self._delete_own(api_version, kind, environment)
        log.info("route.closed", environment=f"{environment.namespace}/{environment.name}")

    async def _delete_own(self, api_version: str, kind: str, environment: Environment) -> None:
        """The environment's object of this kind (aenv-<name>), deleted if it is the environment's own."""
        found = await self._kube.get_object(api_version, kind, environment.namespace, environment.child_name)
        labels = ((found or {}).get("metadata") or {}).get("labels") or {}
        if found is not None and labels.get(LABEL_ENVIRONMENT_UID) == environment.uid:
            uid = str(found["metadata"].get("uid", ""))
            await self._kube.delete_object(api_version, kind, environment.namespace, environment.child_name, uid)

    async def _delete_backend_tls(self, environment: Environment) -> None:
        try:
            await self._delete_own(GATEWAY_API, "BackendTLSPolicy", environment)
        except ApiException as error:  # RBAC older than this operator (no chart): the policy cannot be made
            if error.status != 403:  # either, and neither a close nor a route must fail on it
                raise

    async def _own_endpoint_service(self, environment: Environment) -> bool:
        """A Service without selector is the route's (an address upstream); one with a selector is a pod's."""
        found = await self._kube.get_object("v1", "Service", environment.namespace, environment.child_name)
        return found is not None and not (found.get("spec") or {}).get("selector")
