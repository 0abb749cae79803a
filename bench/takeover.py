"""How long until the standby replica acts after the active one is killed (SIGKILL).

Two operator processes with kopf peering (as the Helm chart's two replicas), against
the local stack (KUBECONFIG, CLUSTER_STATE_DIR as for the tests). Each run: start
both, kill -9 the active one, create an environment at once, and time until it is
Ready (handled by the standby). Prints the runs and the median per peering lifetime.

    .venv/bin/python bench/takeover.py --runs 5 --lifetimes 10 20
"""

from __future__ import annotations

import argparse
import pathlib
import signal
import statistics
import sys
import tempfile
import time
import uuid

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import kubernetes

from tests.integration.conftest import Environments, kubectl
from tests.integration.test_peering import handled, split, start_pair


def one_run(lifetime: int, custom, workdir: pathlib.Path) -> float:
    namespace = f"takeover-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", namespace)
    started: list = []
    try:
        name, processes = start_pair(workdir, kubectl_config(), lifetime, on_start=lambda *pair: started.append(pair))
        active, standby = split(name, processes)
        environments = Environments(custom, namespace)
        active.stop(signal.SIGKILL)
        killed = time.monotonic()
        environments.create("after-kill", flavor="jupyter-basic")
        environments.wait_phase("after-kill", "Ready", timeout=lifetime + 60)
        took = time.monotonic() - killed
        assert handled(standby, "after-kill")
        return took
    finally:
        for name, processes in started:
            for process in processes:
                process.stop(signal.SIGKILL)
            kubectl("delete", "clusterkopfpeering", name, "--ignore-not-found")
        kubectl("delete", "namespace", namespace, "--wait=false")


def kubectl_config() -> str:
    import os

    return os.environ["KUBECONFIG"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--lifetimes", type=int, nargs="+", default=[10, 20])
    arguments = parser.parse_args()
    custom = kubernetes.client.CustomObjectsApi(kubernetes.config.new_client_from_config(config_file=kubectl_config()))
    root = pathlib.Path(__file__).resolve().parents[1]
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(root / "crds"))
    kubectl("apply", "-f", str(root / "examples/flavors.yaml"))
    print("| peering lifetime | runs (s) | median | min | max |\n|---|---|---|---|---|")
    for lifetime in arguments.lifetimes:
        times = []
        for _ in range(arguments.runs):
            with tempfile.TemporaryDirectory() as workdir:
                times.append(one_run(lifetime, custom, pathlib.Path(workdir)))
        print(
            f"| {lifetime} s | {', '.join(f'{t:.1f}' for t in times)} | **{statistics.median(times):.1f} s** "
            f"| {min(times):.1f} | {max(times):.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
