#!/usr/bin/env python3
"""Chaos run: faults in the middle of a burst, then the invariant (tests/integration/invariant.py).

A burst of JupyterLab pods and Slurm jobs for one owner with a ComputeBudget; in the middle of it,
in turn: `kill -9` of the operator (restarted at once), slurmrestd down for a while (deletes and
creates go on meanwhile), and a kube-apiserver restart. Afterwards the invariant must hold: no
finished environment holds anything or is charged, every live one is in the ledger and will expire,
nothing the operator made is left without a live environment; and no environment has two Slurm jobs.

    eval "$(hack/cluster.sh env)"; eval "$(hack/slurm.sh env)"; kubectl apply -f examples/users.yaml
    .venv/bin/python bench/chaos.py --pods 200 --jobs 10 --rest-down 60
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import os
import pathlib
import signal
import subprocess
import sys
import time
import uuid

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO / "operator"), str(REPO)]
from run import GROUP, VERSION, Cluster, Operator, machine_info  # noqa: E402

from analysis_operator.backends.slurm import SlurmBackend  # noqa: E402
from analysis_operator.settings import load_settings  # noqa: E402
from tests.integration.invariant import violations  # noqa: E402

OWNER = "carol"  # a FacilityUser (examples/users.yaml) and a Unix user of the local Slurm (hack/slurm.sh)


def script(name: str, *arguments: str) -> None:
    subprocess.run([str(REPO / "hack" / name), *arguments], check=True, capture_output=True)


def create(cluster: Cluster, namespace: str, name: str, flavor: str) -> None:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AnalysisEnvironment",
        "metadata": {"name": name},
        "spec": {"owner": OWNER, "flavor": flavor, "lifetime": "2h"},
    }
    for _ in range(60):  # the webhook is down while the operator restarts: the portal would retry too
        try:
            cluster.custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, "analysisenvironments", body, _preload_content=False
            )
            return
        except Exception as error:
            if "AlreadyExists" in str(error):
                return
            time.sleep(1)
    raise RuntimeError(f"could not create {namespace}/{name}")


def delete(cluster: Cluster, namespace: str, name: str) -> None:
    for _ in range(60):
        try:
            cluster.custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, "analysisenvironments", name, _preload_content=False
            )
            return
        except Exception as error:
            if "NotFound" in str(error):
                return
            time.sleep(1)


def unconverged(cluster: Cluster, namespace: str) -> list[str]:
    """Environments the operator has not (yet) decided on: no phase, or an older generation."""
    items = cluster.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "analysisenvironments")["items"]
    return [
        f"{item['metadata']['name']} not reconciled (generation {item['metadata'].get('generation')}, "
        f"status {(item.get('status') or {}).get('phase')}/{(item.get('status') or {}).get('observedGeneration')})"
        for item in items
        if not item["metadata"].get("deletionTimestamp")
        and (
            (item.get("status") or {}).get("observedGeneration") != item["metadata"].get("generation")
            or not (item.get("status") or {}).get("phase")
        )
    ]


def settle(cluster: Cluster, namespace: str, timeout: float) -> tuple[float, list[str]]:
    """Seconds until every environment is decided on and the invariant holds in the namespace
    (or what is still wrong at the timeout)."""
    began = time.monotonic()
    found: list[str] = []
    while time.monotonic() - began < timeout:
        try:
            found = unconverged(cluster, namespace) or violations(cluster.api, [namespace])
        except Exception as error:
            found = [repr(error)]
        if not found:
            return time.monotonic() - began, []
        time.sleep(1)
    return time.monotonic() - began, found


def duplicate_jobs(slurm: SlurmBackend) -> int:
    """Environments with more than one active Slurm job."""
    per_uid = collections.Counter(job.uid for job in asyncio.run(slurm.list_managed()))
    return sum(1 for count in per_uid.values() if count > 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pods", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--rest-down", type=float, default=60.0, help="seconds slurmrestd stays down")
    parser.add_argument("--settle-timeout", type=float, default=300.0)
    parser.add_argument("--out", type=pathlib.Path, help="append the report to this file")
    args = parser.parse_args()

    cluster = Cluster(os.environ["KUBECONFIG"], pool=32)
    slurm_env = {
        key: value
        for key, value in os.environ.items()
        if key.startswith("ANALYSIS_OPERATOR_SLURM_") or key == "SLURM_CONF"
    }
    slurm = SlurmBackend(load_settings().slurm) if args.jobs else None
    logs = REPO / "bench" / "logs"
    logs.mkdir(exist_ok=True)
    operator = Operator(
        cluster.kubeconfig,
        logs / "chaos-operator.log",
        core=1,
        **slurm_env,
        ANALYSIS_OPERATOR_BUDGETS_REQUIRE_BUDGET="true",
        ANALYSIS_OPERATOR_SWEEP_INTERVAL_SECONDS="2",
        ANALYSIS_OPERATOR_BUDGETS_CHARGE_INTERVAL_SECONDS="5",
    )
    namespace = f"chaos-{uuid.uuid4().hex[:6]}"
    budget = f"chaos-{namespace}"
    rows: list[tuple[str, str]] = []
    info = machine_info(cluster)
    cluster.kubectl("apply", "-f", str(REPO / "examples" / "flavors.yaml"))
    cluster.custom.create_cluster_custom_object(
        GROUP,
        VERSION,
        "computebudgets",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ComputeBudget",
            "metadata": {"name": budget},
            "spec": {"user": OWNER, "limits": {"cpuHours": 100000, "gpuHours": 1000, "maxEnvironments": 100000}},
        },
    )
    cluster.create_namespace(namespace)
    pool = concurrent.futures.ThreadPoolExecutor(16)
    names = [(f"p{i}", "jupyter-basic") for i in range(args.pods)] + [
        (f"j{i}", "jupyter-cluster") for i in range(args.jobs)
    ]
    try:
        operator.start()
        # 1. kill -9 of the operator in the middle of the burst
        half = len(names) // 2
        list(pool.map(lambda item: create(cluster, namespace, *item), names[:half]))
        operator.stop(signal.SIGKILL)
        killed = time.monotonic()
        creating = pool.map(lambda item: create(cluster, namespace, *item), names[half:])
        operator.start()
        list(creating)
        seconds, left = settle(cluster, namespace, args.settle_timeout)
        rows.append(
            (
                "operator kill -9 mid-burst: invariant holds after (from the kill)",
                f"{time.monotonic() - killed:.1f} s"
                if not left
                else f"NOT after {seconds:.0f} s: {len(left)} left, e.g. {left[:2]}",
            )
        )

        # 2. slurmrestd down; deletes and creates meanwhile
        if slurm is not None:
            rows.append(slurmrestd_down(cluster, namespace, pool, names, args))
        # 3. kube-apiserver restart
        extra = [(f"r{i}", flavor) for i, (_, flavor) in enumerate(names[-5:])]
        list(pool.map(lambda item: create(cluster, namespace, *item), extra))
        restarted = time.monotonic()
        script("cluster.sh", "restart", "kube-apiserver")
        list(pool.map(lambda item: delete(cluster, namespace, item[0]), extra[: len(extra) // 2]))
        seconds, left = settle(cluster, namespace, args.settle_timeout)
        rows.append(
            (
                "kube-apiserver restart: invariant holds after (from the restart)",
                f"{time.monotonic() - restarted:.1f} s" if not left else f"NOT: {len(left)} left, e.g. {left[:2]}",
            )
        )

        final = violations(cluster.api, [namespace])
        rows.append(
            ("violations at the end (orphans, uncharged or unexpiring live, charged finished)", str(len(final)))
        )
        if slurm is not None:
            rows.append(("environments with two active Slurm jobs", str(duplicate_jobs(slurm))))
        items = cluster.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "analysisenvironments")["items"]
        phases = collections.Counter((item.get("status") or {}).get("phase", "-") for item in items)
        rows.append(("environments at the end, by phase", ", ".join(f"{k} {v}" for k, v in sorted(phases.items()))))
    finally:
        _cleanup(cluster, operator, namespace, budget)
    report = "\n".join(
        [
            f"## Chaos run: {args.pods} pods and {args.jobs} Slurm jobs, {3 if slurm else 2} faults (`bench/chaos.py`)",
            "",
            "| machine | |",
            "| --- | --- |",
            *[f"| {key} | {value} |" for key, value in info],
            "",
            "| | |",
            "| --- | --- |",
            *[f"| {what} | {value} |" for what, value in rows],
            "",
        ]
    )
    print(report)
    if args.out:
        with args.out.open("a") as handle:
            handle.write("\n" + report)


def slurmrestd_down(
    cluster: Cluster,
    namespace: str,
    pool: concurrent.futures.ThreadPoolExecutor,
    names: list[tuple[str, str]],
    args: argparse.Namespace,
) -> tuple[str, str]:
    """slurmrestd killed; a quarter of the environments deleted and new ones created meanwhile."""
    state = pathlib.Path(os.environ.get("SLURM_STATE_DIR", "/tmp/analysis-operator-slurm"))
    os.kill(int((state / "run" / "slurmrestd.pid").read_text()), signal.SIGKILL)
    down_at = time.monotonic()
    doomed = names[: len(names) // 4]
    list(pool.map(lambda item: delete(cluster, namespace, item[0]), doomed))
    extra = [(f"s{i}", flavor) for i, (_, flavor) in enumerate(names[-args.jobs - 5 :])]
    list(pool.map(lambda item: create(cluster, namespace, *item), extra))
    time.sleep(max(0.0, args.rest_down - (time.monotonic() - down_at)))
    script("slurm.sh", "up")
    seconds, left = settle(cluster, namespace, args.settle_timeout)
    return (
        f"slurmrestd down {args.rest_down:.0f} s (deletes and creates meanwhile): invariant holds "
        "after slurmrestd is back",
        f"{seconds:.1f} s" if not left else f"NOT: {len(left)} left, e.g. {left[:2]}",
    )


def _cleanup(cluster: Cluster, operator: Operator, namespace: str, budget: str) -> None:
    operator.stop(signal.SIGTERM)
    operator.start()  # the finalizers of Slurm environments need it
    cluster.core.delete_namespace(namespace, _preload_content=False)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            cluster.core.read_namespace(namespace, _preload_content=False)
            time.sleep(1)
        except Exception:
            break
    cluster.custom.delete_cluster_custom_object(GROUP, VERSION, "computebudgets", budget)
    operator.stop(signal.SIGTERM)


if __name__ == "__main__":
    main()
