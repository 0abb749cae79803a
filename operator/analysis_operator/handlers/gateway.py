"""The gateway's forward-auth: may this signed-in person open this environment? (OPEN)

The gateway (Traefik's forwardAuth Middleware on every environment's HTTPRoute,
engine/routes.py) sends each request's headers here before passing it on. The answer is
decided in memory (kopf's indexes, policy/opening.py) and writes nothing:
  - 200: pass the request on, with the server's credential (`Authorization: token ...`,
    the environment's access token) and of the browser's cookies only those named in
    gateway.pass_cookies (never the session cookie), so neither the session (the viewer's
    identity), nor the viewer's other cookies, nor the token ever reaches the other side;
  - 401: not signed in (or a session that does not verify), or a redirect to the login URL;
  - 403: signed in, not allowed (not the owner, not shared with them, or shared but a
    mounted dataset they may not read); or a request another site's page sent (CrossSiteRequest,
    policy/opening.cross_site_refusal), whoever it is from; or the operator's own probe, answered
    here and never passed on (ProbeAnswered);
  - 404: no such environment; or, with gateway.environment_domain, its path asked on a host that is
    not its own (WrongHost, policy/opening.wrong_host_refusal); 503: allowed, but it is not running
    (a page says why).
Every non-200 answer is a small HTML page saying why (the gateway shows it as it is), with
the reason in the X-Analysis-Reason header for scripts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import html
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping

import structlog
from aiohttp import web

from analysis_operator.engine.data_access import IndexCatalogue, api_catalogue
from analysis_operator.engine.idle import GatewayActivity
from analysis_operator.engine.reconciler import utcnow
from analysis_operator.engine.tokens import read_token, token_lost
from analysis_operator.engine.views import EnvironmentRecord, Index, first
from analysis_operator.handlers.offer import add_offer_routes
from analysis_operator.infra.kube import KubeClient
from analysis_operator.infra.oidc import NotSignedIn, TokenVerifier, cookie_pairs
from analysis_operator.model.domain import Environment, Phase
from analysis_operator.policy.access import Catalogue
from analysis_operator.policy.opening import (
    PROBE_HEADER,
    PROBE_REASON,
    PROBE_STATUS,
    Verdict,
    Viewer,
    cross_site_refusal,
    environment_host,
    environment_of,
    is_probe,
    may_open,
    passed_cookies,
    wrong_host_refusal,
)
from analysis_operator.settings import GatewaySettings

log = structlog.get_logger("analysis_operator.gateway")
STARTING = frozenset({Phase.PENDING.value, Phase.PROVISIONING.value})


class Authorizer:
    """Decides one forward-auth request; in memory, except a token's first read."""

    def __init__(
        self,
        settings: GatewaySettings,
        kube: KubeClient,
        environments: Index,
        catalogue: IndexCatalogue,
        verifier: TokenVerifier,
        clock: Callable[[], datetime.datetime] | None = None,
        active: Callable[[], bool] = lambda: True,
        activity: GatewayActivity | None = None,
        written: Mapping[str, str] | None = None,
        probe_passed: Callable[[str], None] = lambda uid: None,
    ) -> None:
        self.settings, self.kube, self.environments, self.catalogue = settings, kube, environments, catalogue
        self.verifier = verifier
        self.admins = frozenset(settings.admins)
        self.pass_cookies = frozenset(settings.pass_cookies)
        self._clock = clock
        # A standby replica (kopf peering) has paused indexes: it answers from the API server instead.
        self._active = active
        self.activity = activity or GatewayActivity()  # what it lets through counts as activity (idle culling)
        self._written = written if written is not None else {}  # phases this process wrote (Context.written)
        self._probe_passed = probe_passed  # engine/routes.py: its probe came through the environment's own route

    def _now(self) -> datetime.datetime:
        return self._clock() if self._clock else utcnow()

    async def decide(self, headers: Mapping[str, str], closed: bool = False) -> tuple[Verdict, dict[str, str]]:
        """The verdict and the headers to answer with. `closed`: asked by the namespace's closed page
        (the environment has no route of its own), so nothing is ever passed on from there."""
        uri = headers.get("X-Forwarded-Uri", "")
        target = environment_of(self.settings.path_prefix, urllib.parse.unquote(uri.split("?", 1)[0]))
        if target is None:
            return Verdict(404, "NotAnEnvironment", f"{uri or '/'} is not the address of an environment"), {}
        own_host = environment_host(self.settings.environment_domain, *target)
        refusal = wrong_host_refusal(headers, own_host, *target) if own_host else None
        refusal = refusal or cross_site_refusal(headers, self.settings.url, own_host)
        if refusal is not None:
            return refusal, {}
        if headers.get(PROBE_HEADER):
            probed = await self._probe(target, headers[PROBE_HEADER], closed)
            if probed is not None:
                return probed
        try:
            token = self.verifier.credential(headers)
            if not token:
                raise NotSignedIn("you are not signed in")
            user = await self.verifier.user(token)
        except NotSignedIn as error:
            return self._sign_in(str(error), headers)
        catalogue: Catalogue = self.catalogue
        if self._active():
            record: EnvironmentRecord | None = first(self.environments, target)
        else:
            record = await self._read(*target)
            catalogue = await api_catalogue(self.kube)
        if record is not None and record.status.get("phase") in STARTING:
            # The index follows the operator's own status writes a moment late (more under load):
            # before telling someone it is still starting, see what this process wrote last, or
            # ask the API server.
            written = self._written.get(record.environment.uid)
            if written is not None and written not in STARTING:
                record = EnvironmentRecord(record.environment, {**record.status, "phase": written})
            else:
                record = await self._read(*target)
        if record is None:
            return Verdict(404, "NoSuchEnvironment", f"there is no environment {target[0]}/{target[1]}"), {}
        viewer = Viewer(user, catalogue.groups_of(user))
        verdict = may_open(
            record.environment, str(record.status.get("phase") or ""), viewer, self.admins, catalogue, self._now()
        )
        if not verdict.allowed:
            return verdict, {}
        if closed:  # Ready, but its route is not (yet, or any more) in the gateway
            message = f"{target[0]}/{target[1]} is ready and its address is being opened: reload in a moment"
            return Verdict(503, "RouteNotReady", message, verdict.role), {"Retry-After": "2"}
        server_token = await self._token(record.environment)
        if server_token is None:
            return Verdict(503, "NoToken", f"{target[0]}/{target[1]}: {token_lost(record.environment)}"), {}
        self.activity.saw(record.environment.uid)
        passed = {"Authorization": f"token {server_token}", "X-Forwarded-User": user}
        cookies = passed_cookies(
            cookie_pairs(headers.get("Cookie", "")), self.pass_cookies, self.settings.session_cookie
        )
        if cookies:  # none: no Cookie in the answer, and Traefik removes the browser's (authResponseHeaders)
            passed["Cookie"] = cookies
        return verdict, passed

    async def _probe(
        self, target: tuple[str, str], signature: str, closed: bool
    ) -> tuple[Verdict, dict[str, str]] | None:
        """The operator's own probe (engine/routes.py): is the environment's own route in the gateway yet?
        Answered here, whatever the phase (it comes just before Ready), with PROBE_STATUS naming the
        environment, and never passed on: whoever can make the signature (anyone who read the token
        inside the environment) gets in nowhere with it. Not counted as activity. Through the
        namespace's closed page (no route of its own yet) a 503, which the probe does not count, for any
        probe header: nothing is passed on from there anyway. None: not this environment's signature,
        so an ordinary request, decided like any other."""
        if closed:
            return Verdict(503, "RouteNotReady", "the route is not served yet"), {}
        record = first(self.environments, target) if self._active() else None
        record = record or await self._read(*target)
        server_token = None if record is None else await self._token(record.environment)
        if record is None or server_token is None or not is_probe(signature, server_token, record.environment.uid):
            return None
        uid = record.environment.uid
        self._probe_passed(uid)
        message = "the operator's probe: answered by the forward-auth of this environment's own route, never passed on"
        return Verdict(PROBE_STATUS, PROBE_REASON, message), {PROBE_HEADER: uid}

    async def _read(self, namespace: str, name: str) -> EnvironmentRecord | None:
        body = await self.kube.get_environment(namespace, name)
        if body is None:
            return None
        return EnvironmentRecord(Environment.from_body(body), dict(body.get("status") or {}))

    def _sign_in(self, why: str, headers: Mapping[str, str]) -> tuple[Verdict, dict[str, str]]:
        if self.settings.login_url:
            back = headers.get("X-Forwarded-Proto", "https") + "://" + headers.get("X-Forwarded-Host", "")
            back += headers.get("X-Forwarded-Uri", "/")
            location = f"{self.settings.login_url}?{urllib.parse.urlencode({'rd': back})}"
            return Verdict(302, "NotSignedIn", why), {"Location": location}
        return Verdict(401, "NotSignedIn", f"{why}: sign in through the facility portal"), {}

    async def _token(self, environment: Environment) -> str | None:
        return await read_token(self.kube, environment)  # known in memory once made or read (engine/tokens.py)


def page(verdict: Verdict) -> str:
    title = {401: "Sign in", 403: "Not allowed", 404: "Not found", 503: "Not running"}.get(verdict.status, "Analysis")
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>"
        f"{title}</title></head><body><h1>{title}</h1><p id='reason'>{html.escape(verdict.message)}</p>"
        f"<p><small>{html.escape(verdict.reason)}</small></p></body></html>"
    )


def build_app(authorizer: Authorizer) -> web.Application:
    async def authorize(request: web.Request) -> web.Response:
        started = time.perf_counter()
        closed = request.path.endswith("/closed")
        for attempt in range(AuthServer.ATTEMPTS):
            try:
                verdict, headers = await authorizer.decide(request.headers, closed=closed)
                break
            except RuntimeError:  # an index changed while this thread read it: decide again
                if attempt == AuthServer.ATTEMPTS - 1:
                    raise
        log.info(
            "gateway.authorize",
            uri=request.headers.get("X-Forwarded-Uri", ""),
            status=verdict.status,
            reason=verdict.reason,
            role=verdict.role or None,
            user=headers.get("X-Forwarded-User"),
            seconds=round(time.perf_counter() - started, 6),
        )
        if verdict.allowed:
            return web.Response(status=200, headers=headers)
        return web.Response(
            status=verdict.status,
            text=page(verdict),
            content_type="text/html",
            headers={**headers, "X-Analysis-Reason": verdict.reason, "Cache-Control": "no-store"},
        )

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/authorize", authorize)
    app.router.add_route("*", "/authorize/{tail:.*}", authorize)
    app.router.add_get("/healthz", healthz)
    add_offer_routes(app)  # GET /api/v1/offer: what may this user do? (handlers/offer.py)
    return app


class AuthServer:
    """The forward-auth server on a thread and event loop of its own.

    A burst of creates keeps the operator's event loop busy for minutes; served there, every
    gateway request waited behind the queued reconciles (seconds at p99, bench/RESULTS.md). Here
    it waits only for the GIL (the interpreter hands it over every few milliseconds). What a
    decision reads is safe from this thread: kopf's indexes and the phases the operator wrote
    are dicts read key by key (an index changed mid-read raises RuntimeError: the decision is
    made again), the API server is reached through a KubeClient session of this loop's own, and what must
    happen on the operator's loop (a passed probe) is handed to it (`call_soon_threadsafe`)."""

    ATTEMPTS = 3

    def __init__(self, authorizer: Authorizer, address: str, port: int) -> None:
        self.app = build_app(authorizer)
        self.authorizer = authorizer
        self.address, self.port = address, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def start(self) -> AuthServer:
        listening: concurrent.futures.Future[None] = concurrent.futures.Future()
        # its loop of the same kind as the operator's (uvloop or the standard library's, cli.py)
        loop_type = type(asyncio.get_running_loop())
        self._thread = threading.Thread(
            target=self._serve, args=(listening, loop_type), name="forward-auth", daemon=True
        )
        self._thread.start()
        await asyncio.wrap_future(listening)
        log.info("gateway.auth_listening", address=self.address, port=self.port)
        return self

    def _serve(self, listening: concurrent.futures.Future[None], loop_type: type[asyncio.AbstractEventLoop]) -> None:
        loop = self._loop = loop_type()
        runner = web.AppRunner(self.app, access_log=None)
        try:
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, self.address, self.port).start())
        except BaseException as error:  # the port taken, say: the operator's startup fails with it
            listening.set_exception(error)
            loop.close()
            return
        listening.set_result(None)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.run_until_complete(self.authorizer.kube.close())  # its connections, made on this loop
            loop.close()

    async def cleanup(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            await asyncio.to_thread(self._thread.join, 10)


async def start_server(authorizer: Authorizer, address: str, port: int) -> AuthServer:
    return await AuthServer(authorizer, address, port).start()
