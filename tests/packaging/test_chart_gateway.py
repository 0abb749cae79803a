"""The Helm chart's OPEN part (values `gateway`), rendered with `helm template`, no server:
the values become the operator's ANALYSIS_OPERATOR_GATEWAY_* settings, the forward-auth port
is exposed (container port, Service, the default authUrl pointing at it), the RBAC covers what
engine/routes.py calls (found by running it against a recording client), NetworkPolicies let
only the gateway in, and values the operator cannot run with are refused with a clear message.

helm is the one hack/build.sh builds (the local stack's bin directory, else the build cache);
the tests against a real API server are in tests/integration/test_chart.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pathlib
import re
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import pytest
import yaml

from analysis_operator.backends.base import Upstream
from analysis_operator.engine.routes import GatewayRoutes
from analysis_operator.infra.kube import object_path
from analysis_operator.model.domain import LABEL_ENVIRONMENT_UID, Environment
from analysis_operator.settings import PREFIX, GatewaySettings, Settings, load_settings

REPO = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO / "charts/analysis-operator"
RELEASE, NAMESPACE = "aop", "ops"
FULLNAME = f"{RELEASE}-analysis-operator"

# The smallest values the chart accepts with the gateway on.
ENABLED = {
    "gateway": {
        "enabled": True,
        "url": "https://analysis.facility.example.org",
        "oidc": {
            "issuer": "https://sso.example.org/realms/facility",
            "audience": "analysis-portal",
            "jwksUrl": "https://sso.example.org/realms/facility/protocol/openid-connect/certs",
        },
    }
}


def _helm_binary() -> pathlib.Path:
    """The stack's helm (its bin directory, as tests/integration/chart.py finds it), else the build cache's."""
    state = pathlib.Path(os.environ.get("CLUSTER_STATE_DIR", "/tmp/analysis-operator-cluster")) / "bin"
    if state.is_file() and (pathlib.Path(state.read_text().strip()) / "helm").exists():
        return pathlib.Path(state.read_text().strip()) / "helm"
    version = re.search(r"HELM_VERSION=\$\{HELM_VERSION:-(v[0-9.]+)\}", (REPO / "hack/build.sh").read_text())
    assert version, "hack/build.sh no longer names its helm version"
    cache = pathlib.Path(os.environ.get("ANALYSIS_OPERATOR_CACHE", pathlib.Path.home() / ".cache/analysis-operator"))
    binary = cache / f"helm-{version.group(1)}" / "helm"
    if not binary.exists():
        pytest.fail(f"no helm at {binary}: run hack/build.sh (hack/install-deps.sh does)")
    return binary


HELM = _helm_binary()


def helm(*arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(HELM), *arguments], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(arguments)} failed ({result.returncode}):\n{result.stderr}")
    return result


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and key in merged else value
    return merged


def render(tmp_path: pathlib.Path, values: dict | None = None, *arguments: str) -> list[dict]:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values or {}))
    output = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--values", str(path), *arguments).stdout
    return [document for document in yaml.safe_load_all(output) if document]


def refusal(tmp_path: pathlib.Path, values: dict, *arguments: str) -> str:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    result = helm("template", RELEASE, str(CHART), "--values", str(path), *arguments, check=False)
    assert result.returncode != 0, "rendered, but should have been refused"
    return result.stderr


def find(objects: list[dict], kind: str, name: str | None = None) -> dict:
    matches = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, got {[m['metadata']['name'] for m in matches]}"
    return matches[0]


def container(objects: list[dict]) -> dict:
    return find(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env_of(objects: list[dict]) -> dict[str, str]:
    return {item["name"]: item.get("value") for item in container(objects)["env"]}


def settings_of(objects: list[dict]) -> Settings:
    """What the operator makes of the rendered environment (the config file aside)."""
    env = env_of(objects)
    return load_settings(
        {k: v for k, v in env.items() if v is not None and k.startswith(PREFIX) and k != f"{PREFIX}CONFIG"}
    )


def grants(rules: list[dict]) -> set[tuple[str, str, str, tuple[str, ...]]]:
    """(group, resource, verb, resourceNames) for every rule."""
    return {
        (group, resource, verb, tuple(rule.get("resourceNames") or ()))
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


GATEWAY_RESOURCES = {"httproutes", "gateways", "endpointslices", "middlewares"}


# ---------------------------------------------------------------- off by default


def test_gateway_is_off_by_default_and_renders_nothing(tmp_path):
    objects = render(tmp_path, {"networkPolicy": {"enabled": True, "namespaces": ["envs"]}})
    assert not [name for name in env_of(objects) if name.startswith("ANALYSIS_OPERATOR_GATEWAY_")]
    assert "forward-auth" not in {port["name"] for port in container(objects)["ports"]}
    assert not [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == FULLNAME]
    role = grants(find(objects, "ClusterRole", FULLNAME)["rules"])
    assert not {g for g in role if g[1] in GATEWAY_RESOURCES}
    assert ("", "services", "patch", ()) not in role
    operator = find(objects, "NetworkPolicy", FULLNAME)["spec"]["ingress"]
    assert 9100 not in {port["port"] for rule in operator for port in rule["ports"]}
    # The operator's own defaults apply (config.gateway would too): no gateway.
    assert settings_of(objects).gateway == GatewaySettings()


# ---------------------------------------------------------------- values -> settings


def test_enabled_values_reach_every_gateway_setting(tmp_path):
    values = _merge(
        ENABLED,
        {
            "gateway": {
                "name": "facility",
                "namespace": "edge",
                "sectionName": "https",
                "hostname": "analysis.facility.example.org",
                "pathPrefix": "/jupyter",
                "authPort": 9200,
                "oidc": {"usernameClaim": "email", "usernamePrefix": "oidc:"},
                "sessionCookie": "portal_session",
                "passCookies": ["_xsrf", "site_prefs"],
                "admins": ["oidc:carol", "oidc:dave"],
                "loginUrl": "https://portal.example.org/login",
            }
        },
    )
    objects = render(tmp_path, values)
    env = env_of(objects)
    assert env["ANALYSIS_OPERATOR_GATEWAY_ENABLED"] == "true"
    assert env["ANALYSIS_OPERATOR_GATEWAY_URL"] == "https://analysis.facility.example.org"
    assert env["ANALYSIS_OPERATOR_GATEWAY_ADMINS"] == "oidc:carol,oidc:dave"
    assert env["ANALYSIS_OPERATOR_GATEWAY_AUTH_URL"] == f"http://{FULLNAME}.{NAMESPACE}.svc:9200/authorize"
    assert settings_of(objects).gateway == GatewaySettings(
        enabled=True,
        name="facility",
        namespace="edge",
        section_name="https",
        url="https://analysis.facility.example.org",
        hostname="analysis.facility.example.org",
        path_prefix="/jupyter",
        auth_port=9200,
        auth_url=f"http://{FULLNAME}.{NAMESPACE}.svc:9200/authorize",
        oidc_issuer="https://sso.example.org/realms/facility",
        oidc_audience="analysis-portal",
        oidc_jwks_url="https://sso.example.org/realms/facility/protocol/openid-connect/certs",
        oidc_username_claim="email",
        oidc_username_prefix="oidc:",
        session_cookie="portal_session",
        pass_cookies=("_xsrf", "site_prefs"),
        admins=("oidc:carol", "oidc:dave"),
        login_url="https://portal.example.org/login",
    )
    # Every variable the chart sets is one the operator reads (no misspelt name silently ignored).
    known = {f"{PREFIX}GATEWAY_{field.name.upper()}" for field in dataclasses.fields(GatewaySettings)}
    assert {name for name in env if name.startswith(f"{PREFIX}GATEWAY_")} <= known


def test_chart_defaults_are_the_operators_defaults(tmp_path):
    """Only what the chart must know differs from GatewaySettings' defaults: the URL, the OIDC
    issuer, audience and keys, and where forward-auth is reached."""
    gateway = settings_of(render(tmp_path, ENABLED)).gateway
    differ = {
        field.name
        for field in dataclasses.fields(GatewaySettings)
        if getattr(gateway, field.name) != getattr(GatewaySettings(), field.name)
    }
    assert differ == {"enabled", "url", "auth_url", "oidc_issuer", "oidc_audience", "oidc_jwks_url"}


def test_environment_domain_reaches_the_operator_and_is_off_by_default(tmp_path):
    """gateway.environmentDomain: one browser origin per environment (README, OPEN); "" as the operator's
    default, so a chart that does not set it keeps every environment under the host of gateway.url."""
    assert env_of(render(tmp_path, ENABLED))["ANALYSIS_OPERATOR_GATEWAY_ENVIRONMENT_DOMAIN"] == ""
    assert settings_of(render(tmp_path, ENABLED)).gateway.environment_domain == ""
    objects = render(tmp_path, _merge(ENABLED, {"gateway": {"environmentDomain": "env.facility.example.org"}}))
    assert env_of(objects)["ANALYSIS_OPERATOR_GATEWAY_ENVIRONMENT_DOMAIN"] == "env.facility.example.org"
    assert settings_of(objects).gateway.environment_domain == "env.facility.example.org"


def test_pass_cookies_reach_the_operator_and_none_pass_by_default(tmp_path):
    """gateway.passCookies: the only browser cookies an environment's server gets (each reaches its owner's
    server, whoever opens it); none by default, as the operator's; a list passes those named."""
    objects = render(tmp_path, ENABLED)
    assert env_of(objects)["ANALYSIS_OPERATOR_GATEWAY_PASS_COOKIES"] == ""
    assert settings_of(objects).gateway.pass_cookies == ()
    objects = render(tmp_path, _merge(ENABLED, {"gateway": {"passCookies": ["_xsrf"]}}))
    assert env_of(objects)["ANALYSIS_OPERATOR_GATEWAY_PASS_COOKIES"] == "_xsrf"
    assert settings_of(objects).gateway.pass_cookies == ("_xsrf",)


def test_auth_url_default_is_the_charts_service_and_can_be_overridden(tmp_path):
    objects = render(tmp_path, ENABLED)
    service = find(objects, "Service", FULLNAME)
    (port,) = service["spec"]["ports"]
    assert port == {"name": "forward-auth", "port": 9100, "targetPort": "forward-auth", "protocol": "TCP"}
    assert service["metadata"]["namespace"] == NAMESPACE
    pod = find(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod.items()
    assert {"name": "forward-auth", "containerPort": 9100, "protocol": "TCP"} in container(objects)["ports"]
    # The default authUrl names exactly that Service, namespace and port.
    url = settings_of(objects).gateway.auth_url
    assert url == f"http://{service['metadata']['name']}.{NAMESPACE}.svc:{port['port']}/authorize"
    custom = render(
        tmp_path, _merge(ENABLED, {"gateway": {"authUrl": "http://auth.ops.svc.cluster.local:9100/authorize"}})
    )
    assert settings_of(custom).gateway.auth_url == "http://auth.ops.svc.cluster.local:9100/authorize"


def test_jwks_from_a_file_in_config_instead_of_a_url(tmp_path):
    values = _merge(
        ENABLED, {"gateway": {"oidc": {"jwksUrl": ""}}, "config": {"gateway": {"oidc_jwks_file": "/jwks/keys.json"}}}
    )
    objects = render(tmp_path, values)
    assert env_of(objects)["ANALYSIS_OPERATOR_GATEWAY_OIDC_JWKS_URL"] == ""
    assert "ANALYSIS_OPERATOR_GATEWAY_OIDC_JWKS_FILE" not in env_of(objects)  # config.gateway's file applies


# ---------------------------------------------------------------- RBAC against the code


class RecordingKube:
    """What GatewayRoutes asks of the API server, as (verb, group, plural); every object exists and is ours."""

    def __init__(self, uid: str) -> None:
        self.uid, self.calls = uid, set()

    def _record(self, verbs: tuple[str, ...], api_version: str, kind: str) -> None:
        path = object_path(api_version, kind, "ns", "name").split("/")
        group = "" if path[1] == "api" else path[2]
        self.calls |= {(verb, group, path[-2]) for verb in verbs}

    async def apply(self, body: dict[str, Any]) -> dict[str, Any]:
        self._record(("create", "patch"), body["apiVersion"], body["kind"])  # SSA that may make the object
        return body

    async def get_object(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        self._record(("get",), api_version, kind)
        return {"metadata": {"uid": "x", "labels": {LABEL_ENVIRONMENT_UID: self.uid}}, "spec": {}}

    async def delete_object(self, api_version: str, kind: str, namespace: str, name: str, uid: str = "") -> bool:
        self._record(("delete",), api_version, kind)
        return True

    async def present(self, api_version: str, kind: str, selector: str, fields: str = "") -> set[tuple[str, str]]:
        self._record(("list",), api_version, kind)
        return set()  # someone deleted everything: the repair applies what it set up again

    # the verdicts' watch (GatewayRoutes.start, infra/watch.py): a list, then a watch that waits
    _KINDS = {"HTTPRoute": "gateway.networking.k8s.io/v1"}

    async def labelled(self, kind: str, selector: str) -> AsyncIterator[tuple[list[dict[str, Any]], str]]:
        self._record(("list",), self._KINDS[kind], kind)
        yield [], "1"

    async def watch(self, kind: str, selector: str, resource_version: str) -> AsyncIterator[dict[str, Any]]:
        self._record(("watch",), self._KINDS[kind], kind)
        await asyncio.Event().wait()
        yield {}

    async def close(self) -> None:
        return None


def _routes_calls(settings: GatewaySettings) -> set[tuple[str, str, str]]:
    environment = Environment(namespace="team-a", name="lab", uid="u-1", owner="alice", flavor="jl")
    kube = RecordingKube(environment.uid)
    routes = GatewayRoutes(kube, settings)  # type: ignore[arg-type]

    async def lifecycle() -> None:
        await routes.start("", kube)  # type: ignore[arg-type]
        routes.follow()
        await asyncio.sleep(0)  # the watch's task starts (and waits in its watch)
        await routes.open(environment, Upstream(port=8888, service=environment.child_name, landing="lab"))
        await routes.close(environment)
        await routes.open(environment, Upstream(port=20001, address="10.1.2.3", landing="lab"))  # a node
        await routes.repair({environment.uid})
        await routes.close(environment)
        await routes.shutdown()

    asyncio.run(lifecycle())
    return kube.calls


@pytest.mark.parametrize("watch_namespace", ["", "team-a"])
def test_rbac_grants_what_the_routes_call_and_nothing_broader(tmp_path, watch_namespace):
    objects = render(tmp_path, _merge(ENABLED, {"watchNamespace": watch_namespace, "gateway": {"name": "facility"}}))
    cluster = grants(find(objects, "ClusterRole", FULLNAME)["rules"])
    served = grants(find(objects, "Role", FULLNAME)["rules"]) if watch_namespace else cluster
    calls = _routes_calls(settings_of(objects).gateway)
    assert {group for _, group, _ in calls} >= {"gateway.networking.k8s.io", "discovery.k8s.io", "traefik.io", ""}
    for verb, group, plural in calls:
        if plural == "gateways":  # in gateway.namespace, outside the served ones: only that Gateway, only read
            assert (group, plural, verb, ("facility",)) in cluster, (verb, group, plural)
        else:
            assert (group, plural, verb, ()) in served, f"the operator may not {verb} {plural}.{group}"
    gateway = {g for g in cluster | served if g[1] in GATEWAY_RESOURCES}
    assert {(g[0], g[1], g[2]) for g in gateway} == {
        (group, plural, verb) for verb, group, plural in calls if plural in GATEWAY_RESOURCES
    }
    # Server-side apply: patch (and create, when the apply makes the object), never update. Listed:
    # only the kinds the operator applies per namespace and per environment, for its repair (Services
    # by the Kubernetes backend's rule, which lists them for its orphan sweep).
    assert not {g for g in gateway if g[2] in {"update", "*", "deletecollection"}}
    listed = {(g[1], g[2]) for g in gateway if g[2] == "list"}
    assert listed == {("httproutes", "list"), ("middlewares", "list"), ("endpointslices", "list")}
    # Watched: only the HTTPRoutes, for the gateway's verdict on each (status.parents)
    assert {(g[1], g[2]) for g in gateway if g[2] == "watch"} == {("httproutes", "watch")}
    assert ("list", "", "services") in calls and ("", "services", "list", ()) in served
    assert ("", "services", "patch", ()) in served and ("", "services", "update", ()) not in served
    if watch_namespace:  # the served namespace's rules stay in the Role
        assert not {g for g in cluster if g[1] in GATEWAY_RESOURCES - {"gateways"}}
    # the offer API checks the portal's token with the API server (TokenReview), and that is all
    assert ("authentication.k8s.io", "tokenreviews", "create", ()) in cluster
    assert not {g for g in cluster | served if g[0] == "authentication.k8s.io" and g[2] != "create"}


# ---------------------------------------------------------------- NetworkPolicies


# The operator's own pods reach the environments' JupyterLab too: its idle reads, and closing an
# unshared viewer's websockets (engine/viewers.py) go straight to the pod's Service.
OPERATOR_PEER = {
    "ports": [{"port": 8888, "protocol": "TCP"}],
    "from": [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}},
            "podSelector": {
                "matchLabels": {"app.kubernetes.io/name": "analysis-operator", "app.kubernetes.io/instance": RELEASE}
            },
        }
    ],
}


def _policies(tmp_path: pathlib.Path, gateway: dict, ingress_from: list | None = None) -> tuple[list, list]:
    values = _merge(ENABLED, {"gateway": gateway, "networkPolicy": {"enabled": True, "namespaces": ["envs"]}})
    if ingress_from is not None:
        values["networkPolicy"]["ingressFrom"] = ingress_from
    objects = render(tmp_path, values)
    for policy in (o for o in objects if o["kind"] == "NetworkPolicy"):
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("from", None) != [], f"{policy['metadata']['name']}: `from: []` lets every source in"
    operator = find(objects, "NetworkPolicy", FULLNAME)["spec"]["ingress"]
    environments = find(objects, "NetworkPolicy", f"{FULLNAME}-environments")["spec"]["ingress"]
    return operator, environments


def test_network_policy_lets_only_the_gateways_pods_reach_forward_auth_and_the_environments(tmp_path):
    operator, environments = _policies(tmp_path, {"namespace": "edge"})
    gateway = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "edge"}}}]
    assert {"ports": [{"port": 9100, "protocol": "TCP"}], "from": gateway} in operator
    assert [rule for rule in operator if {"port": 9100, "protocol": "TCP"} in rule["ports"]] == [
        {"ports": [{"port": 9100, "protocol": "TCP"}], "from": gateway}
    ]
    assert environments == [{"ports": [{"port": 8888, "protocol": "TCP"}], "from": gateway}, OPERATOR_PEER]
    # Listed peers replace the default; the ingress controller's stay beside them.
    peers = [
        {"namespaceSelector": {"matchLabels": {"team": "edge"}}, "podSelector": {"matchLabels": {"app": "traefik"}}}
    ]
    ingress = [{"ipBlock": {"cidr": "10.8.0.0/16"}}]
    operator, environments = _policies(tmp_path, {"networkPolicyFrom": peers}, ingress)
    assert {"ports": [{"port": 9100, "protocol": "TCP"}], "from": peers} in operator
    assert environments == [{"ports": [{"port": 8888, "protocol": "TCP"}], "from": ingress + peers}, OPERATOR_PEER]


# ---------------------------------------------------------------- refused values


def test_lint_with_the_gateway_on(tmp_path):
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(_merge(ENABLED, {"networkPolicy": {"enabled": True, "namespaces": ["envs"]}})))
    assert "0 chart(s) failed" in helm("lint", "--strict", str(CHART), "--values", str(path)).stdout


@pytest.mark.parametrize(
    "values, arguments, complaint",
    [
        ({"gateway": {"url": ""}}, (), "at '/gateway/url'"),  # enabled without a URL: the schema
        ({"gateway": {"url": ""}}, ("--skip-schema-validation",), "gateway.url is required when gateway.enabled"),
        ({"gateway": {"oidc": {"issuer": ""}}}, (), "at '/gateway/oidc/issuer'"),
        ({"gateway": {"oidc": {"audience": ""}}}, (), "at '/gateway/oidc/audience'"),
        (
            {"gateway": {"oidc": {"audience": ""}}},
            ("--skip-schema-validation",),
            "gateway.oidc.audience is required when gateway.enabled",
        ),
        ({"gateway": {"oidc": {"jwksUrl": ""}}}, (), "gateway.oidc.jwksUrl is required when gateway.enabled"),
        ({"gateway": {"authPort": 9443}}, (), "gateway.authPort 9443 is already taken"),
        ({"gateway": {"hostname": "other.example.org"}}, (), "does not match the host of gateway.url"),
        ({"gateway": {"url": "https://analysis.facility.example.org/x"}}, (), "at '/gateway/url'"),  # pathPrefix
        ({"gateway": {"pathPrefix": "env"}}, (), "at '/gateway/pathPrefix'"),
        ({"gateway": {"environmentDomain": "https://env.example.org"}}, (), "at '/gateway/environmentDomain'"),
        ({"gateway": {"environmentDomain": "*.env.example.org"}}, (), "at '/gateway/environmentDomain'"),
        ({"gateway": {"environmentDomain": "Env.example.org"}}, (), "at '/gateway/environmentDomain'"),
        ({"gateway": {"loginUrl": "https://sso.example.org/login?x=1"}}, (), "at '/gateway/loginUrl'"),
        ({"gateway": {"admins": ["a,b"]}}, (), "at '/gateway/admins/0'"),  # joined with commas
        ({"gateway": {"sessionCookie": "a session"}}, (), "at '/gateway/sessionCookie'"),
        ({"gateway": {"passCookies": ["_xsrf,other"]}}, (), "at '/gateway/passCookies/0'"),  # joined with commas
        ({"gateway": {"authPort": 80}}, (), "at '/gateway/authPort'"),  # non-root: no port below 1024
        ({"gateway": {"networkPolicyFrom": [{}]}}, (), "at '/gateway/networkPolicyFrom/0'"),
        ({"gateway": {"networkPolicyFrom": [{"namespace": "edge"}]}}, (), "additional properties 'namespace'"),
        ({"gateway": {"oidcIssuer": "https://sso"}}, (), "additional properties 'oidcIssuer'"),
    ],
)
def test_values_the_operator_cannot_run_with_are_refused(tmp_path, values, arguments, complaint):
    stderr = refusal(tmp_path, _merge(ENABLED, values), *arguments)
    assert complaint in stderr, stderr


def test_wildcard_hostname_covering_the_url_is_accepted(tmp_path):
    objects = render(tmp_path, _merge(ENABLED, {"gateway": {"hostname": "*.example.org"}}))
    assert settings_of(objects).gateway.hostname == "*.example.org"
