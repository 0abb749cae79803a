"""What a portal asks the API server, on the real one with the operator's webhooks: environments
selected by owner and by dataset with one list call (labels the CREATE webhook stamps, over
whatever the creator sent, and only the operator and admins may change later), and refusals
that carry a machine-readable reason and the field it concerns (status details.causes)."""

from __future__ import annotations

import json

import kubernetes
import pytest
import yaml

from analysis_operator.model.domain import label_text
from tests.integration.conftest import GROUP, VERSION, impersonating, kubectl
from tests.integration.test_datasets import PUBLIC, Catalogue, create_as, embargoed
from tests.integration.test_metrics import webhook_calls
from tests.waiting import wait_for

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


def _owner_webhook_calls(operator) -> float:
    """Admission requests the operator's environment-owner (mutating) webhook answered, whatever the answer."""
    return webhook_calls(operator).get("environment-owner", 0.0)


def _calls_become(operator, expected: float) -> None:
    wait_for(
        lambda: _owner_webhook_calls(operator) == expected,
        timeout=10,
        what=f"{expected} environment-owner calls (now {_owner_webhook_calls(operator)})",
    )


def test_the_api_server_stamps_the_labels_and_calls_the_owner_webhook_only_for_what_it_cannot(
    kubeconfig, custom, namespace, catalogue, operator
):
    """The mutating policy (deploy/authorization/identity-policy.yaml) stamps owner, created-by and the
    selection labels where CEL can, and the webhook, whose answer would change nothing, is not called
    (its matchConditions, operator/analysis_operator/match_conditions.yaml): one call per create, not
    two. It is called for a PID to resolve, an owner that is no label value, and a spoofed owner, also
    one who forged every label and annotation the policy would stamp: refused with its cause."""
    raw = catalogue.dataset("raw", PUBLIC)
    reference = catalogue.dataset("reference", PUBLIC, pid=f"10.5072/SEL-{catalogue.suffix}")
    other = catalogue.dataset("other", PUBLIC)
    before = _owner_webhook_calls(operator)

    # Alice herself, forged labels: stamped and cleaned by the API server alone.
    forged = {OWNER: "bob", DATASET + other: "true", f"x.{GROUP}/backend": "slurm", "team": "xray"}
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AnalysisEnvironment",
        "metadata": {"name": "self", "labels": forged},
        "spec": {"flavor": "jupyter-basic", "datasets": [{"name": raw}]},
    }
    alice = kubernetes.client.CustomObjectsApi(impersonating(kubeconfig, "alice"))
    made = alice.create_namespaced_custom_object(GROUP, VERSION, namespace, "analysisenvironments", body)
    assert made["metadata"]["labels"] == {OWNER: "alice", DATASET + raw: "true", "team": "xray"}
    assert made["metadata"]["annotations"][f"{GROUP}/created-by"] == "alice"
    assert made["spec"]["owner"] == "alice"
    # The portal for bob (it may act for him), and a dry run.
    his = create_as(kubeconfig, PORTAL[0], namespace, "his", group=PORTAL[1], owner="bob", datasets=[{"name": raw}])
    assert his["metadata"]["labels"] == {OWNER: "bob", DATASET + raw: "true"}
    assert his["metadata"]["annotations"][f"{GROUP}/created-by"] == PORTAL[0]
    create_as(kubeconfig, "alice", namespace, "asked", dry_run="All")
    _calls_become(operator, before)

    # Only the webhook resolves a PID: called, and the label is the dataset's name.
    by_pid = create_as(kubeconfig, "alice", namespace, "by-pid", datasets=[{"pid": f"10.5072/sel-{catalogue.suffix}"}])
    assert by_pid["metadata"]["labels"] == {OWNER: "alice", DATASET + reference: "true"}
    _calls_become(operator, before + 1)
    # An owner that is no label value (hashed by the webhook): called, whatever the create's fate.
    try:
        mail = create_as(kubeconfig, PORTAL[0], namespace, "mail", group=PORTAL[1], owner="bob@x.org", dry_run="All")
    except kubernetes.client.ApiException as refusal:  # for an owner with no FacilityUser, after the webhook
        assert "bob@x.org" in refusal.body, refusal.body
    else:
        assert mail["metadata"]["labels"][OWNER] == label_text("bob@x.org") != "bob@x.org"
    _calls_become(operator, before + 2)
    # A spoofed owner: called, and refused with its cause; also with every stamp forged as the policy
    # would make it for bob (the policy removes the labels of a creator who may not create for him).
    status, refusal = _refused(lambda: create_as(kubeconfig, "bob", namespace, "spoof", owner="alice"))
    assert status == 403 and [c["reason"] for c in refusal["details"]["causes"]] == ["NotOwner"]
    _calls_become(operator, before + 3)
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AnalysisEnvironment",
        "metadata": {
            "name": "forged",
            "labels": {OWNER: "alice", DATASET + raw: "true"},
            "annotations": {f"{GROUP}/created-by": "bob"},
        },
        "spec": {"owner": "alice", "flavor": "jupyter-basic", "datasets": [{"name": raw}]},
    }
    bob = kubernetes.client.CustomObjectsApi(impersonating(kubeconfig, "bob"))
    status, refusal = _refused(
        lambda: bob.create_namespaced_custom_object(GROUP, VERSION, namespace, "analysisenvironments", body)
    )
    assert status == 403 and [c["reason"] for c in refusal["details"]["causes"]] == ["NotOwner"]
    assert refusal["message"].startswith('admission webhook "environment-owner.analysis.panosc.eu" denied')
    _calls_become(operator, before + 4)
    assert _names(custom, namespace, f"{OWNER}=alice") == {"self", "by-pid"}


def _dry_run_as(kubeconfig, namespace: str, user: tuple[str, str], labels: dict, spec: dict) -> dict:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AnalysisEnvironment",
        "metadata": {"name": "probe", "labels": labels},
        "spec": {"flavor": "jupyter-basic", **spec},
    }
    creator = kubernetes.client.CustomObjectsApi(impersonating(kubeconfig, *user))
    return creator.create_namespaced_custom_object(
        GROUP, VERSION, namespace, "analysisenvironments", body, dry_run="All"
    )


def test_without_the_mutating_policy_the_webhook_stamps_the_same_labels(
    kubeconfig, namespace, catalogue, operator, tmp_path
):
    """A cluster without the mutating policy (before Kubernetes 1.36, the chart's
    authorization.mutatingPolicy=false, or its binding deleted): nothing is stamped before the
    webhook, so it is called and stamps it all, and exactly as the policy did: the same creates give
    the same labels and created-by either way (forged labels under the operator's prefixes and under
    look-alike ones, several datasets, the portal creating for someone)."""
    raw, other = catalogue.dataset("raw", PUBLIC), catalogue.dataset("other", PUBLIC)
    alice, portal = ("alice", "facility-users"), PORTAL
    forged = {
        OWNER: "bob",
        DATASET + "nothing": "true",
        f"a.b.{GROUP}/x": "y",  # under the operator's prefix: removed
        f"{GROUP}.evil/x": "y",  # not the operator's: kept
        f"x{GROUP}/y": "z",  # not the operator's: kept
        "team": "xray",
    }
    cases = [
        (alice, forged, {"datasets": [{"name": raw}, {"name": other, "mountPath": "/data/o"}]}),
        (alice, {}, {}),
        (portal, forged, {"owner": "bob", "datasets": [{"name": other}]}),
    ]

    def stamps() -> list[tuple[dict, str]]:
        answers = [_dry_run_as(kubeconfig, namespace, user, labels, spec) for user, labels, spec in cases]
        return [
            (made["metadata"]["labels"], made["metadata"]["annotations"][f"{GROUP}/created-by"]) for made in answers
        ]

    before = _owner_webhook_calls(operator)
    by_the_policy = stamps()
    assert _owner_webhook_calls(operator) == before  # the policy stamped them all
    assert by_the_policy[0][0] == {
        OWNER: "alice",
        DATASET + raw: "true",
        DATASET + other: "true",
        f"{GROUP}.evil/x": "y",
        f"x{GROUP}/y": "z",
        "team": "xray",
    }
    saved = yaml.safe_load(
        kubectl("get", "mutatingadmissionpolicybinding", "analysis-environment-owner", "-o", "yaml").stdout
    )
    kubectl("delete", "mutatingadmissionpolicybinding", "analysis-environment-owner")
    try:

        def stamped_by_the_webhook() -> list[tuple[dict, str]] | None:
            calls = _owner_webhook_calls(operator)
            try:
                answers = stamps()
            except kubernetes.client.ApiException as refusal:  # the creation policy, while its cache still
                assert refusal.status == 403, refusal.body  # has the binding and the webhook is skipped
                return None
            return answers if _owner_webhook_calls(operator) == calls + len(cases) else None

        by_the_webhook = wait_for(stamped_by_the_webhook, timeout=30, what="creates that call the webhook")
        assert by_the_webhook == by_the_policy
    finally:
        manifest = tmp_path / "binding.yaml"
        kept = {key: saved[key] for key in ("apiVersion", "kind", "spec")}
        metadata = {key: saved["metadata"][key] for key in ("name", "labels") if key in saved["metadata"]}
        manifest.write_text(yaml.safe_dump({**kept, "metadata": metadata}))
        kubectl("apply", "-f", str(manifest))

    def stamped_by_the_policy() -> bool:  # back in force before the next test: the webhook not called
        calls = _owner_webhook_calls(operator)
        create_as(kubeconfig, "alice", namespace, "again", dry_run="All")
        return _owner_webhook_calls(operator) == calls

    wait_for(stamped_by_the_policy, timeout=30, what="the mutating policy in force again")


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
