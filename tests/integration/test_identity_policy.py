"""The identity checks the API server decides itself (deploy/authorization/identity-policy.yaml):
owner defaulted, a spoofed owner refused, created-by stamped on create; requested-by and filed-by
of a BudgetRequest checked on create (tests/integration/test_requests_on_behalf.py) and kept on
update. Attacked with impersonated users (RBAC on), with the operator running (its webhooks
answer first, with a machine-readable cause) and with no operator and no webhook at all (the
policies alone hold). The chart renders the same three policies."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator

import kubernetes
import pytest
import yaml

from tests.integration.authorization import PARAMETERS, denial, type_warnings
from tests.integration.chart import CHART, find, helm
from tests.integration.conftest import GROUP, REPO, VERSION, impersonating, kubectl
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

POLICY_FILE = REPO / "deploy/authorization/identity-policy.yaml"
CREATED_BY = f"{GROUP}/created-by"
REQUESTED_BY = f"{GROUP}/requested-by"
MUTATING_POLICY_API = "admissionregistration.k8s.io/v1/MutatingAdmissionPolicy"  # helm's --api-versions
FILED_BY = f"{GROUP}/filed-by"
SPOOFED = "spec.owner 'alice' is not you ('bob'): you may only create environments you own"
PORTAL = ("system:serviceaccount:portal:backend", "analysis-portal")
ADMIN = ("dora", "analysis-admins")


def _environment(name: str, annotations: dict | None = None, **spec: str) -> dict:
    metadata: dict = {"name": name}
    if annotations:
        metadata["annotations"] = annotations
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AnalysisEnvironment",
        "metadata": metadata,
        "spec": {"flavor": "jupyter-basic", **spec},
    }


def create_as(kubeconfig: str, user: str, namespace: str, body: dict, group: str = "facility-users", **kw) -> dict:
    api = kubernetes.client.CustomObjectsApi(impersonating(kubeconfig, user, group))
    return api.create_namespaced_custom_object(GROUP, VERSION, namespace, "analysisenvironments", body, **kw)


def _answer(call: Callable[[], object]) -> dict:
    with pytest.raises(kubernetes.client.ApiException) as refused:
        call()
    assert refused.value.status == 403, refused.value.body
    return json.loads(refused.value.body)


# --- with the operator running: its mutating webhook answers first, with the cause


def test_a_spoofed_owner_is_refused_with_its_cause(kubeconfig, namespace, operator):
    for dry_run in (None, "All"):
        answer = _answer(
            lambda: create_as(kubeconfig, "bob", namespace, _environment("spoofed", owner="alice"), dry_run=dry_run)
        )
        assert SPOOFED in answer["message"] and "environment-owner.analysis.panosc.eu" in answer["message"]
        assert [(c["reason"], c["field"]) for c in answer["details"]["causes"]] == [("NotOwner", "spec.owner")]


# --- with no operator and no webhook: the policies alone


def test_with_the_operator_stopped_a_spoofed_owner_is_still_refused(kubeconfig, namespace, operator):
    """Stopped (SIGTERM), kopf takes the webhooks it registered (the local stack's way) out of their
    configuration, so the API server no longer calls them: without the policies a spoofed create
    went through until a replica came back (bench/admission_cel.py measured it)."""
    operator.stop()
    try:
        answer = _answer(
            lambda: create_as(kubeconfig, "bob", namespace, _environment("spoofed", owner="alice"), dry_run="All")
        )
        assert "ValidatingAdmissionPolicy 'analysis-environment-creation'" in answer["message"], answer
        assert SPOOFED in answer["message"]
        created = create_as(kubeconfig, "carol", namespace, _environment("defaulted"), dry_run="All")
        assert (created["spec"]["owner"], created["metadata"]["annotations"][CREATED_BY]) == ("carol", "carol")
    finally:
        operator.start()


@pytest.fixture
def no_operator(kubeconfig, other_operators_stopped) -> None:
    """No replica runs and no webhook is registered (other_operators_stopped removes them)."""
    for kind in ("validatingwebhookconfiguration", "mutatingwebhookconfiguration"):
        assert not kubectl("get", kind, "-o", "name").stdout.count("analysis.panosc.eu")


def test_without_the_operator_a_spoofed_owner_is_still_refused(kubeconfig, namespace, no_operator):
    for dry_run in (None, "All"):
        answer = _answer(
            lambda: create_as(kubeconfig, "bob", namespace, _environment("spoofed", owner="alice"), dry_run=dry_run)
        )
        assert "ValidatingAdmissionPolicy 'analysis-environment-creation'" in answer["message"], answer
        assert SPOOFED in answer["message"] and answer["reason"] == "Forbidden"
    created = create_as(kubeconfig, PORTAL[0], namespace, _environment("for-alice", owner="alice"), PORTAL[1])
    assert (created["spec"]["owner"], created["metadata"]["annotations"][CREATED_BY]) == ("alice", PORTAL[0])


def test_without_the_operator_the_owner_is_defaulted_and_created_by_stamped(kubeconfig, namespace, no_operator):
    forged = {CREATED_BY: "alice", "note": "kept"}
    created = create_as(kubeconfig, "carol", namespace, _environment("defaulted", annotations=forged))
    assert created["spec"]["owner"] == "carol"
    assert created["metadata"]["annotations"] == {CREATED_BY: "carol", "note": "kept"}
    created = create_as(kubeconfig, "carol", namespace, _environment("empty", owner=""))
    assert (created["spec"]["owner"], created["metadata"]["annotations"]) == ("carol", {CREATED_BY: "carol"})


@pytest.mark.parametrize(
    "metadata, said",
    [
        ({"finalizers": ["bob.example.org/keep"]}, "finalizer 'bob.example.org/keep'"),
        ({"annotations": {f"{GROUP}/abandon-backend": "true"}}, f"annotation '{GROUP}/abandon-backend'"),
        ({"annotations": {f"x.{GROUP}/on_environment": "{}"}}, f"annotation 'x.{GROUP}/on_environment'"),
    ],
)
def test_without_the_operator_a_create_may_not_hold_or_steer_what_the_operator_does(
    kubeconfig, namespace, no_operator, metadata, said
):
    """A finalizer of someone's would keep the environment after its deletion, which frees its budget slot
    and ends its charge, while its pod ran on (policy.yaml keeps finalizers at UPDATE; here at CREATE); the
    operator's annotations steer it (abandon-backend skips a Slurm job's cancel). The owner, and the portal
    acting for her, are refused with what they set; an admin (restoring a backup) is not; the creator's
    own annotations are free."""
    body = _environment("held", owner="bob")
    body["metadata"].update(metadata)
    for user, group in (("bob", "facility-users"), PORTAL):
        answer = _answer(lambda: create_as(kubeconfig, user, namespace, body, group, dry_run="All"))
        assert "ValidatingAdmissionPolicy 'analysis-environment-creation'" in answer["message"], answer
        assert said in answer["message"] and "only the operator and admins" in answer["message"], answer
    created = create_as(kubeconfig, ADMIN[0], namespace, body, "system:masters", dry_run="All")
    assert created["metadata"].get("finalizers") == metadata.get("finalizers")
    free = _environment("noted", annotations={"bob.example.org/note": "mine"})
    assert create_as(kubeconfig, "bob", namespace, free, dry_run="All")["metadata"]["annotations"][
        "bob.example.org/note"
    ]


def test_without_the_operator_nobody_but_admins_changes_created_by(kubeconfig, namespace, no_operator, custom):
    """The authorization policy's rule 2 (deploy/authorization/policy.yaml): the owner and the portal
    may change her environment, not the operator's annotations; anyone else nothing at all."""
    create_as(kubeconfig, "alice", namespace, _environment("lab"))

    def overwrite(user: str, group: str = "facility-users") -> Callable[[], object]:
        api = kubernetes.client.CustomObjectsApi(impersonating(kubeconfig, user, group))
        body = {"metadata": {"annotations": {CREATED_BY: "mallory"}}}
        return lambda: api.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, "analysisenvironments", "lab", body
        )

    expected = {
        ("alice", "facility-users"): f"this request changes annotation '{CREATED_BY}'; you are 'alice'",
        PORTAL: f"this request changes annotation '{CREATED_BY}'; you are '{PORTAL[0]}'",
        ("bob", "facility-users"): "only its owner 'alice', the portal acting for that owner, and admins may change",
    }
    for (user, group), shown in expected.items():
        message = denial(overwrite(user, group))
        assert message is not None and shown in message, (user, message)
    stored = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "analysisenvironments", "lab")
    assert stored["metadata"]["annotations"][CREATED_BY] == "alice"


def test_without_its_mutating_policy_an_unstamped_create_is_refused(kubeconfig, namespace, no_operator, tmp_path):
    """created-by must name the requester when the create is decided: were nothing to stamp it (no
    mutating policy, no webhook), a create is refused rather than let through unrecorded or forged."""
    saved = yaml.safe_load(
        kubectl("get", "mutatingadmissionpolicybinding", "analysis-environment-owner", "-o", "yaml").stdout
    )
    forged = _environment("forged", {CREATED_BY: "alice"}, owner="bob")
    unstamped = _environment("unstamped", owner="bob")
    kubectl("delete", "mutatingadmissionpolicybinding", "analysis-environment-owner")
    try:
        message = wait_for(
            lambda: denial(lambda: create_as(kubeconfig, "bob", namespace, forged, dry_run="All")),
            timeout=30,
            what="the forged create refused without the mutating policy",
        )
        assert "metadata.annotations['analysis.panosc.eu/created-by'] is 'alice', not you ('bob')" in message
        message = denial(lambda: create_as(kubeconfig, "bob", namespace, unstamped, dry_run="All"))
        assert message is not None and "created-by'] is '', not you ('bob')" in message
    finally:
        manifest = tmp_path / "binding.yaml"
        kept = {key: saved[key] for key in ("apiVersion", "kind", "spec")}
        manifest.write_text(yaml.safe_dump({**kept, "metadata": {"name": saved["metadata"]["name"]}}))
        kubectl("apply", "-f", str(manifest))
    wait_for(
        lambda: denial(lambda: create_as(kubeconfig, "bob", namespace, unstamped, dry_run="All")) is None,
        timeout=30,
        what="created-by stamped again",
    )


# --- BudgetRequests: whom it is for and who filed it, kept


@pytest.fixture
def filed_request(kubeconfig, namespace, no_operator, custom, api) -> Iterator[str]:
    """alice's request as the webhook stamps it (written by an admin here: no operator runs), and erin,
    a facility user whom RBAC lets edit BudgetRequests in this namespace (a namespace editor)."""
    name = f"more-{uuid.uuid4().hex[:6]}"
    custom.create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        "budgetrequests",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "BudgetRequest",
            "metadata": {"name": name, "annotations": {REQUESTED_BY: "alice", FILED_BY: PORTAL[0]}},
            "spec": {"reason": "beamtime extended", "budget": "alice", "add": {"cpuHours": 10}},
        },
    )
    rbac = kubernetes.client.RbacAuthorizationV1Api(api)
    rbac.create_namespaced_role(
        namespace,
        {
            "metadata": {"name": "budgetrequest-editor"},
            "rules": [{"apiGroups": [GROUP], "resources": ["budgetrequests"], "verbs": ["get", "update", "patch"]}],
        },
    )
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "budgetrequest-editor"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "budgetrequest-editor"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "erin"}],
        },
    )
    yield name


def _patch_request(kubeconfig: str, namespace: str, name: str, user: str, group: str, annotations: dict):
    api = kubernetes.client.CustomObjectsApi(impersonating(kubeconfig, user, group))
    return lambda: api.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, "budgetrequests", name, {"metadata": {"annotations": annotations}}
    )


@pytest.mark.parametrize(
    "annotations, shown",
    [
        ({REQUESTED_BY: "erin"}, f"metadata.annotations['{REQUESTED_BY}'] ('alice' -> 'erin')"),
        ({REQUESTED_BY: None}, f"metadata.annotations['{REQUESTED_BY}'] ('alice' -> '')"),
        ({FILED_BY: "erin"}, f"metadata.annotations['{FILED_BY}'] ('{PORTAL[0]}' -> 'erin')"),
    ],
)
def test_a_non_admin_cannot_change_whom_a_request_is_for(kubeconfig, namespace, filed_request, annotations, shown):
    message = denial(_patch_request(kubeconfig, namespace, filed_request, "erin", "facility-users", annotations))
    assert message is not None and "ValidatingAdmissionPolicy 'analysis-budgetrequest-identity'" in message
    assert shown in message and "only admins and the operator may change them; you are 'erin'" in message
    # Her own annotations are hers to change.
    assert denial(_patch_request(kubeconfig, namespace, filed_request, "erin", "facility-users", {"note": "x"})) is None


def test_an_admin_may_correct_whom_a_request_is_for(kubeconfig, namespace, filed_request, custom):
    _patch_request(kubeconfig, namespace, filed_request, *ADMIN, {REQUESTED_BY: "alice2"})()
    stored = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "budgetrequests", filed_request)
    assert stored["metadata"]["annotations"][REQUESTED_BY] == "alice2"


# --- the policies themselves


def test_the_policies_type_check(api):
    """Every expression of the validating policies was checked against the CRDs' schemas: no warnings."""
    for name in ("analysis-environment-creation", "analysis-budgetrequest-identity"):
        assert not type_warnings(api, name), name


def test_the_local_bindings_use_the_authorization_parameters():
    bindings = list(yaml.safe_load_all((REPO / "deploy/authorization/identity-local.yaml").read_text()))
    policies = list(yaml.safe_load_all(POLICY_FILE.read_text()))
    assert sorted(b["spec"]["policyName"] for b in bindings) == sorted(p["metadata"]["name"] for p in policies)
    for binding in bindings:
        assert binding["spec"]["paramRef"] == {
            "name": PARAMETERS,
            "parameterNotFoundAction": "Deny",
        }


def _template(*arguments: str) -> list[dict]:
    output = helm("template", "aop", str(CHART), "--namespace", "ops", *arguments).stdout
    return [document for document in yaml.safe_load_all(output) if document]


def test_the_chart_renders_the_repository_policies(kubeconfig):
    repository = {doc["metadata"]["name"]: doc for doc in yaml.safe_load_all(POLICY_FILE.read_text())}
    objects = _template("--set", "watchNamespace=labs", "--api-versions", MUTATING_POLICY_API)  # as a 1.36 cluster
    for name, kind in (
        ("environment-owner", "MutatingAdmissionPolicy"),
        ("environment-creation", "ValidatingAdmissionPolicy"),
        ("budgetrequest-identity", "ValidatingAdmissionPolicy"),
    ):
        released = f"aop-analysis-operator-{name}"
        policy = find(objects, kind, released)
        assert policy["spec"] == repository[f"analysis-{name}"]["spec"]
        binding = find(objects, f"{kind}Binding", released)["spec"]
        assert binding["policyName"] == released
        assert binding["paramRef"] == {
            "name": "aop-analysis-operator-authorization",
            "parameterNotFoundAction": "Deny",
        }
        assert binding["matchResources"]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "labs"}
        assert binding.get("validationActions") == (None if kind.startswith("Mutating") else ["Deny"])
    # authorization.mutatingPolicy auto (the default) renders it where the cluster serves it; helm
    # template without a cluster knows no MutatingAdmissionPolicy (tests/versions/ installs on 1.34 and
    # 1.37); true and false decide it whatever the cluster.
    for settings, rendered in (
        (("--set", "authorization.mutatingPolicy=false", "--api-versions", MUTATING_POLICY_API), 0),
        ((), 0),
        (("--set", "authorization.mutatingPolicy=true"), 1),
    ):
        objects = _template(*settings)
        assert len([o for o in objects if o["kind"] == "MutatingAdmissionPolicy"]) == rendered, settings
        assert len([o for o in objects if o["kind"] == "MutatingAdmissionPolicyBinding"]) == rendered, settings
        assert len([o for o in objects if o["kind"] == "ValidatingAdmissionPolicy"]) == 3  # with the authorization one
    for values in ("authorization.identityPolicies=false", "authorization.enabled=false"):
        off = _template("--set", values)
        identity = [
            o for o in off if o["kind"].endswith("AdmissionPolicy") and "environments" not in o["metadata"]["name"]
        ]
        assert not identity, values
