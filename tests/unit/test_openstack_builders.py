"""The OpenStack backend's pure parts: server request, cloud-init, status mapping."""

from __future__ import annotations

import asyncio
import json
import shlex
import threading
import types

import pytest
import yaml

from analysis_operator.backends.base import BackendUnavailable, State
from analysis_operator.backends.openstack import (
    MANAGED_TAG,
    META_MANAGED_BY,
    META_NAME,
    META_NAMESPACE,
    META_OWNER,
    META_UID,
    OpenStackBackend,
    _translate_errors,
    build_dataset_mounts,
    build_identity_metadata,
    build_server_request,
    connection_url,
    gpus_from_extra_specs,
    observe_server,
)
from analysis_operator.model.domain import (
    BackendKind,
    Dataset,
    DatasetStorage,
    Environment,
    Flavor,
    Mount,
    OpenStackSpec,
)
from analysis_operator.settings import OpenStackSettings, Settings

SETTINGS = Settings(openstack=OpenStackSettings(cloud="analysis", executor_workers=2))


def mount(name: str, path: str = "", server: str = "nfs.facility.eu", export: str = "") -> Mount:
    storage = DatasetStorage(nfs_server=server, nfs_path=export or f"/exports/{name}")
    return Mount(Dataset(name=name, pid=f"10.5072/{name}", storage=storage), path or f"/data/{name}", "public")


MOUNTS = (mount("ds-1"), mount("ds-2"))

NASTY = [
    '/data/x"\nruncmd: [[sh, -c, "rm -rf /"]]',
    "'; rm -rf / #",
    "$(reboot) `id` && halt",
    "{{ 7 * 7 }} {% raw %}",
    "key: value\n- item\n# comment",
    "/data/ünïcödé with spaces\ttab",
    '\\"\\n',
]


def make_environment(**overrides) -> Environment:
    values = dict(namespace="team-a", name="desk", uid="0b1c-uid", owner="alice", flavor="vm-basic")
    values.update(overrides)
    return Environment(**values)


def make_flavor(allow_custom_image=False, **openstack) -> Flavor:
    spec = dict(flavor="aenv.basic", image="analysis-desktop")
    spec.update(openstack)
    return Flavor(
        name="vm-basic",
        backend=BackendKind.OPENSTACK,
        allow_custom_image=allow_custom_image,
        openstack=OpenStackSpec(**spec),
    )


def user_data_of(environment, token="tok-en", mounts=()) -> dict:
    request = build_server_request(environment, make_flavor(), token, SETTINGS, mounts)
    return yaml.safe_load(request["user_data"])


@pytest.mark.parametrize(
    "flavor, environment_image, expected",
    [
        (make_flavor(), "", {"flavor": "aenv.basic", "image": "analysis-desktop", "network": "", "key_name": ""}),
        (
            make_flavor(network="science-net", key_name="ops"),
            "",
            {"flavor": "aenv.basic", "image": "analysis-desktop", "network": "science-net", "key_name": "ops"},
        ),
        # A custom image only where the flavor allows it.
        (make_flavor(), "my-desktop", {"image": "analysis-desktop"}),
        (make_flavor(allow_custom_image=True), "my-desktop", {"image": "my-desktop"}),
        (make_flavor(allow_custom_image=True), "", {"image": "analysis-desktop"}),
        (make_flavor(flavor="aenv.gpu"), "", {"flavor": "aenv.gpu"}),
    ],
)
def test_server_request_fields(flavor, environment_image, expected):
    request = build_server_request(make_environment(image=environment_image), flavor, "t", SETTINGS)
    assert {key: request[key] for key in expected} == expected
    assert request["name"] == "aenv-desk"
    assert request["tags"] == [MANAGED_TAG]


def test_identity_metadata_carries_the_environment():
    assert build_identity_metadata(make_environment()) == {
        META_MANAGED_BY: "analysis-operator",
        META_NAMESPACE: "team-a",
        META_NAME: "desk",
        META_UID: "0b1c-uid",
        META_OWNER: "alice",
    }


def test_identity_metadata_fits_novas_limit():
    metadata = build_identity_metadata(make_environment(owner="x" * 1000))
    assert all(len(value) <= 255 for value in metadata.values())


@pytest.mark.parametrize(
    "mounts, expected",
    [
        ((), []),
        ((mount("ds-1"),), [("nfs.facility.eu:/exports/ds-1", "/data/ds-1")]),
        (
            (mount("ds-1", "/data/beamtime"), mount("ds-2")),
            [("nfs.facility.eu:/exports/ds-1", "/data/beamtime"), ("nfs.facility.eu:/exports/ds-2", "/data/ds-2")],
        ),
    ],
)
def test_dataset_mounts(mounts, expected):
    built = build_dataset_mounts(mounts)
    assert [(entry["source"], entry["mount_path"]) for entry in built] == expected


def test_user_data_mounts_datasets_read_only():
    user_data = user_data_of(make_environment(), mounts=MOUNTS)
    assert [entry[:3] for entry in user_data["mounts"]] == [
        ["nfs.facility.eu:/exports/ds-1", "/data/ds-1", "nfs"],
        ["nfs.facility.eu:/exports/ds-2", "/data/ds-2", "nfs"],
    ]
    assert all(entry[3].split(",")[0] == "ro" for entry in user_data["mounts"])


def test_user_data_without_datasets_has_no_mounts():
    assert "mounts" not in user_data_of(make_environment())


def test_user_data_sets_desktop_password_from_token_without_command_line():
    user_data = user_data_of(make_environment(), token="s3cret-token")
    files = {entry["path"]: entry for entry in user_data["write_files"]}
    credentials = files["/etc/analysis-environment/desktop-credentials"]
    assert credentials["content"] == "analysis:s3cret-token"
    assert credentials["permissions"] == "0600"
    assert "s3cret-token" not in json.dumps(user_data["runcmd"])


def test_user_data_starts_remote_desktop():
    user_data = user_data_of(make_environment())
    assert "xrdp" in user_data["packages"]
    assert ["systemctl", "enable", "--now", "xrdp"] in user_data["runcmd"]


@pytest.mark.parametrize("nasty", NASTY)
def test_user_controlled_values_cannot_break_the_yaml(nasty):
    environment = make_environment(owner=nasty)
    user_data = user_data_of(environment, token=nasty, mounts=(mount("ds-1", nasty, server=nasty, export=nasty),))
    # The structure is exactly the template's, whatever the values hold.
    assert set(user_data) == {"hostname", "users", "write_files", "mounts", "packages", "runcmd"}
    assert user_data["mounts"] == [[f"{nasty}:{nasty}", nasty, "nfs", user_data["mounts"][0][3], "0", "0"]]
    files = {entry["path"]: entry for entry in user_data["write_files"]}
    identity = json.loads(files["/etc/analysis-environment/identity.json"]["content"])
    assert identity["owner"] == nasty
    assert files["/etc/analysis-environment/desktop-credentials"]["content"] == f"analysis:{nasty}"
    # In the one shell line that holds the path, the shell sees it as single words.
    mount_line = next(entry[2] for entry in user_data["runcmd"] if "mountpoint" in str(entry))
    words = shlex.split(mount_line)
    assert words[:3] == ["mkdir", "-p", nasty]


@pytest.mark.parametrize(
    "extra_specs, expected",
    [
        ({}, 0),
        ({"resources:VGPU": "1"}, 1),
        ({"resources:CUSTOM_GPU": "2", "trait:CUSTOM_ANALYSIS_GPU": "required"}, 2),
        ({"resources1:VGPU": "1", "resources2:VGPU": "1"}, 2),
        ({"pci_passthrough:alias": "a100:2"}, 2),
        ({"pci_passthrough:alias": "a100:1,t4"}, 2),
        ({"resources:VCPU": "4", "hw:cpu_policy": "dedicated"}, 0),
    ],
)
def test_gpus_from_extra_specs(extra_specs, expected):
    assert gpus_from_extra_specs(extra_specs) == expected


@pytest.mark.parametrize(
    "addresses, expected",
    [
        ({}, ""),
        ({"net": [{"addr": "10.0.0.5", "OS-EXT-IPS:type": "fixed"}]}, "rdp://10.0.0.5:3389"),
        (
            {
                "net": [
                    {"addr": "10.0.0.5", "OS-EXT-IPS:type": "fixed"},
                    {"addr": "192.0.2.7", "OS-EXT-IPS:type": "floating"},
                ]
            },
            "rdp://192.0.2.7:3389",
        ),
        ({"v6": [{"addr": "2001:db8::5"}]}, "rdp://[2001:db8::5]:3389"),
    ],
)
def test_connection_url(addresses, expected):
    assert connection_url(addresses) == expected


def fake_server(status, task_state=None, fault=None, addresses=None, vcpus=4, extra_specs=None):
    flavor = types.SimpleNamespace(vcpus=vcpus, extra_specs=extra_specs or {})
    return types.SimpleNamespace(
        id="srv-1", status=status, task_state=task_state, fault=fault, addresses=addresses or {}, flavor=flavor
    )


@pytest.mark.parametrize(
    "server, state, reason",
    [
        (None, State.GONE, "ServerGone"),
        (fake_server("BUILD"), State.PROVISIONING, "ServerBuilding"),
        (fake_server("ACTIVE"), State.READY, "ServerActive"),
        (fake_server("ACTIVE", task_state="shelving"), State.PROVISIONING, "ServerShelving"),
        (fake_server("ERROR", fault={"message": "No valid host was found. "}), State.FAILED, "ServerError"),
        (fake_server("ERROR"), State.FAILED, "ServerError"),
        (fake_server("SHELVED"), State.SUSPENDED, "Shelved"),
        (fake_server("SHELVED_OFFLOADED"), State.SUSPENDED, "Shelved"),
        (fake_server("HARD_REBOOT"), State.PROVISIONING, "ServerHardReboot"),
        (fake_server("DELETED"), State.GONE, "ServerGone"),
    ],
)
def test_observe_server_states(server, state, reason):
    observation = observe_server(server)
    assert (observation.state, observation.reason) == (state, reason)


def test_active_server_reports_resources_and_url():
    server = fake_server(
        "ACTIVE", addresses={"net": [{"addr": "10.0.0.5"}]}, vcpus=4, extra_specs={"resources:CUSTOM_GPU": "1"}
    )
    observation = observe_server(server)
    assert (observation.cpus, observation.gpus, observation.url) == (4.0, 1, "rdp://10.0.0.5:3389")
    assert observation.reference == {"id": "srv-1", "state": "ACTIVE", "addresses": ["10.0.0.5"]}


def test_error_carries_novas_fault_message():
    observation = observe_server(fake_server("ERROR", fault={"message": "No valid host was found. "}))
    assert observation.message == "No valid host was found."


@pytest.mark.parametrize("shelved", ["SHELVED", "SHELVED_OFFLOADED", "BUILD", "ERROR"])
def test_only_active_servers_hold_resources(shelved):
    observation = observe_server(fake_server(shelved, extra_specs={"resources:VGPU": "1"}))
    assert (observation.cpus, observation.gpus) == (0.0, 0)


def test_unreachable_cloud_becomes_backend_unavailable_without_secrets():
    from keystoneauth1 import exceptions as ksa

    def call():
        raise ksa.ConnectFailure(
            "Unable to establish connection to http://admin:hunter2@127.0.0.1:8774/v2.1/servers: refused"
        )

    with pytest.raises(BackendUnavailable) as caught:
        _translate_errors("analysis", call)
    assert "127.0.0.1:8774" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_refused_credentials_become_backend_unavailable():
    from keystoneauth1 import exceptions as ksa

    def call():
        raise ksa.http.Unauthorized("The request you have made requires authentication.")

    with pytest.raises(BackendUnavailable, match="credentials"):
        _translate_errors("analysis", call)


def test_sdk_calls_run_in_the_backends_own_threads():
    seen = []

    class FakeCompute:
        def servers(self, **query):
            seen.append(threading.current_thread().name)
            return []

    backend = OpenStackBackend(SETTINGS, connect=lambda: types.SimpleNamespace(compute=FakeCompute()))
    try:
        observation = asyncio.run(backend.observe(make_environment()))
    finally:
        backend.close()
    assert observation.state == State.GONE
    assert seen and seen[0].startswith("openstack")
