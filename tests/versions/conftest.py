"""The Kubernetes releases the project supports besides the one the other tests run on: the oldest
and the newest, each a real cluster of its own (hack/cluster.sh, built by hack/build.sh from the
module file hack/testcluster/k8s-<version>.mod), beside the main one on other ports."""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import kubernetes
import pytest
import yaml

from tests.integration.conftest import REPO

# The release the other tests run on (hack/testcluster/go.mod), and one per module file beside it,
# each on its own ports and state directory.
MAIN = re.search(r"^\tk8s.io/kubernetes (v\S+)$", (REPO / "hack/testcluster/go.mod").read_text(), re.M)[1]  # type: ignore[index]
VERSIONS = sorted({MAIN, *(path.stem.removeprefix("k8s-") for path in (REPO / "hack/testcluster").glob("k8s-v*.mod"))})
PORT_OFFSETS = {version: 1000 + 100 * index for index, version in enumerate(VERSIONS)}


@dataclass(frozen=True)
class Cluster:
    version: str
    state: pathlib.Path

    @property
    def kubeconfig(self) -> str:
        return str(self.state / "kubeconfig")

    @property
    def minor(self) -> int:
        return int(self.version.split(".")[1])

    @property
    def api(self) -> kubernetes.client.ApiClient:
        return kubernetes.config.new_client_from_config(config_file=self.kubeconfig)

    def _run(self, tool: str, *arguments: str, check: bool, stdin: str | None) -> subprocess.CompletedProcess:
        binary = pathlib.Path((self.state / "bin").read_text().strip()) / tool
        result = subprocess.run(
            [str(binary), *arguments],
            input=stdin,
            capture_output=True,
            text=True,
            env={**os.environ, "KUBECONFIG": self.kubeconfig},
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(arguments)} on {self.version} failed:\n{result.stderr}")
        return result

    def kubectl(self, *arguments: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
        return self._run("kubectl", *arguments, check=check, stdin=stdin)

    def helm(self, *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
        return self._run("helm", *arguments, check=check, stdin=None)

    def served(self, api_version: str, kind: str) -> bool:
        """Whether this API server serves a kind in this version (MutatingAdmissionPolicy: v1 from 1.36)."""
        return kind in self._kinds(api_version)

    @functools.cache  # noqa: B019 (one Cluster per release for the module: discovery asked once per version)
    def _kinds(self, api_version: str) -> frozenset[str]:
        path = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        answer = self.kubectl("get", "--raw", path, check=False)
        return (
            frozenset(item["kind"] for item in json.loads(answer.stdout)["resources"])
            if answer.returncode == 0
            else frozenset()
        )

    def _served_documents(self, paths: tuple[pathlib.Path, ...]) -> str:
        return yaml.safe_dump_all(
            [
                document
                for path in paths
                for document in yaml.safe_load_all(path.read_text())
                if document and self.served(document["apiVersion"], document["kind"])
            ]
        )

    def delete(self, *paths: pathlib.Path) -> None:
        self.kubectl("delete", "-f", "-", stdin=self._served_documents(paths))

    def apply(self, *paths: pathlib.Path) -> None:
        """Apply these files, leaving out the kinds this release does not serve (the mutating identity
        policy before 1.36: the operator's webhook alone stamps, as the chart does by itself there)."""
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=self._served_documents(paths))


@pytest.fixture(scope="module", params=VERSIONS)
def cluster(request) -> Iterator[Cluster]:
    version = request.param
    state = pathlib.Path(f"/tmp/analysis-operator-cluster-{version}")
    environment = {
        **os.environ,
        "K8S_VERSION": version,
        "CLUSTER_STATE_DIR": str(state),
        "PORT_OFFSET": str(PORT_OFFSETS[version]),
    }
    script = str(REPO / "hack/cluster.sh")
    subprocess.run([script, "up"], check=True, env=environment)
    try:
        running = Cluster(version, state)
        answered = kubernetes.client.VersionApi(running.api).get_code()
        assert answered.git_version == version, f"{running.kubeconfig} answers {answered.git_version}, not {version}"
        yield running
    finally:
        if not os.environ.get("KEEP_CLUSTER"):
            subprocess.run([script, "down"], check=False, env=environment)
