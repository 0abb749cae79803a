"""What a facility on the oldest or the newest supported Kubernetes gets: the chart installs with its
default values, and the operator's whole path holds there as on the main release: an environment
runs and goes with its children, its owner is defaulted and a spoofed one refused, another user can
neither change nor delete it, an immutable field is refused with its reason, the API server's
policies type-check, and they hold through an uninstall and an install. Each against a real cluster
of that release (conftest.py)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import kubernetes
import pytest

from tests.integration.authorization import (
    authorization_parameters,
    denial,
    dry_run_patch,
    type_warnings,
    wait_until_allowed,
)
from tests.integration.conftest import GROUP, REPO, VERSION, Environments, OperatorProcess, impersonating
from tests.versions.conftest import Cluster
from tests.waiting import wait_for

pytestmark = pytest.mark.integration

CHART = REPO / "charts/analysis-operator"
MUTATING_POLICY = ("admissionregistration.k8s.io/v1", "MutatingAdmissionPolicy")
CREATED_BY = f"{GROUP}/created-by"
PLURAL = "analysisenvironments"


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def test_the_chart_installs_with_its_default_values(cluster: Cluster):
    """`helm install` with nothing set: the owner-stamping MutatingAdmissionPolicy is rendered where the
    cluster serves it (1.36 on) and left out before, where the webhook alone stamps (values
    authorization.mutatingPolicy: auto); every other object is accepted by this API server."""
    release = _unique("aop")
    namespace = release
    cluster.kubectl("create", "namespace", namespace)
    try:
        cluster.helm(
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
        deployment = json.loads(
            cluster.kubectl("get", "deployment", f"{release}-analysis-operator", "-n", namespace, "-o", "json").stdout
        )
        assert deployment["status"].get("readyReplicas") == 2
        manifest = cluster.helm("get", "manifest", release, "-n", namespace).stdout
        has_mutating = "kind: MutatingAdmissionPolicy\n" in manifest
        assert has_mutating == cluster.served(*MUTATING_POLICY) == (cluster.minor >= 36), (
            cluster.version,
            has_mutating,
        )
        policies = cluster.kubectl("get", "validatingadmissionpolicies", "-o", "name").stdout.split()
        assert f"validatingadmissionpolicy.admissionregistration.k8s.io/{release}-analysis-operator-environments" in (
            policies
        )
        assert sum(release in policy for policy in policies) == 3, policies  # who changes; who creates; requests
    finally:
        cluster.helm("uninstall", release, "-n", namespace, "--wait", check=False)
        cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


@pytest.fixture(scope="module")
def operator(cluster: Cluster, tmp_path_factory) -> Iterator[OperatorProcess]:
    """The local stack's way (hack/up.sh): the CRDs, the API server's policies this release serves,
    the catalogue, and the operator as a process registering its own webhooks."""
    cluster.apply(*sorted((REPO / "crds").glob("*.yaml")))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
    cluster.apply(*sorted((REPO / "deploy/authorization").glob("*.yaml")))
    cluster.apply(
        REPO / "examples/flavors.yaml", REPO / "tests/integration/flavors.yaml", REPO / "tests/integration/rbac.yaml"
    )
    log = tmp_path_factory.mktemp(f"operator-{cluster.version}") / "operator.log"
    process = OperatorProcess(cluster.kubeconfig, log, cluster_state=cluster.state)
    process.start()
    # The policies read their parameters (an AuthorizationParameters object) through an informer:
    # until it has them, every create is refused ("no params found").
    objects = kubernetes.client.CustomObjectsApi(cluster.api)
    wait_for(
        lambda: _allowed(
            lambda: objects.create_namespaced_custom_object(
                GROUP, VERSION, "default", PLURAL, _body("probe", owner="alice"), dry_run="All"
            )
        ),
        timeout=120,
        what="a create admitted by the policies",
    )
    yield process
    process.stop()


@pytest.fixture
def environments(cluster: Cluster, operator: OperatorProcess) -> Iterator[Environments]:
    core = kubernetes.client.CoreV1Api(cluster.api)
    namespace = _unique("t")
    core.create_namespace({"metadata": {"name": namespace}})
    wait_for(
        lambda: core.list_namespaced_service_account(namespace, field_selector="metadata.name=default").items,
        timeout=30,
        what="the default ServiceAccount",
    )
    yield Environments(kubernetes.client.CustomObjectsApi(cluster.api), namespace)
    core.delete_namespace(namespace, propagation_policy="Background")


def _children(cluster: Cluster, namespace: str, name: str) -> dict[str, object]:
    core = kubernetes.client.CoreV1Api(cluster.api)
    found: dict[str, object] = {}
    for kind, read in (
        ("pod", core.read_namespaced_pod),
        ("service", core.read_namespaced_service),
        ("secret", core.read_namespaced_secret),
    ):
        try:
            found[kind] = read(f"aenv-{name}", namespace)
        except kubernetes.client.ApiException as error:
            if error.status != 404:
                raise
    return found


def test_an_environment_runs_and_its_children_go_with_it(cluster: Cluster, environments: Environments):
    environments.create("lab", flavor="jupyter-basic")
    ready = environments.wait_phase("lab", "Ready", timeout=60)
    assert ready["status"]["connection"]["secretName"] == "aenv-lab"
    children = _children(cluster, environments.namespace, "lab")
    assert set(children) == {"pod", "service", "secret"}
    for child in children.values():
        assert [owner.uid for owner in child.metadata.owner_references] == [ready["metadata"]["uid"]]
    environments.delete("lab")
    wait_for(
        lambda: not environments.exists("lab") and not _children(cluster, environments.namespace, "lab"),
        timeout=60,
        what="the environment and its pod, Service and Secret gone",
    )


def _as(cluster: Cluster, user: str, group: str = "facility-users") -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(impersonating(cluster.kubeconfig, user, group))


def _allowed(call) -> bool:
    try:
        call()
        return True
    except kubernetes.client.ApiException as error:
        if "no params found" in str(error.body):
            return False
        raise


def _refusal(call) -> dict:
    with pytest.raises(kubernetes.client.ApiException) as refused:
        call()
    answer = json.loads(refused.value.body)
    assert answer["code"] == refused.value.status
    return answer


def _body(name: str, **spec: str) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AnalysisEnvironment",
        "metadata": {"name": name},
        "spec": {"flavor": "jupyter-basic", **spec},
    }


def test_the_owner_is_defaulted_and_a_spoofed_owner_refused(cluster: Cluster, environments: Environments):
    namespace = environments.namespace
    made = _as(cluster, "bob").create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _body("mine"))
    assert made["spec"]["owner"] == "bob" and made["metadata"]["annotations"][CREATED_BY] == "bob"
    answer = _refusal(
        lambda: _as(cluster, "bob").create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, _body("spoofed", owner="alice")
        )
    )
    assert answer["code"] == 403 and "is not you ('bob')" in answer["message"], answer
    assert [(cause["reason"], cause["field"]) for cause in answer["details"]["causes"]] == [("NotOwner", "spec.owner")]
    assert not environments.exists("spoofed")


def test_another_user_can_neither_change_nor_delete_it(cluster: Cluster, environments: Environments):
    namespace = environments.namespace
    environments.create("hers", flavor="jupyter-basic", owner="alice")
    before = environments.get("hers")
    bob = _as(cluster, "bob")
    changed = _refusal(
        lambda: bob.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "hers", {"spec": {"suspend": True}}
        )
    )
    deleted = _refusal(lambda: bob.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "hers"))
    for answer, verb in ((changed, "change"), (deleted, "delete")):
        assert answer["code"] == 403 and f"may {verb} this environment; you are 'bob'" in answer["message"], answer
    after = environments.get("hers")
    assert after["spec"] == before["spec"] and "deletionTimestamp" not in after["metadata"]


def test_an_immutable_field_is_refused_with_its_reason(cluster: Cluster, environments: Environments):
    environments.create("fixed", flavor="jupyter-basic")
    answer = _refusal(lambda: environments.patch_spec("fixed", flavor="jupyter-gpu"))
    assert answer["code"] == 422 and "spec.flavor is immutable" in answer["message"], answer
    assert environments.get("fixed")["spec"]["flavor"] == "jupyter-basic"


def test_the_policies_type_check(cluster: Cluster, operator: OperatorProcess):
    """The API server checks every validating policy's CEL against the CRDs' schemas as this release
    knows them (a field or a CEL function it lacks is a warning there, and an error on requests)."""
    for name in (
        "analysis-environment-authorization",
        "analysis-environment-creation",
        "analysis-budgetrequest-identity",
    ):
        assert not type_warnings(cluster.api, name), (cluster.version, name)


def test_the_policies_hold_after_an_uninstall_and_an_install(cluster: Cluster, environments: Environments):
    """kube-apiserver before 1.37 stops its cache of a built-in parameter kind for good once no binding
    uses it (kubernetes#133827). With the parameters in a ConfigMap, deleting the bindings and the
    parameters and applying them again (`helm uninstall`, `helm install`) left every create, change and
    delete of an environment refused with "no params found" until the API server restarted, and a
    parameter changed later was not seen. The parameters are a custom resource now, which that cache
    does not hold: both are checked on every supported release."""
    namespace, local = environments.namespace, REPO / "deploy/authorization"
    environments.create("hers", flavor="jupyter-basic", owner="alice")
    bob_suspends = dry_run_patch(
        impersonating(cluster.kubeconfig, "bob"), namespace, "hers", {"spec": {"suspend": True}}
    )
    refused = "may change this environment; you are 'bob'"
    assert refused in (denial(bob_suspends) or "")
    cluster.delete(local / "local.yaml", local / "identity-local.yaml")  # the bindings and the parameters
    wait_until_allowed(bob_suspends, "the API server without the binding (its policy source refreshed)")
    cluster.apply(local / "local.yaml", local / "identity-local.yaml")
    wait_for(
        lambda: refused in (denial(bob_suspends) or ""), timeout=30, what=lambda: f"bob refused: {denial(bob_suspends)}"
    )
    with authorization_parameters(kubernetes.client.CoreV1Api(cluster.api), trustedUsers="bob"):
        wait_until_allowed(bob_suspends, "a parameter changed after the install seen: bob trusted")
    wait_for(lambda: refused in (denial(bob_suspends) or ""), timeout=30, what="bob refused again")
    made = _as(cluster, "bob").create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _body("his"))
    assert made["metadata"]["annotations"][CREATED_BY] == "bob"
