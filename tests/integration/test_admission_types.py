"""Input of the wrong type, on the real API server with the operator's webhooks: the mutating webhook
sees a create before the schema is checked, and leaves such a field to it. The API server answers
with its own 422 naming the field, never a 500 from the webhook (which names none, and counts as a
webhook error: AnalysisWebhookErrors)."""

from __future__ import annotations

import json

import kubernetes
import pytest

from tests.integration.test_datasets import create_as

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    "spec, field, words",
    [
        ({"owner": "alice", "flavor": ["jupyter-basic"]}, "spec.flavor", "must be of type string"),
        ({"owner": "alice", "flavor": {"name": "jupyter-basic"}}, "spec.flavor", "must be of type string"),
        ({"owner": "alice", "datasets": 5}, "spec.datasets", "must be of type array"),
    ],
    ids=["flavor as a list", "flavor as an object", "datasets as a number"],
)
def test_a_field_of_the_wrong_type_is_refused_by_the_schema_naming_it(
    kubeconfig, namespace, operator, spec, field, words
):
    with pytest.raises(kubernetes.client.ApiException) as refused:
        create_as(kubeconfig, "alice", namespace, "typed", **spec)
    body = json.loads(refused.value.body)
    assert refused.value.status == 422 and body["reason"] == "Invalid", body
    assert field in body["message"] and words in body["message"], body["message"]
    assert field in [cause.get("field") for cause in body["details"]["causes"]]
    assert "webhook" not in body["message"]  # the schema's answer, not the webhook's
