#!/usr/bin/env python3
"""Does a stalled cloud slow down JupyterLab pods? (issue 7)

The OpenStack backend runs openstacksdk's blocking calls in an executor of
its own. This measures that it really isolates them: JupyterLab environments
are created one at a time and timed POST -> Ready, first with a quiet
operator (baseline), then while 50 VM environments are stuck in a cloud that
accepts connections and never answers (a black-hole keystone: every
openstacksdk call hangs, as with a cloud whose API is down behind a load
balancer). The ratio of the two medians is the result (target: within 2x).

    eval "$(hack/cluster.sh env)"
    .venv/bin/python bench/stall.py --out bench/logs/stall.md
"""

from __future__ import annotations

import argparse
import pathlib
import signal
import socket
import sys
import threading
import time
import uuid

import kubernetes
import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from run import (
    GROUP,
    PLURAL,
    STATE,
    VERSION,
    Cluster,
    Operator,
    Tracker,
    log,
    machine_info,
    percentile,
    summary,
)

REPO = pathlib.Path(__file__).resolve().parents[1]


class BlackHole:
    """A TCP server that accepts every connection and never sends a byte."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(connection)
            self.accepted += 1

    def close(self) -> None:
        self.sock.close()
        for connection in self.held:
            connection.close()


def pod_latencies(
    cluster: Cluster, tracker: Tracker, namespace: str, prefix: str, n: int, timeout: float
) -> list[float]:
    latencies = []
    for index in range(n):
        name = f"{prefix}{index:03d}"
        began = time.perf_counter()
        cluster.create_environment(namespace, name)
        if tracker.wait(lambda: name in tracker.ready, timeout=timeout):
            latencies.append(tracker.ready[name] - began)
        else:
            log(f"{name}: not Ready after {timeout} s")
        cluster.delete_environment(namespace, name)  # one pod at a time: the KWOK nodes stay roomy
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pods", type=int, default=30, help="JupyterLab environments timed in each phase")
    parser.add_argument("--vms", type=int, default=50, help="VM environments stuck in the stalled cloud")
    parser.add_argument("--core", type=int, default=1)
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()

    kubeconfig = str(STATE / "kubeconfig")
    cluster = Cluster(kubeconfig, 16)
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
    cluster.kubectl("apply", "-f", str(REPO / "examples/flavors.yaml"))
    run_id = uuid.uuid4().hex[:6]
    logs = REPO / "bench" / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    hole = BlackHole()
    clouds = logs / f"stall-clouds-{run_id}.yaml"
    clouds.write_text(
        yaml.safe_dump(
            {
                "clouds": {
                    "stalled": {
                        "auth": {
                            "auth_url": f"http://127.0.0.1:{hole.port}/v3",
                            "username": "u",
                            "password": "p",
                            "project_name": "p",
                            "user_domain_name": "Default",
                            "project_domain_name": "Default",
                        },
                        "region_name": "RegionOne",
                        "identity_api_version": 3,
                    }
                }
            }
        )
    )
    operator = Operator(
        kubeconfig,
        logs / f"operator-stall-{run_id}.log",
        args.core,
        ANALYSIS_OPERATOR_OPENSTACK_ENABLED="true",
        ANALYSIS_OPERATOR_OPENSTACK_CLOUDS_YAML=str(clouds),
        ANALYSIS_OPERATOR_OPENSTACK_CLOUD="stalled",
    )
    namespace = f"bench-stall-{run_id}"
    cluster.create_namespace(namespace)
    results: list[tuple[str, str]] = []
    try:
        operator.start()
        tracker = Tracker(cluster, namespace, "app.kubernetes.io/managed-by=analysis-operator")
        pod_latencies(cluster, tracker, namespace, "warm", 3, 60)  # first pods pay for connection setup
        baseline = pod_latencies(cluster, tracker, namespace, "base", args.pods, 60)

        for index in range(args.vms):
            cluster.create_environment(namespace, f"vm{index:03d}", flavor="vm-desktop")
        deadline = time.monotonic() + 60
        while hole.accepted < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2)  # let every VM handler reach the cloud and block
        stalled_vms = sum(1 for index in range(args.vms) if tracker.phases.get(f"vm{index:03d}") != "Ready")
        stalled = pod_latencies(cluster, tracker, namespace, "stall", args.pods, 60)

        ratio = percentile(stalled, 50) / percentile(baseline, 50)
        results = [
            ("baseline: POST -> Ready, one at a time", summary(baseline)),
            (f"with {args.vms} VM creates stalled: POST -> Ready", summary(stalled)),
            ("VM environments still not Ready (stuck in the cloud)", f"{stalled_vms} of {args.vms}"),
            ("connections the black-hole cloud is holding", str(len(hole.held))),
            ("ratio of medians (stalled / baseline)", f"{ratio:.2f}x (target <= 2x)"),
        ]
        for metric, value in results:
            log(f"{metric}: {value}")
        info = machine_info(cluster)
    finally:
        operator.stop(signal.SIGKILL)
        hole.close()
        # A killed operator leaves its webhooks registered (failurePolicy Fail, nobody answering): removing
        # the finalizers below is an UPDATE the validating webhook is asked about. The next operator started
        # against this stack registers them again.
        admission = kubernetes.client.AdmissionregistrationV1Api(cluster.core.api_client)
        for remove in (
            admission.delete_validating_webhook_configuration,
            admission.delete_mutating_webhook_configuration,
        ):
            try:
                remove(GROUP)
            except kubernetes.client.ApiException as error:
                if error.status != 404:
                    raise
        # The VM environments carry the operator's finalizer and nobody is left to run it.
        for item in cluster.list_json(cluster.custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL)[
            "items"
        ]:
            cluster.custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, item["metadata"]["name"], {"metadata": {"finalizers": None}}
            )
        cluster.core.delete_namespace(namespace)
    report = [
        "## Stalled cloud vs JupyterLab pods (bench/stall.py)",
        "",
        "| machine | |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in info],
        "",
        "| metric | value |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in results],
        "",
    ]
    text = "\n".join(report)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
