"""Datasets on a real Nova server: the granted NFS shares, read-only, in the VM's cloud-init."""

from __future__ import annotations

import base64

import pytest
import yaml

from tests.integration.test_datasets import PUBLIC, catalogue, embargoed  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def admin_cloud(settings):
    """Nova shows a server's user data to administrators only (the stack's "<cloud>-admin" entry)."""
    import openstack.config
    import openstack.connection

    config = openstack.config.OpenStackConfig(config_files=[settings.openstack.clouds_yaml])
    return openstack.connection.Connection(config=config.get_one(cloud=f"{settings.openstack.cloud}-admin"))


def share(name: str) -> dict:
    return {"nfs": {"server": "nfs.facility.example", "path": f"/exports/{name}"}}


def test_a_vm_mounts_exactly_its_granted_datasets_read_only(vm_environments, admin_cloud, catalogue):
    raw = catalogue.dataset("raw", embargoed(members=("alice",)), storage=share("raw"))
    reference = catalogue.dataset("reference", PUBLIC, storage=share("reference"))
    catalogue.dataset("unrelated", PUBLIC, storage=share("unrelated"))
    vm_environments.create(
        "desk-data",
        flavor="vm-desktop",
        lifetime="2h",
        owner="alice",
        datasets=[{"name": raw, "mountPath": "/data/beamtime/raw"}, {"name": reference}],
    )
    status = vm_environments.wait_phase("desk-data", "Ready", timeout=120)["status"]
    server = admin_cloud.compute.get_server(status["backend"]["id"])
    user_data = yaml.safe_load(base64.b64decode(server.user_data))
    mounts = [entry[:3] for entry in user_data["mounts"]]
    assert mounts == [
        ["nfs.facility.example:/exports/raw", "/data/beamtime/raw", "nfs"],
        ["nfs.facility.example:/exports/reference", f"/data/{reference}", "nfs"],
    ]
    assert all(entry[3].split(",")[0] == "ro" for entry in user_data["mounts"])
    vm_environments.delete("desk-data")
