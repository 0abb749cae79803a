"""The real API server refuses bad manifests before any operator code runs."""
from __future__ import annotations

import json

import kubernetes
import pytest

from tests.integration.conftest import GROUP, VERSION


def create(custom, plural: str, body: dict, namespace: str | None = None) -> None:
    body = {"apiVersion": f"{GROUP}/{VERSION}", **body}
    if namespace:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, body, field_validation="Strict")
    else:
        custom.create_cluster_custom_object(GROUP, VERSION, plural, body, field_validation="Strict")


ENVIRONMENT_CASES = [
    ("missing flavor", {"owner": "alice"}, "spec.flavor: Required value"),
    # A missing owner is not refused: the mutating webhook makes the requester the owner
    # (test_identity.py); the schema still refuses a malformed one ("shell in owner").
    ("bad lifetime", {"owner": "alice", "flavor": "jupyter-basic", "lifetime": "8 hours"}, "spec.lifetime"),
    ("unknown field", {"owner": "alice", "flavor": "jupyter-basic", "gpus": 2}, 'unknown field "spec.gpus"'),
    ("mount outside /data", {"owner": "alice", "flavor": "jupyter-basic",
                             "datasets": [{"name": "d1", "mountPath": "/data/../etc"}]}, "spec.datasets[0].mountPath"),
    ("duplicate dataset", {"owner": "alice", "flavor": "jupyter-basic",
                           "datasets": [{"name": "d1"}, {"name": "d1"}]}, "Duplicate value"),
    ("shell in owner", {"owner": "alice; rm -rf /", "flavor": "jupyter-basic"}, "spec.owner"),
]


@pytest.mark.parametrize("case, spec, words", ENVIRONMENT_CASES, ids=[case[0] for case in ENVIRONMENT_CASES])
def test_bad_environment_is_refused_naming_the_field(custom, namespace, case, spec, words):
    with pytest.raises(kubernetes.client.ApiException) as refused:
        create(custom, "analysisenvironments",
               {"kind": "AnalysisEnvironment", "metadata": {"name": "bad"}, "spec": spec}, namespace)
    assert refused.value.status in (400, 422) and words in json.loads(refused.value.body)["message"]


def test_environment_name_too_long_for_its_children_is_refused(custom, namespace):
    with pytest.raises(kubernetes.client.ApiException) as refused:
        create(custom, "analysisenvironments", {"kind": "AnalysisEnvironment", "metadata": {"name": "x" * 59},
                                                "spec": {"owner": "alice", "flavor": "jupyter-basic"}}, namespace)
    assert refused.value.status == 422 and "at most 58 characters" in refused.value.body


FLAVOR_CASES = [
    ("negative cpu", {"backend": "kubernetes", "image": "a/b:1", "resources": {"cpu": -1, "memory": "1Gi"}},
     "spec.resources.cpu"),
    ("zero cpu", {"backend": "kubernetes", "image": "a/b:1", "resources": {"cpu": 0, "memory": "1Gi"}},
     "spec.resources.cpu"),
    ("bad memory", {"backend": "kubernetes", "image": "a/b:1", "resources": {"cpu": 1, "memory": "lots"}},
     "spec.resources.memory"),
    ("unknown backend", {"backend": "mainframe", "resources": {"cpu": 1, "memory": "1Gi"}}, "spec.backend"),
    ("kubernetes without image", {"backend": "kubernetes", "resources": {"cpu": 1, "memory": "1Gi"}},
     "a kubernetes flavor needs spec.image"),
    ("slurm without partition", {"backend": "slurm", "resources": {"cpu": 1, "memory": "1Gi"}},
     "a slurm flavor needs spec.slurm.partition"),
    ("bad max lifetime", {"backend": "kubernetes", "image": "a/b:1", "maxLifetime": "forever",
                          "resources": {"cpu": 1, "memory": "1Gi"}}, "spec.maxLifetime"),
]


@pytest.mark.parametrize("case, spec, words", FLAVOR_CASES, ids=[case[0] for case in FLAVOR_CASES])
def test_bad_flavor_is_refused_naming_the_field(custom, kubeconfig, case, spec, words):
    with pytest.raises(kubernetes.client.ApiException) as refused:
        create(custom, "environmentflavors", {"kind": "EnvironmentFlavor", "metadata": {"name": "bad-flavor"},
                                              "spec": spec})
    assert refused.value.status in (400, 422) and words in json.loads(refused.value.body)["message"]
