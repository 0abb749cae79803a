"""The AnalysisEnvironment webhooks' own logic (handlers/admission.py), without a server: the
selection labels the mutating webhook stamps (and what it overwrites), and the reason and field
every refusal carries. Against the real API server: tests/integration/test_selection.py."""

from __future__ import annotations

import asyncio
import hashlib
import re
import types

import kopf
import pytest

from analysis_operator.engine.budget_gate import BudgetGate
from analysis_operator.handlers.admission import (
    CREATED_BY,
    MATCH_CONDITIONS,
    confirmed_names,
    dataset_label,
    default_owner,
    field_of,
    is_operator_label,
    label_patch,
    label_text,
    match_conditions,
    misfits,
    mounted_names,
    refused,
    selection_labels,
)
from analysis_operator.infra.kopf_patches import Refused
from analysis_operator.policy.access import pid_key
from analysis_operator.policy.refusal import Refusal
from analysis_operator.settings import AdmissionSettings
from tests.unit.test_budget_gate import CPU, T0, Api
from tests.unit.test_budget_gate import gate as budget_gate

# Kubernetes' rules: a label value, and the name part of a label key.
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(?P<name>.+)$")


# --- labels ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["alice", "a", "p11-20231234-raw", "x" * 63, "a.b_c-d", "alice@facility.eu", "x" * 64, "d" * 253, "-x", "oidc:bob"],
)
def test_label_text_is_always_a_valid_label_and_itself_when_it_can_be(text):
    shown = label_text(text)
    assert LABEL_VALUE.match(shown) and 0 < len(shown) <= 63
    fits = len(text) <= 63 and LABEL_VALUE.match(text)
    assert shown == (text if fits else "sha256_" + hashlib.sha256(text.encode()).hexdigest()[:56])


def test_long_names_do_not_collide_with_any_dataset_name():
    """A hashed label has "_", which no Kubernetes object name has: it never reads as a real name."""
    hashed = dataset_label("d" * 64)
    assert "_" in hashed.split("/", 1)[1]
    assert dataset_label("d" * 64) != dataset_label("d" * 65)
    assert len(hashed) <= 253 + 1 + 63 and LABEL_KEY.match(hashed)


def test_selection_labels():
    assert selection_labels("alice", ["raw", "reference"]) == {
        "analysis.panosc.eu/owner": "alice",
        "dataset.analysis.panosc.eu/raw": "true",
        "dataset.analysis.panosc.eu/reference": "true",
    }
    assert selection_labels("alice@facility.eu", [])["analysis.panosc.eu/owner"].startswith("sha256_")


@pytest.mark.parametrize(
    "key, operators",
    [
        ("analysis.panosc.eu/owner", True),
        ("dataset.analysis.panosc.eu/raw", True),
        ("x.y.analysis.panosc.eu/z", True),
        ("analysis.panosc.eu.evil.org/x", False),
        ("notanalysis.panosc.eu/x", False),
        ("team", False),
        ("app.kubernetes.io/managed-by", False),
    ],
)
def test_which_labels_are_the_operators(key, operators):
    assert is_operator_label(key) is operators


def test_label_patch_removes_forged_labels_and_keeps_the_owners_own():
    current = {
        "team": "xray",
        "analysis.panosc.eu/owner": "bob",
        "dataset.analysis.panosc.eu/secret": "true",
        "dataset.analysis.panosc.eu/raw": "true",
        "analysis.panosc.eu/backend": "slurm",
    }
    wanted = selection_labels("alice", ["raw"])
    assert label_patch(current, wanted) == {
        "analysis.panosc.eu/owner": "alice",
        "dataset.analysis.panosc.eu/secret": None,
        "analysis.panosc.eu/backend": None,
    }
    assert label_patch(wanted, wanted) == {}


def test_a_pid_the_index_does_not_know_yet_is_confirmed_with_the_api_server_before_labelling():
    """A Dataset created a moment ago: the validating webhook confirms it before refusing and admits the
    create, so the mutating one must label it too (the index lags it by a watch event)."""
    listed: list[str] = []

    class Kube:
        async def list_cluster_objects(self, plural: str) -> list[dict]:
            listed.append(plural)
            if plural == "datasets":
                return [{"metadata": {"name": "p11-new"}, "spec": {"pid": "10.5072/P11-NEW"}}]
            return []

    memo = types.SimpleNamespace(context=types.SimpleNamespace(kube=Kube()))
    spec = {"datasets": [{"name": "ref"}, {"pid": "10.5072/p11-new"}]}
    assert asyncio.run(confirmed_names(spec, {}, memo)) == ["ref", "p11-new"]
    assert listed == ["datasets"]
    listed.clear()  # all known to the index: no read
    assert asyncio.run(confirmed_names(spec, {pid_key("10.5072/p11-new"): ["p11-new"]}, memo)) == ["ref", "p11-new"]
    assert asyncio.run(confirmed_names({"datasets": [{"name": "ref"}]}, {}, memo)) == ["ref"]
    assert listed == []


def test_datasets_named_by_pid_are_labelled_by_their_name():
    pids = {pid_key("10.5072/P11-RAW"): ["p11-raw"], "esrf:twice": ["one", "two"]}
    spec = {"datasets": [{"name": "ref"}, {"pid": "10.5072/p11-raw"}, {"pid": "esrf:unknown"}, {"pid": "esrf:twice"}]}
    assert mounted_names(spec, pids) == ["ref", "p11-raw"]  # unknown and ambiguous PIDs are refused later


def _mutate(
    spec: dict,
    labels: dict,
    username: str = "alice",
    pids: dict | None = None,
    groups: tuple[str, ...] = (),
    budget_gate: BudgetGate | None = None,
    dryrun: bool = False,
) -> dict:
    body = kopf.Body({"metadata": {"name": "e", "namespace": "ns", "labels": labels}, "spec": spec})
    patch = kopf.Patch(body=body)
    memo = types.SimpleNamespace(config=types.SimpleNamespace(admission=AdmissionSettings()), budget_gate=budget_gate)
    userinfo = {"username": username, "groups": list(groups)}
    asyncio.run(
        default_owner(
            spec=body.spec,
            body=body,
            patch=patch,
            userinfo=userinfo,
            memo=memo,
            dataset_pids=pids or {},
            flavors={"basic": [CPU]} if budget_gate else {},  # no flavor known: no budget to check
            environments={},
            dryrun=dryrun,
        )
    )
    return dict(patch)


def test_the_mutating_webhook_stamps_owner_creator_and_datasets_over_whatever_was_sent():
    patch = _mutate(
        {"flavor": "basic", "datasets": [{"name": "raw"}]},
        {"team": "xray", "analysis.panosc.eu/owner": "bob", "dataset.analysis.panosc.eu/other": "true"},
    )
    assert patch["spec"] == {"owner": "alice"}
    assert patch["metadata"]["annotations"] == {CREATED_BY: "alice"}
    assert patch["metadata"]["labels"] == {
        "analysis.panosc.eu/owner": "alice",
        "dataset.analysis.panosc.eu/raw": "true",
        "dataset.analysis.panosc.eu/other": None,
    }


def test_the_portal_creating_for_alice_labels_alices_environment():
    patch = _mutate(
        {"owner": "alice", "flavor": "basic"},
        {},
        username="system:serviceaccount:portal:backend",
        groups=("analysis-portal",),
    )
    assert "spec" not in patch and patch["metadata"]["labels"] == {"analysis.panosc.eu/owner": "alice"}


@pytest.mark.parametrize("groups", [(), ("facility-users",), ("analysis-admins",)])
def test_the_mutating_webhook_refuses_a_spoofed_owner_with_its_cause(groups):
    """The first step that can answer with a cause: the API server's own policy, which runs after the
    mutating webhooks, answers with a sentence only."""
    with pytest.raises(Refused) as refusal:
        _mutate({"owner": "alice", "flavor": "basic"}, {}, username="bob", groups=groups)
    answer = refusal.value
    assert answer.code == 403 and str(answer).startswith("spec.owner 'alice' is not you ('bob')")
    assert [(cause.reason, cause.field) for cause in answer.causes] == [("NotOwner", "spec.owner")]


@pytest.mark.parametrize("owner", ["", "bob"])
def test_the_requester_may_name_themselves_or_nobody(owner):
    assert _mutate({"owner": owner, "flavor": "basic"}, {}, username="bob")["metadata"]["annotations"] == {
        CREATED_BY: "bob"
    }


def test_the_mutating_webhook_holds_no_budget_slot_and_checks_identity_before_the_budget():
    """With room it passes and holds nothing (the validating webhook holds the slot of what it admits);
    with none, every check is made there (tests/integration/test_budget_slots.py), after the owner's."""
    api = Api({"maxEnvironments": 1})
    gate = budget_gate(api)
    for dryrun in (False, True):
        assert _mutate({"flavor": "basic"}, {}, budget_gate=gate, dryrun=dryrun)["spec"] == {"owner": "alice"}
    assert gate.admitted.get("b", {}) == {}
    assert asyncio.run(gate.admit_checked("ns", "first", "alice", "", CPU, {}, T0)) is None  # holds the slot
    # Someone else's spoofed create is refused for that, not for alice's full budget.
    with pytest.raises(Refused) as refusal:
        _mutate({"owner": "alice", "flavor": "basic"}, {}, username="bob", budget_gate=gate)
    assert [cause.reason for cause in refusal.value.causes] == ["NotOwner"]
    assert list(gate.admitted["b"]) == ["ns/first"]


# --- refusals: reason and field ---------------------------------------------------------------------

SPEC = {
    "owner": "alice",
    "flavor": "gpu",
    "datasets": [{"name": "raw"}, {"pid": "10.5072/x", "mountPath": "/data/../etc"}],
    "sharing": {"users": ["bob", "zed"], "groups": ["team"]},
}


@pytest.mark.parametrize(
    "refusal, field",
    [
        (Refusal("NotOwner", "m", subject="alice"), "spec.owner"),
        (Refusal("NoPosixIdentity", "m", subject="alice"), "spec.owner"),
        (Refusal("FlavorNotAllowed", "m", subject="gpu"), "spec.flavor"),
        (Refusal("BackendNotEnabled", "m", subject="gpu"), "spec.flavor"),
        (Refusal("LifetimeTooLong", "m"), "spec.lifetime"),
        (Refusal("CustomImageNotAllowed", "m"), "spec.image"),
        (Refusal("DatasetEmbargoed", "m", subject="raw"), "spec.datasets[0].name"),
        (Refusal("DatasetNotFound", "m", subject="10.5072/x"), "spec.datasets[1].pid"),
        (Refusal("InvalidMountPath", "m", subject="10.5072/x"), "spec.datasets[1].mountPath"),
        (Refusal("DatasetNotFound", "m", subject="gone"), "spec.datasets"),
        (Refusal("MountPathCollision", "m", subject="/data"), "spec.datasets"),
        (Refusal("UnknownUser", "m", subject="zed"), "spec.sharing.users[1]"),
        (Refusal("UnknownGroup", "m", subject="team"), "spec.sharing.groups[0]"),
        (Refusal("SharingNotAllowed", "m", subject="bob"), "spec.sharing.users[0]"),
        (Refusal("SharingNotAllowed", "m", subject="carol"), "spec.sharing"),  # via a group
        (Refusal("TooManyEnvironments", "m"), "spec.budget"),
        (Refusal("NoBudget", "m"), "spec.budget"),
        (Refusal("CpuHoursExhausted", "m"), "spec.budget"),
    ],
)
def test_every_refusal_names_its_field(refusal, field):
    assert field_of(refusal, SPEC) == field


def test_a_refusal_carries_every_cause_and_reads_as_one_message():
    error = refused(
        [Refusal("DatasetEmbargoed", "raw is embargoed", subject="raw"), Refusal("FlavorNotAllowed", "no gpu")],
        SPEC,
    )
    assert isinstance(error, Refused) and isinstance(error, kopf.AdmissionError)
    assert (str(error), error.code) == ("raw is embargoed; no gpu", 403)
    assert error.status() == {
        "reason": "Forbidden",
        "details": {
            "causes": [
                {"reason": "DatasetEmbargoed", "field": "spec.datasets[0].name", "message": "raw is embargoed"},
                {"reason": "FlavorNotAllowed", "field": "spec.flavor", "message": "no gpu"},
            ]
        },
    }
    assert refused([Refusal("LifetimeTooLong", "too long")], SPEC, code=422).status()["reason"] == "Invalid"


def test_the_validating_webhook_is_not_called_for_metadata_only_updates():
    conditions = match_conditions()
    assert set(conditions) == {"environment-admission", "environment-owner"}
    assert [c["expression"] for c in conditions["environment-admission"]] == [
        "request.operation != 'UPDATE' || object.spec != oldObject.spec"
    ]
    assert MATCH_CONDITIONS.name == "match_conditions.yaml"


# --- input the schema refuses: left to it ------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, fields",
    [
        ({"owner": "alice", "flavor": ["basic"]}, ["spec.flavor"]),
        ({"owner": "alice", "flavor": {"name": "basic"}}, ["spec.flavor"]),
        ({"owner": "alice", "flavor": "basic", "datasets": 5}, ["spec.datasets"]),
        ({"owner": "alice", "flavor": "basic", "datasets": ["raw"]}, ["spec.datasets"]),
        ({"owner": ["alice"], "flavor": "basic", "budget": {"b": 1}}, ["spec.owner", "spec.budget"]),
        ({"owner": "alice", "flavor": "basic", "sharing": ["bob"], "suspend": "yes"}, ["spec.sharing", "spec.suspend"]),
        ({"owner": "alice", "flavor": "basic", "datasets": [{"name": "raw"}], "lifetime": "8h", "suspend": False}, []),
        ({"owner": None, "flavor": "basic"}, []),  # null: no value (the API server drops it)
    ],
)
def test_fields_of_a_type_the_schema_refuses_are_named(spec, fields):
    assert misfits(spec) == fields


@pytest.mark.parametrize("spec", [{"flavor": ["basic"]}, {"flavor": {"x": 1}}, {"flavor": "basic", "datasets": 5}])
def test_the_mutating_webhook_leaves_a_field_of_the_wrong_type_to_the_schema(spec):
    """Not a 500 ("unhashable type: 'list'") that names no field: nothing is patched, nothing held,
    and the API server's schema check that follows refuses the create naming the field (422)."""
    api = Api({"maxEnvironments": 0})  # a budget without room: the mutating webhook would check it all
    gate = budget_gate(api)
    assert _mutate({"owner": "alice", **spec}, {}, budget_gate=gate) == {}
    assert gate.admitted.get("b", {}) == {}
