"""One browser origin per environment (settings gateway.environment_domain): each environment's own
host (policy/opening.environment_host), its route and URL on that host (engine/routes.py), and the
forward-auth taking its requests only there and from its own pages (handlers/gateway.py). Without the
setting everything is as before (tests/unit/test_opening.py, test_gateway_authorizer.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from analysis_operator.backends.base import Upstream
from analysis_operator.engine import routes as routes_module
from analysis_operator.engine.data_access import IndexCatalogue
from analysis_operator.engine.routes import GatewayRoutes, build_closed_route, build_route, public_url
from analysis_operator.engine.tokens import KNOWN
from analysis_operator.engine.views import EnvironmentRecord
from analysis_operator.handlers.gateway import Authorizer
from analysis_operator.infra.oidc import TokenVerifier
from analysis_operator.policy.opening import (
    PROBE_HEADER,
    cross_site_refusal,
    environment_host,
    environment_label,
    forwarded_host,
)
from analysis_operator.settings import GatewaySettings, load_settings
from tests.unit.test_gateway_authorizer import LAB, Secrets, jwks_file, token

DOMAIN = "env.facility.eu"
SETTINGS = GatewaySettings(
    enabled=True, url="https://analysis.facility.eu/", auth_url="http://op:9100/authorize", environment_domain=DOMAIN
)
OWN = f"3-lab-team-a.{DOMAIN}"  # LAB's own host
OTHER = f"3-lab-team-b.{DOMAIN}"  # another environment's
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
LABELS = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")


# ---------------------------------------------------------------- the host


@pytest.mark.parametrize(
    ("namespace", "name", "label"),
    [
        ("team-a", "lab", "3-lab-team-a"),
        ("t", "demo", "4-demo-t"),
        ("c", "a--b", "4-a--b-c"),
        ("b--c", "a", "1-a-b--c"),
        ("n" * 63, "lab", "h-" + "0" * 24),  # too long for a label: hashed (digits checked below)
    ],
)
def test_an_environments_label_is_its_name_length_name_and_namespace_or_a_hash(namespace, name, label):
    made = environment_label(namespace, name)
    assert DNS_LABEL.fullmatch(made) and len(made) <= 63
    if label.startswith("h-"):
        assert re.fullmatch(r"h-[0-9a-f]{24}", made)
    else:
        assert made == label
    assert environment_host(DOMAIN, namespace, name) == f"{made}.{DOMAIN}"
    assert environment_host("", namespace, name) == ""  # no domain: no host of its own


def test_two_environments_never_share_a_host():
    assert environment_host(DOMAIN, "c", "a--b") != environment_host(DOMAIN, "b--c", "a")
    assert environment_label("ns", "a" * 60) != environment_label("ns", "a" * 59 + "b")  # both hashed


@given(LABELS, LABELS, LABELS, LABELS)
def test_the_label_is_a_dns_label_and_injective(namespace, name, other_namespace, other_name):
    label = environment_label(namespace, name)
    assert DNS_LABEL.fullmatch(label) and label[2:4] != "--"  # never what IDNA reserves (xn--)
    if (namespace, name) != (other_namespace, other_name):
        assert label != environment_label(other_namespace, other_name)


@pytest.mark.parametrize(
    ("header", "host"),
    [("3-lab-team-a.env.facility.eu", OWN), ("3-LAB-team-a.env.facility.eu:8443", OWN), (f"{OWN}., x", OWN)],
)
def test_the_forwarded_host_is_read_without_port_case_or_trailing_dot(header, host):
    assert forwarded_host({"X-Forwarded-Host": header}) == host


def test_the_setting_is_read_from_the_environment():
    environ = {"ANALYSIS_OPERATOR_GATEWAY_ENVIRONMENT_DOMAIN": DOMAIN}
    assert load_settings(environ).gateway.environment_domain == DOMAIN
    assert load_settings({}).gateway.environment_domain == ""


# ---------------------------------------------------------------- route and URL


def test_the_route_names_the_environments_own_host_and_keeps_its_path():
    upstream = Upstream(port=8888, service="aenv-lab", landing="lab")
    route = build_route(dataclasses.replace(SETTINGS, hostname="analysis.facility.eu"), LAB, upstream)
    assert route["spec"]["hostnames"] == [OWN]  # its own host, not the gateway's
    assert route["spec"]["rules"][0]["matches"] == [{"path": {"type": "PathPrefix", "value": "/env/team-a/lab/"}}]
    closed = build_closed_route(SETTINGS, "team-a")
    assert closed["spec"]["hostnames"] == [f"*.{DOMAIN}"]
    assert closed["spec"]["rules"][0]["matches"][0]["path"]["value"] == "/env/team-a/"
    unset = dataclasses.replace(SETTINGS, environment_domain="")
    assert "hostnames" not in build_route(unset, LAB, upstream)["spec"]
    assert "hostnames" not in build_closed_route(unset, "team-a")["spec"]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://analysis.facility.eu/", f"https://{OWN}/env/team-a/lab/lab"),
        ("http://127.0.0.1:8000", f"http://{OWN}:8000/env/team-a/lab/lab"),  # the gateway's scheme and port
    ],
)
def test_the_connection_url_is_on_the_environments_own_host(url, expected):
    upstream = Upstream(port=8888, service="aenv-lab", landing="lab")
    assert public_url(dataclasses.replace(SETTINGS, url=url), LAB, upstream) == expected
    unset = dataclasses.replace(SETTINGS, url=url, environment_domain="")
    assert public_url(unset, LAB, upstream) == url.rstrip("/") + "/env/team-a/lab/lab"


class _Answer:
    status = 403

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False


class _Session:
    def __init__(self):
        self.asked: list[tuple[str, dict]] = []

    def get(self, url, headers, allow_redirects):
        self.asked.append((url, dict(headers)))
        return _Answer()


@pytest.mark.parametrize(("domain", "host"), [(DOMAIN, OWN), ("", None)])
def test_the_probe_asks_on_the_environments_own_host(monkeypatch, domain, host):
    """The route matches only its own host: the probe, sent to the gateway's Service, says it."""

    async def read_token(kube, environment):
        return "t"

    monkeypatch.setattr(routes_module, "read_token", read_token)
    settings = dataclasses.replace(SETTINGS, environment_domain=domain, probe_url="http://traefik.edge.svc")
    routes = GatewayRoutes(kube=None, settings=settings)  # type: ignore[arg-type]
    session = routes._session = _Session()  # type: ignore[assignment]
    asyncio.run(routes._probe(LAB, Upstream(port=8888, service="aenv-lab", landing="lab")))
    ((url, headers),) = session.asked
    assert url == "http://traefik.edge.svc/env/team-a/lab/lab" and PROBE_HEADER in headers
    assert headers.get("Host") == host


# ---------------------------------------------------------------- the forward-auth


@pytest.fixture
def authorizer(tmp_path):
    KNOWN.clear()  # engine/tokens.py keeps tokens per uid for the process: other tests' "u-1" is not this one's
    settings = dataclasses.replace(
        SETTINGS, oidc_jwks_file=jwks_file(tmp_path), oidc_issuer="https://sso.example.org", oidc_audience="analysis"
    )
    environments = {("team-a", "lab"): [EnvironmentRecord(LAB, {"phase": "Ready"})]}
    yield Authorizer(settings, Secrets(), environments, IndexCatalogue({}, {}, {}), TokenVerifier(settings))
    KNOWN.clear()


def ask(authorizer, host=OWN, **headers):
    where = {"X-Forwarded-Uri": "/env/team-a/lab/api/contents", "X-Forwarded-Proto": "https"}
    where |= {"X-Forwarded-Method": "GET", "Cookie": f"aenv_session={token('alice')}"}
    if host is not None:
        where["X-Forwarded-Host"] = host
    return asyncio.run(authorizer.decide({**where, **headers}))


@pytest.mark.parametrize(
    "browser",
    [
        {},  # curl with the session
        {"Origin": f"https://{OWN}", "X-Forwarded-Method": "POST", "Sec-Fetch-Site": "same-origin"},
        {"Origin": f"HTTPS://{OWN.upper()}:443"},
        {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "navigate"},  # a link on the portal, another environment
        {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"},
    ],
)
def test_its_own_host_and_pages_pass(authorizer, browser):
    verdict, headers = ask(authorizer, **browser)
    assert verdict.allowed and headers["Authorization"] == "token server-secret"
    assert ask(authorizer, host=f"{OWN}:443", **browser)[0].allowed  # the port is no part of the host


@pytest.mark.parametrize("host", [OTHER, "analysis.facility.eu", f"x.{OWN}", None])
def test_its_path_on_another_host_is_refused_whoever_asks(authorizer, host):
    """Another environment's host is another origin: a page there (its owner's script) could read what
    this environment's server answers to the viewer's session. Refused before anything is looked up."""
    verdict, headers = ask(authorizer, host=host)
    assert (verdict.status, verdict.reason, headers) == (404, "WrongHost", {})
    assert OWN in verdict.message
    assert ask(authorizer, host=host, Cookie="")[0].reason == "WrongHost"  # nor signed in: the same


@pytest.mark.parametrize(
    "browser",
    [
        {"Origin": f"https://{OTHER}"},  # another environment's page: same site, another origin
        {"Origin": "https://analysis.facility.eu"},  # the gateway's URL is no environment's origin here
        {"Origin": f"http://{OWN}"},  # its host, another scheme
        {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "cors"},  # fetch() from another environment
        {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"},
        {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "navigate", "X-Forwarded-Method": "POST"},  # a form
        {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "iframe"},
        {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "websocket"},
    ],
)
def test_what_another_environments_page_sends_is_refused(authorizer, browser):
    verdict, headers = ask(authorizer, **browser)
    assert (verdict.status, verdict.reason, headers) == (403, "CrossSiteRequest", {})


def test_without_the_setting_same_site_and_the_gateways_origin_pass_as_before():
    headers = {"X-Forwarded-Host": "analysis.facility.eu", "Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "cors"}
    assert cross_site_refusal(headers, SETTINGS.url) is None
    assert cross_site_refusal({"Origin": "https://analysis.facility.eu"}, SETTINGS.url) is None
    assert cross_site_refusal({"Origin": "https://analysis.facility.eu"}, SETTINGS.url, OWN) is not None
    assert cross_site_refusal({"Origin": f"https://{OWN}"}, SETTINGS.url, OWN) is None
