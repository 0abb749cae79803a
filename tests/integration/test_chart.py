"""The Helm chart against the real API server: lint, render with default and
non-default values, every object accepted by the server, a real install, upgrade,
certificate rotation and uninstall; and its RBAC, by running the operator with
the chart ServiceAccount's token through an environment's whole life (and
failing when one rule is taken away)."""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime
import http.client
import json
import pathlib
import socket
import ssl
import threading
import time
import uuid

import kubernetes
import pytest
import yaml

from analysis_operator.infra.certificates import renew
from tests.integration.authorization import PLURAL, denial, operator_identity
from tests.integration.chart import CHART, find, helm, render, service_account_kubeconfig
from tests.integration.conftest import (
    CLUSTER_STATE,
    GROUP,
    REPO,
    VERSION,
    Environments,
    OperatorProcess,
    impersonating,
    kubectl,
)
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

# Stand-ins for CRDs of cert-manager and the Prometheus Operator, which this stack does
# not run: enough for the API server to accept (and so check the envelope of) the
# chart's Certificate, Issuer and ServiceMonitor; their specs are not validated.
STAND_IN_CRDS = [
    ("cert-manager.io", "Certificate", "certificates"),
    ("cert-manager.io", "Issuer", "issuers"),
    ("monitoring.coreos.com", "ServiceMonitor", "servicemonitors"),
]


def _documents(path: pathlib.Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def _apply(objects: list[dict], path: pathlib.Path, *arguments: str) -> str:
    path.write_text(yaml.safe_dump_all(objects))
    return kubectl("apply", "-f", str(path), *arguments).stdout


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(autouse=True)
def _stack(kubeconfig):
    """Every test here needs the local stack: helm comes from its bin directory, KUBECONFIG from it."""


@pytest.fixture
def fresh_namespace(kubeconfig):
    names: list[str] = []

    def make(prefix: str = "aop") -> str:
        name = _unique(prefix)
        kubectl("create", "namespace", name)
        names.append(name)
        return name

    yield make
    for name in names:
        kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")


@pytest.fixture(scope="module")
def stand_in_crds(kubeconfig, tmp_path_factory):
    crds = [
        {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.{group}"},
            "spec": {
                "group": group,
                "scope": "Namespaced",
                "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
                "versions": [
                    {
                        "name": "v1",
                        "served": True,
                        "storage": True,
                        "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
                    }
                ],
            },
        }
        for group, kind, plural in STAND_IN_CRDS
    ]
    path = tmp_path_factory.mktemp("stand-in") / "crds.yaml"
    _apply(crds, path)
    kubectl("wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{c['metadata']['name']}" for c in crds))
    yield
    kubectl("delete", "-f", str(path), "--ignore-not-found")


def custom_values(watch_namespace: str, environment_namespace: str) -> dict:
    """Every optional part switched on, so the test renders (and the server checks) all of it."""
    flavor = _documents(REPO / "examples/flavors.yaml")[0]["spec"]
    values = {
        "replicaCount": 3,
        "watchNamespace": watch_namespace,
        "image": {"repository": "registry.example.org/analysis-operator", "digest": "sha256:" + "ab" * 32},
        "peering": {"name": _unique("chart-custom"), "lifetimeSeconds": 15},
        "certManager": {"enabled": True, "duration": "720h", "renewBefore": "240h"},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "networkPolicy": {
            "enabled": True,
            "namespaces": [environment_namespace],
            "allowAllEgress": False,
            "ingressFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}],
            "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}],
        },
        "admission": {
            "failurePolicy": {"environment-owner": "Ignore"},
            "trustedGroups": ["portal-a", "portal-b"],
        },
        "config": {"sweep_interval_seconds": 30},
        "flavors": {_unique("chart-flavor"): flavor},
        "facilityGroups": {_unique("chart-group"): {"description": "chart test", "members": ["alice"]}},
        "podDisruptionBudget": {"minAvailable": 2},
        "gateway": {
            "enabled": True,
            "url": "https://analysis.example.org",
            "oidc": {
                "issuer": "https://sso.example.org/realms/facility",
                "audience": "analysis-portal",
                "jwksUrl": "https://sso.example.org/realms/facility/protocol/openid-connect/certs",
            },
            "admins": ["carol"],
        },
    }
    if (REPO / "crds/datasets.yaml").exists() and (REPO / "examples/datasets.yaml").exists():
        dataset = next(d for d in _documents(REPO / "examples/datasets.yaml") if d["kind"] == "Dataset")
        values["datasets"] = {_unique("chart-dataset"): dataset["spec"]}
    return values


def test_lint_default_and_custom_values(tmp_path):
    assert "0 chart(s) failed" in helm("lint", "--strict", str(CHART)).stdout
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(custom_values("watched", "environments")))
    assert "0 chart(s) failed" in helm("lint", "--strict", str(CHART), "--values", str(values)).stdout


@pytest.mark.parametrize(
    "setting, complaint",
    [
        ("replicaCount=two", "replicaCount"),
        ("peering.lifetimeSeconds=1", "lifetimeSeconds"),
        ("admission.failurePolicy.environment-owner=Sometimes", "failurePolicy"),
        ("flavours.x=1", "additional properties 'flavours'"),  # a typo in GitOps values is refused
        ("authorization.adminGroup[0]=x", "additional properties 'adminGroup'"),
        ("authorization.operatorUsernames[0]=a\\,b", "operatorUsernames"),  # lists are joined with commas
        ("gateway.enabled=true", "/gateway/url"),  # OPEN without the gateway's public URL
        ("authorization.mutatingPolicy=sometimes", "/authorization/mutatingPolicy"),  # true, false or auto
        ("serviceAccount.create=false", "/serviceAccount/name"),  # not the namespace's `default`
        ("admission.namespaceSelector.matchLabels.a=b", "admission.namespaceSelector is no longer supported"),
    ],
)
def test_schema_refuses_bad_values(setting, complaint):
    result = helm("template", "x", str(CHART), "--set", setting, check=False)
    assert result.returncode != 0 and complaint in result.stderr, result.stderr


def _chart_crds(chart: str) -> list[dict]:
    output = helm("template", "x", chart, "--include-crds").stdout
    return sorted(
        (d for d in yaml.safe_load_all(output) if d and d["kind"] == "CustomResourceDefinition"),
        key=lambda crd: crd["metadata"]["name"],
    )


def test_chart_crds_are_the_repository_crds(tmp_path):
    """One source of truth: the chart's crds/ is a link to the repository's, and helm
    packages what it points to (no copy that could drift)."""
    assert (CHART / "crds").is_symlink() and (CHART / "crds").resolve() == (REPO / "crds").resolve()
    repository = sorted(
        (d for path in sorted((REPO / "crds").glob("*.yaml")) for d in _documents(path)),
        key=lambda crd: crd["metadata"]["name"],
    )
    # `helm template --include-crds` shows what install applies, file by file
    # (`helm show crds` joins the files without separators).
    assert _chart_crds(str(CHART)) == repository
    helm("package", str(CHART), "--destination", str(tmp_path))
    assert _chart_crds(str(next(tmp_path.glob("analysis-operator-*.tgz")))) == repository
    names = {crd["metadata"]["name"] for crd in repository}
    assert {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev", "analysisenvironments.analysis.panosc.eu"} <= names


def _template(chart: str, namespace: str, *arguments: str) -> list[dict]:
    output = helm("template", "aop", chart, "--namespace", namespace, *arguments).stdout
    return [document for document in yaml.safe_load_all(output) if document]


def test_authorization_policy_is_the_repository_policy(tmp_path):
    """One text: the chart renders deploy/authorization/policy.yaml (files/authorization-policy.yaml
    links to it; helm packages what it points to) under the release's name, with a binding to it and
    its parameters from values."""
    repository = _documents(REPO / "deploy/authorization/policy.yaml")[0]
    helm("package", str(CHART), "--destination", str(tmp_path))
    for chart in (str(CHART), str(next(tmp_path.glob("analysis-operator-*.tgz")))):
        objects = _template(
            chart, "ops", "--set", "admission.trustedUsers={portal-backend}", "--set", "admission.usernamePrefix=oidc:"
        )
        policy = find(objects, "ValidatingAdmissionPolicy", "aop-analysis-operator-environments")
        assert policy["spec"] == repository["spec"]
        assert policy["metadata"]["name"] == "aop-analysis-operator-environments"
        assert policy["metadata"]["labels"]["app.kubernetes.io/instance"] == "aop"
        binding = find(objects, "ValidatingAdmissionPolicyBinding", "aop-analysis-operator-environments")["spec"]
        assert binding["policyName"] == "aop-analysis-operator-environments"
        assert binding["validationActions"] == ["Deny"]
        assert binding["paramRef"] == {
            "name": "aop-analysis-operator-authorization",
            "parameterNotFoundAction": "Deny",
        }
        assert "matchResources" not in binding  # every namespace
        assert find(objects, "AuthorizationParameters", "aop-analysis-operator-authorization")["data"] == {
            "trustedUsers": "portal-backend",
            "trustedGroups": "analysis-portal",
            "adminGroups": "analysis-admins",
            "operatorUsernames": "system:serviceaccount:ops:aop-analysis-operator",
            "usernamePrefix": "oidc:",
        }
    objects = _template(
        str(CHART),
        "ops",
        "--set",
        "authorization.operatorUsernames={op-a,op-b}",
        "--set",
        "authorization.adminGroups={ops,platform}",
    )
    data = find(objects, "AuthorizationParameters", "aop-analysis-operator-authorization")["data"]
    assert (data["operatorUsernames"], data["adminGroups"]) == ("op-a,op-b", "ops,platform")
    disabled = _template(str(CHART), "ops", "--set", "authorization.enabled=false")
    assert not [o for o in disabled if o["kind"].startswith("ValidatingAdmissionPolicy")]


def test_the_charts_policy_binds(fresh_namespace, environments, namespace, kubeconfig, tmp_path):
    """Installed from the chart, the policy and its binding act: with the chart trusting another
    portal group, the local stack's portal (trusted by the local binding) is refused in the
    release's watchNamespace by the chart's binding, and allowed again once it is removed."""
    release_namespace, release = fresh_namespace("aop-authz"), _unique("aop")
    objects = render(
        release,
        release_namespace,
        "--show-only",
        "templates/authorization.yaml",
        "--set",
        f"watchNamespace={namespace}",
        "--set",
        "admission.trustedGroups={other-portal}",
    )
    environments.create("lab", flavor="jupyter-basic", owner="alice")
    portal = impersonating(kubeconfig, "system:serviceaccount:portal:backend", "analysis-portal")
    alice = impersonating(kubeconfig, "alice")

    def suspend(client):
        api = kubernetes.client.CustomObjectsApi(client)
        return lambda: api.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "lab", {"spec": {"suspend": True}}, dry_run="All"
        )

    assert denial(suspend(portal)) is None
    manifest = tmp_path / "authorization.yaml"
    _apply(objects, manifest)
    try:
        message = wait_for(lambda: denial(suspend(portal)), timeout=30, what="the chart's binding to refuse the portal")
        assert f"'{release}-analysis-operator-environments'" in message, message
        assert "only its owner 'alice', the portal acting for that owner, and admins may change" in message
        assert denial(suspend(alice)) is None  # its parameters are found: the owner may
    finally:
        kubectl("delete", "-f", str(manifest), "--ignore-not-found")
    wait_for(lambda: denial(suspend(portal)) is None, timeout=30, what="the portal allowed without the chart's binding")


def test_default_values_render_and_are_accepted_by_the_api_server(fresh_namespace, tmp_path):
    namespace = fresh_namespace("aop-default")
    objects = render("aop", namespace, "--set", f"peering.name={_unique('chart-default')}")
    deployment = find(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["ANALYSIS_OPERATOR_STANDALONE"] == "false" and env["ANALYSIS_OPERATOR_ADMISSION_HOST"] == ""
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # No key material: the operator makes the certificate and sets the caBundle at run time.
    assert not [o for o in objects if o["kind"] == "Secret"]
    for kind in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"):
        for hook in find(objects, kind)["webhooks"]:
            assert "caBundle" not in hook["clientConfig"]
            assert hook["clientConfig"]["service"]["path"] == "/" + hook["name"].split(".")[0]
    identity = next(
        h
        for h in find(objects, "ValidatingWebhookConfiguration")["webhooks"]
        if h["name"].startswith("environment-admission.")
    )
    assert identity["failurePolicy"] == "Fail"
    find(objects, "PodDisruptionBudget")
    find(objects, "ClusterKopfPeering")
    assert not [o for o in objects if o["kind"] in ("NetworkPolicy", "ServiceMonitor", "Certificate")]
    # Two Roles, in the release's namespace: the operator-made certificate's Secret, and patching its
    # own pod's label (analysis.panosc.eu/replica, which the offer Service selects).
    roles = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Role"}
    assert set(roles) == {"aop-analysis-operator-webhook-tls", "aop-analysis-operator-replica"}
    assert all(role["metadata"]["namespace"] == namespace for role in roles.values())
    assert roles["aop-analysis-operator-replica"]["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]}
    ]
    assert not [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"].endswith("-offer")]  # no gateway
    output = _apply(objects, tmp_path / "default.yaml", "--dry-run=server")
    assert output.count("(server dry run)") == len(objects)


def test_custom_values_render_and_are_accepted_by_the_api_server(fresh_namespace, stand_in_crds, tmp_path):
    namespace, watched, environments = (
        fresh_namespace("aop-custom"),
        fresh_namespace("aop-watch"),
        fresh_namespace("aop-envs"),
    )
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(custom_values(watched, environments)))
    objects = render("aop", namespace, "--values", str(values))
    deployment = find(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"].endswith("@sha256:" + "ab" * 32)
    role = find(objects, "Role", "aop-analysis-operator")
    assert role["metadata"]["namespace"] == watched
    assert "pods" in {r for rule in role["rules"] for r in rule["resources"]}
    cluster_role = find(objects, "ClusterRole", "aop-analysis-operator")
    assert "pods" not in {r for rule in cluster_role["rules"] for r in rule["resources"]}
    assert find(objects, "KopfPeering")["metadata"]["namespace"] == watched
    assert not [o for o in objects if o["kind"] in ("ClusterKopfPeering", "Secret")]  # cert-manager makes it
    assert len([o for o in objects if o["kind"] in ("Issuer", "Certificate")]) == 4
    for kind in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"):
        configuration = find(objects, kind)
        assert (
            configuration["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
            == f"{namespace}/aop-analysis-operator-webhook"
        )
        assert all("caBundle" not in hook["clientConfig"] for hook in configuration["webhooks"])
    # The webhooks and the policies judge the watched namespace, where this release's operator acts, only.
    watched_only = {"matchLabels": {"kubernetes.io/metadata.name": watched}}
    owner = find(objects, "MutatingWebhookConfiguration")["webhooks"][0]
    assert owner["failurePolicy"] == "Ignore" and owner["namespaceSelector"] == watched_only
    hooks = [hook for kind in WEBHOOK_KINDS for hook in find(objects, kind)["webhooks"]]
    assert len(hooks) == 6 and all(hook["namespaceSelector"] == watched_only for hook in hooks)
    policy = next(o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["namespace"] == environments)
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/managed-by": "analysis-operator"}
    bindings = [
        o
        for o in objects
        if o["kind"] == "ValidatingAdmissionPolicyBinding"
        and o["metadata"]["name"].removeprefix("aop-analysis-operator-")
        in ("environments", "environment-creation", "budgetrequest-identity")  # authorization, identity
    ]
    assert len(bindings) == 3
    assert all(binding["spec"]["matchResources"]["namespaceSelector"] == watched_only for binding in bindings)
    # OPEN: forward-auth served to the gateway's namespace only; routes in the watched namespace.
    assert find(objects, "Service", "aop-analysis-operator")["spec"]["ports"][0]["name"] == "forward-auth"
    # The offer API on the same port, from the active replica only (it labels its pod; test_peering.py).
    offer = find(objects, "Service", "aop-analysis-operator-offer")["spec"]
    assert offer["selector"]["analysis.panosc.eu/replica"] == "active" and offer["ports"][0]["port"] == 9100
    assert find(objects, "Role", "aop-analysis-operator-replica")["metadata"]["namespace"] == namespace
    forward_auth = [
        rule
        for rule in find(objects, "NetworkPolicy", "aop-analysis-operator")["spec"]["ingress"]
        if {"port": 9100, "protocol": "TCP"} in rule["ports"]
    ]
    assert forward_auth and all(rule.get("from") for rule in forward_auth)
    assert {"httproutes", "endpointslices", "middlewares"} <= {r for rule in role["rules"] for r in rule["resources"]}
    assert "gateways" in {r for rule in cluster_role["rules"] for r in rule["resources"]}
    find(objects, "ServiceMonitor")
    find(objects, "EnvironmentFlavor")
    find(objects, "FacilityGroup")
    output = _apply(objects, tmp_path / "custom.yaml", "--dry-run=server")
    assert output.count("(server dry run)") == len(objects)


WEBHOOK_KINDS = ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration")


def _dry_run_create(custom, namespace: str) -> str | None:
    """Why a server-side dry run of an environment's create in `namespace` fails (None: it would be made)."""
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AnalysisEnvironment",
        "metadata": {"name": "lab"},
        "spec": {"owner": "alice", "flavor": "jupyter-basic"},
    }
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body, dry_run="All")
    except kubernetes.client.ApiException as error:
        return json.loads(error.body)["message"]
    return None


def test_the_charts_webhooks_judge_only_the_watched_namespace(
    fresh_namespace, environments, custom, namespace, tmp_path
):
    """Releases sharding namespaces (watchNamespace) do not judge each other's: a release whose
    operator is down (failurePolicy Fail) refuses creates in its own namespace, nowhere else."""
    release_namespace, watched, release = fresh_namespace("aop-hooks"), fresh_namespace("aop-shard"), _unique("aop")
    objects = render(
        release, release_namespace, "--show-only", "templates/webhook.yaml", "--set", f"watchNamespace={watched}"
    )
    service = f"{release}-analysis-operator-webhook"  # no operator behind it: every call fails
    assert _dry_run_create(custom, namespace) is None
    manifest = tmp_path / "webhooks.yaml"
    _apply(objects, manifest)
    try:
        refused = str(
            wait_for(
                lambda: _dry_run_create(custom, watched),
                timeout=30,
                what="the release's webhooks to judge its namespace",
            )
        )
        assert service in refused and "failed calling webhook" in refused, refused
        assert _dry_run_create(custom, namespace) is None  # another release's namespace: not called
    finally:
        kubectl("delete", "-f", str(manifest), "--ignore-not-found")


def test_the_charts_user_role_runs_environments_and_edit_does_not(namespace, fresh_namespace, tmp_path):
    """People run environments through the chart's <fullname>-user role, bound per namespace; the
    built-in edit role (which also gives the namespace's pods, Secrets and exec) gets only read access
    from the chart (through view), so the namespace's editors are not the environments' users."""
    release = _unique("aop")
    # The chart's ClusterRoles (its operator's own bound to no one here), and people bound as a facility would.
    roles = [
        role for role in render(release, "ops", "--show-only", "templates/rbac.yaml") if role["kind"] == "ClusterRole"
    ]
    user_role = f"{release}-analysis-operator-user"
    bindings = [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": f"{person}-{release}", "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": person}],
        }
        for person, role in (("dora", user_role), ("erin", "edit"))
    ]
    elsewhere = fresh_namespace("aop-elsewhere")

    def can(person: str, verb: str, resource: str, where: str = namespace) -> bool:
        answer = kubectl("auth", "can-i", verb, resource, "-n", where, f"--as={person}", check=False)
        return answer.stdout.strip() == "yes"

    environments, requests = f"analysisenvironments.{GROUP}", f"budgetrequests.{GROUP}"
    manifest = tmp_path / "people.yaml"
    _apply([*roles, *bindings], manifest)
    try:
        # The chart's view role reached edit (through the built-in view): the aggregation has run.
        wait_for(lambda: can("erin", "list", environments), timeout=30, what="the chart's view role aggregated")
        assert not can("erin", "create", environments) and not can("erin", "delete", environments)
        assert not can("erin", "create", requests) and not can("erin", "delete", requests)
        assert user_role in {role["metadata"]["name"] for role in roles}
        for verb in ("create", "patch", "delete"):  # patch: suspend, sharing
            assert can("dora", verb, environments), verb
        assert can("dora", "create", requests)
        assert not can("dora", "delete", requests) and not can("dora", "update", requests)
        assert not can("dora", "create", "pods") and not can("dora", "get", "secrets")
        assert not can("dora", "create", environments, elsewhere)  # bound in one namespace only
    finally:
        kubectl("delete", "-f", str(manifest), "--ignore-not-found")


def _tls(namespace: str, release: str) -> dict | None:
    """The operator-made certificate's Secret data, or None while there is none."""
    result = kubectl(
        "get", "secret", f"{release}-analysis-operator-webhook-tls", "-n", namespace, "-o", "yaml", check=False
    )
    return yaml.safe_load(result.stdout)["data"] if result.returncode == 0 else None


def _ca_bundles(release: str) -> set[str | None]:
    bundles = set()
    for kind in ("validatingwebhookconfiguration", "mutatingwebhookconfiguration"):
        configuration = yaml.safe_load(kubectl("get", kind, f"{release}-analysis-operator", "-o", "yaml").stdout)
        bundles |= {hook["clientConfig"].get("caBundle") for hook in configuration["webhooks"]}
    return bundles


class _ServiceConnection(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1, with the server's certificate checked for the Service's DNS name (as
    the API server checks it when it calls the Service)."""

    def __init__(self, port: int, hostname: str, context: ssl.SSLContext) -> None:
        super().__init__("127.0.0.1", port, timeout=10, context=context)
        self.hostname, self.tls = hostname, context

    def connect(self) -> None:
        connection = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self.tls.wrap_socket(connection, server_hostname=self.hostname)


def _served_certificate(port: int, ca_bundle: str, hostname: str, client_ca_file: str = "") -> bytes:
    """POST a review to the webhook port, TLS verified against the caBundle and the Service's
    name; the served certificate (DER) back. With the operator's client CA set, as the API server
    (its client certificate, hack/cluster.sh)."""
    context = ssl.create_default_context(cadata=base64.b64decode(ca_bundle).decode())
    if client_ca_file:
        pki = pathlib.Path(client_ca_file).parent
        context.load_cert_chain(pki / "webhook-client.crt", pki / "webhook-client.key")
    connection = _ServiceConnection(port, hostname, context)
    try:
        uid = str(uuid.uuid4())
        environment = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "AnalysisEnvironment",
            "metadata": {"name": "probe", "namespace": "probe"},
            "spec": {"owner": "alice", "flavor": "no-such-flavor"},
        }
        review = {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": uid,
                "kind": {"group": GROUP, "version": VERSION, "kind": "AnalysisEnvironment"},
                "resource": {"group": GROUP, "version": VERSION, "resource": "analysisenvironments"},
                "namespace": "probe",
                "name": "probe",
                "operation": "CREATE",
                "userInfo": {"username": "alice", "groups": ["system:authenticated"]},
                "object": environment,
                "dryRun": True,
            },
        }
        connection.request(
            "POST", "/environment-admission", body=json.dumps(review), headers={"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        answer = json.loads(response.read())
        assert response.status == 200 and answer["response"]["uid"] == uid, answer  # the operator decided
        return connection.sock.getpeercert(binary_form=True)
    finally:
        connection.close()


def _holds(condition, seconds: float, what: str) -> None:
    """condition stays true for this long (checked all along)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert condition(), what
        time.sleep(0.2)


def _chart_env(namespace: str, release: str, *arguments: str) -> dict[str, str]:
    """The operator's ANALYSIS_OPERATOR_ADMISSION_* settings as the chart renders them."""
    deployment = find(render(release, namespace, "--set", f"peering.name={release}", *arguments), "Deployment")
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    return {
        item["name"]: item["value"]
        for item in env
        if item["name"].startswith("ANALYSIS_OPERATOR_ADMISSION_")
        and item["name"] != "ANALYSIS_OPERATOR_ADMISSION_PORT"
    }


def test_install_upgrade_rotate_uninstall(fresh_namespace, other_operators_stopped, tmp_path):
    """The README's deploy section, for real (KWOK runs the pods: no containers start, so the
    operator runs here as a process, as the chart's ServiceAccount, with the chart's settings).
    The chart renders no key material; the operator makes the certificate, sets the caBundle,
    serves with it; upgrades keep it; a deleted Secret is made again; uninstall removes it."""
    namespace, release = fresh_namespace("aop-install"), _unique("aop")
    installed = False
    operators: list[OperatorProcess] = []
    try:
        helm(
            "install",
            release,
            str(CHART),
            "-n",
            namespace,
            "--set",
            f"peering.name={release}",
            "--wait",
            "--timeout",
            "120s",
        )
        installed = True
        deployment = yaml.safe_load(
            kubectl("get", "deployment", f"{release}-analysis-operator", "-n", namespace, "-o", "yaml").stdout
        )
        assert deployment["status"].get("readyReplicas") == 2
        kubectl("get", "clusterkopfpeering", release)
        # What Argo CD renders is what was installed, every time: no key, no random value. Argo CD
        # passes the cluster's API versions (the mutating policy is rendered where it is served).
        manifest = helm("get", "manifest", release, "-n", namespace).stdout
        served = ("--api-versions", "admissionregistration.k8s.io/v1/MutatingAdmissionPolicy")
        rendered = [
            helm("template", release, str(CHART), "-n", namespace, "--set", f"peering.name={release}", *served).stdout
            for _ in range(2)
        ]
        assert rendered[0] == rendered[1]
        assert [d for d in yaml.safe_load_all(manifest) if d] == [d for d in yaml.safe_load_all(rendered[0]) if d]
        assert "kind: Secret" not in manifest and _tls(namespace, release) is None
        assert _ca_bundles(release) == {None}

        # Two replicas start at once, as the chart's ServiceAccount: one Secret, both serve it.
        config = service_account_kubeconfig(tmp_path / "sa.kubeconfig", namespace, f"{release}-analysis-operator")
        settings = {
            **_chart_env(namespace, release),
            "ANALYSIS_OPERATOR_ADMISSION_CERT_DIR": "",  # each its own, below
            "ANALYSIS_OPERATOR_ADMISSION_TLS_CHECK_INTERVAL_SECONDS": "2",
            "ANALYSIS_OPERATOR_STANDALONE": "false",  # one active, one standby: both serve webhooks
            "ANALYSIS_OPERATOR_PEERING_NAME": release,
            "ANALYSIS_OPERATOR_ADMISSION_CLIENT_CA_FILE": "",
        }
        hostname = f"{release}-analysis-operator-webhook.{namespace}.svc"
        assert settings["ANALYSIS_OPERATOR_ADMISSION_TLS_HOSTS"].split(",")[0] == hostname
        for replica in range(2):
            log = tmp_path / f"operator-{replica}.log"
            settings["ANALYSIS_OPERATOR_ADMISSION_CERT_DIR"] = str(tmp_path / f"tls-{replica}")
            operators.append(OperatorProcess(str(config), log, **settings))
        starting = [threading.Thread(target=process.start) for process in operators]
        for thread in starting:
            thread.start()
        for thread in starting:
            thread.join()
        first = _tls(namespace, release)
        assert first is not None and set(first) == {"ca.crt", "ca.key", "tls.crt", "tls.key"}
        wait_for(lambda: _ca_bundles(release) == {first["ca.crt"]}, timeout=30, what="the caBundle set")
        served = {_served_certificate(process.webhook_port, first["ca.crt"], hostname) for process in operators}
        pem = ssl.DER_cert_to_PEM_cert(served.pop())
        assert not served and pem.strip() == base64.b64decode(first["tls.crt"]).decode().strip()
        for process in operators:
            log = process.log_path.read_text()
            # what the certificate needs (its Secret, the two webhook configurations) was never refused;
            # these replicas watch every namespace, and other tests' environments are no concern here
            refused = [
                line
                for line in log.lower().splitlines()
                if "forbidden" in line
                and ("secrets" in line or "webhookconfigurations" in line)
                and "on_environment" not in line  # an environment's token Secret, not the certificate's
            ]
            assert not refused and "ca.key" not in log and "PRIVATE KEY" not in log, refused[:3]
        owner = yaml.safe_load(
            kubectl("get", "secret", f"{release}-analysis-operator-webhook-tls", "-n", namespace, "-o", "yaml").stdout
        )["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"]) == ("ValidatingWebhookConfiguration", f"{release}-analysis-operator")

        # An upgrade with other values keeps the certificate and the caBundle (Helm's three-way
        # merge leaves a field it never set), and the replicas do not rewrite them.
        def version() -> str:
            secret = f"{release}-analysis-operator-webhook-tls"
            return kubectl(
                "get", "secret", secret, "-n", namespace, "-o", "jsonpath={.metadata.resourceVersion}"
            ).stdout

        written = version()
        helm("upgrade", release, str(CHART), "-n", namespace, "--reuse-values", "--set", "logLevel=DEBUG", "--wait")
        # Longer than two check intervals: the replicas looked, and wrote nothing.
        _holds(
            lambda: version() == written and _ca_bundles(release) == {first["ca.crt"]},
            5,
            "the certificate and caBundle kept across the upgrade",
        )
        assert _tls(namespace, release) == first
        assert "REVISION: 2" in helm("status", release, "-n", namespace).stdout

        # Getting around it: a caBundle overwritten (say, by a GitOps tool) is set back; a serving
        # certificate swapped in from another CA is replaced by one from the operator's CA.
        kubectl(
            "patch",
            "validatingwebhookconfiguration",
            f"{release}-analysis-operator",
            "--type=json",
            "-p",
            json.dumps([{"op": "replace", "path": "/webhooks/0/clientConfig/caBundle", "value": "Zm9yZ2Vk"}]),
        )
        wait_for(lambda: _ca_bundles(release) == {first["ca.crt"]}, timeout=30, what="the caBundle set back")
        foreign = renew(None, (hostname,), datetime.datetime.now(datetime.UTC))
        swapped = base64.b64encode(foreign.certificate).decode()
        kubectl(
            "patch",
            "secret",
            f"{release}-analysis-operator-webhook-tls",
            "-n",
            namespace,
            "-p",
            json.dumps({"data": {"tls.crt": swapped, "tls.key": base64.b64encode(foreign.key).decode()}}),
        )
        repaired = wait_for(
            lambda: (data := _tls(namespace, release)) and data["tls.crt"] not in (swapped, first["tls.crt"]) and data,
            timeout=30,
            what="the swapped certificate replaced",
        )
        assert repaired["ca.crt"] == first["ca.crt"] and _ca_bundles(release) == {first["ca.crt"]}

        # Rotation: delete the Secret; the replicas make a new CA and certificate, set the
        # caBundle, and serve the new certificate (kopf re-reads the files), without a restart.
        kubectl("delete", "secret", f"{release}-analysis-operator-webhook-tls", "-n", namespace)
        second = wait_for(
            lambda: (data := _tls(namespace, release)) and data["ca.crt"] != first["ca.crt"] and data,
            timeout=30,
            what="a new certificate made",
        )
        wait_for(lambda: _ca_bundles(release) == {second["ca.crt"]}, timeout=30, what="the new caBundle")

        def serves_the_new_one(process: OperatorProcess) -> bool:
            try:
                _served_certificate(process.webhook_port, second["ca.crt"], hostname)
                return True
            except (ssl.SSLError, OSError):
                return False

        for process in operators:
            wait_for(lambda: serves_the_new_one(process), timeout=60, what="the new certificate served")

        for process in operators:
            process.stop()
        operators.clear()
        helm("uninstall", release, "-n", namespace, "--wait")
        installed = False
        for kind, name, scope in [
            ("deployment", f"{release}-analysis-operator", ["-n", namespace]),
            ("validatingwebhookconfiguration", f"{release}-analysis-operator", []),
            ("clusterrole", f"{release}-analysis-operator", []),
            ("validatingadmissionpolicy", f"{release}-analysis-operator-environments", []),
            ("validatingadmissionpolicybinding", f"{release}-analysis-operator-environments", []),
            ("clusterkopfpeering", release, []),
        ]:
            assert kubectl("get", kind, name, *scope, check=False).returncode != 0, f"{kind} {name} left behind"
        # The operator-made Secret goes with the webhook configuration that owns it.
        wait_for(lambda: _tls(namespace, release) is None, timeout=60, what="the certificate's Secret collected")
        # Helm never deletes CRDs (nor the objects in them): removing them is a separate step.
        kubectl("get", "crd", "analysisenvironments.analysis.panosc.eu")
    finally:
        for process in operators:
            process.stop()
        if installed:
            helm("uninstall", release, "-n", namespace, check=False)


def test_uninstall_keeps_the_catalogue_and_the_budgets_ledgers(fresh_namespace, custom, tmp_path):
    """The catalogue from values and the ComputeBudgets (their status is the usage ledger) survive
    `helm uninstall`; installing the release again adopts them; the directory stays admins' only."""
    namespace, release = fresh_namespace("aop-keep"), _unique("aop")
    flavor, group, budget = _unique("keep-flavor"), _unique("keep-group"), _unique("keep-budget")
    dataset = next(d for d in _documents(REPO / "examples/datasets.yaml") if d["kind"] == "Dataset")
    dataset_name = _unique("keep-dataset")
    values = {
        "peering": {"name": release},
        "flavors": {flavor: _documents(REPO / "examples/flavors.yaml")[0]["spec"]},
        "datasets": {dataset_name: dataset["spec"]},
        "facilityGroups": {group: {"members": ["alice"]}},
        "computeBudgets": [{"name": budget, "spec": {"group": group, "limits": {"cpuHours": 10}}}],
    }
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    kept = [
        ("environmentflavors", flavor),
        ("datasets", dataset_name),
        ("facilitygroups", group),
        ("computebudgets", budget),
    ]
    installed = False
    try:
        output = helm("install", release, str(CHART), "-n", namespace, "--values", str(path)).stdout
        installed = True
        assert "NOTES:" in output and "kept by `helm uninstall`" in output, output
        # A ledger, as the operator writes it (whether or not one runs here).
        ledger = {"environments": {}, "settled": {"cpuHours": 4.25, "gpuHours": 0.0}, "used": {"cpuHours": 4.25}}
        custom.patch_cluster_custom_object_status(GROUP, VERSION, "computebudgets", budget, {"status": ledger})

        # The directory is the admins': a facility user may read the catalogue, not the memberships.
        def can_list(resource: str, user: str, group: str) -> str:
            answer = kubectl(
                "auth", "can-i", "list", f"{resource}.{GROUP}", f"--as={user}", f"--as-group={group}", check=False
            )
            return answer.stdout.strip()

        assert can_list("environmentflavors", "zed", "system:authenticated") == "yes"
        assert can_list("datasets", "zed", "system:authenticated") == "yes"
        assert can_list("facilitygroups", "zed", "system:authenticated") == "no"
        assert can_list("facilityusers", "zed", "system:authenticated") == "no"
        assert can_list("facilitygroups", "dora", "analysis-admins") == "yes"

        helm("uninstall", release, "-n", namespace, "--wait")
        installed = False
        for plural, name in kept:
            kubectl("get", f"{plural}.{GROUP}", name)  # still there
        assert kubectl("get", "deployment", f"{release}-analysis-operator", "-n", namespace, check=False).returncode
        status = custom.get_cluster_custom_object(GROUP, VERSION, "computebudgets", budget)["status"]
        assert status["settled"]["cpuHours"] == 4.25 and status["used"]["cpuHours"] == 4.25

        # Installed again, the release adopts what it kept (no "exists and cannot be imported").
        helm("install", release, str(CHART), "-n", namespace, "--values", str(path))
        installed = True
        assert custom.get_cluster_custom_object(GROUP, VERSION, "computebudgets", budget)["status"] == status
    finally:
        if installed:
            helm("uninstall", release, "-n", namespace, check=False)
        for plural, name in kept:
            kubectl("delete", f"{plural}.{GROUP}", name, "--ignore-not-found")


# --- RBAC: the chart's rules are enough for a whole environment lifecycle, and each is needed.


def _operator_rbac(release: str, namespace: str) -> list[dict]:
    return render(
        release,
        namespace,
        "--show-only",
        "templates/serviceaccount.yaml",
        "--show-only",
        "templates/rbac.yaml",
        "--show-only",
        "templates/peering.yaml",
        "--set",
        "rbac.userRoles=false",
        "--set",
        f"peering.name={release}",
    )


def _without(objects: list[dict], resource: str, verb: str) -> list[dict]:
    objects = copy.deepcopy(objects)
    role = find(objects, "ClusterRole")
    rules = []
    for rule in role["rules"]:
        if resource in rule["resources"] and verb in rule["verbs"]:
            others = [r for r in rule["resources"] if r != resource]
            if others:
                rules.append({**rule, "resources": others})
            if len(rule["verbs"]) > 1:
                rules.append({**rule, "resources": [resource], "verbs": [v for v in rule["verbs"] if v != verb]})
        else:
            rules.append(rule)
    assert rules != role["rules"], f"the chart grants no {verb} on {resource}"
    role["rules"] = rules
    return objects


@pytest.fixture
def chart_operator(fresh_namespace, other_operators_stopped, tmp_path, kubeconfig, core, custom):
    """Start the operator (as a local process, with peering) under the chart's RBAC,
    optionally with one rule taken away; everything is removed afterwards. The local stack's
    authorization policy takes its ServiceAccount for the operator meanwhile."""
    started: list[tuple[OperatorProcess, pathlib.Path]] = []
    identities = contextlib.ExitStack()

    def start(remove: tuple[str, str] | None = None) -> OperatorProcess:
        namespace, release = fresh_namespace("aop-rbac"), _unique("aop-rbac")
        objects = _operator_rbac(release, namespace)
        if remove:
            objects = _without(objects, *remove)
        manifest = tmp_path / f"{release}.yaml"
        _apply(objects, manifest)
        service_account = find(objects, "ServiceAccount")["metadata"]["name"]
        config = service_account_kubeconfig(tmp_path / f"{release}.kubeconfig", namespace, service_account)
        identities.enter_context(
            operator_identity(
                core, custom, kubeconfig, f"system:serviceaccount:{namespace}:{service_account}", namespace
            )
        )
        # A stand-in for the replica's pod, which it labels active under the chart's Role.
        kubectl("run", f"{release}-0", "-n", namespace, "--image=analysis-operator", "--restart=Never")
        # As in the chart: the operator makes its webhook certificate (a Secret in its namespace,
        # under the chart's Role); nothing registered here (no host, no webhook configurations).
        process = OperatorProcess(
            str(config),
            tmp_path / f"{release}.log",
            ANALYSIS_OPERATOR_ADMISSION_HOST="",
            ANALYSIS_OPERATOR_ADMISSION_CERT_DIR=str(tmp_path / f"{release}-tls"),
            ANALYSIS_OPERATOR_ADMISSION_TLS_SECRET=f"{release}-analysis-operator-webhook-tls",
            ANALYSIS_OPERATOR_ADMISSION_TLS_SECRET_NAMESPACE=namespace,
            ANALYSIS_OPERATOR_ADMISSION_TLS_HOSTS=f"{release}-analysis-operator-webhook.{namespace}.svc",
            ANALYSIS_OPERATOR_ADMISSION_WEBHOOK_CONFIGURATION=f"{release}-analysis-operator",
            ANALYSIS_OPERATOR_STANDALONE="false",
            ANALYSIS_OPERATOR_PEERING_NAME=release,
            ANALYSIS_OPERATOR_POD_NAMESPACE=namespace,
            POD_ID=f"{release}-0",
        )
        started.append((process, manifest))
        process.start()
        return process

    yield start
    for process, manifest in started:
        process.stop()
        kubectl("delete", "-f", str(manifest), "--ignore-not-found", "--wait=false")
    identities.close()


def _log(process: OperatorProcess) -> str:
    return process.log_path.read_text()


def test_chart_rbac_is_enough_for_a_whole_lifecycle(chart_operator, custom, namespace):
    process = chart_operator()
    # It made its webhook certificate under the chart's Role, and serves it.
    release_namespace = process.settings["ANALYSIS_OPERATOR_ADMISSION_TLS_SECRET_NAMESPACE"]
    secret = process.settings["ANALYSIS_OPERATOR_ADMISSION_TLS_SECRET"]
    data = yaml.safe_load(kubectl("get", "secret", secret, "-n", release_namespace, "-o", "yaml").stdout)["data"]
    hostname = process.settings["ANALYSIS_OPERATOR_ADMISSION_TLS_HOSTS"]
    client_ca = process.settings.get("ANALYSIS_OPERATOR_ADMISSION_CLIENT_CA_FILE") or str(
        CLUSTER_STATE / "pki" / "webhook-client-ca.crt"
    )
    served = ssl.DER_cert_to_PEM_cert(_served_certificate(process.webhook_port, data["ca.crt"], hostname, client_ca))
    assert served.strip() == base64.b64decode(data["tls.crt"]).decode().strip()
    # The one replica labelled its pod active (the offer Service's selector) under the chart's Role.
    pod = process.settings["POD_ID"]
    wait_for(
        lambda: (
            kubectl(
                "get",
                "pod",
                pod,
                "-n",
                release_namespace,
                "-o",
                r"jsonpath={.metadata.labels.analysis\.panosc\.eu/replica}",
            ).stdout
            == "active"
        ),
        timeout=15,
        what="the replica's pod labelled active",
    )
    environments = Environments(custom, namespace)
    environments.create("lab", flavor="jupyter-basic")
    ready = environments.wait_phase("lab", "Ready", timeout=60)
    assert ready["status"]["connection"]["url"]
    for kind in ("pod", "service", "secret"):
        assert kubectl(
            "get", kind, "-n", namespace, "-l", "analysis.panosc.eu/environment=lab", "-o", "name"
        ).stdout.strip(), f"no {kind} for the environment"
    # What it sets up per namespace, deleted by someone, is listed and applied again under the chart's rules.
    kubectl("delete", "configmap", "aenv-jupyter", "-n", namespace)
    wait_for(
        lambda: kubectl(
            "get", "configmap", "-n", namespace, "--field-selector=metadata.name=aenv-jupyter", "-o", "name"
        ).stdout.strip(),
        timeout=60,
        what="aenv-jupyter applied again",
    )
    environments.patch_spec("lab", suspend=True)
    environments.wait_phase("lab", "Suspended", timeout=60)
    environments.patch_spec("lab", suspend=False)  # resuming reads the kept token Secret back
    environments.wait_phase("lab", "Ready", timeout=60)
    environments.delete("lab")
    wait_for(lambda: not environments.exists("lab"), timeout=60, what="lab deleted (finalizer released)")
    log = _log(process).lower()
    assert "forbidden" not in log and " 403" not in log, "the operator was refused something: see " + str(
        process.log_path
    )


@pytest.mark.parametrize(
    "resource, verb",
    [
        ("pods", "create"),  # the child cannot be made: never Ready
        ("services", "create"),  # no URL to reach JupyterLab
        ("analysisenvironments/status", "patch"),  # no status: the portal sees nothing
    ],
)
def test_chart_rbac_without_one_rule_fails(chart_operator, custom, namespace, resource, verb):
    process = chart_operator(remove=(resource, verb))
    environments = Environments(custom, namespace)
    environments.create("lab", flavor="jupyter-basic")
    denied = f'cannot {verb} resource "{resource}"'
    wait_for(
        lambda: denied in _log(process).replace("\\", ""),
        timeout=60,  # quotes escaped twice in the log
        what=f"the operator to be refused {verb} on {resource} (log {process.log_path})",
    )
    assert environments.phase("lab") != "Ready"


# --- Slurm, webhook client certificates and identity: chart values -> ANALYSIS_OPERATOR_* and mounts.


def slurm_values(**slurm) -> dict:
    """Per-user Slurm with the cluster's key, a webhook client CA from a Secret, non-default identity."""
    return {
        "slurm": {
            "enabled": True,
            "url": "http://slurmrestd.hpc.example.org:6820",
            "apiVersion": "v0.0.39",
            "user": "slurmop",
            "jwtKeySecret": {"name": "slurm-jwt-key", "key": "jwt_hs256.key"},
            "workingDirectory": "/scratch/{user}/analysis-environments",
            "ownerPrefix": "oidc:",
            "ownerSuffix": "@facility.eu",
            "refusedAccounts": ["root", "slurm", "admin"],
            "tokenLifetimeSeconds": 120,
            "portMin": 21000,
            "portMax": 22000,
            "nodeDomain": "hpc.example.org",
            **slurm,
        },
        "admission": {"clientCA": {"kind": "Secret", "name": "webhook-client-ca", "key": "ca.pem"}},
        "identity": {"requirePosixIdentity": False, "minUid": 500, "strictSupplementalGroups": False},
    }


def _pod(objects: list[dict]) -> tuple[dict, dict, dict, dict]:
    """The operator pod's spec, its env (name -> value), mounts and volumes by name."""
    pod = find(objects, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {item["name"]: item.get("value") for item in container["env"]}
    mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    return pod, env, mounts, volumes


def _settings(env: dict):
    """What the operator reads from the rendered environment (the config file aside)."""
    from analysis_operator.settings import PREFIX, load_settings

    return load_settings(
        {
            name: value
            for name, value in env.items()
            if value is not None and name.startswith(PREFIX) and name != f"{PREFIX}CONFIG"
        }
    )


def _known_env_names() -> set[str]:
    """ANALYSIS_OPERATOR_<FIELD> and ANALYSIS_OPERATOR_<SECTION>_<FIELD> for every setting."""
    import dataclasses

    from analysis_operator.settings import PREFIX, Settings

    names = {f"{PREFIX}CONFIG"}
    for spec in dataclasses.fields(Settings):
        default = spec.default if spec.default_factory is dataclasses.MISSING else spec.default_factory()
        if dataclasses.is_dataclass(default):
            names |= {f"{PREFIX}{spec.name.upper()}_{field.name.upper()}" for field in dataclasses.fields(default)}
        else:
            names.add(f"{PREFIX}{spec.name.upper()}")
    return names


def _render_values(tmp_path: pathlib.Path, namespace: str, values: dict) -> list[dict]:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return render("aop", namespace, "--values", str(path))


def test_lint_slurm_client_ca_and_identity_values(tmp_path):
    for values in (slurm_values(), slurm_values(jwtKeySecret={}, tokenSecret={"name": "slurm-token"})):
        path = tmp_path / "values.yaml"
        path.write_text(yaml.safe_dump(values))
        assert "0 chart(s) failed" in helm("lint", "--strict", str(CHART), "--values", str(path)).stdout


def test_slurm_per_user_values_render_env_and_a_read_only_key(fresh_namespace, tmp_path):
    namespace = fresh_namespace("aop-slurm")
    objects = _render_values(tmp_path, namespace, slurm_values())
    pod, env, mounts, volumes = _pod(objects)
    assert env["ANALYSIS_OPERATOR_SLURM_JWT_KEY_FILE"] == "/etc/analysis-operator/slurm-jwt/jwt.key"
    assert env["ANALYSIS_OPERATOR_SLURM_TOKEN_FILE"] == ""
    assert env["ANALYSIS_OPERATOR_ADMISSION_CLIENT_CA_FILE"] == "/etc/analysis-operator/webhook-client-ca/ca.crt"
    # The key: only that item of the Secret, owner-read only, on a read-only mount (no subPath,
    # so a rotated key reaches the pod); the pod's fsGroup lets the non-root operator read it.
    assert mounts["slurm-jwt"] == {
        "name": "slurm-jwt",
        "mountPath": "/etc/analysis-operator/slurm-jwt",
        "readOnly": True,
    }
    assert volumes["slurm-jwt"]["secret"] == {
        "secretName": "slurm-jwt-key",
        "defaultMode": 0o400,
        "items": [{"key": "jwt_hs256.key", "path": "jwt.key", "mode": 0o400}],
    }
    assert pod["securityContext"]["fsGroup"] and pod["securityContext"]["runAsNonRoot"] is True
    assert "slurm-token" not in volumes and "slurm-token" not in mounts
    # The client CA (public): read-only, world-readable.
    assert mounts["webhook-client-ca"]["readOnly"] is True
    assert mounts["webhook-client-ca"]["mountPath"] == "/etc/analysis-operator/webhook-client-ca"
    assert volumes["webhook-client-ca"]["secret"] == {
        "secretName": "webhook-client-ca",
        "defaultMode": 0o444,
        "items": [{"key": "ca.pem", "path": "ca.crt", "mode": 0o444}],
    }
    # What the operator makes of it: every value reaches its setting.
    settings = _settings(env)
    slurm = settings.slurm
    assert (slurm.enabled, slurm.url, slurm.api_version, slurm.user) == (
        True,
        "http://slurmrestd.hpc.example.org:6820",
        "v0.0.39",
        "slurmop",
    )
    assert (slurm.jwt_key_file, slurm.token_file) == ("/etc/analysis-operator/slurm-jwt/jwt.key", "")
    assert slurm.working_directory == "/scratch/{user}/analysis-environments"
    assert (slurm.owner_prefix, slurm.owner_suffix) == ("oidc:", "@facility.eu")
    assert slurm.refused_accounts == ("root", "slurm", "admin")
    assert (slurm.token_lifetime_seconds, slurm.port_min, slurm.port_max) == (120, 21000, 22000)
    assert slurm.node_domain == "hpc.example.org"
    assert settings.admission.client_ca_file == "/etc/analysis-operator/webhook-client-ca/ca.crt"
    assert (
        settings.identity.require_posix_identity,
        settings.identity.min_uid,
        settings.identity.strict_supplemental_groups,
    ) == (False, 500, False)
    # The API server takes the Deployment (modes, items) as rendered; the Secrets need not exist yet.
    output = _apply(objects, tmp_path / "slurm.yaml", "--dry-run=server")
    assert output.count("(server dry run)") == len(objects)


def test_slurm_single_token_values_render_a_read_only_token(tmp_path):
    values = slurm_values(jwtKeySecret={}, tokenSecret={"name": "slurm-token"})
    values["admission"] = {"clientCA": {"name": "webhook-client-ca"}}  # a ConfigMap, key ca.crt
    objects = _render_values(tmp_path, "ops", values)
    _, env, mounts, volumes = _pod(objects)
    assert env["ANALYSIS_OPERATOR_SLURM_TOKEN_FILE"] == "/etc/analysis-operator/slurm-token/token"
    assert env["ANALYSIS_OPERATOR_SLURM_JWT_KEY_FILE"] == ""
    assert mounts["slurm-token"] == {
        "name": "slurm-token",
        "mountPath": "/etc/analysis-operator/slurm-token",
        "readOnly": True,
    }
    assert "subPath" not in mounts["slurm-token"]  # the site's renewals reach the pod
    assert volumes["slurm-token"]["secret"] == {
        "secretName": "slurm-token",
        "defaultMode": 0o400,
        "items": [{"key": "token", "path": "token", "mode": 0o400}],
    }
    assert "slurm-jwt" not in volumes and "slurm-jwt" not in mounts
    assert volumes["webhook-client-ca"]["configMap"] == {
        "name": "webhook-client-ca",
        "defaultMode": 0o444,
        "items": [{"key": "ca.crt", "path": "ca.crt", "mode": 0o444}],
    }
    settings = _settings(env)
    assert (settings.slurm.jwt_key_file, settings.slurm.token_file) == ("", "/etc/analysis-operator/slurm-token/token")


def test_default_values_render_identity_and_no_slurm_or_client_ca(tmp_path):
    """Defaults: Slurm off and not rendered (so `config.slurm` still applies), any TLS client,
    and the identity settings at the operator's own defaults."""
    _, env, mounts, volumes = _pod(render("aop", "ops"))
    assert not [name for name in env if name.startswith("ANALYSIS_OPERATOR_SLURM_")]
    assert "ANALYSIS_OPERATOR_ADMISSION_CLIENT_CA_FILE" not in env
    assert not {"slurm-jwt", "slurm-token", "webhook-client-ca"} & (set(mounts) | set(volumes))
    assert env["ANALYSIS_OPERATOR_IDENTITY_REQUIRE_POSIX_IDENTITY"] == "true"
    from analysis_operator.settings import IdentitySettings, SlurmSettings

    settings = _settings(env)
    assert settings.identity == IdentitySettings() and settings.identity.require_posix_identity is True
    assert settings.slurm == SlurmSettings() and settings.admission.client_ca_file == ""
    # The operator reads every ANALYSIS_OPERATOR_* variable the chart sets: no misspelt name is ignored.
    _, env, _, _ = _pod(_render_values(tmp_path, "ops", slurm_values()))
    rendered = {name for name in env if name.startswith("ANALYSIS_OPERATOR_")}
    assert rendered - _known_env_names() == set()


def test_webhook_from_renders_the_operators_network_policy():
    peers = "networkPolicy.webhookFrom[0].ipBlock.cidr=172.16.0.0/28"
    objects = render("aop", "ops", "--set", "networkPolicy.enabled=true", "--set", peers)
    ingress = find(objects, "NetworkPolicy", "aop-analysis-operator")["spec"]["ingress"]
    assert ingress[0] == {
        "ports": [{"port": 9443, "protocol": "TCP"}],
        "from": [{"ipBlock": {"cidr": "172.16.0.0/28"}}],
    }
    assert ingress[1] == {"ports": [{"port": 8080, "protocol": "TCP"}, {"port": 9090, "protocol": "TCP"}]}
    default = render("aop", "ops", "--set", "networkPolicy.enabled=true")
    (rule,) = find(default, "NetworkPolicy", "aop-analysis-operator")["spec"]["ingress"]
    assert "from" not in rule and {"port": 9443, "protocol": "TCP"} in rule["ports"]


_SLURM_ON = ["slurm.enabled=true", "slurm.url=http://slurmrestd:6820"]


@pytest.mark.parametrize(
    "settings, complaint",
    [
        (["slurm.jwtKeySecret.key=jwt_hs256.key"], "missing property 'name'"),  # a jwtKeySecret without a name
        (["slurm.tokenSecret.key=token"], "missing property 'name'"),
        (["slurm.jwtKeySecret.name="], "/slurm/jwtKeySecret/name"),
        (["slurm.jwtKeySecret.name=k", "slurm.jwtKeySecret.mode=0644"], "additional properties 'mode'"),
        (_SLURM_ON, "oneOf"),  # enabled with neither the key nor a token
        ([*_SLURM_ON, "slurm.jwtKeySecret.name=k", "slurm.tokenSecret.name=t"], "oneOf"),  # both
        (["slurm.enabled=true", "slurm.jwtKeySecret.name=k"], "/slurm/url"),  # enabled, no URL
        (["slurm.url=slurmrestd:6820"], "/slurm/url"),
        (["slurm.workingDirectory=scratch/{user}"], "/slurm/workingDirectory"),
        # per-user mode with one HOME for every user
        ([*_SLURM_ON, "slurm.jwtKeySecret.name=k", "slurm.workingDirectory=/tmp"], "/slurm/workingDirectory"),
        (["slurm.refusedAccounts={root\\,slurm}"], "/slurm/refusedAccounts"),
        (["slurm.jwtKey.name=k"], "additional properties 'jwtKey'"),
        (["admission.clientCA.key=ca.crt"], "missing property 'name'"),
        (["admission.clientCA.kind=Certificate", "admission.clientCA.name=ca"], "/admission/clientCA/kind"),
        (["identity.requirePosixIdentity=maybe"], "/identity/requirePosixIdentity"),
        (["identity.minUid=0"], "/identity/minUid"),
        (["identity.requirePosixIdentities=false"], "additional properties 'requirePosixIdentities'"),
    ],
)
def test_schema_refuses_bad_slurm_client_ca_and_identity_values(settings, complaint):
    arguments = [argument for setting in settings for argument in ("--set", setting)]
    result = helm("template", "x", str(CHART), *arguments, check=False)
    assert result.returncode != 0 and complaint in result.stderr, result.stderr


@pytest.mark.parametrize(
    "settings, complaint",
    [
        (["slurm.portMin=30000", "slurm.portMax=25000"], "portMin must not be above slurm.portMax"),
        (["podSecurityContext.fsGroup=null"], "podSecurityContext.fsGroup"),  # the 0400 key would be unreadable
    ],
)
def test_template_refuses_slurm_values_it_cannot_run_with(settings, complaint):
    arguments = ["--set", "slurm.jwtKeySecret.name=k", *(f"--set={s}" for s in [*_SLURM_ON, *settings])]
    result = helm("template", "x", str(CHART), *arguments, check=False)
    assert result.returncode != 0 and complaint in result.stderr, result.stderr
