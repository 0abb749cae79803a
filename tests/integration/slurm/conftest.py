"""A real Slurm for the backend tests: hack/slurm.sh, unless one is given.

If ANALYSIS_OPERATOR_SLURM_URL is set, the tests use that cluster as
configured by the environment and leave it running; otherwise they start the
local one and stop it at the end of the session. Its compute node has an
address of its own (a network namespace the script makes, 10.250.N.2), which
the tests reach over the node's veth pair; jobs run the real JupyterLab.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from analysis_operator.backends.slurm import SlurmBackend
from analysis_operator.model.domain import Environment
from analysis_operator.settings import SlurmSettings, load_settings
from tests.integration.invariant import PROBES, Managed
from tests.integration.scripts import parse_exports, run_script

REPO = pathlib.Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def slurm_environ() -> Iterator[dict[str, str]]:
    if os.environ.get("ANALYSIS_OPERATOR_SLURM_URL"):
        yield dict(os.environ)
        return
    run_script("slurm.sh", "up")
    try:
        yield {**os.environ, **parse_exports(run_script("slurm.sh", "env"))}
    finally:
        run_script("slurm.sh", "down")


@pytest.fixture(scope="session")
def slurm_script() -> Callable[[str], str]:
    """Runs hack/slurm.sh up|down|env|status (for tests that stop a daemon)."""
    return lambda *arguments: run_script("slurm.sh", *arguments)


def slurm_commands_path(environ: dict[str, str]) -> str:
    """PATH for Slurm's commands (srun, scontrol, squeue) of the cluster under test: the jobs' PATH
    (hack/slurm.sh puts the built Slurm's bin first), then the system's."""
    return f"{environ.get('ANALYSIS_OPERATOR_SLURM_JOB_PATH') or '/usr/bin:/bin'}:/usr/sbin:/sbin"


@pytest.fixture(scope="session")
def slurm_settings(slurm_environ) -> SlurmSettings:
    return load_settings(slurm_environ).slurm


@pytest.fixture
def slurm_environments(operator, slurm_environ, slurm_settings, environments):
    """Environments on the Cluster card: the session's operator with the Slurm backend enabled (from now
    on), and the invariant checker watching Slurm jobs too."""
    operator.configure(
        **{
            key: value
            for key, value in slurm_environ.items()
            if key.startswith("ANALYSIS_OPERATOR_SLURM_") or key == "SLURM_CONF"
        }
    )

    def jobs() -> list[Managed]:
        return [
            Managed("SlurmJob", job.namespace, job.name, job.uid, job.backend_id)
            for job in asyncio.run(SlurmBackend(slurm_settings).list_managed())
        ]

    PROBES["slurm"] = jobs
    return environments


@pytest.fixture
def operator_leaves_slurm_alone():
    """For tests that drive the backend with environments that exist only in the test: a running
    session operator with Slurm enabled would rightly cancel their jobs as orphans. Turned off
    here (if on); `slurm_environments` turns it on again for the tests that need it."""
    from tests.integration.conftest import OperatorProcess

    for process in list(OperatorProcess.running):
        if process.settings.get("ANALYSIS_OPERATOR_SLURM_ENABLED") == "true":
            process.configure(ANALYSIS_OPERATOR_SLURM_ENABLED="false")


@pytest.fixture
def backend(slurm_settings) -> SlurmBackend:
    return SlurmBackend(slurm_settings)


@pytest.fixture
def make_environment(request, slurm_settings) -> Iterator[Callable[..., Environment]]:
    """Environments with fresh uids; their jobs are cancelled after the test."""
    created: list[Environment] = []

    def factory(**overrides) -> Environment:
        suffix = uuid.uuid4().hex[:8]
        values = dict(
            namespace=f"test-{suffix}",
            name=request.node.name[:30].replace("_", "-").strip("-"),
            uid=str(uuid.uuid4()),
            owner="alice",
            flavor="cluster-test",
        )
        values.update(overrides)
        environment = Environment(**values)
        created.append(environment)
        return environment

    yield factory
    cleaner = SlurmBackend(slurm_settings)
    for environment in created:
        deadline = time.monotonic() + 30
        while not asyncio.run(cleaner.delete(environment)):
            assert time.monotonic() < deadline, f"job of {environment.name} still active after 30 s"
            time.sleep(0.5)
