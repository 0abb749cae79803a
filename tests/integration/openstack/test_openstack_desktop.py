"""OPEN for the remote-desktop VM card: the desktop opens in the browser through the gateway.

A real Nova server (fake virt driver) becomes Ready; the operator routes the gateway (Traefik,
hack/gateway.sh) to noVNC on the server's address. The local stack's Neutron binds no ports (no
mechanism driver), so Nova boots the server without a network; the test then gives it an address as
a real cloud would have: a Neutron port on a test network (203.0.113.0/24, TEST-NET-3) with a
floating IP (198.51.100.0/24, TEST-NET-2), both owned by the server, which Nova picks up into the
server's addresses (its periodic network-info refresh, within a minute). Those documentation ranges
route nowhere, so a network namespace at the floating address (tests/integration/netns.py) is the
VM: it runs what the server's cloud-init starts (tests/integration/desktop.py): a VNC server on
localhost only, and websockify with noVNC and the access-token check on port 6080."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import pathlib
import time
import urllib.error
import urllib.request
import warnings

import kubernetes
import pytest
import websockets
import websockets.sync.client

from tests.integration.browser import chromium, diagnosis, screenshot, sign_in
from tests.integration.conftest import GROUP, REPO, VERSION, kubectl
from tests.integration.desktop import DesktopStandIn
from tests.integration.netns import Netns
from tests.integration.openstack.test_openstack_datasets import admin_cloud  # noqa: F401 (fixture)
from tests.integration.slurm.test_idle_slurm import IDLE_SETTINGS, conditions, events
from tests.waiting import wait_for

GATEWAY_API = ("gateway.networking.k8s.io", "v1")
NETWORK, SUBNET, CIDR = "aenv-desktop-test", "aenv-desktop-test", "203.0.113.0/24"
EXTERNAL, EXTERNAL_SUBNET, EXTERNAL_CIDR = "aenv-desktop-test-ext", "aenv-desktop-test-ext", "198.51.100.0/24"
ROUTER = "aenv-desktop-test"
RFB_GREETING = b"RFB 003.008\n"

pytestmark = pytest.mark.skipif(
    not all(pathlib.Path(path).exists() for path in ("/usr/bin/Xvnc", "/usr/bin/websockify", "/usr/share/novnc")),
    reason="needs the Debian packages tigervnc-standalone-server, websockify and novnc",
)


@pytest.fixture(scope="module")
def network(admin_cloud):
    """A tenant network with a router to an external one (floating IPs): records in Neutron only."""
    cloud = admin_cloud.network
    made = []
    net = cloud.find_network(NETWORK)
    if net is None:
        net = cloud.create_network(
            name=NETWORK, is_shared=True, provider_network_type="flat", provider_physical_network=NETWORK
        )
        made.append(("network", net))
    subnet = cloud.find_subnet(SUBNET) or cloud.create_subnet(
        network_id=net.id, name=SUBNET, ip_version=4, cidr=CIDR, is_dhcp_enabled=False
    )
    external = cloud.find_network(EXTERNAL)
    if external is None:
        external = cloud.create_network(
            name=EXTERNAL, is_router_external=True, provider_network_type="flat", provider_physical_network=EXTERNAL
        )
        made.append(("network", external))
    if cloud.find_subnet(EXTERNAL_SUBNET) is None:
        cloud.create_subnet(
            network_id=external.id, name=EXTERNAL_SUBNET, ip_version=4, cidr=EXTERNAL_CIDR, is_dhcp_enabled=False
        )
    router = cloud.find_router(ROUTER)
    if router is None:
        router = cloud.create_router(name=ROUTER, external_gateway_info={"network_id": external.id})
        cloud.add_interface_to_router(router, subnet.id)
        made.insert(0, ("router", router))
    yield net, external
    for kind, made_object in made:  # what this module made, router first (it holds ports on both)
        if kind == "router":
            cloud.remove_interface_from_router(made_object, subnet.id)
            cloud.delete_router(made_object, ignore_missing=True)
        else:
            for port in cloud.ports(network_id=made_object.id):
                cloud.delete_port(port, ignore_missing=True)
            cloud.delete_network(made_object, ignore_missing=True)


def give_address(admin_cloud, network, server_id: str) -> tuple[str, str, list]:
    """A port and a floating IP for the server, as Nova and Neutron would have made them:
    (fixed address, floating address, what to delete afterwards)."""
    net, external = network
    server = admin_cloud.compute.get_server(server_id)
    port = admin_cloud.network.create_port(
        network_id=net.id, project_id=server.project_id, device_id=server.id, device_owner="compute:nova"
    )
    floating = admin_cloud.network.create_ip(
        floating_network_id=external.id, port_id=port.id, project_id=server.project_id
    )
    return port.fixed_ips[0]["ip_address"], floating.floating_ip_address, [floating, port]


def release(admin_cloud, made: list) -> None:
    """Delete what give_address made (the floating IP first: it holds the port)."""
    for made_object in made:
        if hasattr(made_object, "floating_ip_address"):
            admin_cloud.network.delete_ip(made_object, ignore_missing=True)
        else:
            admin_cloud.network.delete_port(made_object, ignore_missing=True)


@pytest.fixture(scope="module")
def directory(kubeconfig):
    kubectl("apply", "-f", str(REPO / "examples/users.yaml"))


def route(custom, namespace: str, name: str) -> dict | None:
    try:
        return custom.get_namespaced_custom_object(*GATEWAY_API, namespace, "httproutes", f"aenv-{name}")
    except kubernetes.client.ApiException as error:
        if error.status == 404:
            return None
        raise


def endpoint_addresses(api, namespace: str, name: str) -> list[str]:
    try:
        endpoint_slice = kubernetes.client.DiscoveryV1Api(api).read_namespaced_endpoint_slice(f"aenv-{name}", namespace)
    except kubernetes.client.ApiException as error:
        if error.status == 404:
            return []
        raise
    return [address for endpoint in endpoint_slice.endpoints or () for address in endpoint.addresses]


async def rfb_greeting(url: str, cookie: str | None) -> bytes:
    headers = {"Cookie": cookie} if cookie else {}
    async with websockets.connect(url, subprotocols=["binary"], additional_headers=headers, open_timeout=10) as socket:
        return await asyncio.wait_for(socket.recv(), timeout=10)


def refused_status(url: str, cookie: str | None) -> int:
    try:
        asyncio.run(rfb_greeting(url, cookie))
    except websockets.exceptions.InvalidStatus as error:
        return error.response.status_code
    return 101


def test_the_vm_desktop_opens_in_the_browser_through_the_gateway_for_its_owner_only(
    opened,
    vm_environments,
    admin_cloud,
    network,
    directory,
    custom,
    api,
    namespace,
    tmp_path,
):
    environments = vm_environments
    environments.create("desk", flavor="vm-desktop", lifetime="2h")
    ready = environments.wait_phase("desk", "Ready", timeout=120)
    server_id = ready["status"]["backend"]["id"]
    fixed, floating, made = give_address(admin_cloud, network, server_id)
    try:
        base = f"/env/{namespace}/desk/"
        wanted = f"{opened.url}{base}vnc.html?path={base.lstrip('/')}websockify&autoconnect=true&resize=remote"
        status = wait_for(
            lambda: (
                (status := environments.get("desk")["status"]).get("connection", {}).get("url") == wanted and status
            ),
            timeout=150,
            what=lambda: (
                f"Nova to report the address and the operator to route it: {environments.get('desk')['status']}"
            ),
        )
        assert status["phase"] == "Ready"
        assert set(status["backend"]["addresses"]) == {fixed, floating}
        made_route = route(custom, namespace, "desk")
        rule = made_route["spec"]["rules"][0]
        assert rule["matches"][0]["path"] == {"type": "PathPrefix", "value": base}
        assert {
            "type": "URLRewrite",
            "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}},
        } in rule["filters"]
        assert [(ref["name"], ref["port"]) for ref in rule["backendRefs"]] == [("aenv-desk", 6080)]
        assert endpoint_addresses(api, namespace, "desk") == [floating]  # the floating address first

        user_data = base64.b64decode(admin_cloud.compute.get_server(server_id).user_data).decode()
        cookie = f"aenv_session={opened.token('alice')}"
        socket_url = opened.url.replace("http", "ws", 1) + base + "websockify"
        with Netns(floating) as vm, DesktopStandIn(vm, user_data, tmp_path):
            status_code, headers, page = wait_for(
                lambda: (
                    (answer := opened.request(base + "vnc.html", "alice", timeout=3))[0] not in (0, 404, 502, 504)
                    and answer
                ),
                timeout=40,
                what="the gateway to route the desktop",
            )
            assert status_code == 200 and b"<title>noVNC</title>" in page
            assert opened.request(base + "app/ui.js", "alice")[0] == 200  # noVNC's own files, relative to the page
            assert asyncio.run(rfb_greeting(socket_url, cookie)) == RFB_GREETING

            status_code, headers, page = opened.request(base + "vnc.html", "bob")
            assert status_code == 403 and headers["X-Analysis-Reason"] == "NotShared"
            assert refused_status(socket_url, f"aenv_session={opened.token('bob')}") == 403
            assert refused_status(socket_url, None) == 401
            # The VM itself lets in only what carries the access token (the gateway adds it).
            try:
                urllib.request.urlopen(f"http://{floating}:6080/vnc.html", timeout=10)
                direct = 200
            except urllib.error.HTTPError as error:
                direct = error.code
            assert direct == 401
            assert refused_status(f"ws://{floating}:6080/websockify", None) == 401

            # Unsharing closes the desktop connection bob has open, and only his (engine/viewers.py and
            # the plugin in the VM's websockify): the gateway alone would let it run on.
            environments.patch_spec("desk", sharing={"users": ["bob"]})
            wait_for(lambda: opened.request(base + "vnc.html", "bob")[0] == 200, timeout=20, what="shared with bob")
            assert opened.request(base + "vnc.html", "bob", headers={"X-Aenv-Viewers": "alice"})[0] == 403

            def desktop(user):
                return websockets.sync.client.connect(
                    socket_url,
                    subprotocols=["binary"],
                    additional_headers={"Cookie": f"aenv_session={opened.token(user)}"},
                    open_timeout=10,
                )

            with desktop("bob") as bob_socket, desktop("alice") as alice_socket:
                assert bob_socket.recv(timeout=10) == RFB_GREETING
                assert alice_socket.recv(timeout=10) == RFB_GREETING
                environments.patch_spec("desk", sharing={"users": []})
                unshared = time.monotonic()
                with pytest.raises(websockets.exceptions.ConnectionClosed):
                    bob_socket.recv(timeout=20)  # the VNC server says nothing more: only the close ends this
                closed_after = time.monotonic() - unshared
                print(f"closed {closed_after:.2f} s after the unshare")  # -s shows it (the closing notes quote it)
                assert closed_after < 15, "bob's desktop connection stayed open"
                alice_socket.send(RFB_GREETING)  # the owner's connection still speaks RFB: security types come
                assert alice_socket.recv(timeout=10)
            assert refused_status(socket_url, f"aenv_session={opened.token('bob')}") == 403
            disconnected = wait_for(
                lambda: [
                    event.message
                    for event in kubernetes.client.CoreV1Api(api).list_namespaced_event(namespace).items
                    if event.reason == "ViewersDisconnected" and event.involved_object.name == "desk"
                ],
                timeout=20,
                what="the ViewersDisconnected Event",
            )
            assert "bob (1, NotShared)" in disconnected[0] and "alice" not in disconnected[0]

            width, height = show_in_browser(opened, status["connection"]["url"], opened.token("alice"), tmp_path)
            assert width >= 640 and height >= 480, (width, height)  # the desktop drawn (0x0 until it is)

        environments.delete("desk")
        wait_for(lambda: route(custom, namespace, "desk") is None, timeout=90, what="the route gone with the VM")
        wait_for(lambda: not environments.exists("desk"), timeout=90, what="the server deleted, the finalizer released")
    finally:
        release(admin_cloud, made)


# ---------------------------------------------------------------- a real browser (Chromium)


def show_in_browser(gateway, url: str, session: str, workdir: pathlib.Path) -> tuple[int, int]:
    """Headless Chromium signed in (the session cookie for the gateway's origin) opens the URL in
    status.connection.url; noVNC connects to the desktop and draws it on its canvas: the canvas's
    size, and a screenshot kept as an artifact.

    A page that does not connect within 30 s says why (noVNC's status line, the browser's console
    and failed requests, websockify's log) in a warning (the run's summary shows it), and is loaded
    once more, as a person would reload it. The second load must connect. One CI run saw a first
    load not connect within 30 s with nothing on its status line; the cause is not known yet, the
    warning is there to find it."""
    driver = chromium()
    try:
        sign_in(driver, gateway.url, "aenv_session", session)

        def connected() -> bool:
            return driver.execute_script(
                "return document.documentElement.classList.contains('noVNC_connected')"
                " && document.querySelector('#noVNC_container canvas') !== null;"
            )

        def why() -> str:
            classes, status = driver.execute_script(
                "const status = document.getElementById('noVNC_status');"
                "return [document.documentElement.className, status ? status.textContent : '(no status line)'];"
            )
            log = workdir / "websockify.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
            page = f"page classes {classes!r}, status {status!r}"
            return f"noVNC to connect; {page}; {diagnosis(driver)}; websockify: {tail}"

        driver.get(url)
        try:
            wait_for(connected, timeout=30, interval=0.5, what=why)
        except TimeoutError as first:
            warnings.warn(f"the desktop's first load did not connect, loading it again: {first}", stacklevel=1)
            driver.get(url)
            wait_for(connected, timeout=30, interval=0.5, what=why)
        screenshot(driver, "open-vm-desktop-alice")
        width, height = driver.execute_script(
            "const canvas = document.querySelector('#noVNC_container canvas'); return [canvas.width, canvas.height];"
        )
        return width, height
    finally:
        driver.quit()


# ---------------------------------------------------------------- idle desktops (issue: idle culling)

IDLE_VM = "test-vm-idle"


@pytest.fixture
def idle_vm_flavor(custom):
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "EnvironmentFlavor",
        "metadata": {"name": IDLE_VM},
        "spec": {
            "backend": "openstack",
            "resources": {"cpu": 2, "memory": "4Gi"},
            "maxLifetime": "2h",
            "openstack": {"flavor": "aenv.basic", "image": "analysis-desktop"},
            "idleTimeout": "24s",
            "idleWarnBefore": "12s",
        },
    }
    with contextlib.suppress(kubernetes.client.ApiException):
        custom.delete_cluster_custom_object(GROUP, VERSION, "environmentflavors", IDLE_VM)
    custom.create_cluster_custom_object(GROUP, VERSION, "environmentflavors", body)
    yield IDLE_VM
    custom.delete_cluster_custom_object(GROUP, VERSION, "environmentflavors", IDLE_VM)


def test_an_open_desktop_connection_keeps_the_vm_and_a_closed_one_lets_it_be_suspended(
    opened,
    operator,
    vm_environments,
    idle_vm_flavor,
    admin_cloud,
    network,
    directory,
    core,
    namespace,
    tmp_path,
):
    """The VM's activity agent (cloud-init) reports open desktop connections; the operator reads it
    through websockify with the token: a noVNC connection held through the gateway past the timeout
    keeps the VM, and once it is closed the VM is warned, then suspended."""
    operator.configure(**IDLE_SETTINGS)
    environments = vm_environments
    environments.create("idle-desk", flavor=IDLE_VM, lifetime="1h")
    ready = environments.wait_phase("idle-desk", "Ready", timeout=120)
    server_id = ready["status"]["backend"]["id"]
    _, floating, made = give_address(admin_cloud, network, server_id)
    try:
        wait_for(
            lambda: (
                (environments.get("idle-desk")["status"].get("backend") or {}).get("endpoint") == f"{floating}:6080"
            ),
            timeout=150,
            what=lambda: f"Nova to report the address: {environments.get('idle-desk')['status']}",
        )
        base = f"/env/{namespace}/idle-desk/"
        user_data = base64.b64decode(admin_cloud.compute.get_server(server_id).user_data).decode()
        socket_url = opened.url.replace("http", "ws", 1) + base + "websockify"
        cookie = {"Cookie": f"aenv_session={opened.token('alice')}"}
        with Netns(floating) as vm, DesktopStandIn(vm, user_data, tmp_path, activity_seconds=1):
            wait_for(
                lambda: opened.request(base + "vnc.html", "alice", timeout=3)[0] == 200,
                timeout=40,
                what="the desktop routed",
            )
            with websockets.sync.client.connect(
                socket_url, subprotocols=["binary"], additional_headers=cookie, open_timeout=20
            ) as desktop:
                assert desktop.recv(timeout=10) == RFB_GREETING  # a desktop connection, open and silent
                held = time.monotonic()
                while time.monotonic() - held < 36:  # 1.5x the timeout: no gateway request meanwhile
                    now = environments.get("idle-desk")
                    assert now["status"]["phase"] == "Ready", now["status"]
                    time.sleep(2)
                idle = conditions(environments.get("idle-desk"))["Idle"]
                assert (idle["status"], idle["reason"]) == ("False", "Active"), idle
                assert "IdleSoon" not in events(core, namespace, "idle-desk")
            closed = time.monotonic()
            wait_for(lambda: "IdleSoon" in events(core, namespace, "idle-desk"), timeout=40, what="IdleSoon")
            suspended = environments.wait_phase("idle-desk", "Suspended", timeout=60)
            assert time.monotonic() - closed >= 20  # idle counted from the connection's close, not before
            assert suspended["spec"]["suspend"] is True
            assert conditions(suspended)["Idle"]["reason"] == "IdleSuspended"
        environments.delete("idle-desk")
        wait_for(lambda: not environments.exists("idle-desk"), timeout=90, what="the environment gone")
    finally:
        release(admin_cloud, made)
