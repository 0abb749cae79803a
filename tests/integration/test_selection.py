"""What a portal asks the API server, on the real one with the operator's webhooks: environments
selected by owner and by dataset with one list call (labels the CREATE webhook stamps, over
whatever the creator sent, and only the operator and admins may change later), and refusals
that carry a machine-readable reason and the field it concerns (status details.causes)."""

from __future__ import annotations

import json

import kubernetes
import pytest

from tests.integration.conftest import GROUP, VERSION, impersonating
from tests.integration.test_datasets import PUBLIC, Catalogue, create_as, embargoed

pytestmark = pytest.mark.integration

OWNER = f"{GROUP}/owner"
DATASET = f"dataset.{GROUP}/"
PORTAL = ("system:serviceaccount:portal:backend", "analysis-portal")


@pytest.fixture
def catalogue(custom) -> Catalogue:
    created = Catalogue(custom)
    yield created
    created.delete_all()


def _labels(custom, namespace: str, name: str) -> dict:
    environment = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "analysisenvironments", name)
    return environment["metadata"].get("labels") or {}


def _names(custom, namespace: str, selector: str) -> set[str]:
    listed = custom.list_namespaced_custom_object(
        GROUP, VERSION, namespace, "analysisenvironments", label_selector=selector
    )
    return {item["metadata"]["name"] for item in listed["items"]}


def _refused(call) -> tuple[int, dict]:
    with pytest.raises(kubernetes.client.ApiException) as refused:
        call()
    return refused.value.status, json.loads(refused.value.body)


def test_labels_select_by_owner_and_dataset_and_forged_ones_are_replaced(
    kubeconfig, custom, namespace, catalogue, operator
):
    raw = catalogue.dataset("raw", PUBLIC)
    reference = catalogue.dataset("reference", PUBLIC, pid=f"10.5072/REF-{catalogue.suffix}")
    other = catalogue.dataset("other", PUBLIC)
    forged = {
        OWNER: "bob",  # someone else's
        DATASET + other: "true",  # a dataset it does not mount
        f"{GROUP}/backend": "slurm",  # another operator label: would misdirect the delete handler
        "team": "xray",  # her own: kept
    }
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AnalysisEnvironment",
        "metadata": {"name": "mine", "labels": forged},
        "spec": {
            "flavor": "jupyter-basic",
            # one by name, one by its PID (in another case: PIDs are compared case-insensitively)
            "datasets": [{"name": raw}, {"pid": f"10.5072/ref-{catalogue.suffix}"}],
        },
    }
    alice = kubernetes.client.CustomObjectsApi(impersonating(kubeconfig, "alice"))
    alice.create_namespaced_custom_object(GROUP, VERSION, namespace, "analysisenvironments", body)
    assert _labels(custom, namespace, "mine") == {
        OWNER: "alice",
        DATASET + raw: "true",
        DATASET + reference: "true",
        "team": "xray",
    }

    # The portal creating for bob: his label, not the portal's.
    create_as(kubeconfig, PORTAL[0], namespace, "his", group=PORTAL[1], owner="bob", datasets=[{"name": raw}])
    create_as(kubeconfig, "alice", namespace, "plain")  # no datasets
    assert _labels(custom, namespace, "his")[OWNER] == "bob"

    assert _names(custom, namespace, f"{OWNER}=alice") == {"mine", "plain"}
    assert _names(custom, namespace, f"{OWNER}=bob") == {"his"}
    assert _names(custom, namespace, f"{DATASET}{raw}") == {"mine", "his"}
    assert _names(custom, namespace, f"{DATASET}{reference}=true") == {"mine"}
    assert _names(custom, namespace, f"{DATASET}{other}") == set()
    assert _names(custom, namespace, f"{OWNER}=alice,{DATASET}{raw}") == {"mine"}


def test_a_dry_run_create_shows_the_labels_it_would_get(kubeconfig, namespace, catalogue, operator):
    raw = catalogue.dataset("raw", PUBLIC)
    answer = create_as(kubeconfig, "alice", namespace, "probe", dry_run="All", datasets=[{"name": raw}])
    assert answer["metadata"]["labels"] == {OWNER: "alice", DATASET + raw: "true"}


# --- refusals a portal can read ------------------------------------------------------------------------


def test_refusals_carry_reason_and_field(kubeconfig, namespace, catalogue, operator):
    secret = catalogue.dataset("secret", embargoed(members=("dave",)))
    status, body = _refused(lambda: create_as(kubeconfig, "alice", namespace, "data", datasets=[{"name": secret}]))
    assert status == 403 and body["reason"] == "Forbidden"
    assert body["message"].startswith('admission webhook "environment-admission.analysis.panosc.eu" denied')
    [cause] = body["details"]["causes"]
    assert (cause["reason"], cause["field"]) == ("DatasetEmbargoed", "spec.datasets[0].name")
    assert f"dataset '{secret}'" in cause["message"] and cause["message"] in body["message"]

    # Two problems: both named, each with its field.
    missing = f"10.5072/missing-{catalogue.suffix}"
    status, body = _refused(
        lambda: create_as(
            kubeconfig, "alice", namespace, "two", datasets=[{"name": secret}, {"pid": missing, "mountPath": "/data/x"}]
        )
    )
    assert [(cause["reason"], cause["field"]) for cause in body["details"]["causes"]] == [
        ("DatasetEmbargoed", "spec.datasets[0].name"),
        ("DatasetNotFound", "spec.datasets[1].pid"),
    ]

    status, body = _refused(lambda: create_as(kubeconfig, "alice", namespace, "for-bob", owner="bob"))
    assert status == 403 and [(c["reason"], c["field"]) for c in body["details"]["causes"]] == [
        ("NotOwner", "spec.owner")
    ]

    # 422 for terms the flavor does not allow (the schema's own 422s carry causes too).
    status, body = _refused(lambda: create_as(kubeconfig, "alice", namespace, "long", lifetime="30d"))
    assert status == 422 and body["reason"] == "Invalid"
    assert [(c["reason"], c["field"]) for c in body["details"]["causes"]] == [("LifetimeTooLong", "spec.lifetime")]

    # A dry run (the portal asking) gets the same answer.
    status, body = _refused(lambda: create_as(kubeconfig, "alice", namespace, "asked", owner="bob", dry_run="All"))
    assert status == 403 and body["details"]["causes"][0]["reason"] == "NotOwner"
