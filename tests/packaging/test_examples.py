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


def test_each_example_object_is_defined_once():
    where = collections.defaultdict(list)
    for file, document in _objects():
        metadata = document["metadata"]
        where[(document["kind"], metadata.get("namespace", ""), metadata["name"])].append(file)
    twice = {key: files for key, files in where.items() if len(files) > 1}
    assert not twice, f"defined more than once: {twice}"


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
