"""The chart's typed catalogue values, derived from the CRDs: the `definitions` of
charts/analysis-operator/values.schema.json are the CRDs' spec schemas in JSON Schema (draft-07),
with every object closed (a typo is refused, not pruned by the API server) and the CRDs' CEL
rules that JSON Schema can say (patterns, required-if) written out here. `helm install` and
`helm template` then refuse a bad flavor, dataset, group or budget before anything is applied.

tests/packaging/test_values_schema.py fails when the file and the CRDs drift apart;
`python -m tests.packaging.values_schema` writes the definitions again.
"""

from __future__ import annotations

import copy
import json
import pathlib
from typing import Any

import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
SCHEMA = REPO / "charts/analysis-operator/values.schema.json"
# definition name -> the CRD file whose spec it describes
KINDS = {
    "flavorSpec": "environmentflavors.yaml",
    "datasetSpec": "datasets.yaml",
    "facilityGroupSpec": "facilitygroups.yaml",
    "computeBudgetSpec": "computebudgets.yaml",
}
DURATION = "^([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?$"
DATE_OR_TIME = "^[1-9][0-9]{3}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])(T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]Z)?$"
# What the CRDs check with CEL, as JSON Schema (definition, path of property names) -> keywords;
# a keyword given as None is removed.
CEL = {
    ("flavorSpec", ()): {
        "allOf": [
            {
                "if": {"properties": {"backend": {"const": "kubernetes"}}, "required": ["backend"]},
                "then": {
                    "anyOf": [
                        {"required": ["image"]},
                        {"properties": {"allowCustomImage": {"const": True}}, "required": ["allowCustomImage"]},
                    ]
                },
            },
            {
                "if": {"properties": {"backend": {"const": "openstack"}}, "required": ["backend"]},
                "then": {"required": ["openstack"], "properties": {"openstack": {"required": ["flavor", "image"]}}},
            },
            {
                "if": {"properties": {"backend": {"const": "slurm"}}, "required": ["backend"]},
                "then": {"required": ["slurm"], "properties": {"slurm": {"required": ["partition"]}}},
            },
        ]
    },
    ("flavorSpec", ("resources", "cpu")): {"minimum": 0.001, "exclusiveMinimum": None},
    ("flavorSpec", ("resources", "memory")): {
        "pattern": "^[0-9]{1,12}([.][0-9]{1,3})?(Ki|Mi|Gi|Ti|k|M|G|T)?$",
        "not": {"pattern": "^0*([.]0*)?[A-Za-z]*$"},
    },
    ("flavorSpec", ("maxLifetime",)): {"pattern": DURATION, "minLength": 1},
    ("flavorSpec", ("idleTimeout",)): {"pattern": DURATION, "minLength": 1},
    ("datasetSpec", ("pid",)): {
        "pattern": "^([0-9]+([.][0-9]+)+/[A-Za-z0-9._;()/:-]+|[a-z][a-z0-9-]*:[A-Za-z0-9][A-Za-z0-9._/-]*)$",
        "not": {"pattern": "^(?i)(doi:|hdl:|http)"},
    },
    ("datasetSpec", ("size",)): {"pattern": "^[0-9]{1,15}([.][0-9]{1,4})?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$"},
    ("datasetSpec", ("storage",)): {
        "anyOf": [{"required": ["persistentVolumeClaim"]}, {"required": ["nfs"]}, {"required": ["path"]}]
    },
    ("datasetSpec", ("access",)): {
        "if": {"properties": {"level": {"const": "embargoed"}}, "required": ["level"]},
        "then": {"required": ["embargoedUntil"]},
    },
    ("datasetSpec", ("access", "embargoedUntil")): {"pattern": DATE_OR_TIME},
    ("computeBudgetSpec", ()): {"oneOf": [{"required": ["user"]}, {"required": ["group"]}]},
}
KEPT = {
    "type",
    "description",
    "properties",
    "required",
    "items",
    "enum",
    "pattern",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "minItems",
    "maxItems",
    "default",
}


def _convert(node: dict[str, Any]) -> dict[str, Any]:
    """One OpenAPI v3 (structural, Kubernetes) schema node as JSON Schema draft-07."""
    out: dict[str, Any] = {key: copy.deepcopy(value) for key, value in node.items() if key in KEPT}
    if node.get("exclusiveMinimum") is True and "minimum" in node:
        out["exclusiveMinimum"] = out.pop("minimum")
    if node.get("format") == "date-time":
        out["format"] = "date-time"
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if "properties" in node:
        out["properties"] = {name: _convert(child) for name, child in node["properties"].items()}
        out["additionalProperties"] = False
    if "items" in node:
        out["items"] = _convert(node["items"])
    return out


def _at(schema: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    for name in path:
        schema = schema["properties"][name]
    return schema


def definitions() -> dict[str, Any]:
    result = {}
    for name, crd_file in KINDS.items():
        crd = yaml.safe_load((REPO / "crds" / crd_file).read_text())
        [version] = [v for v in crd["spec"]["versions"] if v.get("storage")]
        spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
        result[name] = _convert(spec)
        result[name]["description"] = f"spec of a {crd['spec']['names']['kind']} (crds/{crd_file})"
    for (name, path), keywords in CEL.items():
        node = _at(result[name], path)
        for key, value in keywords.items():
            if value is None:
                node.pop(key, None)
            else:
                node[key] = copy.deepcopy(value)
    return result


def main() -> None:
    schema = json.loads(SCHEMA.read_text())
    schema["definitions"] = definitions()
    SCHEMA.write_text(json.dumps(schema, indent=2) + "\n")


if __name__ == "__main__":
    main()
