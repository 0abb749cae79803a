#!/usr/bin/env python3
"""Does a stalled backend slow down JupyterLab pods? (issue 7; issue 17, G7)

The OpenStack backend runs openstacksdk's blocking calls in an executor of
its own; the Slurm backend speaks to slurmrestd with asyncio (aiohttp). This
measures that both really isolate a backend that hangs: JupyterLab
environments are created one at a time and timed POST -> Ready, first with a
quiet operator (baseline), then while 50 environments of the stalled backend
are stuck (--backend):

  openstack  VM environments, a cloud that accepts connections and never
             answers (a black-hole keystone: every openstacksdk call hangs, as
             with a cloud whose API is down behind a load balancer)
  slurm      JupyterLab-on-Slurm environments, a black-hole slurmrestd (every
             request hangs until the operator's own timeout, then is retried)

The ratio of the two medians is the result (target: within 2x).

    eval "$(hack/cluster.sh env)"
    .venv/bin/python bench/stall.py --backend slurm --out bench/logs/stall.md
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


STALLED = {"openstack": ("vm-desktop", "VM"), "slurm": ("jupyter-cluster", "Slurm")}  # flavor, what it makes


def stalled_backend(backend: str, hole: BlackHole, logs: pathlib.Path, run_id: str) -> dict[str, str]:
    """The operator's settings that point `backend` at the black hole."""
    if backend == "slurm":  # single-token mode: the token is never checked, no request is ever answered
        token = logs / f"stall-slurm-token-{run_id}"
        token.write_text("stalled\n")
        return {
            "ANALYSIS_OPERATOR_SLURM_ENABLED": "true",
            "ANALYSIS_OPERATOR_SLURM_URL": f"http://127.0.0.1:{hole.port}",
            "ANALYSIS_OPERATOR_SLURM_TOKEN_FILE": str(token),
        }
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
    return {
        "ANALYSIS_OPERATOR_OPENSTACK_ENABLED": "true",
        "ANALYSIS_OPERATOR_OPENSTACK_CLOUDS_YAML": str(clouds),
        "ANALYSIS_OPERATOR_OPENSTACK_CLOUD": "stalled",
    }


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
        cluster.delete_environment(namespace, name)
        # One pod at a time, each gone before the next (not timed): the stack's three KWOK nodes hold 48 of
        # these pods, and pods still being deleted count (stop 39: the 49th waited 16 s, Unschedulable).
        if not tracker.wait(lambda: f"aenv-{name}" in tracker.pod_deleted, timeout=timeout):
            log(f"{name}: its pod not deleted after {timeout} s")
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pods", type=int, default=30, help="JupyterLab environments timed in each phase")
    parser.add_argument("--backend", choices=("openstack", "slurm"), default="openstack", help="the backend stalled")
    parser.add_argument("--vms", type=int, default=50, help="environments stuck in the stalled backend")
    parser.add_argument("--core", type=int, default=1)
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()

    kubeconfig = str(STATE / "kubeconfig")
    cluster = Cluster(kubeconfig, 16)
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
    cluster.kubectl("apply", "-f", str(REPO / "examples/flavors.yaml"))
    cluster.ensure_owner()
    run_id = uuid.uuid4().hex[:6]
    logs = REPO / "bench" / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    hole = BlackHole()
    operator = Operator(
        kubeconfig,
        logs / f"operator-stall-{run_id}.log",
        args.core,
        **stalled_backend(args.backend, hole, logs, run_id),
    )
    flavor, kind = STALLED[args.backend]
    namespace = f"bench-stall-{run_id}"
    cluster.create_namespace(namespace)
    results: list[tuple[str, str]] = []
    try:
        operator.start()
        tracker = Tracker(cluster, namespace, "app.kubernetes.io/managed-by=analysis-operator")
        pod_latencies(cluster, tracker, namespace, "warm", 3, 60)  # first pods pay for connection setup
        baseline = pod_latencies(cluster, tracker, namespace, "base", args.pods, 60)

        for index in range(args.vms):
            cluster.create_environment(namespace, f"stuck{index:03d}", flavor=flavor)
        deadline = time.monotonic() + 60
        while hole.accepted < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2)  # let every VM handler reach the cloud and block
        stuck = sum(1 for index in range(args.vms) if tracker.phases.get(f"stuck{index:03d}") != "Ready")
        stalled = pod_latencies(cluster, tracker, namespace, "stall", args.pods, 60)

        ratio = percentile(stalled, 50) / percentile(baseline, 50)
        results = [
            ("baseline: POST -> Ready, one at a time", summary(baseline)),
            (f"with {args.vms} {kind} creates stalled: POST -> Ready", summary(stalled)),
            (f"{kind} environments still not Ready (stuck in the backend)", f"{stuck} of {args.vms}"),
            (
                f"connections the black-hole {args.backend} has accepted / is holding",
                f"{hole.accepted} / {len(hole.held)}",
            ),
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
        # The stalled environments carry the operator's finalizer and nobody is left to run it.
        for item in cluster.list_json(cluster.custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL)[
            "items"
        ]:
            cluster.custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, item["metadata"]["name"], {"metadata": {"finalizers": None}}
            )
        cluster.core.delete_namespace(namespace)
    report = [
        f"## Stalled {args.backend} vs JupyterLab pods (bench/stall.py --backend {args.backend})",
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
