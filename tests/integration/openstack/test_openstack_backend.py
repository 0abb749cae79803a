"""The OpenStack backend against a real Nova (fake virt driver) started by hack/openstack.sh."""

from __future__ import annotations

import asyncio
import socket

import pytest

from analysis_operator.backends.base import BackendUnavailable, Launch, State
from analysis_operator.backends.openstack import META_UID, OpenStackBackend, build_server_request
from analysis_operator.backends.slurm import SlurmBackend
from analysis_operator.engine.converge import Context
from analysis_operator.engine.reconciler import Reconciler
from analysis_operator.engine.sweep import sweep_orphans
from analysis_operator.settings import SlurmSettings

pytestmark = pytest.mark.integration
TOKEN = "desktop-token-not-logged"


@pytest.fixture
def wait_for_state(wait_until):
    def wait(backend, environment, state, timeout=60):
        return wait_until(
            lambda: asyncio.run(backend.observe(environment)),
            lambda observation: observation.state == state,
            timeout=timeout,
            what=f"{environment.name} to be {state.value}",
        )

    return wait


def servers_named(cloud, environment):
    return [
        server
        for server in cloud.compute.servers(details=True)
        if server.name == environment.child_name and (server.metadata or {}).get(META_UID) == environment.uid
    ]


def test_create_goes_ready(backend, make_environment, basic_flavor, wait_for_state):
    environment = make_environment()
    first = asyncio.run(backend.ensure(Launch(environment, basic_flavor, TOKEN)))
    assert first.state in (State.PROVISIONING, State.READY)
    ready = wait_for_state(backend, environment, State.READY)
    assert ready.reference["id"] == first.reference["id"]
    assert ready.reference["state"] == "ACTIVE"
    assert (ready.cpus, ready.gpus) == (2.0, 0)
    assert TOKEN not in repr(ready)


def test_gpu_flavor_is_scheduled_then_refused_when_capacity_is_gone(backend, make_environment, gpu_flavor, wait_until):
    ready = []
    for _ in range(8):  # the local cloud has 2 GPUs; stop at the first refusal
        environment = make_environment(flavor="vm-gpu")
        asyncio.run(backend.ensure(Launch(environment, gpu_flavor, TOKEN)))
        settled = wait_until(
            lambda: asyncio.run(backend.observe(environment)),
            lambda observation: observation.state in (State.READY, State.FAILED),
            what="the GPU server to settle",
        )
        if settled.state == State.FAILED:
            break
        assert settled.gpus == 1
        ready.append(environment)
    assert ready, "no GPU server was scheduled at all"
    assert settled.state == State.FAILED
    assert settled.reason == "ServerError"
    assert "No valid host was found" in settled.message
    # Reconciling again reports the same failure; it does not create another server.
    again = asyncio.run(backend.ensure(Launch(environment, gpu_flavor, TOKEN)))
    assert again.state == State.FAILED
    assert again.reference["id"] == settled.reference["id"]


def test_shelve_and_unshelve_keep_the_server(backend, make_environment, basic_flavor, wait_for_state, wait_until):
    environment = make_environment()
    asyncio.run(backend.ensure(Launch(environment, basic_flavor, TOKEN)))
    ready = wait_for_state(backend, environment, State.READY)
    asyncio.run(backend.suspend(environment))
    shelved = wait_until(
        lambda: asyncio.run(backend.observe(environment)),
        lambda observation: observation.reason == "Shelved",
        what="shelved",
    )
    assert shelved.reference["state"] in ("SHELVED", "SHELVED_OFFLOADED")
    assert (shelved.cpus, shelved.gpus) == (0.0, 0)
    asyncio.run(backend.resume(Launch(environment, basic_flavor, TOKEN)))
    resumed = wait_for_state(backend, environment, State.READY)
    assert resumed.reference["id"] == ready.reference["id"]


def test_delete_is_confirmed_only_once_nova_has_no_server(
    backend, cloud, make_environment, basic_flavor, wait_for_state, wait_until
):
    environment = make_environment()
    asyncio.run(backend.ensure(Launch(environment, basic_flavor, TOKEN)))
    wait_for_state(backend, environment, State.READY)
    assert asyncio.run(backend.delete(environment)) is False  # asked, not yet confirmed
    wait_until(lambda: asyncio.run(backend.delete(environment)), bool, what="delete confirmed")
    assert asyncio.run(backend.observe(environment)).state == State.GONE
    assert servers_named(cloud, environment) == []


def test_a_restarted_operator_adopts_the_server(settings, cloud, make_environment, basic_flavor):
    environment = make_environment()
    before_restart = OpenStackBackend(settings)
    try:
        created = asyncio.run(before_restart.ensure(Launch(environment, basic_flavor, TOKEN)))
    finally:
        before_restart.close()
    after_restart = OpenStackBackend(settings)
    try:
        adopted = asyncio.run(after_restart.ensure(Launch(environment, basic_flavor, TOKEN)))
        again = asyncio.run(after_restart.ensure(Launch(environment, basic_flavor, TOKEN)))
    finally:
        after_restart.close()
    assert adopted.reference["id"] == created.reference["id"]
    assert again.reference["id"] == created.reference["id"]
    assert len(servers_named(cloud, environment)) == 1


def test_same_name_in_another_namespace_gets_its_own_server(backend, make_environment, basic_flavor):
    first = make_environment(name="shared-name")
    second = make_environment(name="shared-name")
    one = asyncio.run(backend.ensure(Launch(first, basic_flavor, TOKEN)))
    two = asyncio.run(backend.ensure(Launch(second, basic_flavor, TOKEN)))
    assert one.reference["id"] != two.reference["id"]


def test_list_managed_finds_an_orphan(settings, make_environment, basic_flavor):
    orphan = make_environment()
    backend = OpenStackBackend(settings)
    try:
        created = asyncio.run(backend.ensure(Launch(orphan, basic_flavor, TOKEN)))
        # The operator restarts; its environment is gone from Kubernetes, the server is not.
        managed = asyncio.run(OpenStackBackend(settings).list_managed())
    finally:
        backend.close()
    found = [item for item in managed if item.uid == orphan.uid]
    assert [(item.namespace, item.name, item.backend_id) for item in found] == [
        (orphan.namespace, orphan.name, created.reference["id"])
    ]


def test_a_duplicate_server_is_deleted_at_the_next_observe(
    backend, settings, cloud, make_environment, basic_flavor, wait_for_state, wait_until
):
    """A create whose answer was lost and was sent again (or one per replica across a failover): the
    second server ran on, uncharged, until the environment was deleted; only a warning was logged."""
    environment = make_environment()
    first = asyncio.run(backend.ensure(Launch(environment, basic_flavor, TOKEN)))
    wait_for_state(backend, environment, State.READY)  # seconds later: the duplicate is the younger
    request = build_server_request(environment, basic_flavor, TOKEN, settings)
    duplicate = asyncio.run(backend._run(backend._create_server, request))  # the same create, sent again
    assert {server.id for server in servers_named(cloud, environment)} == {first.reference["id"], duplicate.id}
    assert asyncio.run(backend.observe(environment)).reference["id"] == first.reference["id"]
    wait_until(
        lambda: [server.id for server in servers_named(cloud, environment)],
        lambda ids: ids == [first.reference["id"]],
        what="the duplicate server deleted",
    )


class Environments:
    """The API server's answer for the orphan sweep: every environment exists but `gone`'s."""

    def __init__(self, gone: str) -> None:
        self.gone = gone

    async def environment_exists(self, namespace: str, name: str, uid: str) -> bool:
        return uid != self.gone

    async def delete_owned(self, kind: str, namespace: str, name: str, label: str, value: str) -> bool:
        return False  # no token Secret: this test has no API server


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_orphan_sweep_removes_a_vm_while_slurm_is_down(
    settings, cloud, make_environment, basic_flavor, wait_until, tmp_path
):
    """Slurm comes before OpenStack in the backends: slurmrestd down, its listing raised out of the
    orphan sweep, and no VM was removed for as long as Slurm stayed down (an Expired one uncharged)."""
    orphan = make_environment()
    openstack = OpenStackBackend(settings)
    (tmp_path / "slurm.jwt").write_text("a-token")
    slurm_settings = SlurmSettings(
        enabled=True, url=f"http://127.0.0.1:{_closed_port()}", token_file=str(tmp_path / "slurm.jwt")
    )
    slurm = SlurmBackend(slurm_settings)
    try:
        asyncio.run(openstack.ensure(Launch(orphan, basic_flavor, TOKEN)))
        with pytest.raises(BackendUnavailable, match="unreachable"):  # what the sweep meets first
            asyncio.run(slurm.list_managed())
        context = Context(kube=Environments(gone=orphan.uid), backends={"slurm": slurm, "openstack": openstack})
        assert asyncio.run(sweep_orphans(Reconciler(context, {}, {}))) == 1
    finally:
        slurm.close()
        openstack.close()
    wait_until(lambda: servers_named(cloud, orphan), lambda servers: servers == [], what="the orphan VM deleted")


@pytest.mark.parametrize("service, port", [("nova-api", "8774"), ("keystone", "5000")])
def test_cloud_down_is_unavailable_then_recovers(
    settings, openstack_script, make_environment, basic_flavor, service, port, wait_for_state, wait_until
):
    environment = make_environment()
    backend = OpenStackBackend(settings)
    try:
        asyncio.run(backend.ensure(Launch(environment, basic_flavor, TOKEN)))
        wait_for_state(backend, environment, State.READY)
        openstack_script("stop", service)
        try:
            # A fresh backend has no cached token: it must log in to keystone first.
            fresh = OpenStackBackend(settings)
            try:
                with pytest.raises(BackendUnavailable) as caught:
                    asyncio.run(fresh.observe(environment))
            finally:
                fresh.close()
            assert port in str(caught.value)
            assert "local-only" not in str(caught.value)  # no password in the message
        finally:
            openstack_script("up")
        recovered = wait_until(
            lambda: _observe_or_none(backend, environment),
            lambda observation: observation is not None,
            timeout=60,
            what=f"{service} back",
        )
        assert recovered.state == State.READY
    finally:
        backend.close()


def _observe_or_none(backend, environment):
    try:
        return asyncio.run(backend.observe(environment))
    except BackendUnavailable:
        return None
