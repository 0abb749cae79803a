"""A real OpenStack (Nova with the fake virt driver) for the backend tests: hack/openstack.sh.

If ANALYSIS_OPERATOR_OPENSTACK_CLOUDS_YAML is set, the tests use that cloud as
configured by the environment and leave it running; otherwise they start the
local one (about 35 s cold, 20 s warm) and stop it at the end of the session.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from analysis_operator.backends.openstack import OpenStackBackend
from analysis_operator.model.domain import BackendKind, Environment, Flavor, OpenStackSpec, Resources
from analysis_operator.settings import Settings, load_settings
from tests.integration.invariant import PROBES, Managed
from tests.integration.scripts import parse_exports, run_script

REPO = pathlib.Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def openstack_environ() -> Iterator[dict[str, str]]:
    if os.environ.get("ANALYSIS_OPERATOR_OPENSTACK_CLOUDS_YAML"):
        yield dict(os.environ)
        return
    try:
        run_script("openstack.sh", "up")
    except Exception:
        run_script("openstack.sh", "down")  # a half-started stack must not outlive the session
        raise
    try:
        yield {**os.environ, **parse_exports(run_script("openstack.sh", "env"))}
    finally:
        run_script("openstack.sh", "down")


@pytest.fixture(scope="session")
def openstack_script(openstack_environ) -> Callable[..., str]:
    """Runs hack/openstack.sh (e.g. `stop nova-api`, then `up` to bring it back)."""
    if "ANALYSIS_OPERATOR_OPENSTACK_CLOUDS_YAML" in os.environ:
        pytest.skip("stopping services needs the local stack started by these tests")
    return lambda *arguments: run_script("openstack.sh", *arguments)


@pytest.fixture(scope="session")
def settings(openstack_environ) -> Settings:
    return load_settings({**openstack_environ, "ANALYSIS_OPERATOR_OPENSTACK_ENABLED": "true"})


@pytest.fixture
def backend(settings) -> Iterator[OpenStackBackend]:
    backend = OpenStackBackend(settings)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def cloud(openstack_environ, settings) -> Any:
    """A plain openstacksdk connection, to check what Nova holds independently of the backend."""
    import openstack.config
    import openstack.connection

    config = openstack.config.OpenStackConfig(config_files=[settings.openstack.clouds_yaml])
    return openstack.connection.Connection(config=config.get_one(cloud=settings.openstack.cloud))


def make_vm_flavor(name: str, nova_flavor: str, gpu: int = 0) -> Flavor:
    return Flavor(
        name=name,
        backend=BackendKind.OPENSTACK,
        resources=Resources(cpu="2", gpu=gpu),
        openstack=OpenStackSpec(flavor=nova_flavor, image="analysis-desktop"),
    )


@pytest.fixture(scope="session")
def basic_flavor() -> Flavor:
    return make_vm_flavor("vm-basic", "aenv.basic")


@pytest.fixture(scope="session")
def gpu_flavor() -> Flavor:
    return make_vm_flavor("vm-gpu", "aenv.gpu", gpu=1)


def wait_until(
    fetch: Callable[[], Any], done: Callable[[Any], bool], timeout: float = 60, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = fetch()
        if done(result):
            return result
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}: {result}"
        time.sleep(0.3)


@pytest.fixture(name="wait_until", scope="session")
def wait_until_fixture() -> Callable[..., Any]:
    """wait_until(fetch, done, timeout=60, what=...): poll until done(fetch()), or fail."""
    return wait_until


@pytest.fixture
def make_environment(request, settings) -> Iterator[Callable[..., Environment]]:
    """Environments with fresh uids; their servers are deleted (and confirmed gone) after the test."""
    created: list[Environment] = []

    def factory(**overrides) -> Environment:
        name = request.node.name[:30].replace("_", "-").strip("-") + "-" + uuid.uuid4().hex[:4]
        values = dict(
            namespace=f"test-{uuid.uuid4().hex[:8]}", name=name, uid=str(uuid.uuid4()), owner="alice", flavor="vm-basic"
        )
        values.update(overrides)
        environment = Environment(**values)
        created.append(environment)
        return environment

    yield factory
    cleaner = OpenStackBackend(settings)
    try:
        for environment in created:
            wait_until(
                lambda: asyncio.run(cleaner.delete(environment)),
                bool,
                timeout=60,
                what=f"server of {environment.name} to be gone",
            )
    finally:
        cleaner.close()


@pytest.fixture
def vm_environments(operator, openstack_environ, settings, environments):
    """Environments on the VM cards: the session's operator with the OpenStack backend enabled (from now
    on), and the invariant checker watching Nova servers too."""
    operator_settings = {
        key: value
        for key, value in openstack_environ.items()
        if key.startswith("ANALYSIS_OPERATOR_OPENSTACK_") or key == "OS_CLIENT_CONFIG_FILE"
    }
    operator.configure(ANALYSIS_OPERATOR_OPENSTACK_ENABLED="true", **operator_settings)

    def servers() -> list[Managed]:
        backend = OpenStackBackend(settings)
        try:
            return [
                Managed("Server", server.namespace, server.name, server.uid, server.backend_id)
                for server in asyncio.run(backend.list_managed())
            ]
        finally:
            backend.close()

    PROBES["openstack"] = servers
    return environments
