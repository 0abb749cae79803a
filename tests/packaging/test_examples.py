"""The examples are one catalogue: each object is defined once across examples/*.yaml (a folder
synced by GitOps would otherwise flip an object back and forth between two definitions), and
what one example refers to is defined in another."""

from __future__ import annotations

import collections
import pathlib

import yaml

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


def _objects() -> list[tuple[str, dict]]:
    return [
        (path.name, document)
        for path in sorted(EXAMPLES.glob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
        if document
    ]


def _namespaced_kinds() -> set[str]:
    crds = pathlib.Path(__file__).resolve().parents[2] / "crds"
    return {
        crd["spec"]["names"]["kind"]
        for path in crds.glob("*.yaml")
        for crd in yaml.safe_load_all(path.read_text())
        if crd and crd["spec"]["scope"] == "Namespaced"
    }


def identity(document: dict, namespaced: set[str]) -> tuple[str, str, str]:
    """(kind, namespace, name) as the API server sees it: a namespaced object without a namespace
    lands in the one `kubectl apply` uses, `default` for a GitOps folder without one."""
    metadata = document["metadata"]
    namespace = metadata.get("namespace") or ("default" if document["kind"] in namespaced else "")
    return document["kind"], namespace, metadata["name"]


def duplicates(objects: list[tuple[str, dict]], namespaced: set[str]) -> dict:
    where = collections.defaultdict(list)
    for file, document in objects:
        where[identity(document, namespaced)].append(file)
    return {key: files for key, files in where.items() if len(files) > 1}


def test_each_example_object_is_defined_once():
    twice = duplicates(_objects(), _namespaced_kinds())
    assert not twice, f"defined more than once: {twice}"


def test_a_duplicate_is_found_even_with_the_namespace_written_out():
    """The check itself: the same environment once without and once with namespace default, and a
    FacilityGroup in two files, are duplicates; the same name in two namespaces is not."""
    namespaced = _namespaced_kinds()
    assert {"AnalysisEnvironment", "BudgetRequest"} <= namespaced and "FacilityGroup" not in namespaced
    environment = {"kind": "AnalysisEnvironment", "metadata": {"name": "demo"}}
    group = {"kind": "FacilityGroup", "metadata": {"name": "staff"}}
    objects = [
        ("a.yaml", environment),
        ("b.yaml", {**environment, "metadata": {"name": "demo", "namespace": "default"}}),
        ("c.yaml", {**environment, "metadata": {"name": "demo", "namespace": "beamline"}}),
        ("a.yaml", group),
        ("d.yaml", group),
    ]
    assert duplicates(objects, namespaced) == {
        ("AnalysisEnvironment", "default", "demo"): ["a.yaml", "b.yaml"],
        ("FacilityGroup", "", "staff"): ["a.yaml", "d.yaml"],
    }


def test_what_the_examples_refer_to_is_in_the_examples():
    names = collections.defaultdict(set)
    for _, document in _objects():
        names[document["kind"]].add(document["metadata"]["name"])
    for file, document in _objects():
        spec = document.get("spec") or {}
        if document["kind"] == "ComputeBudget" and spec.get("group"):
            assert spec["group"] in names["FacilityGroup"], (file, spec["group"])
        if document["kind"] == "AnalysisEnvironment":
            assert spec["flavor"] in names["EnvironmentFlavor"], (file, spec["flavor"])
            for dataset in spec.get("datasets") or ():
                assert dataset.get("pid") or dataset["name"] in names["Dataset"], (file, dataset)
        if document["kind"] == "BudgetRequest" and spec.get("budget"):
            assert spec["budget"] in names["ComputeBudget"], (file, spec["budget"])
        for group in (spec.get("access") or {}).get("groups") or ():
            assert group in names["FacilityGroup"], (file, group)
