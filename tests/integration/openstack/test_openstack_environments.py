"""The remote-desktop VM cards end to end: AnalysisEnvironment -> operator -> real Nova (fake driver)."""
from __future__ import annotations

from tests.waiting import wait_for


def servers_named(cloud, name: str) -> list:
    return [server for server in cloud.compute.servers() if server.name == name]


def test_vm_card_becomes_an_active_server_shelved_on_suspend_and_deleted_with_the_environment(vm_environments, cloud):
    environments = vm_environments
    environments.create("desk", flavor="vm-desktop", lifetime="2h")
    status = environments.wait_phase("desk", "Ready", timeout=120)["status"]
    server_id = status["backend"]["id"]
    assert cloud.compute.get_server(server_id).status == "ACTIVE"

    environments.patch_spec("desk", suspend=True)
    environments.wait_phase("desk", "Suspended", timeout=60)
    wait_for(lambda: cloud.compute.get_server(server_id).status.startswith("SHELVED"), timeout=90,
             what="the server shelved")
    environments.patch_spec("desk", suspend=False)
    environments.wait_phase("desk", "Ready", timeout=120)
    assert environments.get("desk")["status"]["backend"]["id"] == server_id  # same server, disk kept

    environments.delete("desk")
    wait_for(lambda: all(server.id != server_id for server in cloud.compute.servers()), timeout=90,
             what="the server deleted")
    wait_for(lambda: not environments.exists("desk"), timeout=30, what="the finalizer released")
