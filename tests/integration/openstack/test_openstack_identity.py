"""The VM's desktop user is its owner, on a real Nova server: the cloud-init Nova holds creates the
owner's groups with their gids and the desktop account with the owner's uid, gid and the gids of
the groups that grant the mounted data (the fake virt driver runs no cloud-init: what Nova would
hand the guest is checked)."""

from __future__ import annotations

import base64

import yaml

from tests.integration.openstack.test_openstack_datasets import admin_cloud  # noqa: F401 (fixture)
from tests.integration.test_posix_identity import directory  # noqa: F401 (fixture)


def test_the_desktop_user_is_the_owner_with_their_uid_gid_and_data_groups(vm_environments, admin_cloud, directory):
    alice = directory.user("alice", 22001, 22001)
    team = directory.group("team", [alice], gid=7001)
    directory.group("unrelated", [alice], gid=7002)  # grants nothing mounted: left out
    raw = directory.dataset("raw", [team])
    vm_environments.create("desk-id", flavor="vm-desktop", lifetime="2h", owner=alice, datasets=[{"name": raw}])
    status = vm_environments.wait_phase("desk-id", "Ready", timeout=120)["status"]
    server = admin_cloud.compute.get_server(status["backend"]["id"])
    user_data = yaml.safe_load(base64.b64decode(server.user_data))

    assert user_data["users"] == ["default"]  # no shared desktop account
    arguments = [command[3:] for command in user_data["runcmd"] if command[:2] == ["sh", "-c"] and len(command) > 3]
    assert arguments == [
        ["aenv-group", "22001", alice],
        ["aenv-group", "7001", team],
        ["aenv-user", alice, "22001", "22001", "7001"],
    ]
    credentials = next(item for item in user_data["write_files"] if item["path"].endswith("desktop-credentials"))
    assert credentials["content"].startswith(f"{alice}:")
    vm_environments.delete("desk-id")
