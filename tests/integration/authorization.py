"""The local stack's authorization policy (deploy/authorization/): its parameters changed for a
test, and waiting until the API server acts on the change (it reads them through an informer)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator

import kubernetes

from tests.integration.conftest import GROUP, VERSION
from tests.waiting import wait_for

POLICY = "analysis-environment-authorization"
PARAMETERS = POLICY  # the AuthorizationParameters object deploy/authorization/local.yaml makes (cluster-scoped)
PARAMETERS_PLURAL = "authorizationparameters"
PLURAL = "analysisenvironments"


def read_parameters(api: kubernetes.client.ApiClient) -> dict:
    return kubernetes.client.CustomObjectsApi(api).get_cluster_custom_object(
        GROUP, VERSION, PARAMETERS_PLURAL, PARAMETERS
    )


def _patch_parameters(api: kubernetes.client.ApiClient, data: dict[str, str | None]) -> None:
    kubernetes.client.CustomObjectsApi(api).patch_cluster_custom_object(
        GROUP, VERSION, PARAMETERS_PLURAL, PARAMETERS, {"data": data}
    )


@contextlib.contextmanager
def authorization_parameters(core: kubernetes.client.CoreV1Api, **data: str) -> Iterator[dict[str, str]]:
    """Run with these keys of the policy's parameters changed; the old values come back after."""
    before = dict(read_parameters(core.api_client).get("data") or {})
    _patch_parameters(core.api_client, dict(data))
    try:
        yield before
    finally:
        _patch_parameters(core.api_client, {key: before.get(key) for key in data})


def denial(call: Callable[[], object]) -> str | None:
    """The refusal message for this call, or None if it was allowed. The policy's refusals are 403
    (reason Forbidden); the API server's own (its parameters missing) 422."""
    try:
        call()
    except kubernetes.client.ApiException as error:
        if error.status not in (403, 422):
            raise
        return json.loads(error.body)["message"]
    return None


def wait_until_allowed(call: Callable[[], object], what: str, timeout: float = 10) -> None:
    """For a call a parameter change is about to allow (e.g. a server-side dry run)."""
    wait_for(lambda: denial(call) is None, timeout=timeout, what=what)


def dry_run_patch(client: kubernetes.client.ApiClient, namespace: str, name: str, body: dict) -> Callable[[], object]:
    api = kubernetes.client.CustomObjectsApi(client)
    return lambda: api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, body, dry_run="All")


@contextlib.contextmanager
def operator_identity(
    core: kubernetes.client.CoreV1Api,
    custom: kubernetes.client.CustomObjectsApi,
    kubeconfig: str,
    username: str,
    namespace: str,
) -> Iterator[None]:
    """The policy takes `username` for the operator's (a chart ServiceAccount a test runs the
    operator as) until the end of the block: it may then add and remove its finalizer."""
    current = (read_parameters(core.api_client).get("data") or {}).get("operatorUsernames", "")
    with authorization_parameters(core, operatorUsernames=",".join(filter(None, [current, username]))):
        # Wait until the API server reads the new parameters: a dry run of what the operator does first.
        probe = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "AnalysisEnvironment",
            "metadata": {"name": "authorization-probe"},
            "spec": {"owner": "alice", "flavor": "jupyter-basic"},
        }
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, probe)
        try:
            acting = kubernetes.config.new_client_from_config(config_file=kubeconfig)
            acting.default_headers["Impersonate-User"] = username
            wait_until_allowed(
                dry_run_patch(
                    acting, namespace, "authorization-probe", {"metadata": {"finalizers": [f"{GROUP}/finalizer"]}}
                ),
                f"the policy to take {username} for the operator",
            )
        finally:
            custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "authorization-probe")
        yield


def type_warnings(api: kubernetes.client.ApiClient, name: str) -> list[tuple[str, str]]:
    """The API server's type-checking warnings for a validating policy's expressions against the
    CRDs' schemas (status.typeChecking), once it has checked the policy's current generation."""
    admission = kubernetes.client.AdmissionregistrationV1Api(api)

    def checked():
        policy = admission.read_validating_admission_policy(name)
        status = policy.status
        return policy if status and status.observed_generation == policy.metadata.generation else None

    policy = wait_for(checked, timeout=30, what=f"the API server to type-check {name}")
    warnings = (policy.status.type_checking.expression_warnings or []) if policy.status.type_checking else []
    return [(warning.field_ref, warning.warning) for warning in warnings]
