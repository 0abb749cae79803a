"""Who may change or delete an AnalysisEnvironment after it was created: the owner, the portal
acting for the owner, admins and the operator; the operator's labels, annotations and finalizers
only the operator and admins. Enforced by the API server itself with the ValidatingAdmissionPolicy
in deploy/authorization/ (impersonated users, RBAC on: every refusal here comes from the policy,
since RBAC lets facility users patch and delete environments)."""

from __future__ import annotations

import uuid

import kubernetes
import pytest

from tests.integration.authorization import (
    PARAMETERS,
    PARAMETERS_PLURAL,
    PLURAL,
    POLICY,
    authorization_parameters,
    denial,
    dry_run_patch,
    read_parameters,
    type_warnings,
    wait_until_allowed,
)
from tests.integration.conftest import GROUP, VERSION, Environments, impersonating, kubectl
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

FINALIZER = f"{GROUP}/finalizer"  # the operator's (kopf's) finalizer
CREATED_BY = f"{GROUP}/created-by"
OPERATOR_LABEL = f"{GROUP}/backend"  # the operator sets it on Slurm and VM environments: kopf's
# finalizer then stays until the job or VM is gone
OWNER_MAY = "only its owner 'alice', the portal acting for that owner, and admins may"
OPERATOR_ONLY = "only the operator and admins may add, change or remove the operator's labels, annotations"
PORTAL = ("system:serviceaccount:portal:backend", "analysis-portal")
ADMIN = ("dora", "analysis-admins")
NAMESPACE_CONTROLLER = "system:serviceaccount:kube-system:namespace-controller"
GARBAGE_COLLECTOR = "system:serviceaccount:kube-system:generic-garbage-collector"


class Acting:
    """AnalysisEnvironments in one namespace, as one (impersonated) identity."""

    def __init__(self, client: kubernetes.client.ApiClient, namespace: str) -> None:
        self.client, self.api, self.namespace = client, kubernetes.client.CustomObjectsApi(client), namespace

    def patch(self, name: str, body: dict) -> dict:
        return self.api.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name, body)

    def delete(self, name: str, propagation: str | None = None) -> None:
        self.api.delete_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, propagation_policy=propagation
        )


@pytest.fixture
def as_user(kubeconfig, namespace):
    def make(user: str, group: str = "facility-users") -> Acting:
        return Acting(impersonating(kubeconfig, user, group), namespace)

    return make


@pytest.fixture
def admins_may_edit(api, namespace):
    """analysis-admins get the environment role in this namespace (with the chart, a facility binds
    its -user role to them); without it RBAC, not the policy, would refuse them."""
    kubernetes.client.RbacAuthorizationV1Api(api).create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "analysis-admins"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "analysis-environment-user",
            },
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": ADMIN[1]}],
        },
    )


@pytest.fixture
def lab(environments, custom, namespace) -> dict:
    """alice's running environment, with her own label, and the operator's label and finalizer as a
    Slurm or VM environment carries them (set here as the operator would: a pod needs neither)."""
    environments.create("lab", flavor="jupyter-basic", owner="alice")
    environments.wait_phase("lab", "Ready", timeout=60)
    custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        "lab",
        {
            "metadata": {
                "labels": {"team": "xray", OPERATOR_LABEL: "kubernetes"},
                "annotations": {"note": "beamtime 42"},
            }
        },
    )
    wait_for(lambda: FINALIZER in _finalizers(environments.get("lab")), timeout=30, what="kopf's finalizer on lab")
    environment = environments.get("lab")
    assert environment["metadata"]["annotations"][CREATED_BY] == "admin"
    return environment


def _finalizers(environment: dict) -> list[str]:
    return list(environment["metadata"].get("finalizers") or [])


# --- bob, another facility user, may do nothing to alice's environment.

ATTACKS = {
    "suspend": lambda env: {"spec": {"suspend": True}},
    "shorten the lifetime": lambda env: {"spec": {"lifetime": "10s"}},
    "overwrite her label": lambda env: {"metadata": {"labels": {"team": "bob-was-here"}}},
    "overwrite created-by": lambda env: {"metadata": {"annotations": {CREATED_BY: "bob"}}},
    "add a finalizer": lambda env: {"metadata": {"finalizers": _finalizers(env) + ["bob.example.org/hold"]}},
    "remove the operator's finalizer": lambda env: {
        "metadata": {"finalizers": [f for f in _finalizers(env) if f != FINALIZER]}
    },
    "remove the operator's label": lambda env: {"metadata": {"labels": {OPERATOR_LABEL: None}}},
}


@pytest.mark.parametrize("attack", ATTACKS)
def test_another_user_cannot_change_her_environment(lab, as_user, environments, attack):
    message = denial(lambda: as_user("bob").patch("lab", ATTACKS[attack](lab)))
    assert message is not None, f"bob could {attack}"
    assert f"{OWNER_MAY} change this environment; you are 'bob'" in message, message
    after = environments.get("lab")
    assert after["spec"] == lab["spec"]
    assert after["metadata"]["labels"] == lab["metadata"]["labels"]
    assert after["metadata"]["annotations"][CREATED_BY] == "admin"
    assert _finalizers(after) == _finalizers(lab)


def test_another_user_cannot_delete_her_environment(lab, as_user, environments):
    message = denial(lambda: as_user("bob").delete("lab"))
    assert message is not None and f"{OWNER_MAY} delete this environment; you are 'bob'" in message, message
    assert "deletionTimestamp" not in environments.get("lab")["metadata"]


# --- alice, the owner.


def test_the_owner_suspends_resumes_and_labels_her_environment(lab, as_user, environments):
    alice = as_user("alice")
    alice.patch("lab", {"spec": {"suspend": True}})
    environments.wait_phase("lab", "Suspended", timeout=60)
    alice.patch("lab", {"spec": {"suspend": False, "lifetime": "2h"}})
    environments.wait_phase("lab", "Ready", timeout=60)
    alice.patch("lab", {"metadata": {"labels": {"team": "saxs", "course": "2026"}, "annotations": {"note": None}}})
    metadata = environments.get("lab")["metadata"]
    assert (metadata["labels"]["team"], metadata["labels"]["course"]) == ("saxs", "2026")
    assert metadata["labels"][OPERATOR_LABEL] == "kubernetes" and "note" not in metadata["annotations"]


def test_the_owner_deletes_her_environment(lab, as_user, environments):
    as_user("alice").delete("lab")
    wait_for(lambda: not environments.exists("lab"), timeout=60, what="lab deleted (the operator's finalizer released)")


def test_the_token_secret_goes_with_a_held_environment_without_the_garbage_collector(
    lab, as_user, environments, core, namespace
):
    """An environment the operator's finalizer holds (a Slurm job's or VM's: lab carries its label) takes
    its token Secret with it before the finalizer goes. It is not left to the garbage collector alone,
    which misses the deletion of a kind it has not discovered yet (the first seconds after the CRD is
    installed) and then kept the access token behind its environment. Here the Secret's owner reference
    is removed first, as if the collector would never act."""
    core.patch_namespaced_secret("aenv-lab", namespace, [{"op": "remove", "path": "/metadata/ownerReferences"}])
    assert not core.read_namespaced_secret("aenv-lab", namespace).metadata.owner_references
    as_user("alice").delete("lab")
    wait_for(lambda: not environments.exists("lab"), timeout=60, what="lab deleted (the operator's finalizer released)")
    with pytest.raises(kubernetes.client.ApiException) as gone:
        core.read_namespaced_secret("aenv-lab", namespace)
    assert gone.value.status == 404


def test_the_owner_deletes_in_the_foreground(lab, as_user, environments):
    """The API server adds foregroundDeletion for her (that is part of her DELETE, not an UPDATE the
    policy would refuse her), and the garbage collector removes it once the pod is gone."""
    as_user("alice").delete("lab", propagation="Foreground")
    wait_for(lambda: not environments.exists("lab"), timeout=60, what="lab deleted in the foreground")


ALICE_MAY_NOT = {
    "add an operator label": (
        lambda env: {"metadata": {"labels": {f"{GROUP}/environment": "other"}}},
        f"label '{GROUP}/environment'",
    ),
    "change an operator label": (
        lambda env: {"metadata": {"labels": {OPERATOR_LABEL: "slurm"}}},
        f"label '{OPERATOR_LABEL}'",
    ),
    "remove an operator label": (
        lambda env: {"metadata": {"labels": {OPERATOR_LABEL: None}}},
        f"label '{OPERATOR_LABEL}'",
    ),
    "change the owner label": (
        lambda env: {"metadata": {"labels": {f"{GROUP}/owner": "bob"}}},
        f"label '{GROUP}/owner'",
    ),
    "add a dataset label": (  # the selection labels (dataset.analysis.panosc.eu/<dataset>)
        lambda env: {"metadata": {"labels": {f"dataset.{GROUP}/secret": "true"}}},
        f"label 'dataset.{GROUP}/secret'",
    ),
    "add managed-by": (
        lambda env: {"metadata": {"labels": {"app.kubernetes.io/managed-by": "analysis-operator"}}},
        "label 'app.kubernetes.io/managed-by'",
    ),
    "change created-by": (
        lambda env: {"metadata": {"annotations": {CREATED_BY: "alice"}}},
        f"annotation '{CREATED_BY}'",
    ),
    "overwrite kopf's record": (
        lambda env: {"metadata": {"annotations": {f"{GROUP}/last-handled-configuration": "{}"}}},
        f"annotation '{GROUP}/last-handled-configuration'",
    ),
    "add a finalizer": (
        lambda env: {"metadata": {"finalizers": _finalizers(env) + ["alice.example.org/keep"]}},
        "finalizer 'alice.example.org/keep' added",
    ),
    "remove the operator's finalizer": (
        lambda env: {"metadata": {"finalizers": [f for f in _finalizers(env) if f != FINALIZER]}},
        f"finalizer '{FINALIZER}' removed",
    ),
}


@pytest.mark.parametrize("change", ALICE_MAY_NOT)
def test_the_owner_cannot_touch_the_operators_metadata(lab, as_user, environments, change):
    patch, named = ALICE_MAY_NOT[change]
    message = denial(lambda: as_user("alice").patch("lab", patch(lab)))
    assert message is not None, f"alice could {change}"
    assert OPERATOR_ONLY in message and named in message and "you are 'alice'" in message, message
    after = environments.get("lab")["metadata"]
    assert (after["labels"], after["annotations"][CREATED_BY], _finalizers({"metadata": after})) == (
        lab["metadata"]["labels"],
        "admin",
        _finalizers(lab),
    )


# --- the portal, admins, the operator.


def test_the_portal_acts_for_the_owner(lab, as_user, environments):
    portal = as_user(*PORTAL)
    portal.patch("lab", {"spec": {"suspend": True}, "metadata": {"labels": {"team": "portal-set"}}})
    environments.wait_phase("lab", "Suspended", timeout=60)
    message = denial(lambda: portal.patch("lab", {"metadata": {"annotations": {CREATED_BY: "alice"}}}))
    assert message is not None and OPERATOR_ONLY in message and f"you are '{PORTAL[0]}'" in message, message
    portal.delete("lab")
    wait_for(lambda: not environments.exists("lab"), timeout=60, what="lab deleted by the portal")


def test_an_admin_may_do_everything(lab, as_user, environments, admins_may_edit):
    dora = as_user(*ADMIN)
    dora.patch(
        "lab",
        {
            "spec": {"lifetime": "1h"},
            "metadata": {
                "labels": {f"{GROUP}/audited": "yes"},
                "annotations": {CREATED_BY: "dora"},
                "finalizers": _finalizers(lab) + ["admin.example.org/hold"],
            },
        },
    )
    after = environments.get("lab")
    assert after["spec"]["lifetime"] == "1h" and after["metadata"]["labels"][f"{GROUP}/audited"] == "yes"
    assert after["metadata"]["annotations"][CREATED_BY] == "dora" and "admin.example.org/hold" in _finalizers(after)
    dora.patch("lab", {"metadata": {"finalizers": [f for f in _finalizers(after) if f != "admin.example.org/hold"]}})
    dora.delete("lab")
    wait_for(lambda: not environments.exists("lab"), timeout=60, what="lab deleted by an admin")


def test_refused_while_the_operator_is_down(lab, as_user, environments, operator):
    """The API server decides alone: no operator replica needs to answer."""
    operator.stop()
    try:
        assert denial(lambda: as_user("bob").patch("lab", {"spec": {"suspend": True}})) is not None
        as_user("alice").patch("lab", {"spec": {"suspend": True}})
        assert environments.get("lab")["spec"]["suspend"] is True
    finally:
        operator.start()
    environments.wait_phase("lab", "Suspended", timeout=60)


# --- Kubernetes' own controllers keep working.


def test_a_deleted_namespace_takes_its_environments_with_it(core, custom, operator):
    """The local stack's controller-manager acts as an admin; the test after this one checks the
    identities real clusters give it."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    environments = Environments(custom, name)
    wait_for(lambda: _has_default_service_account(core, name), timeout=30, what="default ServiceAccount")
    environments.create("lab", flavor="jupyter-basic", owner="alice")
    environments.wait_phase("lab", "Ready", timeout=60)
    core.delete_namespace(name)
    wait_for(
        lambda: not _namespace_exists(core, name),
        timeout=90,
        what=lambda: f"namespace {name} gone: {kubectl('get', 'aenv', '-n', name, '-o', 'yaml', check=False).stdout}",
    )


def test_the_controllers_real_identities(lab, as_user, environments, custom, namespace):
    """As kube-controller-manager runs in real clusters (--use-service-account-credentials): the
    namespace controller and the garbage collector delete, and the garbage collector removes its own
    finalizers, but neither may change the spec or the operator's metadata."""
    collector = as_user(GARBAGE_COLLECTOR, "system:serviceaccounts")
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "lab", {"metadata": {"finalizers": _finalizers(lab) + ["orphan"]}}
    )  # as if deleted with --cascade=orphan
    for refused in (
        {"spec": {"suspend": True}},
        {"metadata": {"labels": {OPERATOR_LABEL: None}}},
        {"metadata": {"finalizers": ["orphan"]}},
    ):  # the operator's finalizer removed
        message = denial(lambda: collector.patch("lab", refused))
        assert message is not None, f"the garbage collector could {refused}"
    collector.patch("lab", {"metadata": {"finalizers": _finalizers(lab)}})  # removes only "orphan"
    assert _finalizers(environments.get("lab")) == _finalizers(lab)
    as_user(NAMESPACE_CONTROLLER, "system:serviceaccounts").delete("lab")
    wait_for(lambda: not environments.exists("lab"), timeout=60, what="lab deleted by the namespace controller")


def _namespace_exists(core, name: str) -> bool:
    try:
        core.read_namespace(name)
        return True
    except kubernetes.client.ApiException as error:
        if error.status != 404:
            raise
        return False


def _has_default_service_account(core, namespace: str) -> bool:
    try:
        core.read_namespaced_service_account("default", namespace)
        return True
    except kubernetes.client.ApiException:
        return False


# --- configuration: the parameters, and the policy itself.


def test_a_username_prefix_is_stripped(lab, as_user, core, namespace, kubeconfig):
    with authorization_parameters(core, usernamePrefix="oidc:"):
        wait_until_allowed(
            dry_run_patch(impersonating(kubeconfig, "oidc:alice"), namespace, "lab", {"spec": {"suspend": True}}),
            "oidc:alice to be alice",
        )
        as_user("oidc:alice").patch("lab", {"spec": {"suspend": True}})
        message = denial(lambda: as_user("oidc:bob").patch("lab", {"spec": {"suspend": False}}))
        assert message is not None and f"{OWNER_MAY} change this environment; you are 'bob'" in message, message


def test_without_its_parameters_the_policy_refuses(lab, as_user, core, namespace, kubeconfig):
    """Fail closed: while the binding's parameters are missing, not even the owner may change anything."""
    custom = kubernetes.client.CustomObjectsApi(core.api_client)
    saved = read_parameters(core.api_client)
    custom.delete_cluster_custom_object(GROUP, VERSION, PARAMETERS_PLURAL, PARAMETERS)
    alice_suspends = dry_run_patch(impersonating(kubeconfig, "alice"), namespace, "lab", {"spec": {"suspend": True}})
    try:
        wait_for(
            lambda: "no params found" in (denial(alice_suspends) or ""),
            timeout=10,
            what="the policy to refuse without parameters",
        )
    finally:
        metadata = saved["metadata"]
        custom.create_cluster_custom_object(
            GROUP,
            VERSION,
            PARAMETERS_PLURAL,
            {
                "apiVersion": saved["apiVersion"],
                "kind": saved["kind"],
                "metadata": {
                    "name": PARAMETERS,
                    "labels": metadata.get("labels"),
                    "annotations": metadata.get("annotations"),
                },
                "data": saved["data"],
            },
        )
    wait_until_allowed(alice_suspends, "alice allowed again with the parameters back")


def test_the_policy_type_checks(api):
    """Every expression was checked against the CRD's schema by the API server: no warnings."""
    assert not type_warnings(api, POLICY)
