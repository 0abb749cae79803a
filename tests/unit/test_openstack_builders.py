"""The OpenStack backend's pure parts: server request, cloud-init, status mapping."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import pathlib
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import types

import pytest
import yaml

from analysis_operator.backends.base import BackendUnavailable, Launch, State, Upstream
from analysis_operator.backends.openstack import (
    MANAGED_TAG,
    META_MANAGED_BY,
    META_NAME,
    META_NAMESPACE,
    META_OWNER,
    META_UID,
    NOVNC_PORT,
    OpenStackBackend,
    _translate_errors,
    best_address,
    build_dataset_mounts,
    build_identity_metadata,
    build_server_request,
    connection_url,
    desktop_upstream,
    gpus_from_extra_specs,
    observe_server,
)
from analysis_operator.engine.idle import parse_server
from analysis_operator.model.domain import (
    BackendKind,
    Dataset,
    DatasetStorage,
    Environment,
    Flavor,
    Mount,
    OpenStackSpec,
)
from analysis_operator.model.identity import PosixIdentity
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


def user_data_of(environment, token="tok-en", mounts=(), identity=None) -> dict:
    request = build_server_request(environment, make_flavor(), token, SETTINGS, mounts, identity)
    return yaml.safe_load(request["user_data"])


def files_of(user_data: dict) -> dict[str, dict]:
    return {entry["path"]: entry for entry in user_data["write_files"]}


def unit(text: str) -> dict[str, str]:
    """A systemd unit's settings as {key: value} (each key once in these units)."""
    lines = (line.strip() for line in text.splitlines())
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


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


DESKTOP_UNIT = "/etc/systemd/system/aenv-desktop@.service"
NOVNC_UNIT = "/etc/systemd/system/aenv-novnc.service"
AUTH_PLUGIN = "/usr/local/lib/analysis-environment/aenv_gateway_auth.py"


def test_user_data_installs_the_browser_desktop_from_distribution_packages():
    packages = user_data_of(make_environment())["packages"]
    assert {"xfce4", "tigervnc-standalone-server", "novnc", "websockify", "nfs-common"} <= set(packages)
    assert not {"xrdp", "xorgxrdp"} & set(packages)  # no RDP: nothing but the gateway would reach it


def test_vnc_desktop_runs_as_the_desktop_user_on_localhost_only():
    user_data = user_data_of(make_environment())
    desktop = unit(files_of(user_data)[DESKTOP_UNIT]["content"])
    assert desktop["User"] == "%i"  # the instance is the user: no user-controlled text in the unit
    command = desktop["ExecStart"].split()
    assert command[:3] == ["/usr/bin/tigervncserver", ":1", "-fg"]
    assert command[command.index("-localhost") + 1] == "yes"  # no password: nothing off the VM reaches it
    assert command[command.index("-SecurityTypes") + 1] == "None"
    assert command[command.index("-xstartup") + 1] == "/usr/bin/startxfce4"
    assert ["systemctl", "enable", "--now", "aenv-desktop@analysis.service"] in user_data["runcmd"]


def test_the_desktop_runs_as_the_owners_account():
    identity = PosixIdentity(user="alice", uid=20001, gid=20001)
    runcmd = user_data_of(make_environment(), identity=identity)["runcmd"]
    useradd = next(index for index, entry in enumerate(runcmd) if "useradd" in str(entry))
    started = runcmd.index(["systemctl", "enable", "--now", "aenv-desktop@alice.service"])
    assert useradd < started


def test_websockify_serves_novnc_to_the_gateway_and_checks_the_access_token():
    user_data = user_data_of(make_environment(), token="s3cret-token")
    files = files_of(user_data)
    novnc = unit(files[NOVNC_UNIT]["content"])
    command = novnc["ExecStart"].split()
    assert command[0] == "/usr/bin/websockify"
    assert command[-2:] == [f"0.0.0.0:{NOVNC_PORT}", "localhost:5901"]
    assert command[command.index("--web") + 1] == WEB_ROOT  # noVNC's files and the activity report
    assert novnc["ExecStartPre"] == f"+{ACTIVITY_AGENT} --prepare {WEB_ROOT}"  # root: DynamicUser cannot write it
    assert "--web-auth" in command  # noVNC's files too, not only the websocket
    assert command[command.index("--auth-plugin") + 1] == "aenv_gateway_auth.GatewayToken"
    assert command[command.index("--auth-source") + 1] == "token"
    assert novnc["DynamicUser"] == "yes"  # not root, and the token file stays root's
    assert novnc["LoadCredential"] == "token:/etc/analysis-environment/access-token"
    assert novnc["Environment"] == "PYTHONPATH=/usr/local/lib/analysis-environment"
    token_file = files["/etc/analysis-environment/access-token"]
    assert (token_file["content"], token_file["permissions"], token_file["owner"]) == (
        "s3cret-token",
        "0600",
        "root:root",
    )
    assert AUTH_PLUGIN in files
    assert ["systemctl", "enable", "--now", "aenv-novnc.service"] in user_data["runcmd"]
    assert user_data["runcmd"].index(["systemctl", "daemon-reload"]) < user_data["runcmd"].index(
        ["systemctl", "enable", "--now", "aenv-novnc.service"]
    )
    assert "s3cret-token" not in json.dumps(user_data["runcmd"])


ACTIVITY_AGENT = "/usr/local/lib/analysis-environment/aenv-activity"
ACTIVITY_UNIT = "/etc/systemd/system/aenv-activity.service"
WEB_ROOT = "/var/lib/analysis-environment/web"


def test_the_desktop_activity_agent_is_installed_and_started():
    user_data = user_data_of(make_environment(), token="s3cret-token")
    files = files_of(user_data)
    assert files[ACTIVITY_AGENT]["permissions"] == "0755"
    agent = unit(files[ACTIVITY_UNIT]["content"])
    assert agent["ExecStart"] == f"{ACTIVITY_AGENT} {WEB_ROOT} 5901"  # the VNC server's port
    enable = ["systemctl", "enable", "--now", "aenv-activity.service"]
    assert user_data["runcmd"].index(["systemctl", "daemon-reload"]) < user_data["runcmd"].index(enable)


@pytest.mark.skipif(not pathlib.Path("/usr/share/novnc").is_dir() or not shutil.which("ss"), reason="needs novnc, ss")
def test_the_activity_agent_reports_open_desktop_connections(tmp_path):
    """The agent as cloud-init writes it, run here: a connection to the 'VNC port' is a desktop
    connection open (connections 1, last_activity now); closed, the time stays and the count is 0."""
    script = tmp_path / "aenv-activity"
    script.write_text(files_of(user_data_of(make_environment(), token="t"))[ACTIVITY_AGENT]["content"])
    script.chmod(0o755)
    web = tmp_path / "web"
    subprocess.run([str(script), "--prepare", str(web)], check=True)
    assert (web / "vnc.html").resolve() == pathlib.Path("/usr/share/novnc/vnc.html").resolve()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    agent = subprocess.Popen([str(script), str(web), str(port), "0.2"])
    report = web / "api" / "status"

    def read_when(condition):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError, ValueError):
                answer = json.loads(report.read_text())
                if condition(answer):
                    return answer
            time.sleep(0.1)
        raise AssertionError(f"the agent never reported that: {report.read_text() if report.exists() else None}")

    try:
        started = read_when(lambda answer: answer["connections"] == 0)
        time.sleep(1.1)  # a second later: an open connection moves last_activity
        client = socket.create_connection(("127.0.0.1", port))
        server_side, _ = listener.accept()
        open_now = read_when(lambda answer: answer["connections"] == 1)
        assert open_now["last_activity"] > started["last_activity"]
        assert parse_server(open_now, None).busy  # what the idle check makes of it: active now
        client.close()
        server_side.close()
        closed = read_when(lambda answer: answer["connections"] == 0)
        time.sleep(1.1)
        assert json.loads(report.read_text())["last_activity"] == closed["last_activity"] >= open_now["last_activity"]
        assert not parse_server(closed, None).busy
    finally:
        agent.kill()
        agent.wait()
        listener.close()


@pytest.fixture
def gateway_auth(tmp_path, monkeypatch):
    """The auth plugin exactly as cloud-init writes it, with websockify's AuthenticationError."""

    class AuthenticationError(Exception):
        def __init__(self, log_msg=None, response_code=403, response_headers=None, response_msg=None):
            super().__init__(log_msg)
            self.code, self.headers = response_code, response_headers or {}

    websockify = types.ModuleType("websockify")
    auth_plugins = types.ModuleType("websockify.auth_plugins")
    auth_plugins.AuthenticationError = AuthenticationError
    monkeypatch.setitem(sys.modules, "websockify", websockify)
    monkeypatch.setitem(sys.modules, "websockify.auth_plugins", auth_plugins)
    (tmp_path / "token").write_text("s3cret-token")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    namespace: dict = {}
    exec(files_of(user_data_of(make_environment(), token="s3cret-token"))[AUTH_PLUGIN]["content"], namespace)
    return namespace["GatewayToken"]("token"), AuthenticationError


def basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize("authorization", ["token s3cret-token", basic("anyone:s3cret-token"), basic(":s3cret-token")])
def test_the_access_token_lets_the_gateway_or_a_browser_in(gateway_auth, authorization):
    plugin, _ = gateway_auth
    plugin.authenticate({"Authorization": authorization}, "localhost", 5901)


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "token",
        "token wrong",
        "token s3cret-token-and-more",
        "Bearer s3cret-token",
        basic("s3cret-token"),
        basic("x:wrong"),
        "Basic !!!",
        "s3cret-token",
    ],
)
def test_anything_else_is_refused_asking_for_the_token(gateway_auth, authorization):
    plugin, error = gateway_auth
    with pytest.raises(error) as refused:
        plugin.authenticate({"Authorization": authorization} if authorization is not None else {}, "localhost", 5901)
    assert refused.value.code == 401 and "Basic" in refused.value.headers["WWW-Authenticate"]


def test_an_empty_token_lets_no_one_in(gateway_auth, tmp_path):
    plugin, error = gateway_auth
    plugin.token = b""
    with pytest.raises(error):
        plugin.authenticate({"Authorization": "token "}, "localhost", 5901)


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
        ({"net": []}, ""),
        ({"net": [{"addr": "10.0.0.5", "OS-EXT-IPS:type": "fixed"}]}, "10.0.0.5"),
        (
            {
                "net": [
                    {"addr": "10.0.0.5", "OS-EXT-IPS:type": "fixed"},
                    {"addr": "192.0.2.7", "OS-EXT-IPS:type": "floating"},
                ]
            },
            "192.0.2.7",
        ),
        ({"v6": [{"addr": "2001:db8::5"}]}, "2001:db8::5"),
    ],
)
def test_best_address_is_floating_first(addresses, expected):
    assert best_address(addresses) == expected


@pytest.mark.parametrize(
    "address, expected",
    [
        ("", ""),
        ("10.0.0.5", "http://10.0.0.5:6080/vnc.html?autoconnect=true&resize=remote"),
        ("2001:db8::5", "http://[2001:db8::5]:6080/vnc.html?autoconnect=true&resize=remote"),
    ],
)
def test_connection_url_without_a_gateway_is_novnc_at_the_server(address, expected):
    assert connection_url(address) == expected


def test_desktop_upstream_is_novnc_served_at_the_root():
    assert desktop_upstream("") is None
    assert desktop_upstream("10.0.0.5") == Upstream(
        port=6080,
        address="10.0.0.5",
        landing="vnc.html?path={path}websockify&autoconnect=true&resize=remote",
        strip_prefix=True,
    )


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


def test_active_server_reports_resources_url_and_upstream():
    server = fake_server(
        "ACTIVE",
        addresses={
            "net": [
                {"addr": "10.0.0.5", "OS-EXT-IPS:type": "fixed"},
                {"addr": "192.0.2.7", "OS-EXT-IPS:type": "floating"},
            ]
        },
        vcpus=4,
        extra_specs={"resources:CUSTOM_GPU": "1"},
    )
    observation = observe_server(server)
    assert (observation.cpus, observation.gpus) == (4.0, 1)
    assert observation.url == "http://192.0.2.7:6080/vnc.html?autoconnect=true&resize=remote"
    assert observation.upstream == desktop_upstream("192.0.2.7")
    assert observation.reference == {"id": "srv-1", "state": "ACTIVE", "addresses": ["10.0.0.5", "192.0.2.7"]}


def test_the_upstream_opens_as_novnc_under_the_environments_path():
    from analysis_operator.engine.routes import build_endpoint, build_route, public_url
    from analysis_operator.settings import GatewaySettings

    gateway = GatewaySettings(enabled=True, url="https://analysis.example.org", auth_url="http://op:9100/authorize")
    environment = make_environment()
    upstream = observe_server(fake_server("ACTIVE", addresses={"net": [{"addr": "10.0.0.5"}]})).upstream
    assert public_url(gateway, environment, upstream) == (
        "https://analysis.example.org/env/team-a/desk/"
        "vnc.html?path=env/team-a/desk/websockify&autoconnect=true&resize=remote"
    )
    rule = build_route(gateway, environment, upstream)["spec"]["rules"][0]
    assert {
        "type": "URLRewrite",
        "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}},
    } in (rule["filters"])
    assert rule["backendRefs"] == [{"name": "aenv-desk", "port": 6080}]
    endpoint_slice = build_endpoint(environment, upstream)[1]
    assert endpoint_slice["endpoints"][0]["addresses"] == ["10.0.0.5"]


def test_active_server_without_an_address_has_no_upstream():
    observation = observe_server(fake_server("ACTIVE"))
    assert observation.state == State.READY and observation.upstream is None and observation.url == ""
    assert "no network address" in observation.message


@pytest.mark.parametrize("status", ["BUILD", "REBOOT", "HARD_REBOOT"])
def test_a_starting_server_with_an_address_is_routed_already(status):
    """The engine routes it while it starts (endpoint not ready), so at Ready only the endpoint changes."""
    observation = observe_server(fake_server(status, addresses={"net": [{"addr": "10.0.0.5"}]}))
    assert observation.state == State.PROVISIONING and observation.upstream == desktop_upstream("10.0.0.5")
    assert observe_server(fake_server(status)).upstream is None  # no address yet


@pytest.mark.parametrize(
    "status, task_state", [("SHELVED_OFFLOADED", None), ("ERROR", None), ("SHUTOFF", None), ("ACTIVE", "shelving")]
)
def test_a_server_not_starting_is_not_routed(status, task_state):
    observation = observe_server(fake_server(status, task_state, addresses={"net": [{"addr": "10.0.0.5"}]}))
    assert observation.upstream is None


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


def listed_server(environment, server_id, created_at, status="ACTIVE", task_state=None):
    """A server as Nova's detailed listing shows it, carrying the environment's identity."""
    server = fake_server(status, task_state=task_state)
    server.id, server.created_at, server.metadata = server_id, created_at, build_identity_metadata(environment)
    return server


class DuplicatingCompute:
    """Nova holding several servers of one environment; deletes recorded, some refused."""

    def __init__(self, servers, refuse=()):
        self.listed, self.refuse, self.deleted = servers, set(refuse), []

    def servers(self, **query):
        return list(self.listed)

    def delete_server(self, server_id, ignore_missing=True):
        from openstack import exceptions as sdk

        if server_id in self.refuse:
            raise sdk.ConflictException("Instance is locked")
        self.deleted.append(server_id)


@pytest.mark.parametrize("look", ["observe", "ensure"])
def test_every_server_of_an_environment_but_the_oldest_is_deleted_on_sight(look, caplog):
    """A create whose answer was lost and was sent again (or one per replica across a failover) left a
    second server running, uncharged, until the environment went: only a warning was logged."""
    environment = make_environment()
    compute = DuplicatingCompute(
        [
            listed_server(environment, "srv-new", "2026-12-05T10:00:09Z"),
            listed_server(environment, "srv-old", "2026-12-05T10:00:01Z"),
            listed_server(environment, "srv-gone", "2026-12-05T10:00:00Z", task_state="deleting"),
            listed_server(environment, "srv-same-second", "2026-12-05T10:00:01Z", status="SHELVED"),
        ]
    )
    backend = OpenStackBackend(SETTINGS, connect=lambda: types.SimpleNamespace(compute=compute))
    try:
        if look == "observe":
            observation = asyncio.run(backend.observe(environment))
        else:
            observation = asyncio.run(backend.ensure(Launch(environment, make_flavor(), "tok-en")))
    finally:
        backend.close()
    assert observation.reference["id"] == "srv-old"
    assert sorted(compute.deleted) == ["srv-new", "srv-same-second"]  # not the one Nova deletes already
    assert "keeping the oldest srv-old, deleting srv-same-second, srv-new" in caplog.text


def test_a_duplicate_nova_will_not_delete_is_asked_again_at_the_next_look():
    environment = make_environment()
    compute = DuplicatingCompute(
        [
            listed_server(environment, "srv-old", "2026-12-05T10:00:01Z"),
            listed_server(environment, "srv-locked", "2026-12-05T10:00:02Z"),
            listed_server(environment, "srv-new", "2026-12-05T10:00:03Z"),
        ],
        refuse={"srv-locked"},
    )
    backend = OpenStackBackend(SETTINGS, connect=lambda: types.SimpleNamespace(compute=compute))
    try:
        observation = asyncio.run(backend.observe(environment))
        compute.refuse.clear()
        asyncio.run(backend.observe(environment))
    finally:
        backend.close()
    assert observation.reference["id"] == "srv-old"
    assert compute.deleted == ["srv-new", "srv-locked", "srv-new"]


def test_the_clouds_yaml_named_in_settings_is_the_one_read_whatever_the_environment_says(tmp_path, monkeypatch):
    """openstacksdk reads OS_CLIENT_CONFIG_FILE before the files it is given: an operator configured
    with one cloud must not reach another because its environment names one (seen in CI)."""
    import dataclasses

    from analysis_operator.settings import OpenStackSettings, Settings

    def clouds(path: pathlib.Path, url: str) -> str:
        path.write_text(
            f"clouds:\n  analysis:\n    auth:\n      auth_url: {url}\n      username: u\n      password: p\n"
            "      project_name: x\n      user_domain_name: Default\n      project_domain_name: Default\n"
        )
        return str(path)

    named = clouds(tmp_path / "named.yaml", "http://named.example:5000/v3")
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", clouds(tmp_path / "other.yaml", "http://other.example:5000/v3"))
    monkeypatch.setenv("OS_AUTH_URL", "http://environment.example:5000/v3")
    settings = dataclasses.replace(
        Settings(), openstack=OpenStackSettings(enabled=True, cloud="analysis", clouds_yaml=named)
    )
    backend = OpenStackBackend(settings)
    try:
        assert backend._connect().config.config["auth"]["auth_url"] == "http://named.example:5000/v3"
    finally:
        backend.close()
