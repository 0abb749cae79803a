"""How the operator's client reports a refusal (infra/kube.py): pure, no server."""

from __future__ import annotations

import json

import pytest
from kubernetes.client.rest import ApiException

from analysis_operator.infra.kube import KubeError, namespace_terminating

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


def test_a_bearer_token_is_sent_as_the_loaders_store_it_and_read_again_when_refreshed():
    import kubernetes

    from analysis_operator.infra.kube import auth_headers

    configuration = kubernetes.client.Configuration()
    assert auth_headers(configuration) == {}  # client certificates: nothing in the headers
    configuration.api_key["BearerToken"] = "Bearer first"  # where the in-cluster and kubeconfig loaders put it
    assert auth_headers(configuration) == {"authorization": "Bearer first"}
    configuration.refresh_api_key_hook = lambda c: c.api_key.update(BearerToken="Bearer rotated")
    assert auth_headers(configuration) == {"authorization": "Bearer rotated"}
