"""The Helm chart rendered with `helm template`, no server: the catalogue values are typed from the
CRDs (a typo or `cpu: lots` is refused), the catalogue and the budgets' ledgers are kept by
`helm uninstall`, the environments' NetworkPolicy denies by default (never `from: []`), only admins
read the directory (FacilityGroups, FacilityUsers), and nameOverride / fullnameOverride name things.
Install, uninstall and reinstall for real: tests/integration/test_chart.py."""

from __future__ import annotations

import json
import pathlib

import pytest
import yaml

from tests.packaging.test_chart_gateway import CHART, OPERATOR_PEER, REPO, find, refusal, render
from tests.packaging.values_schema import SCHEMA, definitions

CATALOGUE_KINDS = {"EnvironmentFlavor", "Dataset", "FacilityGroup", "ComputeBudget"}


def _documents(path: pathlib.Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def _examples() -> dict:
    """Every example catalogue object of the repository, as chart values."""
    values: dict = {"flavors": {}, "datasets": {}, "facilityGroups": {}, "computeBudgets": []}
    for path in [*sorted((REPO / "examples").glob("*.yaml")), REPO / "tests/integration/flavors.yaml"]:
        for document in _documents(path):
            name, spec = document["metadata"]["name"], document.get("spec")
            match document["kind"]:
                case "EnvironmentFlavor":
                    values["flavors"][name] = spec
                case "Dataset":
                    values["datasets"][name] = spec
                case "FacilityGroup":
                    values["facilityGroups"][name] = spec
                case "ComputeBudget":
                    values["computeBudgets"].append({"name": name, "spec": spec})
    return values


# --- typed catalogue values ----------------------------------------------------------------------------


def test_the_values_schema_is_the_crds_schema():
    """One source: the definitions are derived from crds/ (python -m tests.packaging.values_schema)."""
    assert json.loads(SCHEMA.read_text())["definitions"] == definitions()


def test_every_example_object_is_accepted_as_values(tmp_path):
    values = _examples()
    assert all(values[key] for key in values), "the examples lost a kind"
    objects = render(tmp_path, values)
    rendered = {(o["kind"], o["metadata"]["name"]): o["spec"] for o in objects if o["kind"] in CATALOGUE_KINDS}
    assert rendered[("EnvironmentFlavor", "jupyter-basic")] == values["flavors"]["jupyter-basic"]
    assert len(rendered) == sum(len(v) for v in values.values())


FLAVOR = {"backend": "kubernetes", "resources": {"cpu": 1, "memory": "16Gi"}, "image": "quay.io/jupyter/base"}
DATASET = {
    "pid": "10.5072/x-1",
    "storage": {"nfs": {"server": "nfs.example", "path": "/x"}},
    "access": {"level": "public"},
}
BUDGET = {"user": "alice", "limits": {"cpuHours": 10}}


def _with(base: dict, **changes) -> dict:
    merged = json.loads(json.dumps(base))
    for path, value in changes.items():
        node = merged
        *parents, last = path.split("__")
        for parent in parents:
            node = node.setdefault(parent, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return merged


@pytest.mark.parametrize(
    "values, complaint",
    [
        ({"flavors": {"f": _with(FLAVOR, resources__cpu="lots")}}, "/flavors/f/resources/cpu"),
        ({"flavors": {"f": _with(FLAVOR, resources__cpu=0)}}, "/flavors/f/resources/cpu"),
        ({"flavors": {"f": _with(FLAVOR, imag="x")}}, "additional properties 'imag'"),
        ({"flavors": {"f": _with(FLAVOR, resources__cpuu=1)}}, "additional properties 'cpuu'"),
        ({"flavors": {"f": _with(FLAVOR, resources__memory="lots")}}, "/flavors/f/resources/memory"),
        ({"flavors": {"f": _with(FLAVOR, resources__memory="0Gi")}}, "/flavors/f/resources/memory"),
        ({"flavors": {"f": _with(FLAVOR, backend="docker")}}, "/flavors/f/backend"),
        ({"flavors": {"f": _with(FLAVOR, maxLifetime="8 hours")}}, "/flavors/f/maxLifetime"),
        ({"flavors": {"f": _with(FLAVOR, image=None)}}, "missing property 'image'"),
        ({"flavors": {"f": _with(FLAVOR, backend="slurm")}}, "missing property 'slurm'"),
        ({"flavors": {"f": _with(FLAVOR, idleAction="Pause")}}, "/flavors/f/idleAction"),
        ({"flavors": {"f": _with(FLAVOR, access__users=["alice", "alice"])}}, "/flavors/f/access/users"),
        ({"flavors": {"Bad_Name": FLAVOR}}, "Bad_Name"),
        ({"datasets": {"d": _with(DATASET, pid="doi:10.5072/x")}}, "/datasets/d/pid"),
        ({"datasets": {"d": _with(DATASET, storage={})}}, "/datasets/d/storage"),
        ({"datasets": {"d": _with(DATASET, storage__nfs__sever="x")}}, "additional properties 'sever'"),
        ({"datasets": {"d": _with(DATASET, access={"level": "embargoed"})}}, "embargoedUntil"),
        ({"datasets": {"d": _with(DATASET, access__embargoedUntil="next year")}}, "/datasets/d/access/embargoedUntil"),
        ({"datasets": {"d": _with(DATASET, size="huge")}}, "/datasets/d/size"),
        ({"facilityGroups": {"g": {"members": ["alice"], "gid": 0}}}, "/facilityGroups/g/gid"),
        ({"facilityGroups": {"g": {"member": ["alice"]}}}, "additional properties 'member'"),
        ({"computeBudgets": [{"name": "b", "spec": _with(BUDGET, group="g")}]}, "/computeBudgets/0/spec"),
        ({"computeBudgets": [{"name": "b", "spec": _with(BUDGET, limits__maxGPUs=1)}]}, "'maxGPUs'"),
        ({"computeBudgets": [{"name": "b", "spec": _with(BUDGET, limits__cpuHours="many")}]}, "cpuHours"),
        ({"nameOverride": "Bad_Name"}, "/nameOverride"),
        ({"fullnameOverride": "x" * 64}, "/fullnameOverride"),
    ],
)
def test_bad_catalogue_values_are_refused(tmp_path, values, complaint):
    stderr = refusal(tmp_path, values)
    assert "values don't meet the specifications" in stderr and complaint in stderr, stderr


def test_good_variants_pass(tmp_path):
    """What the CRDs accept, the schema accepts (a millicore, a PID by facility, a set of users)."""
    values = {
        "flavors": {
            "small": _with(FLAVOR, resources__cpu=0.001, maxLifetime="1d12h", access={"users": ["a@b.eu", "c"]}),
            "custom": _with(FLAVOR, image=None, allowCustomImage=True),
            "batch": {
                "backend": "slurm",
                "resources": {"cpu": 4, "memory": "1.5Gi", "gpu": 1},
                "slurm": {"partition": "gpu", "modules": ["python/3.11"]},
            },
        },
        "datasets": {
            "d": _with(DATASET, pid="esrf:ES-1234", access={"level": "embargoed", "embargoedUntil": "2027-02-28"})
        },
        "computeBudgets": [{"name": "g", "spec": {"group": "team", "limits": {"maxEnvironments": 2}}}],
    }
    render(tmp_path, values)


# --- kept by uninstall ------------------------------------------------------------------------------


def test_the_catalogue_and_budgets_are_kept_by_uninstall(tmp_path):
    objects = render(tmp_path, _examples())
    catalogue = [o for o in objects if o["kind"] in CATALOGUE_KINDS]
    assert {o["kind"] for o in catalogue} == CATALOGUE_KINDS
    for item in catalogue:
        assert item["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep", item["metadata"]["name"]
    others = [o for o in objects if o["kind"] not in CATALOGUE_KINDS]
    assert not any("helm.sh/resource-policy" in (o["metadata"].get("annotations") or {}) for o in others)


# --- the environments' NetworkPolicy ----------------------------------------------------------------


def _environments_policy(tmp_path: pathlib.Path, network: dict) -> dict:
    values = {"networkPolicy": {"enabled": True, "namespaces": ["envs"], **network}}
    objects = render(tmp_path, values)
    for policy in (o for o in objects if o["kind"] == "NetworkPolicy"):
        for rule in policy["spec"].get("ingress") or ():
            assert rule.get("from", "absent") != [], f"{policy['metadata']['name']}: `from: []` lets every source in"
    return find(objects, "NetworkPolicy", "aop-analysis-operator-environments")["spec"]


def test_with_no_peers_only_the_operator_reaches_the_environments(tmp_path):
    spec = _environments_policy(tmp_path, {})
    assert spec["policyTypes"] == ["Ingress", "Egress"] and spec["ingress"] == [OPERATOR_PEER]


def test_listed_peers_and_only_they_reach_jupyterlab(tmp_path):
    peers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]
    spec = _environments_policy(tmp_path, {"ingressFrom": peers})
    assert spec["ingress"] == [{"ports": [{"port": 8888, "protocol": "TCP"}], "from": peers}, OPERATOR_PEER]


# --- who reads the directory ------------------------------------------------------------------------


def _people_rbac(objects: list[dict]) -> dict[str, set[str]]:
    """subject -> the analysis.panosc.eu resources it may read through the chart's cluster bindings."""
    roles = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ClusterRole"}
    readers: dict[str, set[str]] = {}
    for binding in (o for o in objects if o["kind"] == "ClusterRoleBinding"):
        rules = roles[binding["roleRef"]["name"]]["rules"]
        resources = {
            resource
            for rule in rules
            if "analysis.panosc.eu" in rule["apiGroups"] and "list" in rule["verbs"]
            for resource in rule["resources"]
        }
        for subject in binding["subjects"]:
            readers.setdefault(f"{subject['kind']}:{subject['name']}", set()).update(resources)
    return readers


def test_only_admins_and_the_operator_read_facility_groups_and_users(tmp_path):
    readers = _people_rbac(render(tmp_path, {}))
    assert readers["Group:system:authenticated"] == {"environmentflavors", "datasets"}
    assert {"facilitygroups", "facilityusers"} <= readers["Group:analysis-admins"]
    assert {"facilitygroups", "facilityusers"} <= readers["ServiceAccount:aop-analysis-operator"]
    directory = {name for name, resources in readers.items() if resources & {"facilitygroups", "facilityusers"}}
    assert directory == {"Group:analysis-admins", "ServiceAccount:aop-analysis-operator"}

    readers = _people_rbac(render(tmp_path, {"authorization": {"adminGroups": ["it", "user-office"]}}))
    assert {name for name, r in readers.items() if "facilitygroups" in r} == {
        "Group:it",
        "Group:user-office",
        "ServiceAccount:aop-analysis-operator",
    }
    readers = _people_rbac(render(tmp_path, {"authorization": {"adminGroups": []}}))
    assert {name for name, r in readers.items() if "facilitygroups" in r} == {"ServiceAccount:aop-analysis-operator"}


# --- names ----------------------------------------------------------------------------------------------


def _names(objects: list[dict]) -> set[tuple[str, str]]:
    return {(o["kind"], o["metadata"]["name"]) for o in objects}


def test_fullname_override_names_every_object(tmp_path):
    objects = render(tmp_path, {"fullnameOverride": "analysis"})
    names = _names(objects)
    for kind, name in [
        ("Deployment", "analysis"),
        ("Service", "analysis-webhook"),
        ("ServiceAccount", "analysis"),
        ("ClusterRole", "analysis"),
        ("ClusterRole", "analysis-directory-reader"),
        ("MutatingWebhookConfiguration", "analysis"),
        ("ValidatingWebhookConfiguration", "analysis"),
        ("Role", "analysis-webhook-tls"),  # the operator-made certificate's Secret, by name
    ]:
        assert (kind, name) in names, (kind, name)
    assert not any("aop-analysis-operator" in name for _, name in names)
    hooks = find(objects, "MutatingWebhookConfiguration")["webhooks"]
    assert {hook["clientConfig"]["service"]["name"] for hook in hooks} == {"analysis-webhook"}
    deployment = find(objects, "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "analysis"


def test_name_override_names_the_app_and_the_objects(tmp_path):
    objects = render(tmp_path, {"nameOverride": "aenv"})
    deployment = find(objects, "Deployment", "aop-aenv")
    assert deployment["metadata"]["labels"]["app.kubernetes.io/name"] == "aenv"
    assert deployment["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == "aenv"
    assert ("Service", "aop-aenv-webhook") in _names(objects)
    default = find(render(tmp_path, {}), "Deployment")
    assert default["metadata"]["name"] == "aop-analysis-operator"
    assert default["metadata"]["labels"]["app.kubernetes.io/name"] == "analysis-operator"


def test_the_chart_has_notes():
    notes = (CHART / "templates/NOTES.txt").read_text()
    assert "condition=Stalled" in notes and "analysis.panosc.eu/owner" in notes and "resource-policy: keep" in notes
