"""`kubectl explain` has something to say about every field: each property of every CRD schema
(spec, status, list items, map values) carries a description. The chart ships the same files
(charts/analysis-operator/crds links to crds/), so this covers both."""

from __future__ import annotations

import pathlib

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
CRDS = sorted((REPO / "crds").glob("*.yaml"))


def undescribed(schema: dict, path: str, root: bool = True) -> list[str]:
    """The paths of the properties under schema without a (non-blank) description. The object's
    own metadata is the one exception: the API server refuses anything but name and generateName
    there, and `kubectl explain` shows ObjectMeta's description for it."""
    missing = []
    for name, child in (schema.get("properties") or {}).items():
        where = f"{path}.{name}"
        if root and name == "metadata" and child == {"type": "object"}:
            continue
        if not str(child.get("description") or "").strip():
            missing.append(where)
        missing += undescribed(child, where, root=False)
    if isinstance(schema.get("items"), dict):
        missing += undescribed(schema["items"], f"{path}[]", root=False)
    if isinstance(schema.get("additionalProperties"), dict):
        missing += undescribed(schema["additionalProperties"], f"{path}{{}}", root=False)
    return missing


def _schemas() -> list[tuple[str, dict]]:
    return [
        (f"{crd['spec']['names']['kind']}/{version['name']}", version["schema"]["openAPIV3Schema"])
        for path in CRDS
        for crd in yaml.safe_load_all(path.read_text())
        if crd
        for version in crd["spec"]["versions"]
    ]


def test_the_chart_ships_these_crds():
    assert (REPO / "charts/analysis-operator/crds").resolve() == (REPO / "crds").resolve()
    kinds = {name.split("/")[0] for name, _ in _schemas()}
    assert {"AnalysisEnvironment", "ComputeBudget", "BudgetRequest", "Dataset", "EnvironmentFlavor"} <= kinds


@pytest.mark.parametrize("name, schema", _schemas(), ids=[name for name, _ in _schemas()])
def test_every_property_has_a_description(name, schema):
    assert str(schema.get("description") or "").strip(), f"{name}: the kind itself has no description"
    assert undescribed(schema, name) == []


@pytest.mark.parametrize(
    "schema, missing",
    [
        ({"properties": {"a": {"type": "string"}}}, ["X.a"]),
        ({"properties": {"a": {"type": "string", "description": "  "}}}, ["X.a"]),  # blank is not a description
        ({"properties": {"a": {"description": "A", "properties": {"b": {"type": "number"}}}}}, ["X.a.b"]),
        ({"properties": {"l": {"description": "L", "items": {"properties": {"i": {}}}}}}, ["X.l[].i"]),
        ({"properties": {"m": {"description": "M", "additionalProperties": {"properties": {"v": {}}}}}}, ["X.m{}.v"]),
        ({"properties": {"a": {"type": "string", "description": "A"}}}, []),
        ({"properties": {"metadata": {"type": "object"}}}, []),  # the object's own: the API server's
        ({"properties": {"s": {"description": "S", "properties": {"metadata": {"type": "object"}}}}}, ["X.s.metadata"]),
        ({"properties": {"metadata": {"type": "object", "properties": {"x": {}}}}}, ["X.metadata", "X.metadata.x"]),
    ],
)
def test_the_walk_finds_what_is_missing(schema, missing):
    """The check itself: a field hidden in a list item or a map value is found too."""
    assert undescribed(schema, "X") == missing
