"""The chart's gateway policies (templates/gateway-policy.yaml), rendered with `helm template`, no
server: with the gateway on, only the operator and admins put routes on the analysis Gateway, in
every namespace, whatever watchNamespace says; the policies are the repository's text
(deploy/authorization/gateway-policy.yaml) with this release's names and Gateway. What they refuse,
against the real API server and Traefik: tests/integration/test_open.py."""

from __future__ import annotations

import pathlib

import pytest
import yaml

from tests.packaging.test_chart_gateway import ENABLED, FULLNAME, _merge, find, refusal, render

REPO = pathlib.Path(__file__).resolve().parents[2]
POLICIES = {f"{FULLNAME}-gateway-routes": "analysis-gateway-routes"}
POLICIES[f"{FULLNAME}-gateway-traefik-routes"] = "analysis-gateway-traefik-routes"
POLICIES[f"{FULLNAME}-gateway-backend-tls"] = "analysis-gateway-backend-tls"


def _repository(name: str) -> dict:
    texts = yaml.safe_load_all((REPO / "deploy/authorization/gateway-policy.yaml").read_text())
    return next(policy for policy in texts if policy["metadata"]["name"] == name)


def _variables(policy: dict) -> dict[str, str]:
    return {variable["name"]: variable["expression"] for variable in policy["spec"]["variables"]}


def _gateway_objects(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["metadata"]["name"] in POLICIES]


def test_off_with_the_gateway_off(tmp_path):
    assert not _gateway_objects(render(tmp_path, {}))


def test_off_without_the_authorization_parameters(tmp_path):
    """Its parameters are the authorization policy's: without them the binding would refuse the
    operator's own routes (parameterNotFoundAction: Deny)."""
    assert not _gateway_objects(render(tmp_path, _merge(ENABLED, {"authorization": {"enabled": False}})))


@pytest.mark.parametrize("watch", ["", "labs"])
def test_only_the_operator_and_admins_put_routes_on_the_gateway_of_the_values_in_every_namespace(tmp_path, watch):
    values = _merge(ENABLED, {"watchNamespace": watch, "gateway": {"name": "web", "namespace": "edge"}})
    objects = render(tmp_path, values)
    parameters = find(objects, "AuthorizationParameters")["metadata"]["name"]
    for name, repository_name in POLICIES.items():
        policy, binding = (
            find(objects, "ValidatingAdmissionPolicy", name),
            find(objects, "ValidatingAdmissionPolicyBinding", name),
        )
        # One text: the repository's, with this release's name and its Gateway.
        repository = _repository(repository_name)
        assert policy["spec"]["validations"] == repository["spec"]["validations"]
        assert policy["spec"]["matchConstraints"] == repository["spec"]["matchConstraints"]
        rendered, original = _variables(policy), _variables(repository)
        assert (rendered["gatewayNamespace"], rendered["gatewayName"]) == ("'edge'", "'web'")
        assert {k: v for k, v in rendered.items() if not k.startswith("gateway")} == {
            k: v for k, v in original.items() if not k.startswith("gateway")
        }
        assert binding["spec"]["policyName"] == name and binding["spec"]["validationActions"] == ["Deny"]
        assert binding["spec"]["paramRef"] == {"name": parameters, "parameterNotFoundAction": "Deny"}
        assert "matchResources" not in binding["spec"]  # a route from any namespace reaches the Gateway
    routes = find(objects, "ValidatingAdmissionPolicy", f"{FULLNAME}-gateway-routes")
    assert {"httproutes", "grpcroutes"} <= set(routes["spec"]["matchConstraints"]["resourceRules"][0]["resources"])


def test_a_gateway_name_that_is_no_kubernetes_name_never_reaches_the_policy(tmp_path):
    """They become CEL string literals; the schema refuses such a name, and so does the template
    without it."""
    values = _merge(ENABLED, {"gateway": {"name": "web' || true || '"}})
    assert "/gateway/name" in refusal(tmp_path, values)
    message = refusal(tmp_path, values, "--skip-schema-validation")
    assert "is not a Kubernetes name" in message, message


def test_the_local_stack_binds_every_gateway_policy_to_the_authorization_parameters():
    local = REPO / "deploy/authorization"
    policies = {p["metadata"]["name"] for p in yaml.safe_load_all((local / "gateway-policy.yaml").read_text())}
    bindings = list(yaml.safe_load_all((local / "gateway-local.yaml").read_text()))
    parameters = yaml.safe_load_all((local / "local.yaml").read_text())
    parameters_name = next(p for p in parameters if p["kind"] == "AuthorizationParameters")["metadata"]["name"]
    assert {b["spec"]["policyName"] for b in bindings} == policies == set(POLICIES.values())
    assert all(b["spec"]["paramRef"] == {"name": parameters_name, "parameterNotFoundAction": "Deny"} for b in bindings)


def test_a_facility_whose_traefik_serves_only_its_own_ingressroutes_may_keep_other_teams_ones(tmp_path):
    """gateway.refuseIngressRoutes false drops the IngressRoute policy only: routes on the Gateway
    stay the operator's."""
    kept = {o["metadata"]["name"] for o in _gateway_objects(render(tmp_path, ENABLED))}
    assert kept == set(POLICIES)
    values = _merge(ENABLED, {"gateway": {"refuseIngressRoutes": False}})
    left = {o["metadata"]["name"] for o in _gateway_objects(render(tmp_path, values))}
    assert left == {f"{FULLNAME}-gateway-routes", f"{FULLNAME}-gateway-backend-tls"}


def test_a_release_upgraded_without_the_value_keeps_refusing_ingressroutes(tmp_path):
    """helm upgrade --reuse-values from a release made before gateway.refuseIngressRoutes existed
    has no such value (null): only an explicit false drops the IngressRoute policy."""
    values = _merge(ENABLED, {"gateway": {"refuseIngressRoutes": None}})
    kept = {o["metadata"]["name"] for o in _gateway_objects(render(tmp_path, values, "--skip-schema-validation"))}
    assert kept == set(POLICIES)
