"""Helpers for the Helm chart tests: helm from the stack's cache, rendering, and a
kubeconfig that acts as the chart's ServiceAccount (its own token, no admin rights)."""

from __future__ import annotations

import os
import pathlib
import subprocess

import yaml

from tests.integration.conftest import CLUSTER_STATE, REPO, kubectl

CHART = REPO / "charts/analysis-operator"


def helm(*arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    """helm as built by hack/build.sh (cluster state's bin directory)."""
    binary = pathlib.Path((CLUSTER_STATE / "bin").read_text().strip()) / "helm"
    result = subprocess.run(
        [str(binary), *arguments],
        capture_output=True,
        text=True,
        env={**os.environ, "KUBECONFIG": os.environ["KUBECONFIG"]},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(arguments)} failed ({result.returncode}):\n{result.stderr}")
    return result


def render(release: str, namespace: str, *arguments: str) -> list[dict]:
    output = helm("template", release, str(CHART), "--namespace", namespace, *arguments).stdout
    return [document for document in yaml.safe_load_all(output) if document]


def find(objects: list[dict], kind: str, name: str | None = None) -> dict:
    matches = [item for item in objects if item["kind"] == kind and (name is None or item["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, got {[m['metadata']['name'] for m in matches]}"
    return matches[0]


def service_account_kubeconfig(path: pathlib.Path, namespace: str, service_account: str) -> pathlib.Path:
    """A kubeconfig that authenticates with a token of the ServiceAccount (TokenRequest)."""
    token = kubectl("create", "token", service_account, "-n", namespace, "--duration", "2h").stdout.strip()
    admin = yaml.safe_load(pathlib.Path(os.environ["KUBECONFIG"]).read_text())
    cluster = admin["clusters"][0]["cluster"]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": cluster}],
        "users": [{"name": service_account, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "local", "user": service_account, "namespace": namespace}}],
        "current-context": "sa",
    }
    path.write_text(yaml.safe_dump(config))
    return path
