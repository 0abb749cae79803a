"""The forward-auth decision (handlers/gateway.py) with real signed tokens: who is let through, with
what, and what everyone else is told. The gateway's side is in tests/integration/gateway."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from analysis_operator.engine.data_access import IndexCatalogue
from analysis_operator.engine.views import EnvironmentRecord
from analysis_operator.handlers.gateway import Authorizer
from analysis_operator.infra.oidc import TokenVerifier
from analysis_operator.model.domain import Environment
from analysis_operator.settings import GatewaySettings

NOW = datetime.datetime(2026, 11, 30, 12, 0, tzinfo=datetime.UTC)
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
LAB = Environment(namespace="team-a", name="lab", uid="u-1", owner="alice", flavor="jl")


def jwks_file(tmp_path) -> str:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(KEY.public_key()))
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}))
    return str(path)


def token(user, key=KEY, expires_in=300, issuer="https://sso.example.org", audience="analysis", kid="k1"):
    claims = {"preferred_username": user, "iss": issuer, "aud": audience, "exp": int(time.time()) + expires_in}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})


class Secrets:
    def __init__(self):
        self.reads = 0

    async def get_environment(self, namespace, name):
        return None  # the API server knows no more than the index here

    async def read_secret(self, namespace, name):
        self.reads += 1
        if (namespace, name) != ("team-a", "aenv-lab"):
            return None
        labels = {"analysis.panosc.eu/environment-uid": "u-1"}
        return {"metadata": {"labels": labels}, "data": {"token": base64.b64encode(b"server-secret").decode()}}

    async def close(self):
        return None  # the server's thread closes its client's connections when it stops


@pytest.fixture(autouse=True)
def _no_tokens_known():
    """engine/tokens.py keeps tokens per uid for the process: other tests' "u-1" is not this one's."""
    from analysis_operator.engine.tokens import KNOWN

    KNOWN.clear()
    yield
    KNOWN.clear()


@pytest.fixture
def authorizer(tmp_path):
    settings = GatewaySettings(
        enabled=True,
        oidc_jwks_file=jwks_file(tmp_path),
        oidc_issuer="https://sso.example.org",
        oidc_audience="analysis",
        admins=("support",),
    )
    environments = {("team-a", "lab"): [EnvironmentRecord(LAB, {"phase": "Ready"})]}
    catalogue = IndexCatalogue({}, {}, {"staff": [frozenset({"bob"})]})
    return Authorizer(settings, Secrets(), environments, catalogue, TokenVerifier(settings), clock=lambda: NOW)


def ask(authorizer, **headers):
    headers.setdefault("X-Forwarded-Uri", "/env/team-a/lab/lab")
    return asyncio.run(authorizer.decide(headers))


def test_owner_passes_with_the_server_token_and_without_the_session_cookie(authorizer):
    verdict, headers = ask(
        authorizer,
        Cookie=f"aenv_session={token('alice')}; _xsrf=abc; username-x=y",
        **{"X-Forwarded-Uri": "/env/team-a/lab/api"},
    )
    assert verdict.status == 200 and verdict.role == "owner"
    assert headers["Authorization"] == "token server-secret" and headers["X-Forwarded-User"] == "alice"
    # no cookie reaches the server by default (gateway.pass_cookies is empty): not the session, not JupyterLab's
    # login cookie, not _xsrf (the gateway's token makes jupyter_server skip its XSRF check)
    assert "Cookie" not in headers
    verdict, headers = ask(authorizer, Authorization=f"Bearer {token('alice')}")
    assert verdict.allowed and "Cookie" not in headers
    assert authorizer.kube.reads == 1  # the token is read once, then kept


def test_someone_else_gets_403_and_no_token(authorizer):
    verdict, headers = ask(authorizer, Authorization=f"Bearer {token('bob')}")
    assert verdict.status == 403 and verdict.reason == "NotShared" and headers == {}


def test_sharing_through_a_group_and_unsharing_take_effect_on_the_next_request(authorizer):
    record = EnvironmentRecord(dataclasses.replace(LAB, shared_groups=frozenset({"staff"})), {"phase": "Ready"})
    authorizer.environments[("team-a", "lab")] = [record]
    assert ask(authorizer, Authorization=f"Bearer {token('bob')}")[0].allowed
    authorizer.environments[("team-a", "lab")] = [EnvironmentRecord(LAB, {"phase": "Ready"})]
    assert ask(authorizer, Authorization=f"Bearer {token('bob')}")[0].status == 403


def test_admin_passes(authorizer):
    assert ask(authorizer, Authorization=f"Bearer {token('support')}")[0].role == "admin"


@pytest.mark.parametrize(
    "headers",
    [
        {},  # nobody
        {"X-Forwarded-User": "alice", "X-Auth-Request-User": "alice"},  # a forged proxy header
        {"Authorization": f"Bearer {token('alice', key=OTHER_KEY)}"},  # signed by someone else
        {"Authorization": f"Bearer {token('alice', expires_in=-120)}"},  # expired
        {"Authorization": f"Bearer {token('alice', issuer='https://evil.example.org')}"},
        {"Authorization": f"Bearer {token('alice', audience='another-app')}"},
        {"Authorization": f"Bearer {token('alice', kid='unknown')}"},
        {"Authorization": "Bearer not-a-jwt"},
        {"Authorization": "token server-secret"},  # JupyterLab's own token is no identity here
        {"Cookie": "aenv_session=garbage"},
    ],
)
def test_no_verified_identity_is_401(authorizer, headers):
    verdict, answer = ask(authorizer, **headers)
    assert verdict.status == 401 and verdict.reason == "NotSignedIn" and "Authorization" not in answer


def test_unsigned_token_is_refused(authorizer):
    forged = jwt.encode({"preferred_username": "alice", "exp": int(time.time()) + 60}, None, algorithm="none")
    assert ask(authorizer, Authorization=f"Bearer {forged}")[0].status == 401


def test_not_an_environment_and_unknown_environment(authorizer):
    bearer = f"Bearer {token('alice')}"
    assert ask(authorizer, Authorization=bearer, **{"X-Forwarded-Uri": "/elsewhere"})[0].status == 404
    verdict, _ = ask(authorizer, Authorization=bearer, **{"X-Forwarded-Uri": "/env/team-a/other/"})
    assert verdict.status == 404 and verdict.reason == "NoSuchEnvironment"


def test_suspended_environment_answers_with_a_page_not_a_token(authorizer):
    authorizer.environments[("team-a", "lab")] = [EnvironmentRecord(LAB, {"phase": "Suspended"})]
    verdict, headers = ask(authorizer, Authorization=f"Bearer {token('alice')}")
    assert verdict.status == 503 and "suspended" in verdict.message and headers == {}


def test_login_url_redirects_back(tmp_path):
    settings = GatewaySettings(enabled=True, oidc_jwks_file=jwks_file(tmp_path), login_url="https://portal/login")
    authorizer = Authorizer(settings, Secrets(), {}, IndexCatalogue({}, {}, {}), TokenVerifier(settings))
    verdict, headers = ask(authorizer, **{"X-Forwarded-Host": "gw.example.org", "X-Forwarded-Proto": "https"})
    assert verdict.status == 302
    assert headers["Location"] == "https://portal/login?rd=https%3A%2F%2Fgw.example.org%2Fenv%2Fteam-a%2Flab%2Flab"


class ApiServer(Secrets):
    """What a standby replica reads instead of its paused indexes."""

    def __init__(self, phase):
        super().__init__()
        self.phase = phase

    async def get_environment(self, namespace, name):
        if (namespace, name) != ("team-a", "lab"):
            return None
        metadata = {"namespace": namespace, "name": name, "uid": "u-1"}
        return {"metadata": metadata, "spec": {"owner": "alice", "flavor": "jl"}, "status": {"phase": self.phase}}

    async def list_cluster_objects(self, plural):
        return []


def test_a_standby_replica_answers_from_the_api_server_not_its_paused_index(tmp_path):
    settings = GatewaySettings(enabled=True, oidc_jwks_file=jwks_file(tmp_path))
    stale = {("team-a", "lab"): [EnvironmentRecord(LAB, {"phase": "Ready"})]}  # paused: still says Ready
    authorizer = Authorizer(
        settings,
        ApiServer("Suspended"),
        stale,
        IndexCatalogue({}, {}, {}),
        TokenVerifier(settings),
        active=lambda: False,
    )
    bearer = {"Authorization": f"Bearer {token('alice', issuer='x', audience='y')}"}
    assert ask(authorizer, **bearer)[0].status == 503  # the API server's word, not the index's
    authorizer.kube.phase = "Ready"
    assert ask(authorizer, **bearer)[0].allowed
    assert ask(authorizer, **bearer, **{"X-Forwarded-Uri": "/env/team-a/gone/"})[0].reason == "NoSuchEnvironment"


def test_the_closed_page_never_passes_a_request_on(authorizer):
    bearer = f"Bearer {token('alice')}"
    verdict, headers = asyncio.run(
        authorizer.decide({"X-Forwarded-Uri": "/env/team-a/lab/", "Authorization": bearer}, closed=True)
    )
    assert verdict.status == 503 and verdict.reason == "RouteNotReady" and "Authorization" not in headers


def test_an_index_still_saying_starting_is_checked_with_the_api_server(tmp_path):
    settings = GatewaySettings(enabled=True, oidc_jwks_file=jwks_file(tmp_path))
    lagging = {("team-a", "lab"): [EnvironmentRecord(LAB, {"phase": "Provisioning"})]}
    authorizer = Authorizer(settings, ApiServer("Ready"), lagging, IndexCatalogue({}, {}, {}), TokenVerifier(settings))
    bearer = {"Authorization": f"Bearer {token('alice', issuer='x', audience='y')}"}
    assert ask(authorizer, **bearer)[0].allowed  # the API server already says Ready
    authorizer.kube.phase = "Provisioning"
    assert ask(authorizer, **bearer)[0].reason == "NotProvisioning"


def test_the_operators_probe_is_answered_by_the_forward_auth_and_never_passed_on(authorizer):
    """Ready means OPEN works: the operator probes the route through the gateway before Ready. The
    forward-auth of the environment's own route answers its probe itself, whatever the phase, with
    PROBE_STATUS naming the environment (the gateway returns a non-2xx answer as it is): nothing is
    passed on, no token handed out; it counts as nobody's activity. A forged, stale or borrowed
    signature is no probe: decided like any request (here: nobody signed in)."""
    from analysis_operator.policy.opening import PROBE_HEADER, PROBE_STATUS, probe_signature

    passed: list[str] = []
    authorizer._probe_passed = passed.append  # engine/routes.py learns its route is served
    good = probe_signature("server-secret", "u-1")
    for phase in ("Provisioning", "Ready", "Suspended"):
        authorizer.environments[("team-a", "lab")] = [EnvironmentRecord(LAB, {"phase": phase})]
        verdict, headers = ask(authorizer, **{PROBE_HEADER: good})
        assert (verdict.status, verdict.reason, headers) == (PROBE_STATUS, "ProbeAnswered", {PROBE_HEADER: "u-1"})
        assert not verdict.allowed
    assert passed == ["u-1"] * 3
    assert authorizer.activity.last("u-1") is None  # not activity: idle culling never sees the probe
    for forged in ("0" * 64, probe_signature("server-secret", "u-2"), probe_signature("other-token", "u-1")):
        verdict, headers = ask(authorizer, **{PROBE_HEADER: forged})
        assert (verdict.status, verdict.reason, headers) == (401, "NotSignedIn", {}), forged
    # through the namespace's closed page (its own route is not served yet): not counted by the probe
    verdict, headers = asyncio.run(
        authorizer.decide({"X-Forwarded-Uri": "/env/team-a/lab/lab", PROBE_HEADER: good}, closed=True)
    )
    assert (verdict.status, verdict.reason, headers) == (503, "RouteNotReady", {})
    verdict, headers = ask(authorizer, **{PROBE_HEADER: good, "X-Forwarded-Uri": "/env/team-a/nope/lab"})
    assert verdict.status == 401 and headers == {}
    assert passed == ["u-1"] * 3  # neither the forged ones nor the closed page counted


@pytest.mark.parametrize("who", [None, "bob"])
def test_a_valid_probe_signature_opens_nothing_for_someone_who_read_the_token(authorizer, who):
    """Someone it was shared with read the server's token inside it (echo $JUPYTER_TOKEN) and its uid
    (kubectl), and was unshared: the probe signature they can make gets them no 200 and no token in
    any header or page, signed in or not (through the forward-auth's real HTTP answer)."""
    from aiohttp.test_utils import TestClient, TestServer

    from analysis_operator.handlers.gateway import build_app
    from analysis_operator.policy.opening import PROBE_HEADER, probe_signature

    shared = EnvironmentRecord(dataclasses.replace(LAB, shared_users=frozenset({"bob"})), {"phase": "Ready"})
    authorizer.environments[("team-a", "lab")] = [shared]
    bearer = {"Authorization": f"Bearer {token('bob')}"}
    assert ask(authorizer, **bearer)[0].allowed  # shared: bob's JupyterLab terminal shows the token
    authorizer.environments[("team-a", "lab")] = [EnvironmentRecord(LAB, {"phase": "Ready"})]  # unshared
    headers = {"X-Forwarded-Uri": "/env/team-a/lab/lab", PROBE_HEADER: probe_signature("server-secret", "u-1")}
    if who:
        headers.update(bearer)

    async def answer() -> tuple[int, dict[str, str], str]:
        async with TestClient(TestServer(build_app(authorizer))) as client:
            response = await client.get("/authorize", headers=headers)
            return response.status, dict(response.headers), await response.text()

    status, answered, page = asyncio.run(answer())
    assert status == 403 and answered["X-Analysis-Reason"] == "ProbeAnswered"
    assert "Authorization" not in answered and "X-Forwarded-User" not in answered
    assert not any("server-secret" in value for value in answered.values()) and "server-secret" not in page


def test_a_probe_header_that_is_not_ascii_is_an_ordinary_refusal_not_an_error(authorizer):
    """compare_digest raises TypeError for a str that is not ASCII: that was a 500 and a traceback."""
    from analysis_operator.policy.opening import PROBE_HEADER

    verdict, headers = ask(authorizer, **{PROBE_HEADER: "é" * 64})
    assert (verdict.status, verdict.reason, headers) == (401, "NotSignedIn", {})
    verdict, headers = ask(authorizer, Authorization=f"Bearer {token('alice')}", **{PROBE_HEADER: "\udcff" * 64})
    assert verdict.allowed and headers["X-Forwarded-User"] == "alice"  # the owner, decided as any request


@pytest.mark.parametrize(
    "browser",
    [
        {"Origin": "https://evil.example"},  # a form or fetch POST from another site's page
        {"Origin": "https://evil.example", "Upgrade": "websocket"},  # a websocket opened by it
        {"Origin": "null"},  # a sandboxed frame
        {"Origin": "http://gw.example.org"},  # the gateway's host, another scheme
        {"Origin": "https://gw.example.org:8443"},  # ... another port
        {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors", "X-Forwarded-Method": "GET"},
        {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "X-Forwarded-Method": "POST"},  # a form
        {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "iframe"},
    ],
)
def test_a_request_another_sites_page_sent_is_refused_with_its_session(authorizer, browser):
    """The gateway hands JupyterLab its token, so it skips its own XSRF and Origin checks: a page on
    evil.example riding the owner's session cookie is refused here, before anything is passed on."""
    where = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "gw.example.org", "X-Forwarded-Method": "GET"}
    verdict, headers = ask(authorizer, Cookie=f"aenv_session={token('alice')}", **{**where, **browser})
    assert (verdict.status, verdict.reason, headers) == (403, "CrossSiteRequest", {})
    assert "environments take requests only from their own pages" in verdict.message


@pytest.mark.parametrize(
    "browser",
    [
        {},  # curl, a script with a bearer token: no browser's headers at all
        {"Origin": "https://gw.example.org", "X-Forwarded-Method": "POST", "Sec-Fetch-Site": "same-origin"},
        {"Origin": "HTTPS://GW.example.org:443"},  # the same origin, written otherwise
        {"Origin": "https://analysis.example.org"},  # the configured URL's (TLS ended in front of the gateway)
        {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"},  # portal link
        {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "navigate"},
        {"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate"},  # typed in, a bookmark
    ],
)
def test_requests_from_its_own_pages_and_links_from_elsewhere_pass(tmp_path, browser):
    settings = GatewaySettings(enabled=True, oidc_jwks_file=jwks_file(tmp_path), url="https://analysis.example.org/")
    environments = {("team-a", "lab"): [EnvironmentRecord(LAB, {"phase": "Ready"})]}
    authorizer = Authorizer(settings, Secrets(), environments, IndexCatalogue({}, {}, {}), TokenVerifier(settings))
    where = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "gw.example.org", "X-Forwarded-Method": "GET"}
    session = f"aenv_session={token('alice', issuer='x', audience='y')}"
    verdict, headers = ask(authorizer, Cookie=session, **{**where, **browser})
    assert verdict.allowed and headers["Authorization"] == "token server-secret"


@pytest.mark.parametrize(
    ("other", "kept"),
    [
        ('prefs={"a":1}', 'prefs={"a":1}'),
        ("x=a b", "x=a b"),
        ("a[1]=2", "a[1]=2"),
        ('q="quoted"; broken', 'q="quoted"'),  # a piece without "=" is no pair
        ("=nameless", ""),
    ],
)
def test_the_session_cookie_is_found_and_kept_back_whatever_else_the_header_holds(authorizer, other, kept):
    """http.cookies stopped at the first pair it could not parse: `prefs={"a":1}` before the session
    cookie was 401 NotSignedIn, so a backend setting such a cookie for /env/ signed its viewers out of
    every environment. Every well-formed pair allowed through is passed on as sent, the session cookie
    never (not even named in gateway.pass_cookies)."""
    authorizer.pass_cookies = frozenset({"prefs", "x", "a[1]", "q", "_xsrf", "aenv_session"})
    session = f"aenv_session={token('alice')}"
    for cookie in (f"{other}; {session}; _xsrf=abc", f"{session}; {other}; _xsrf=abc"):
        verdict, headers = ask(authorizer, Cookie=cookie)
        assert verdict.allowed and verdict.role == "owner", cookie
        assert headers["Cookie"] == "; ".join(filter(None, [kept, "_xsrf=abc"])), cookie


BROWSER_COOKIES = "_oauth2_proxy=oauth-session; portal_session=portal; username-x=jupyter-login; _xsrf=abc"


@pytest.mark.parametrize(("viewer", "role"), [("bob", "shared"), ("support", "admin")])
def test_a_sharee_or_an_admin_passes_on_only_the_allowed_cookies(authorizer, viewer, role):
    """The server is its owner's, who can log every header it is sent: bob's or an admin's other cookies for
    the site (oauth2-proxy's in front of the gateway, a portal's session with Path=/, JupyterLab's login
    cookie) would let the owner replay them and act as that person. None by default; only those named in
    gateway.pass_cookies (here _xsrf) when some are."""
    record = EnvironmentRecord(dataclasses.replace(LAB, shared_users=frozenset({"bob"})), {"phase": "Ready"})
    authorizer.environments[("team-a", "lab")] = [record]
    for allowed, passed in ((frozenset(), None), (frozenset({"_xsrf"}), "_xsrf=abc")):
        authorizer.pass_cookies = allowed
        for cookie in (
            f"aenv_session={token(viewer)}; {BROWSER_COOKIES}",
            f"{BROWSER_COOKIES}; aenv_session={token(viewer)}",
        ):
            verdict, headers = ask(authorizer, Cookie=cookie)
            assert verdict.allowed and verdict.role == role, cookie
            assert headers.get("Cookie") == passed, cookie
        verdict, headers = ask(authorizer, Authorization=f"Bearer {token(viewer)}", Cookie=BROWSER_COOKIES)
        assert verdict.allowed and headers.get("Cookie") == passed


def test_with_no_allowed_cookie_left_the_answer_has_none_and_the_gateway_removes_the_browsers(authorizer):
    """Traefik removes each of authResponseHeaders from the request and copies the answer's (engine/routes.py):
    an answer without Cookie leaves the server none of the browser's."""
    session = f"aenv_session={token('alice')}"
    verdict, headers = ask(authorizer, Cookie=f"{session}; _oauth2_proxy=oauth-session; username-x=jupyter-login")
    assert verdict.allowed and "Cookie" not in headers
    # gateway.pass_cookies is empty by default: none passes, not even JupyterLab's _xsrf (token-authenticated
    # requests skip jupyter_server's XSRF check; another app on the host, JupyterHub, names its own _xsrf)
    verdict, headers = ask(authorizer, Cookie=f"{session}; _xsrf=abc")
    assert verdict.allowed and "Cookie" not in headers


def test_the_cookies_passed_on_are_a_setting_read_from_the_environment():
    from analysis_operator.settings import load_settings

    assert load_settings({}).gateway.pass_cookies == ()  # none by default
    environ = {"ANALYSIS_OPERATOR_GATEWAY_PASS_COOKIES": "_xsrf, site_prefs"}
    assert load_settings(environ).gateway.pass_cookies == ("_xsrf", "site_prefs")
    assert load_settings({"ANALYSIS_OPERATOR_GATEWAY_PASS_COOKIES": ""}).gateway.pass_cookies == ()
    settings = GatewaySettings(pass_cookies=("_xsrf", "site_prefs"))
    authorizer = Authorizer(settings, Secrets(), {}, IndexCatalogue({}, {}, {}), TokenVerifier(settings))
    assert authorizer.pass_cookies == {"_xsrf", "site_prefs"}


def test_a_verified_token_is_remembered_only_until_it_expires(authorizer, monkeypatch):
    """Verified once per token (a browser sends the same one every few seconds), never past its
    expiry (+ the 30 s leeway) nor longer than 300 s; a forged one is never remembered."""
    import analysis_operator.infra.oidc as oidc

    session = token("alice", expires_in=120)
    assert ask(authorizer, Cookie=f"aenv_session={session}")[0].status == 200
    verified = []
    real_verify = authorizer.verifier._verify

    async def counting(value):
        verified.append(value)
        return await real_verify(value)

    monkeypatch.setattr(authorizer.verifier, "_verify", counting)
    assert ask(authorizer, Cookie=f"aenv_session={session}")[0].status == 200 and verified == []  # remembered
    later = time.time() + 120 + 31
    monkeypatch.setattr(oidc.time, "time", lambda: later)  # the operator's clock (PyJWT keeps its own)
    ask(authorizer, Cookie=f"aenv_session={session}")
    assert verified == [session]  # past its expiry the token is verified again, not taken from memory
    forged = token("alice", key=OTHER_KEY)
    for _ in range(2):
        assert ask(authorizer, Cookie=f"aenv_session={forged}")[0].status == 401
    assert forged not in authorizer.verifier._verified


def test_a_ready_this_operator_just_wrote_is_believed_before_its_index_shows_it(tmp_path):
    """Its index lags its own status writes: a phase this process wrote (Context.written) answers
    before the API server is asked; a written phase that is still starting does not."""
    settings = GatewaySettings(
        enabled=True,
        oidc_jwks_file=jwks_file(tmp_path),
        oidc_issuer="https://sso.example.org",
        oidc_audience="analysis",
    )
    environments = {("team-a", "lab"): [EnvironmentRecord(LAB, {"phase": "Provisioning"})]}
    written = {"u-1": "Ready"}
    catalogue = IndexCatalogue({}, {}, {})
    authorizer = Authorizer(
        settings, Secrets(), environments, catalogue, TokenVerifier(settings), clock=lambda: NOW, written=written
    )
    assert ask(authorizer, Cookie=f"aenv_session={token('alice')}")[0].status == 200
    written["u-1"] = "Provisioning"  # not believed over the API server, which (here) knows nothing
    assert ask(authorizer, Cookie=f"aenv_session={token('alice')}")[0].status == 404


def test_the_server_answers_on_its_own_thread_while_the_operators_loop_is_busy(authorizer):
    """A burst of reconciles keeps the operator's loop busy: the forward-auth is served on a thread
    and loop of its own (AuthServer), so a gateway request is answered meanwhile; what must happen
    on the operator's loop (a passed probe) is handed to it, and stopping it frees the port."""
    import socket
    import threading
    import urllib.error
    import urllib.request

    from analysis_operator.handlers.gateway import AuthServer
    from analysis_operator.policy.opening import PROBE_HEADER, probe_signature

    with socket.socket() as probe_port:
        probe_port.bind(("127.0.0.1", 0))
        port = probe_port.getsockname()[1]

    def get(**headers) -> tuple[int, float]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/authorize", headers=headers)
        began = time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                status = response.status
        except urllib.error.HTTPError as error:
            status = error.code
        return status, time.monotonic() - began

    async def scenario():
        loop = asyncio.get_running_loop()
        passed: list[tuple[str, bool]] = []
        authorizer._probe_passed = lambda uid: loop.call_soon_threadsafe(
            lambda: passed.append((uid, threading.current_thread() is threading.main_thread()))
        )
        server = await AuthServer(authorizer, "127.0.0.1", port).start()
        answers: list[tuple[int, float]] = []
        headers = {"X-Forwarded-Uri": "/env/team-a/lab/lab", "Authorization": f"Bearer {token('alice')}"}
        client = threading.Thread(target=lambda: answers.append(get(**headers)))
        client.start()
        time.sleep(1.5)  # the operator's loop busy (a blocking call stands in for a burst of reconciles)
        client.join()
        prober = threading.Thread(
            target=lambda: get(
                **{"X-Forwarded-Uri": "/env/team-a/lab/lab", PROBE_HEADER: probe_signature("server-secret", "u-1")}
            )
        )
        prober.start()
        await asyncio.to_thread(prober.join)
        await asyncio.sleep(0.05)
        await server.cleanup()
        return answers, passed

    answers, passed = asyncio.run(scenario())
    ((status, seconds),) = answers
    assert status == 200 and seconds < 1.0  # answered while the loop was blocked, not after it
    assert passed == [("u-1", True)]  # the probe's news reached the operator's loop, on its thread
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass  # stopped: nothing listens any more


def test_cookie_pairs_are_read_pair_by_pair_as_sent():
    from analysis_operator.infra.oidc import cookie_pairs

    header = 'prefs={"a":1}; x=a b;a[1]=2 ; junk; =v; t=a=b=; aenv_session="quoted.jwt"'
    assert cookie_pairs(header) == [
        ("prefs", '{"a":1}'),
        ("x", "a b"),
        ("a[1]", "2"),
        ("t", "a=b="),  # split at the first "=" only (base64 padding)
        ("aenv_session", '"quoted.jwt"'),
    ]
    assert cookie_pairs("") == []
    verifier = TokenVerifier(GatewaySettings(enabled=True))
    assert verifier.credential({"Cookie": header}) == "quoted.jwt"  # unquoted, as http.cookies did
    # two of them (one a server under /env/ set for its path comes first): the last, as before
    assert verifier.credential({"Cookie": "aenv_session=planted; x=1; aenv_session=portal"}) == "portal"
