"""The real API server refuses bad manifests before any operator code runs."""

from __future__ import annotations

import json

import kubernetes
import pytest

from analysis_operator.engine.routes import CLOSED_PAGE
from tests.integration.conftest import GROUP, VERSION, kubectl


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
    (
        "bad lifetime",
        {"owner": "alice", "flavor": "jupyter-basic", "lifetime": "8 hours"},
        'spec.lifetime: Invalid value: "8 hours": use a duration such as 8h, 90m or 1d12h',
    ),
    # Before: accepted by the schema, then "Python int too large to convert to C int" from the webhook.
    (
        "huge lifetime",
        {"owner": "alice", "flavor": "jupyter-basic", "lifetime": "9999999999d"},
        "a lifetime must be at most 366d",
    ),
    (
        "lifetime over the ceiling",
        {"owner": "alice", "flavor": "jupyter-basic", "lifetime": "366d1s"},
        "a lifetime must be at most 366d",
    ),
    # Before: accepted, and run with the flavor's 8h as if no lifetime had been given.
    (
        "zero lifetime",
        {"owner": "alice", "flavor": "jupyter-basic", "lifetime": "0s"},
        "a lifetime must be at least 1s: zero is no duration",
    ),
    ("empty lifetime", {"owner": "alice", "flavor": "jupyter-basic", "lifetime": ""}, "use a duration such as"),
    ("unknown field", {"owner": "alice", "flavor": "jupyter-basic", "gpus": 2}, 'unknown field "spec.gpus"'),
    (
        "mount outside /data",
        {"owner": "alice", "flavor": "jupyter-basic", "datasets": [{"name": "d1", "mountPath": "/data/../etc"}]},
        "spec.datasets[0].mountPath",
    ),
    (
        "duplicate dataset",
        {"owner": "alice", "flavor": "jupyter-basic", "datasets": [{"name": "d1"}, {"name": "d1"}]},
        "Duplicate value",
    ),
    ("shell in owner", {"owner": "alice; rm -rf /", "flavor": "jupyter-basic"}, "spec.owner"),
]


@pytest.mark.parametrize("case, spec, words", ENVIRONMENT_CASES, ids=[case[0] for case in ENVIRONMENT_CASES])
def test_bad_environment_is_refused_naming_the_field(custom, namespace, case, spec, words):
    with pytest.raises(kubernetes.client.ApiException) as refused:
        create(
            custom,
            "analysisenvironments",
            {"kind": "AnalysisEnvironment", "metadata": {"name": "bad"}, "spec": spec},
            namespace,
        )
    assert refused.value.status in (400, 422) and words in json.loads(refused.value.body)["message"]


def test_environment_name_too_long_for_its_children_is_refused(custom, namespace):
    with pytest.raises(kubernetes.client.ApiException) as refused:
        create(
            custom,
            "analysisenvironments",
            {
                "kind": "AnalysisEnvironment",
                "metadata": {"name": "x" * 59},
                "spec": {"owner": "alice", "flavor": "jupyter-basic"},
            },
            namespace,
        )
    assert refused.value.status == 422 and "at most 58 characters" in refused.value.body


def test_the_name_of_the_namespaces_closed_page_is_refused(custom, namespace):
    """An environment's route is aenv-<name>; the namespace's page for environments that are not open
    is the HTTPRoute aenv-closed: an environment named `closed` would replace it (or be replaced)."""
    with pytest.raises(kubernetes.client.ApiException) as refused:
        create(
            custom,
            "analysisenvironments",
            {
                "kind": "AnalysisEnvironment",
                "metadata": {"name": CLOSED_PAGE.removeprefix("aenv-")},
                "spec": {"owner": "alice", "flavor": "jupyter-basic"},
            },
            namespace,
        )
    assert refused.value.status == 422 and "metadata.name 'closed' is taken" in refused.value.body


FLAVOR_CASES = [
    (
        "negative cpu",
        {"backend": "kubernetes", "image": "a/b:1", "resources": {"cpu": -1, "memory": "1Gi"}},
        "spec.resources.cpu",
    ),
    (
        "zero cpu",
        {"backend": "kubernetes", "image": "a/b:1", "resources": {"cpu": 0, "memory": "1Gi"}},
        "spec.resources.cpu",
    ),
    (
        "bad memory",
        {"backend": "kubernetes", "image": "a/b:1", "resources": {"cpu": 1, "memory": "lots"}},
        "spec.resources.memory",
    ),
    ("unknown backend", {"backend": "mainframe", "resources": {"cpu": 1, "memory": "1Gi"}}, "spec.backend"),
    (
        "kubernetes without image",
        {"backend": "kubernetes", "resources": {"cpu": 1, "memory": "1Gi"}},
        "a kubernetes flavor needs spec.image",
    ),
    (
        "slurm without partition",
        {"backend": "slurm", "resources": {"cpu": 1, "memory": "1Gi"}},
        "a slurm flavor needs spec.slurm.partition",
    ),
    (
        "bad max lifetime",
        {"backend": "kubernetes", "image": "a/b:1", "maxLifetime": "forever", "resources": {"cpu": 1, "memory": "1Gi"}},
        'spec.maxLifetime: Invalid value: "forever": use a duration such as 8h, 90m or 1d12h',
    ),
    (
        "huge max lifetime",
        {
            "backend": "kubernetes",
            "image": "a/b:1",
            "maxLifetime": "99999999999999999999d",
            "resources": {"cpu": 1, "memory": "1Gi"},
        },
        "spec.maxLifetime",
    ),
    (
        "max lifetime over the ceiling",
        {"backend": "kubernetes", "image": "a/b:1", "maxLifetime": "400d", "resources": {"cpu": 1, "memory": "1Gi"}},
        "maxLifetime must be at most 366d",
    ),
    (
        "zero max lifetime",
        {"backend": "kubernetes", "image": "a/b:1", "maxLifetime": "0h", "resources": {"cpu": 1, "memory": "1Gi"}},
        "maxLifetime must be at least 1s",
    ),
    (
        "zero idle timeout",
        {"backend": "kubernetes", "image": "a/b:1", "idleTimeout": "0m", "resources": {"cpu": 1, "memory": "1Gi"}},
        "idleTimeout must be at least 1s",
    ),
    (
        "memory in words",
        {"backend": "kubernetes", "image": "a/b:1", "resources": {"cpu": 1, "memory": "16 GB"}},
        "use an amount of memory above zero such as 16Gi, 512Mi or 1.5Gi",
    ),
    (
        "zero memory",
        {"backend": "kubernetes", "image": "a/b:1", "resources": {"cpu": 1, "memory": "0Gi"}},
        "use an amount of memory above zero",
    ),
    (
        "endless memory",
        {"backend": "kubernetes", "image": "a/b:1", "resources": {"cpu": 1, "memory": "9" * 40}},
        "spec.resources.memory",
    ),
    (
        "a millionth of a cpu",
        {"backend": "kubernetes", "image": "a/b:1", "resources": {"cpu": 1e-06, "memory": "1Gi"}},
        "use at least 0.001 CPU (one millicore)",
    ),
    (
        "endless slurm time limit",
        {
            "backend": "slurm",
            "slurm": {"partition": "p", "timeLimitMinutes": 10**12},
            "resources": {"cpu": 1, "memory": "1Gi"},
        },
        "spec.slurm.timeLimitMinutes",
    ),
]


@pytest.mark.parametrize("case, spec, words", FLAVOR_CASES, ids=[case[0] for case in FLAVOR_CASES])
def test_bad_flavor_is_refused_naming_the_field(custom, kubeconfig, case, spec, words):
    with pytest.raises(kubernetes.client.ApiException) as refused:
        create(
            custom,
            "environmentflavors",
            {"kind": "EnvironmentFlavor", "metadata": {"name": "bad-flavor"}, "spec": spec},
        )
    assert refused.value.status in (400, 422) and words in json.loads(refused.value.body)["message"]


def test_refusal_messages_are_words_not_regexes(custom, namespace):
    """Before: 'spec.lifetime in body should match '^([0-9]+d)?([0-9]+h)?...'."""
    with pytest.raises(kubernetes.client.ApiException) as refused:
        create(
            custom,
            "analysisenvironments",
            {
                "kind": "AnalysisEnvironment",
                "metadata": {"name": "bad"},
                "spec": {"owner": "alice", "flavor": "jupyter-basic", "lifetime": "8 hours"},
            },
            namespace,
        )
    message = json.loads(refused.value.body)["message"]
    assert "should match" not in message and "[0-9]" not in message, message


def dataset(name: str, embargoed_until: str, size: str = "1Ti") -> dict:
    return {
        "kind": "Dataset",
        "metadata": {"name": name},
        "spec": {
            "pid": f"10.5072/{name}",
            "size": size,
            "storage": {"path": f"/gpfs/{name}"},
            "access": {"level": "embargoed", "embargoedUntil": embargoed_until, "members": ["alice"]},
        },
    }


DATASET_CASES = [
    # Before: accepted; the operator's datasets index then failed with "day is out of range for month".
    ("30 February", "2026-02-30", "1Ti", "no such date: that month has fewer days"),
    ("31 April", "2026-04-31T00:00:00Z", "1Ti", "no such date"),
    ("29 February of a common year", "2027-02-29", "1Ti", "no such date"),
    ("month 13", "2026-13-01", "1Ti", "write a date such as 2027-03-01 or a UTC time such as 2027-03-01T12:00:00Z"),
    ("hour 24", "2026-01-01T24:00:00Z", "1Ti", "write a date such as 2027-03-01"),
    ("a local time", "2026-01-01T12:00:00", "1Ti", "write a date such as 2027-03-01"),
    ("size in words", "2026-01-01", "2 TB", "write the size as a quantity such as 2Ti"),
]


@pytest.mark.parametrize("case, until, size, words", DATASET_CASES, ids=[case[0] for case in DATASET_CASES])
def test_bad_dataset_is_refused_in_words(custom, kubeconfig, case, until, size, words):
    with pytest.raises(kubernetes.client.ApiException) as refused:
        create(custom, "datasets", dataset("bad-dataset", until, size))
    assert refused.value.status == 422 and words in json.loads(refused.value.body)["message"]


@pytest.mark.parametrize("until", ["2024-02-29", "2026-12-31", "2026-02-28T23:59:59Z", "9999-12-31"])
def test_real_dates_are_accepted(custom, kubeconfig, until):
    name = f"real-date-{until.lower().replace(':', '-')}"
    create(custom, "datasets", dataset(name, until))
    custom.delete_cluster_custom_object(GROUP, VERSION, "datasets", name)


def test_odd_but_valid_flavor_quantities_are_accepted(custom, kubeconfig):
    create(
        custom,
        "environmentflavors",
        {
            "kind": "EnvironmentFlavor",
            "metadata": {"name": "odd-quantities"},
            "spec": {
                "backend": "kubernetes",
                "image": "a/b:1",
                "maxLifetime": "366d",
                "idleTimeout": "1s",
                "resources": {"cpu": 0.001, "memory": "1.5Gi"},
            },
        },
    )
    custom.delete_cluster_custom_object(GROUP, VERSION, "environmentflavors", "odd-quantities")


REQUEST_CASES = [
    # Before: accepted, and its approval was never applied (OverflowError in the operator).
    ("huge extension", "9999999999d", "the extension must be at most 366d"),
    ("zero extension", "0m", "the extension must be at least 1s"),
    ("extension in words", "4 hours", "use a duration such as 8h, 90m or 1d12h"),
]


@pytest.mark.parametrize("case, lifetime, words", REQUEST_CASES, ids=[case[0] for case in REQUEST_CASES])
def test_bad_budget_request_is_refused_in_words(custom, namespace, case, lifetime, words):
    with pytest.raises(kubernetes.client.ApiException) as refused:
        create(
            custom,
            "budgetrequests",
            {
                "kind": "BudgetRequest",
                "metadata": {"name": "more"},
                "spec": {"environment": "lab", "lifetime": lifetime, "reason": "beam time ran late"},
            },
            namespace,
        )
    assert refused.value.status == 422 and words in json.loads(refused.value.body)["message"]


def test_impossible_budget_end_is_refused(custom, kubeconfig):
    with pytest.raises(kubernetes.client.ApiException) as refused:
        create(
            custom,
            "computebudgets",
            {
                "kind": "ComputeBudget",
                "metadata": {"name": "bad-end"},
                "spec": {"user": "nobody", "limits": {"cpuHours": 1}, "period": {"validUntil": "2027-02-30T00:00:00Z"}},
            },
        )
    assert refused.value.status == 422 and "spec.period.validUntil" in json.loads(refused.value.body)["message"]


@pytest.mark.parametrize(
    "field, says",
    [
        ("computebudgets.status.remaining.cpuHours", "CPU-hours left"),
        ("computebudgets.status.environments", "The ledger"),
        ("budgetrequests.spec.add.maxGpus", "How many more GPUs"),
        ("analysisenvironments.status.usage.gpuHours", "GPU-hours charged so far"),
        ("analysisenvironments.status.connection.url", "What OPEN navigates to"),
        ("datasets.spec.storage.nfs.server", "NFS server"),
    ],
)
def test_kubectl_explain_describes_the_fields(kubeconfig, field, says):
    """What a platform engineer reads: the descriptions reach `kubectl explain` through the API server
    (every property has one: tests/unit/test_crd_descriptions.py)."""
    output = kubectl("explain", f"{field}", f"--api-version={GROUP}/{VERSION}").stdout
    assert says in " ".join(output.split()), output
