"""How the operator's client reports a refusal (infra/kube.py): pure, no server."""

from __future__ import annotations

import json

import pytest
from kubernetes.client.rest import ApiException

from analysis_operator.infra.kube import REFUSAL_CHARACTERS, KubeError, cluster_refusal, namespace_terminating

TERMINATING = json.dumps(
    {
        "kind": "Status",
        "status": "Failure",
        "message": "unable to create new content in namespace t because it is being terminated",
        "reason": "Forbidden",
        "code": 403,
    }
)


@pytest.mark.parametrize(
    "error, terminating",
    [
        (KubeError("POST", "/api/v1/namespaces/t/pods", 403, "Forbidden", TERMINATING), True),
        (ApiException(status=403, reason="Forbidden", body=TERMINATING), True),  # the official client's own
        (KubeError("POST", "/api/v1/namespaces/t/pods", 403, "Forbidden", '{"message": "RBAC: denied"}'), False),
        (KubeError("POST", "/api/v1/namespaces/t/pods", 404, "Not Found", "namespace being terminated"), False),
        (RuntimeError("being terminated"), False),
    ],
)
def test_only_the_refusal_of_a_namespace_being_deleted_counts_as_one(error, terminating):
    assert namespace_terminating(error) is terminating


def test_a_refusal_in_the_log_names_the_call_and_status_never_the_answers_words():
    secret_text = "Invalid value: s3cr3t-token"
    error = KubeError("POST", "/api/v1/namespaces/t/secrets", 422, "Unprocessable Entity", secret_text)
    assert repr(error) == "KubeError(422 Unprocessable Entity: POST /api/v1/namespaces/t/secrets)"
    assert isinstance(error, ApiException) and error.status == 422  # callers catch the official client's type
    assert "s3cr3t" not in repr(error)
    assert str(error) == repr(error)  # kopf logs str(): a traceback's last line says no more


def status(code: int, message: str) -> str:
    return json.dumps({"kind": "Status", "status": "Failure", "message": message, "code": code})


PSA = 'pods "aenv-x" is forbidden: violates PodSecurity "restricted:latest": restricted volume types'
QUOTA = 'pods "aenv-x" is forbidden: exceeded quota: compute, requested: limits.memory=16Gi'
RBAC = 'pods is forbidden: User "system:serviceaccount:o:o" cannot create resource "pods" in the namespace "t"'
INVALID = 'Pod "aenv-x" is invalid: spec.containers[0].image: Required value'


@pytest.mark.parametrize(
    "code, body, said",
    [
        (403, status(403, PSA), PSA),  # Pod Security
        (403, status(403, QUOTA), QUOTA),  # a ResourceQuota (a LimitRange, a policy, a webhook: the same)
        (403, status(403, RBAC), RBAC),  # the operator's own rights: the platform team's to fix, said too
        (422, status(422, INVALID), INVALID),  # validation
        (403, "<html>proxy says no</html>", "403 Forbidden"),  # not the API server's Status: the code only
        (403, TERMINATING, ""),  # its namespace is being deleted: the environment goes with it
        (404, status(404, "not found"), ""),
        (409, status(409, "already exists"), ""),
        (429, status(429, "too many requests"), ""),  # the server busy or away: retried as before
        (500, status(500, "etcd timeout"), ""),
    ],
)
def test_a_rule_of_the_cluster_that_refused_is_said_in_its_own_words_and_nothing_else_is(code, body, said):
    error = KubeError("POST", "/api/v1/namespaces/t/pods", code, "Forbidden" if code == 403 else "x", body)
    assert cluster_refusal(error) == said
    assert cluster_refusal(ApiException(status=code, reason="Forbidden", body=body)) == said  # the official client's
    assert cluster_refusal(RuntimeError(PSA)) == ""


def test_a_long_refusal_is_cut_to_what_status_and_an_event_hold():
    error = KubeError("POST", "/api/v1/namespaces/t/pods", 403, "Forbidden", status(403, "denied: " + "x" * 5000))
    assert len(cluster_refusal(error)) == REFUSAL_CHARACTERS and cluster_refusal(error).startswith("denied: x")


def test_a_bearer_token_is_sent_as_the_loaders_store_it_and_read_again_when_refreshed():
    import kubernetes

    from analysis_operator.infra.kube import auth_headers

    configuration = kubernetes.client.Configuration()
    assert auth_headers(configuration) == {}  # client certificates: nothing in the headers
    configuration.api_key["BearerToken"] = "Bearer first"  # where the in-cluster and kubeconfig loaders put it
    assert auth_headers(configuration) == {"authorization": "Bearer first"}
    configuration.refresh_api_key_hook = lambda c: c.api_key.update(BearerToken="Bearer rotated")
    assert auth_headers(configuration) == {"authorization": "Bearer rotated"}
