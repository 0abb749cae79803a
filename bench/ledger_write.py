#!/usr/bin/env python3
"""What a ComputeBudget's ledger write costs kube-apiserver, its status granular or atomic.

The operator writes a budget's status (PUT at the version read) when an admission takes a slot and at
every accounting tick; the status holds one ledger entry per running environment (9 fields each). With
a granular status the API server keeps a managedFields entry for every one of those fields, rewrites it
on every write and sends it with every watch event; with `x-kubernetes-map-type: atomic` it keeps one.

Copies of the shipped CRD under another group (no webhooks, no operator), each variant in turn,
alternating over the rounds:

    granular  crds/computebudgets.yaml as it was before 2026-12-06 (run 7cb4cf called it "shipped")
    atomic    the same with status one atomic object, as shipped since

Each round and variant: BUDGETS budgets, each written by one thread: ENTRIES writes that add one entry
each (a burst of starts), then TICKS writes that charge every entry (ticks), each a PUT at the version
the write before returned. kube-apiserver's CPU (its process group) over the writes / writes, core-ms.

    export CLUSTER_STATE_DIR=/tmp/pf-cluster PORT_OFFSET=600; hack/cluster.sh up; eval "$(hack/cluster.sh env)"
    .venv/bin/python bench/ledger_write.py --rounds 3

The report goes to bench/logs/ledger-write-<run>.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import datetime
import json
import pathlib
import statistics
import sys
import uuid
from typing import Any

import kubernetes
import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from status_write import apiserver_seconds, install_crd, median_of, report_head, write_report  # noqa: E402 (bench/status_write.py)

from tests.integration.conftest import kubectl  # noqa: E402

GROUP, VERSION, PLURAL = "ledgerbench.analysis.panosc.eu", "v1alpha1", "computebudgets"
VARIANTS = ("granular", "atomic")


def crd(variant: str) -> dict[str, Any]:
    body = copy.deepcopy(yaml.safe_load((REPO / "crds" / "computebudgets.yaml").read_text()))
    body["metadata"] = {"name": f"{PLURAL}.{GROUP}"}
    body["spec"]["group"] = GROUP
    status = body["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    status.pop("x-kubernetes-map-type", None)
    if variant == "atomic":
        status["x-kubernetes-map-type"] = "atomic"
    return body


def install(variant: str) -> None:
    install_crd(crd(variant), f"ledger-bench-{variant}.yaml")


def stamp(at: datetime.datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


def ledger(entries: int, tick: int) -> dict[str, Any]:
    """The status the operator writes for a budget holding `entries` environments, charged `tick` times."""
    start = datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)
    charged = start + datetime.timedelta(minutes=tick)
    held = {
        str(uuid.UUID(int=index)): {
            "namespace": "user-alice",
            "name": f"lab-{index:03d}",
            "cpus": 1.0,
            "gpus": 0,
            "since": stamp(start),
            "chargedUntil": stamp(charged),
            "heldSince": stamp(start),
            "cpuHours": round(tick / 60, 6),
            "gpuHours": 0.0,
        }
        for index in range(entries)
    }
    used = round(entries * tick / 60, 6)
    return {
        "used": {"cpuHours": used, "gpuHours": 0.0, "updatedAt": stamp(charged)},
        "limits": {"cpuHours": 100000.0, "maxEnvironments": 1000.0},
        "remaining": {"cpuHours": round(100000 - used, 6)},
        "running": {"environments": entries, "gpus": 0},
        "display": {"cpuHours": f"{used:.1f} / 100000", "gpuHours": "0.0 / -", "environments": f"{entries} / 1000"},
        "settled": {"cpuHours": 0.0, "gpuHours": 0.0},
        "environments": held,
        "warned": {},
    }


def one_budget(custom: Any, name: str, entries: int, ticks: int) -> tuple[int, int]:
    """Writes of one budget, in order; (writes, the object's size in bytes at the end)."""
    body = custom.create_cluster_custom_object(
        GROUP,
        VERSION,
        PLURAL,
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ComputeBudget",
            "metadata": {"name": name},
            "spec": {"user": name, "limits": {"cpuHours": 100000, "maxEnvironments": 1000}},
        },
    )
    writes = 0
    for step in [(count, 0) for count in range(1, entries + 1)] + [(entries, tick) for tick in range(1, ticks + 1)]:
        body = custom.replace_cluster_custom_object_status(
            GROUP, VERSION, PLURAL, name, {**body, "status": ledger(*step)}
        )
        writes += 1
    return writes, len(json.dumps(body))


def measure(custom: Any, variant: str, budgets: int, entries: int, ticks: int) -> dict[str, float]:
    install(variant)
    names = [f"b{index:03d}-{uuid.uuid4().hex[:4]}" for index in range(budgets)]
    with concurrent.futures.ThreadPoolExecutor(budgets) as pool:
        before = apiserver_seconds()
        done = list(pool.map(lambda name: one_budget(custom, name, entries, ticks), names))
        after = apiserver_seconds()
    writes = sum(count for count, _ in done)
    for name in names:
        custom.delete_cluster_custom_object(GROUP, VERSION, PLURAL, name)
    return {"write": (after - before) * 1000 / writes, "size": statistics.median(size for _, size in done)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budgets", type=int, default=8, help="budgets written at once, one thread each")
    parser.add_argument("--entries", type=int, default=50, help="environments in each ledger at the end")
    parser.add_argument("--ticks", type=int, default=100, help="charging writes after the last entry")
    args = parser.parse_args()
    kubernetes.config.load_kube_config()
    configuration = kubernetes.client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = args.budgets
    custom = kubernetes.client.CustomObjectsApi(kubernetes.client.ApiClient(configuration))
    run = uuid.uuid4().hex[:6]
    results: dict[str, list[dict[str, float]]] = {variant: [] for variant in VARIANTS}
    try:
        for round_ in range(args.rounds):
            for variant in VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]:
                result = measure(custom, variant, args.budgets, args.entries, args.ticks)
                results[variant].append(result)
                print(f"round {round_ + 1} {variant}: {result['write']:.2f} core-ms a write", flush=True)
    finally:
        kubectl("delete", "crd", f"{PLURAL}.{GROUP}", "--ignore-not-found", "--wait=false", check=False)
    lines = report_head(
        f"kube-apiserver CPU per ComputeBudget ledger write, status granular or atomic (run {run})",
        f"`bench/ledger_write.py --rounds {args.rounds} --budgets {args.budgets} --entries {args.entries} "
        f"--ticks {args.ticks}`: kube-apiserver's process group CPU over the writes / writes, core-ms; "
        "medians (runs); the object's size with its last write.",
        ["status", "core-ms per write", "object, bytes"],
    )
    for variant in VARIANTS:
        writes = [result["write"] for result in results[variant]]
        size = statistics.median(result["size"] for result in results[variant])
        lines.append(f"| {variant} | {median_of(writes)} | {size:.0f} |")
    write_report(lines, f"ledger-write-{run}.md")


if __name__ == "__main__":
    main()
