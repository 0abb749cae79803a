"""Who the chart lets in, rendered with `helm template`, no server: the webhooks and the admission
policies' bindings cover exactly the namespaces the operator serves (watchNamespace, else all;
admission.namespaceSelector is refused), the operator's rights never go to a namespace's `default`
ServiceAccount, and people get the <fullname>-user role to bind per namespace, never environment
rights through the built-in edit and admin roles. Against a real API server:
tests/integration/test_chart.py."""

from __future__ import annotations

import pytest

from tests.packaging.test_chart_gateway import CHART, FULLNAME, NAMESPACE, find, grants, refusal, render

GROUP = "analysis.panosc.eu"
MUTATING_POLICY = ("--api-versions", "admissionregistration.k8s.io/v1/MutatingAdmissionPolicy")
BINDINGS = ("ValidatingAdmissionPolicyBinding", "MutatingAdmissionPolicyBinding")
WEBHOOKS = ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration")


# The authorization and identity policies: where the operator serves. (The gateway's route policy,
# templates/gateway-policy.yaml, covers every namespace the Gateway takes routes from.)
POLICIES = {f"{FULLNAME}-{name}" for name in ("environments", "environment-owner", "environment-creation")} | {
    f"{FULLNAME}-budgetrequest-identity"
}


def _selectors(objects: list[dict]) -> dict[str, dict | None]:
    """The release's authorization and identity policy bindings and its webhooks -> their
    namespaceSelector (None: every namespace)."""
    selectors: dict[str, dict | None] = {}
    for binding in (o for o in objects if o["kind"] in BINDINGS and o["spec"]["policyName"] in POLICIES):
        match = binding["spec"].get("matchResources") or {}
        selectors[f"{binding['kind']}/{binding['metadata']['name']}"] = match.get("namespaceSelector")
    for configuration in (o for o in objects if o["kind"] in WEBHOOKS):
        for hook in configuration["webhooks"]:
            selectors[f"{configuration['kind']}/{hook['name']}"] = hook.get("namespaceSelector")
    return selectors


@pytest.mark.parametrize(
    "watch, selector",
    [
        ("", None),  # the operator serves every namespace: so do its checks
        ("labs", {"matchLabels": {"kubernetes.io/metadata.name": "labs"}}),  # not another release's namespaces
    ],
)
def test_webhooks_and_policies_cover_exactly_the_namespaces_served(tmp_path, watch, selector):
    selectors = _selectors(render(tmp_path, {"watchNamespace": watch}, *MUTATING_POLICY))
    assert len([name for name in selectors if name.startswith(BINDINGS)]) == 4  # authorization and identity
    assert len([name for name in selectors if name.startswith(WEBHOOKS)]) == 6
    assert selectors == dict.fromkeys(selectors, selector)


@pytest.mark.parametrize("watch", ["", "labs"])
@pytest.mark.parametrize(
    "values",
    [
        {},
        {"admission": {"enabled": False}},  # the policies would still be narrowed
        {"admission": {"enabled": False}, "authorization": {"enabled": False}},  # said, not silently ignored
    ],
)
def test_an_admission_namespace_selector_is_refused(tmp_path, watch, values):
    """A served namespace the webhooks skip has no check of who created an environment (owner
    spoofing): the chart refuses the value instead of narrowing anything by it."""
    selector = {"matchLabels": {"analysis.panosc.eu/environments": "enabled"}}
    merged = {**values, "watchNamespace": watch}
    merged["admission"] = {**values.get("admission", {}), "namespaceSelector": selector}
    message = refusal(tmp_path, merged)
    assert "admission.namespaceSelector is no longer supported" in message, message
    assert "known only at admission" in message


@pytest.mark.parametrize(
    "service_account, complaint",
    [
        ({"create": False}, "at '/serviceAccount/name': minLength"),
        ({"create": False, "name": ""}, "at '/serviceAccount/name': minLength"),
        ({"create": False, "name": "default"}, "at '/serviceAccount/name': 'not' failed"),
    ],
)
def test_an_existing_service_account_must_be_named_and_not_default(tmp_path, service_account, complaint):
    values = {"serviceAccount": service_account}
    assert complaint in refusal(tmp_path, values)
    # Without the schema (--skip-schema-validation) the template says it in words.
    message = refusal(tmp_path, values, "--skip-schema-validation")
    assert "set serviceAccount.name to the existing ServiceAccount" in message, message


def test_an_existing_service_account_gets_the_operators_rights(tmp_path):
    objects = render(tmp_path, {"serviceAccount": {"create": False, "name": "analysis-sa"}})
    assert not [o for o in objects if o["kind"] == "ServiceAccount"]
    assert find(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "analysis-sa"
    subject = {"kind": "ServiceAccount", "name": "analysis-sa", "namespace": NAMESPACE}
    assert find(objects, "ClusterRoleBinding", FULLNAME)["subjects"] == [subject]
    operators = find(objects, "AuthorizationParameters")["data"]["operatorUsernames"]
    assert operators == f"system:serviceaccount:{NAMESPACE}:analysis-sa"


# --- people ---------------------------------------------------------------------------------------------

AGGREGATE = "rbac.authorization.k8s.io/aggregate-to-"


def _aggregated(objects: list[dict]) -> dict[str, set[str]]:
    """built-in role (admin, edit, view) -> the chart's ClusterRoles aggregated into it."""
    into: dict[str, set[str]] = {}
    for role in (o for o in objects if o["kind"] == "ClusterRole"):
        for label, value in (role["metadata"].get("labels") or {}).items():
            if label.startswith(AGGREGATE) and value == "true":
                into.setdefault(label.removeprefix(AGGREGATE), set()).add(role["metadata"]["name"])
    return into


def test_people_get_a_role_to_bind_never_environment_rights_through_edit_or_admin(tmp_path):
    """Whoever has the built-in edit role in a namespace also has its pods (one mounting the data claim
    as any uid), Secrets (other users' tokens) and exec: that role must not be how people run
    environments, so the chart adds nothing to it (nor to admin) and ships <fullname>-user."""
    objects = render(tmp_path, {})
    assert _aggregated(objects) == {"view": {f"{FULLNAME}-view"}}
    view = find(objects, "ClusterRole", f"{FULLNAME}-view")
    assert {verb for (_, _, verb, _) in grants(view["rules"])} == {"get", "list", "watch"}
    user = find(objects, "ClusterRole", f"{FULLNAME}-user")
    environment = {"get", "list", "watch", "create", "update", "patch", "delete"}  # suspend, sharing: patch
    request = {"get", "list", "watch", "create"}  # no delete and re-create under an admin's eyes
    assert grants(user["rules"]) == {
        *((GROUP, "analysisenvironments", verb, ()) for verb in environment),
        *((GROUP, "budgetrequests", verb, ()) for verb in request),
    }
    # Bound by the facility, per namespace: the chart binds it to no one.
    assert not [
        o
        for o in objects
        if o["kind"] in ("RoleBinding", "ClusterRoleBinding") and o["roleRef"]["name"] == user["metadata"]["name"]
    ]
    notes = (CHART / "templates/NOTES.txt").read_text()
    assert "--clusterrole={{ $fullname }}-user" in notes and "never the built-in" in notes


def test_user_roles_off_makes_none(tmp_path):
    names = {
        o["metadata"]["name"] for o in render(tmp_path, {"rbac": {"userRoles": False}}) if o["kind"] == "ClusterRole"
    }
    assert not names & {f"{FULLNAME}-user", f"{FULLNAME}-view"}
