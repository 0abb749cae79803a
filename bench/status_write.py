#!/usr/bin/env python3
"""What one status write of an AnalysisEnvironment costs kube-apiserver, by what its CRD holds.

G2's gap is mostly kube-apiserver's CPU for the environment's own writes (bench/RESULTS.md: about
4 core-ms a status write against 2.5-3 for all of KWOK's pod status updates). This measures one such
write alone, on copies of the shipped CRD under another group (no webhooks, no admission policies,
no operator), each variant in turn, alternating over the rounds:

    shipped       crds/analysisenvironments.yaml as it is
    put           the same, the status written by PUT (the whole object at the version read)
    small-status  the same, a status of two fields only (phase, reason): what the size of it costs
    no-cel        the same without any x-kubernetes-validations rule
    no-root-rule  the same without the object's own rule (metadata.name), evaluated on every write
    open-status   the same with status an object of any fields (x-kubernetes-preserve-unknown-fields)
    no-describe   the same without descriptions (the schema the server walks is smaller)
    full-terms    the shipped CRD, status.terms with every backend's block, empty ones too (as the
                  operator wrote them until 2026-12-03)
    granular      the same with status granular, as shipped before 2026-12-06 (since, status is one
                  atomic object, x-kubernetes-map-type: atomic: managedFields hold `f:status` alone
                  instead of every status field; run 5e2ad5 measured it as "atomic-status")
    atomic-parts  the same with status's objects and conditions atomic, its scalars listed one by one
    no-spec-rules the shipped CRD without the rules on spec itself (its fields' immutability)
    one-spec-rule the shipped CRD with those rules as one (the spec unchanged, or each field unchanged)

--spec portal (default): the spec a portal sends (lifetime, a dataset, sharing); --spec minimal: owner
and flavor only, as bench/run.py creates them for G2.

Each round and variant: COUNT objects created (spec and labels as the portal's), then each given the
status a Ready JupyterLab environment has (one merge patch of /status, or one PUT, THREADS at a time), then
deleted. kube-apiserver's CPU (its process group, /proc) over the patches, divided by COUNT.

    export CLUSTER_STATE_DIR=/tmp/pf-cluster PORT_OFFSET=600; hack/cluster.sh up; eval "$(hack/cluster.sh env)"
    .venv/bin/python bench/status_write.py --count 1000 --rounds 3

The report goes to bench/logs/status-write-<run>.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import datetime
import os
import pathlib
import platform
import statistics
import sys
import time
import types
import uuid
from typing import Any

import kubernetes
import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "operator"))
from analysis_operator.engine.terms import build_terms  # noqa: E402
from analysis_operator.model.domain import Flavor, Resources  # noqa: E402
from tests.integration.conftest import kubectl  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import run  # noqa: E402 (bench/run.py)

GROUP, VERSION, PLURAL = "statusbench.analysis.panosc.eu", "v1alpha1", "analysisenvironments"
STATE = pathlib.Path(os.environ.get("CLUSTER_STATE_DIR", "/tmp/analysis-operator-cluster"))
VARIANTS = (
    "shipped",
    "put",
    "small-status",
    "no-cel",
    "no-root-rule",
    "open-status",
    "no-describe",
    "full-terms",
    "granular",
    "atomic-parts",
    "no-spec-rules",
    "one-spec-rule",
)


def strip(node: Any, key: str) -> Any:
    if isinstance(node, dict):
        return {name: strip(value, key) for name, value in node.items() if name != key}
    if isinstance(node, list):
        return [strip(value, key) for value in node]
    return node


def crd(variant: str) -> dict[str, Any]:
    shipped = yaml.safe_load((REPO / "crds" / "analysisenvironments.yaml").read_text())
    body = copy.deepcopy(shipped)
    body["metadata"] = {"name": f"{PLURAL}.{GROUP}"}
    body["spec"]["group"] = GROUP
    version = body["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    if variant == "no-cel":
        version["schema"]["openAPIV3Schema"] = strip(schema, "x-kubernetes-validations")
    elif variant == "no-root-rule":
        schema.pop("x-kubernetes-validations", None)
    elif variant == "open-status":
        schema["properties"]["status"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    elif variant == "no-describe":
        version["schema"]["openAPIV3Schema"] = strip(schema, "description")
    elif variant == "granular":
        schema["properties"]["status"].pop("x-kubernetes-map-type", None)
    elif variant == "no-spec-rules":
        schema["properties"]["spec"].pop("x-kubernetes-validations", None)
    elif variant == "one-spec-rule":
        rules = schema["properties"]["spec"].pop("x-kubernetes-validations")
        schema["properties"]["spec"]["x-kubernetes-validations"] = [
            {
                "rule": "self == oldSelf || (" + " && ".join(f"({rule['rule']})" for rule in rules) + ")",
                "message": "; ".join(rule["message"] for rule in rules),
            }
        ]
    elif variant == "atomic-parts":
        schema["properties"]["status"].pop("x-kubernetes-map-type", None)
        for field in schema["properties"]["status"]["properties"].values():
            if field.get("type") == "object":
                field["x-kubernetes-map-type"] = "atomic"
            elif field.get("type") == "array":
                field["x-kubernetes-list-type"] = "atomic"
                field.pop("x-kubernetes-list-map-keys", None)
    return body


def environment(namespace: str, name: str, shape: str = "portal") -> dict[str, Any]:
    if shape == "minimal":  # bench/run.py's (G2)
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "AnalysisEnvironment",
            "metadata": {"name": name, "namespace": namespace, "labels": {"analysis.panosc.eu/owner": "bench"}},
            "spec": {"owner": "bench", "flavor": "jupyter-basic"},
        }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AnalysisEnvironment",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"analysis.panosc.eu/owner": "alice", "dataset.analysis.panosc.eu/run-42": "true"},
        },
        "spec": {
            "owner": "alice",
            "flavor": "jupyter-basic",
            "lifetime": "8h",
            "datasets": [{"name": "run-42"}],
            "sharing": {"users": ["bob"]},
        },
    }


# examples/flavors.yaml's jupyter-basic, the flavor bench/run.py starts
BASIC = Flavor(
    name="jupyter-basic",
    backend="kubernetes",
    resources=Resources(cpu="1", memory="16Gi", gpu=0),
    image="quay.io/jupyter/scipy-notebook:2025-10-20",
    max_lifetime=datetime.timedelta(hours=8),
)
# status.terms as the operator wrote them until 2026-12-03: every backend's block, empty ones too
FULL_TERMS = {
    "idleTimeout": "",
    "slurm": {"partition": "", "account": "", "timeLimitMinutes": None, "qos": "", "modules": []},
    "openstack": {"flavor": "", "image": "", "network": "", "keyName": ""},
}


def ready_status(name: str, namespace: str, full_terms: bool = False) -> dict[str, Any]:
    """What the operator writes when a JupyterLab is Ready (one merge patch: the start's only write), as
    a local stack's operator writes it (`kubectl get analysisenvironment -o json`)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    said = "JupyterLab is running on kwok-cpu-0"
    terms = {**build_terms(BASIC), **(FULL_TERMS if full_terms else {})}
    return {
        "status": {
            "phase": "Ready",
            "reason": "PodReady",
            "message": said,
            "observedGeneration": 1,
            "startedAt": now,
            "expiresAt": now,
            "backend": {
                "kind": "kubernetes",
                "name": f"aenv-{name}",
                "state": "Running",
                "node": "kwok-cpu-0",
                "endpoint": f"aenv-{name}:8888",
                "allocatedCpus": 1,
                "allocatedGpus": 0,
            },
            "connection": {
                "url": f"http://aenv-{name}.{namespace}.svc.cluster.local:8888/env/{namespace}/{name}/lab",
                "secretName": f"aenv-{name}",
            },
            "terms": terms,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "PodReady",
                    "message": said,
                    "lastTransitionTime": now,
                    "observedGeneration": 1,
                },
            ],
        }
    }


def cpu_model() -> str:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.machine()


def apiserver_seconds() -> float:
    """kube-apiserver's CPU seconds so far (its process group, as bench/run.py counts it)."""
    return run.CpuMeter(types.SimpleNamespace(pid=-1)).snapshot().get("kube-apiserver", 0.0)


def install(variant: str) -> None:
    install_crd(crd(variant), f"status-bench-{variant}.yaml")


def install_crd(body: dict[str, Any], file: str) -> None:
    """Replace the CRD of body's name with body, and wait until its objects are served."""
    name = body["metadata"]["name"]
    kubectl("delete", "crd", name, "--ignore-not-found", "--wait=true")
    path = STATE / file
    path.write_text(yaml.safe_dump(body))
    kubectl("apply", "-f", str(path))
    kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # served: the discovery and the storage are there
        if kubectl("get", name, "-A", check=False).returncode == 0:
            return
        time.sleep(0.5)
    raise RuntimeError(f"{name} is not served")


def write_status(custom: Any, method: str, body: dict[str, Any]) -> None:
    metadata = body["metadata"]
    status = ready_status(metadata["name"], metadata["namespace"], full_terms=method == "full-terms")
    if method == "small":
        status = {"status": {key: status["status"][key] for key in ("phase", "reason")}}
    if method == "put":  # the whole object back, at the version read
        custom.replace_namespaced_custom_object_status(
            GROUP, VERSION, metadata["namespace"], PLURAL, metadata["name"], {**body, **status}
        )
    else:
        custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, metadata["namespace"], PLURAL, metadata["name"], status
        )


def measure(custom: Any, variant: str, count: int, threads: int, namespace: str, shape: str) -> dict[str, float]:
    method = {"put": "put", "small-status": "small", "full-terms": "full-terms"}.get(variant, "patch")
    install(variant)
    names = [f"s{index:05d}" for index in range(count)]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        before = apiserver_seconds()
        created = list(
            pool.map(
                lambda name: custom.create_namespaced_custom_object(
                    GROUP, VERSION, namespace, PLURAL, environment(namespace, name, shape)
                ),
                names,
            )
        )
        middle = apiserver_seconds()
        list(pool.map(lambda body: write_status(custom, method, body), created))
        after = apiserver_seconds()
    custom.delete_collection_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
    while custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, limit=1)["items"]:
        time.sleep(0.2)
    return {"create": (middle - before) * 1000 / count, "status": (after - middle) * 1000 / count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--spec", choices=("portal", "minimal"), default="portal")
    args = parser.parse_args()
    variants = [variant for variant in args.variants.split(",") if variant]
    kubernetes.config.load_kube_config()
    configuration = kubernetes.client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = args.threads
    custom = kubernetes.client.CustomObjectsApi(kubernetes.client.ApiClient(configuration))
    run = uuid.uuid4().hex[:6]
    namespace = f"status-bench-{run}"
    kubectl("create", "namespace", namespace)
    results: dict[str, list[dict[str, float]]] = {variant: [] for variant in variants}
    try:
        for round_ in range(args.rounds):
            order = variants if round_ % 2 == 0 else variants[::-1]
            for variant in order:
                result = measure(custom, variant, args.count, args.threads, namespace, args.spec)
                results[variant].append(result)
                print(
                    f"round {round_ + 1} {variant}: {result['create']:.2f} core-ms a create, "
                    f"{result['status']:.2f} a status write",
                    flush=True,
                )
    finally:
        kubectl("delete", "crd", f"{PLURAL}.{GROUP}", "--ignore-not-found", "--wait=false", check=False)
        kubectl("delete", "namespace", namespace, "--wait=false", check=False)
    lines = report_head(
        f"kube-apiserver CPU per AnalysisEnvironment write, by CRD variant (run {run})",
        f"`bench/status_write.py --count {args.count} --rounds {args.rounds} --threads {args.threads} "
        f"--spec {args.spec}`: kube-apiserver's process group CPU over the writes / count, core-ms; medians (runs).",
        ["variant", "create", "status write (merge patch)"],
    )
    for variant in variants:
        creates = [result["create"] for result in results[variant]]
        statuses = [result["status"] for result in results[variant]]
        lines.append(f"| {variant} | {median_of(creates)} | {median_of(statuses)} |")
    write_report(lines, f"status-write-{run}.md")


def median_of(values: list[float]) -> str:
    """A table cell: the median, then every run's value."""
    return f"{statistics.median(values):.2f} ({', '.join(f'{value:.2f}' for value in values)})"


def report_head(title: str, command: str, columns: list[str]) -> list[str]:
    """A report's first lines: its title, the machine and the time, the command, and its table's header."""
    return [
        f"# {title}",
        "",
        f"{cpu_model()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        command,
        "",
        "| " + " | ".join(columns) + " |",
        "|" + " --- |" * len(columns),
    ]


def write_report(lines: list[str], name: str) -> None:
    report = REPO / "bench" / "logs" / name
    report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"report: {report}")


if __name__ == "__main__":
    main()
