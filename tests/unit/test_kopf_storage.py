"""handlers/kopf_storage.py: kopf's own records cost no PATCH of an environment that converges at once."""

from __future__ import annotations

import kopf
import pytest

from analysis_operator.handlers.kopf_storage import MemoryDiffBaseStorage, ProgressStorage


def body(uid: str, spec: dict) -> kopf.Body:
    return kopf.Body({"metadata": {"uid": uid, "name": uid, "labels": {"a": "b"}}, "spec": spec, "status": {"x": 1}})


def test_the_last_handled_spec_is_kept_here_and_nothing_is_patched():
    storage = MemoryDiffBaseStorage()
    first = body("u1", {"flavor": "basic"})
    assert storage.fetch(body=first) is None  # never handled here: kopf reads it as created
    patch = kopf.Patch()
    storage.store(body=first, patch=patch, essence=storage.build(body=first))
    assert not patch  # nothing written to the object
    assert storage.fetch(body=first) == {"spec": {"flavor": "basic"}, "metadata": {"labels": {"a": "b"}}}
    changed = body("u1", {"flavor": "gpu"})
    assert storage.fetch(body=changed) != storage.build(body=changed)  # kopf sees the spec change


def test_objects_that_are_gone_are_forgotten():
    storage = MemoryDiffBaseStorage()
    for uid in ("u1", "u2", "u3"):
        storage.store(body=body(uid, {}), patch=kopf.Patch(), essence=storage.build(body=body(uid, {})))
    storage.retain(["u2"])
    assert len(storage) == 1 and storage.fetch(body=body("u2", {})) is not None
    assert storage.fetch(body=body("u1", {})) is None


def test_the_operators_own_annotations_are_not_part_of_what_kopf_compares():
    storage = MemoryDiffBaseStorage()
    annotated = kopf.Body(
        {
            "metadata": {"uid": "u", "annotations": {"analysis.panosc.eu/on_environment": "{}", "note": "kept"}},
            "spec": {},
        }
    )
    assert storage.build(body=annotated) == {"spec": {}, "metadata": {"annotations": {"note": "kept"}}}


def test_a_progress_record_carries_no_marker_and_a_purged_one_leaves_nothing_to_write():
    storage, body = ProgressStorage(), kopf.Body({"metadata": {"uid": "u", "annotations": {}}})
    patch = kopf.Patch()
    storage.store(key="on_environment", record={"success": True}, body=body, patch=patch)
    assert list(patch["metadata"]["annotations"]) == ["analysis.panosc.eu/on_environment"]
    storage.purge(key="on_environment", body=body, patch=patch)
    assert not patch  # nothing to write

    stock, patch = kopf.AnnotationsProgressStorage(prefix="analysis.panosc.eu"), kopf.Patch()
    stock.store(key="on_environment", record={"success": True}, body=body, patch=patch)
    stock.purge(key="on_environment", body=body, patch=patch)
    assert patch == {"metadata": {"annotations": {"analysis.panosc.eu/kopf-managed": "yes"}}}  # what it cost


FULL = {
    "apiVersion": "analysis.panosc.eu/v1alpha1",
    "kind": "AnalysisEnvironment",
    "metadata": {
        "uid": "u",
        "name": "e",
        "generation": 3,
        "labels": {"owner": "alice"},
        "annotations": {
            "analysis.panosc.eu/created-by": "alice",
            "kubectl.kubernetes.io/last-applied-configuration": "{}",
        },
        "managedFields": [{"manager": "analysis-operator", "fieldsV1": {"f:status": {"f:phase": {}}}}] * 20,
        "finalizers": ["x"],
    },
    "spec": {"owner": "alice", "flavor": "jupyter-basic", "datasets": [{"name": "d"}]},
    "status": {"phase": "Ready", "conditions": [{"type": "Ready", "status": "True"}]},
}


@pytest.mark.parametrize("extra_fields", [None, [], ["spec.flavor"], [("spec", "datasets")]])
def test_the_essence_built_from_what_kopf_keeps_is_kopfs_own(extra_fields):
    """Built without copying status and managedFields, the essence is the one kopf's build makes."""
    ours = MemoryDiffBaseStorage().build(body=kopf.Body(FULL), extra_fields=extra_fields)
    theirs = kopf.DiffBaseStorage.build(MemoryDiffBaseStorage(), body=kopf.Body(FULL), extra_fields=extra_fields)
    del theirs["metadata"]["annotations"]["analysis.panosc.eu/created-by"]  # ours drops the operator's own
    MemoryDiffBaseStorage.remove_empty_stanzas(theirs)
    assert ours == theirs
    assert "status" not in ours and "managedFields" not in ours["metadata"]


@pytest.mark.parametrize("extra_fields", [["status.phase"], [("metadata", "finalizers")]])
def test_a_handler_watching_status_or_metadata_gets_them_in_the_essence(extra_fields):
    essence = MemoryDiffBaseStorage().build(body=kopf.Body(FULL), extra_fields=extra_fields)
    assert essence.get("status", {}).get("phase") == "Ready" or essence["metadata"].get("finalizers") == ["x"]
