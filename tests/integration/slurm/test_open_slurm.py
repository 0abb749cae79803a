"""OPEN for the Cluster card, end to end: a real JupyterLab in a real Slurm job on a compute node with
an address of its own (hack/slurm.sh), reached through the real gateway (Traefik, hack/gateway.sh)
by a selector-less Service and EndpointSlice, opened in a real browser (Debian's chromium) as the
owner, refused to others, opened for a sharee and refused again once unshared."""

from __future__ import annotations

import base64
import datetime
import http.client
import json
import os
import pwd
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import kubernetes
import pytest
import websockets.sync.client
from selenium.webdriver.common.by import By

from analysis_operator.infra.server_tls import ServerCertificate, issue
from analysis_operator.model.domain import Environment
from tests.integration.browser import chromium, jupyterlab_shown, screenshot, sign_in
from tests.integration.conftest import REPO, kubectl
from tests.integration.test_jupyter_extension import JUPYTERLAB, signed
from tests.waiting import wait_for


@pytest.fixture(scope="module")
def directory(kubeconfig):
    kubectl("apply", "-f", str(REPO / "examples/users.yaml"))


@pytest.fixture
def cluster_lab(opened, slurm_environments, directory, core, namespace):
    """alice's JupyterLab on Slurm, Ready, and its path behind the gateway."""
    slurm_environments.create("hpc", flavor="jupyter-cluster", lifetime="1h", owner="alice")
    ready = slurm_environments.wait_phase("hpc", "Ready", timeout=90)
    return slurm_environments, ready, f"/env/{namespace}/hpc/"


def answered(gateway, path, user, expected, headers=None):
    return wait_for(
        lambda: (answer := gateway.request(path, user, headers))[0] == expected and answer,
        timeout=20,
        what=lambda: f"{path} as {user} to answer {expected}, not {gateway.request(path, user, headers)[0]}",
    )


def test_jupyterlab_in_slurm_opens_through_the_gateway_for_its_owner(opened, cluster_lab, custom, namespace):
    environments, ready, base = cluster_lab
    assert ready["status"]["connection"]["url"] == f"{opened.url}{base}lab"
    slices = kubernetes.client.DiscoveryV1Api(custom.api_client).list_namespaced_endpoint_slice(
        namespace, label_selector="kubernetes.io/service-name=aenv-hpc"
    )
    (address,) = slices.items[0].endpoints[0].addresses
    assert address == ready["status"]["backend"]["addresses"][0] and not address.startswith("127.")

    _, _, body = answered(opened, base + "api/status", "alice", 200)
    assert "last_activity" in json.loads(body)  # JupyterLab's own answer, through the gateway
    # ... over TLS, checked by the gateway against the job's own certificate (BackendTLSPolicy, accepted)
    name = f"aenv-hpc.{namespace}.jupyter.invalid"
    assert ready["status"]["backend"]["serverName"] == name
    policy = custom.get_namespaced_custom_object(
        "gateway.networking.k8s.io", "v1", namespace, "backendtlspolicies", "aenv-hpc"
    )
    assert policy["spec"]["validation"] == {
        "caCertificateRefs": [{"group": "", "kind": "ConfigMap", "name": "aenv-hpc-tls"}],
        "hostname": name,
    }
    conditions = [c for ancestor in policy["status"]["ancestors"] for c in ancestor["conditions"]]
    assert {"type": "Accepted", "status": "True"} in [{"type": c["type"], "status": c["status"]} for c in conditions]
    certificate = kubernetes.client.CoreV1Api(custom.api_client).read_namespaced_config_map("aenv-hpc-tls", namespace)
    port = int(ready["status"]["backend"]["endpoint"].rpartition(":")[2])
    context = ssl.create_default_context(cadata=certificate.data["ca.crt"])
    with socket.create_connection((address, port), timeout=10) as raw, context.wrap_socket(raw, server_hostname=name):
        pass  # the job's JupyterLab presents exactly that certificate, for that name
    status, headers, page = opened.request(base + "api/status", "bob")
    assert status == 403 and b"belongs to alice" in page
    assert opened.request(base + "api/status")[0] == 401
    assert opened.request(base + "api/status", headers={"X-Forwarded-User": "alice"})[0] == 401

    # A kernel, and its websocket, through the gateway (the credential is added by the gateway)
    status, _, body = opened.request(base + "api/kernels", "alice", method="POST")
    assert status == 201, body
    kernel = json.loads(body)["id"]
    cookie = f"aenv_session={opened.token('alice')}"
    websocket_url = opened.url.replace("http", "ws", 1) + f"{base}api/kernels/{kernel}/channels"
    with websockets.sync.client.connect(websocket_url, additional_headers={"Cookie": cookie}, open_timeout=20) as ws:
        assert kernel_info(ws)["content"]["status"] == "ok"
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        websockets.sync.client.connect(
            websocket_url, additional_headers={"Cookie": f"aenv_session={opened.token('bob')}"}, open_timeout=20
        )
    assert refused.value.response.status_code == 403


def test_the_service_and_endpointslice_someone_deleted_are_made_again_and_nothing_opens_meanwhile(
    opened, cluster_lab, core, custom, namespace
):
    """Nothing but the operator makes the selector-less Service and the EndpointSlice that route to the
    job's node: someone deletes both, the operator's repair (with its orphan sweep) makes them again,
    and meanwhile no request gets past the gateway without the forward-auth's yes."""
    environments, ready, base = cluster_lab
    answered(opened, base + "api/status", "alice", 200)
    discovery = kubernetes.client.DiscoveryV1Api(custom.api_client)
    core.delete_namespaced_service("aenv-hpc", namespace)
    discovery.delete_namespaced_endpoint_slice("aenv-hpc", namespace)
    answers = opened.others_until_owner_back(base + "api/status", "alice", "bob")  # not shared with bob
    assert 200 not in answers and answers <= {401, 403, 404, 503}, answers
    assert not core.read_namespaced_service("aenv-hpc", namespace).spec.selector
    (address,) = discovery.read_namespaced_endpoint_slice("aenv-hpc", namespace).endpoints[0].addresses
    assert address == ready["status"]["backend"]["addresses"][0]


IMPOSTOR = r"""
import socket, ssl, sys, threading
address, directory, tls = sys.argv[1], sys.argv[2], sys.argv[3] == "tls"
context = None
if tls:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(f"{directory}/crt", f"{directory}/key")
for port in range(int(sys.argv[4]), 32768):  # in JupyterLab's range, where the gateway reaches the node
    try:
        listener = socket.create_server((address, port))
        break
    except OSError:
        continue
print(port, flush=True)
lock = threading.Lock()

def read(connection):
    connection.settimeout(10)
    try:
        if context is not None:
            connection = context.wrap_socket(connection, server_side=True)
        while chunk := connection.recv(65536):
            with lock, open(f"{directory}/received", "ab") as received:
                received.write(chunk)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    except (OSError, ssl.SSLError):
        pass
    finally:
        connection.close()

while True:
    connection, _ = listener.accept()
    with lock, open(f"{directory}/connections", "a") as connections:
        connections.write(".")
    threading.Thread(target=read, args=(connection,), daemon=True).start()
"""


class Impostor:
    """Another process on the compute node (in its network namespace) listening where the environment's
    route points, as another user's could on the port JupyterLab freed when it exited on its own, until
    the sweep closes the route: every byte it is sent, in plain HTTP or after a TLS handshake with a
    certificate of its own for the same name."""

    def __init__(self, slurm_environ: dict[str, str], address: str, near: int, own: ServerCertificate | None) -> None:
        state = Path(slurm_environ["SLURM_CONF"]).parent
        node = f"/proc/{(state / 'run' / 'slurmd.pid').read_text().strip()}/ns/net"
        self.directory = Path(tempfile.mkdtemp())
        (self.directory / "received").write_bytes(b"")
        (self.directory / "connections").write_text("")
        if own is not None:
            (self.directory / "crt").write_text(own.certificate)
            (self.directory / "key").write_text(own.key)
        self.process = subprocess.Popen(
            ["nsenter", f"--net={node}", "--", sys.executable, "-c", IMPOSTOR, address, str(self.directory)]
            + ["tls" if own is not None else "plain", str(near + 1)],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.port = int(self.process.stdout.readline())  # type: ignore[union-attr]

    @property
    def connections(self) -> int:
        return len((self.directory / "connections").read_text())

    @property
    def received(self) -> bytes:
        return (self.directory / "received").read_bytes()

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


REFUSED = {500, 502}  # Traefik's answer when the server's certificate fails its check, or it speaks no TLS


@pytest.mark.parametrize("speaks", ["plain HTTP", "TLS, its own certificate for the same name"])
def test_a_server_without_the_job_s_key_where_the_route_points_is_sent_nothing(
    opened, cluster_lab, core, custom, namespace, slurm_environ, speaks
):
    """The attack on a freed port: something else listens where the route points. The gateway speaks TLS
    there and checks the job's own certificate: it sends the impostor no request, so not the token the
    forward-auth adds (before, it passed alice's request on in plain HTTP, with it), and alice gets the
    gateway's error, not the impostor's page."""
    environments, ready, base = cluster_lab
    answered(opened, base + "api/status", "alice", 200)
    token = base64.b64decode(core.read_namespaced_secret("aenv-hpc", namespace).data["token"]).decode()
    own = None
    if speaks != "plain HTTP":
        own = issue(Environment(namespace=namespace, name="hpc", uid="x", owner="", flavor=""), _now())
    address, _, port = ready["status"]["backend"]["endpoint"].rpartition(":")
    impostor = Impostor(slurm_environ, address, int(port), own)
    try:
        # Where the route points now (an admin's edit stands in for the freed port: JupyterLab keeps its own)
        kubernetes.client.DiscoveryV1Api(custom.api_client).patch_namespaced_endpoint_slice(
            "aenv-hpc", namespace, [{"op": "replace", "path": "/ports/0/port", "value": impostor.port}]
        )
        wait_for(
            lambda: opened.request(base + "api/status", "alice")[0] in REFUSED and impostor.connections > 0,
            timeout=20,
            what=lambda: (
                f"the gateway to connect to the impostor on port {impostor.port} (alice: "
                f"{opened.request(base + 'api/status', 'alice')[0]}, connections {impostor.connections})"
            ),
        )
        answers = [opened.request(base + path, "alice") for path in ("api/status", "lab", "api/contents")]
        received = impostor.received
    finally:
        impostor.close()
    assert {status for status, _, _ in answers} <= REFUSED and b"ok" not in {page for _, _, page in answers}
    assert token.encode() not in received and b"Authorization" not in received
    assert b"GET /" not in received  # no request at all, only (at most) a TLS client hello


def test_a_job_holding_another_certificate_than_the_stored_one_is_replaced_and_opens_again(
    opened, cluster_lab, core, namespace, operator
):
    """The lost-submission race: a job submitted with one certificate whose answer was lost, another stored
    for the submission after it, and the first job found later. Nothing could open it (the gateway checks
    the stored one): before, it stayed Ready until its lifetime ended. Made here by an admin's write of
    another certificate to the ConfigMap, and a restart of the operator (which then reads it, as one whose
    submission was lost would have it in memory): the job is cancelled and a new one started, with a
    certificate of its own that the gateway accepts."""
    environments, ready, base = cluster_lab
    answered(opened, base + "api/status", "alice", 200)
    first = ready["status"]["backend"]["id"]
    lab = Environment(namespace=namespace, name="hpc", uid=ready["metadata"]["uid"], owner="alice", flavor="")
    other = issue(lab, _now())
    core.patch_namespaced_config_map("aenv-hpc-tls", namespace, {"data": {"ca.crt": other.certificate}})
    operator.restart()
    replaced = wait_for(
        lambda: (
            (found := environments.get("hpc"))["status"]["phase"] == "Ready"
            and found["status"]["backend"]["id"] != first
            and found
        ),
        timeout=150,
        what=lambda: f"a new job, Ready, for the one holding another certificate ({environments.get('hpc')['status']})",
    )
    assert core.read_namespaced_config_map("aenv-hpc-tls", namespace).data["ca.crt"] != other.certificate
    _, _, body = answered(opened, base + "api/status", "alice", 200)
    assert "last_activity" in json.loads(body)
    message = events(core, namespace, "hpc")["ServerReplaced"]
    assert f"its server ({first}) held a certificate other than the one stored in ConfigMap aenv-hpc-tls" in message
    assert message.endswith(f"{replaced['status']['backend']['id']} takes its place"), message


def events(core, namespace: str, name: str) -> dict[str, str]:
    selector = f"involvedObject.kind=AnalysisEnvironment,involvedObject.name={name}"
    return {
        event.reason: event.message for event in core.list_namespaced_event(namespace, field_selector=selector).items
    }


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def kernel_info(ws) -> dict:
    ws.send(
        json.dumps(
            {
                "header": {
                    "msg_id": "1",
                    "msg_type": "kernel_info_request",
                    "username": "",
                    "session": "s",
                    "version": "5.3",
                },
                "parent_header": {},
                "metadata": {},
                "content": {},
                "channel": "shell",
            }
        )
    )
    return wait_for(
        lambda: (message := json.loads(ws.recv(timeout=20)))["msg_type"] == "kernel_info_reply" and message,
        timeout=30,
        what="kernel_info_reply",
    )


def test_unsharing_closes_the_sharees_open_websocket_within_seconds_and_only_theirs(
    opened, cluster_lab, core, namespace
):
    """The gateway checks each new websocket; the operator's JupyterLab extension closes the ones
    already open of someone the environment is no longer shared with (engine/viewers.py)."""
    environments, _, base = cluster_lab
    environments.patch_spec("hpc", sharing={"users": ["bob"]})
    answered(opened, base + "api/status", "bob", 200)
    # the extension's endpoint is the operator's: a viewer, through the gateway, may neither list nor close
    assert opened.request(base + "aenv/viewers", "bob")[0] == 403
    assert opened.request(base + "aenv/viewers", "alice", method="POST")[0] == 403
    status, _, body = opened.request(base + "api/kernels", "alice", method="POST")
    assert status == 201, body
    url = opened.url.replace("http", "ws", 1) + f"{base}api/kernels/{json.loads(body)['id']}/channels"

    def connect(user):
        cookie = {"Cookie": f"aenv_session={opened.token(user)}"}
        return websockets.sync.client.connect(url, additional_headers=cookie, open_timeout=20)

    with connect("bob") as bob, connect("alice") as alice:
        assert kernel_info(bob)["content"]["status"] == "ok"
        assert kernel_info(alice)["content"]["status"] == "ok"
        environments.patch_spec("hpc", sharing={"users": []})
        unshared = time.monotonic()
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            while True:  # kernel status messages until the server closes it (TimeoutError: it did not)
                bob.recv(timeout=20)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403
        closed_after = time.monotonic() - unshared
        print(f"closed {closed_after:.2f} s after the unshare")  # -s shows it (the closing notes quote it)
        assert closed_after < 15, "bob's websocket stayed open"
        assert kernel_info(alice)["content"]["status"] == "ok"  # the owner's connection is left alone
    with pytest.raises(websockets.exceptions.InvalidStatus) as refused:
        connect("bob")  # JupyterLab's reconnect: refused at the gateway
    assert refused.value.response.status_code == 403
    disconnected = wait_for(
        lambda: [
            event.message
            for event in core.list_namespaced_event(namespace).items
            if event.reason == "ViewersDisconnected" and event.involved_object.name == "hpc"
        ],
        timeout=20,
        what="the ViewersDisconnected Event",
    )
    assert "bob (1, NotShared)" in disconnected[0] and "alice" not in disconnected[0]


def test_an_unshare_while_no_operator_runs_closes_the_sharees_websocket_once_one_is_back(
    opened, operator, cluster_lab, core, namespace
):
    """The unshare happens while the operator is down (a rolling update, a crash): its spec handler then
    sees no change (kopf keeps the last spec in memory), so the check of open connections is made at the
    resume, where the sharing is not the one last checked (status.viewersCheckedFor)."""
    environments, _, base = cluster_lab
    environments.patch_spec("hpc", sharing={"users": ["bob"]})
    answered(opened, base + "api/status", "bob", 200)
    wait_for(
        lambda: (environments.get("hpc").get("status") or {}).get("viewersCheckedFor"),
        timeout=30,
        what="the sharing's open connections checked",
    )
    status, _, body = opened.request(base + "api/kernels", "alice", method="POST")
    assert status == 201, body
    url = opened.url.replace("http", "ws", 1) + f"{base}api/kernels/{json.loads(body)['id']}/channels"
    cookie = {"Cookie": f"aenv_session={opened.token('bob')}"}
    with websockets.sync.client.connect(url, additional_headers=cookie, open_timeout=20) as bob:
        assert kernel_info(bob)["content"]["status"] == "ok"
        operator.stop()
        try:
            environments.patch_spec("hpc", sharing={"users": []})
            assert kernel_info(bob)["content"]["status"] == "ok"  # nobody to close it meanwhile
        finally:
            operator.start()
        with pytest.raises(websockets.exceptions.ConnectionClosed) as closed:
            while True:
                bob.recv(timeout=30)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403
    wait_for(
        lambda: not (environments.get("hpc").get("status") or {}).get("viewersCheckedFor"),
        timeout=30,
        what="the unshared sharing marked checked",
    )


@pytest.fixture
def cookie_secret(slurm_settings):
    """Where jupyter_server keeps its cookie secret in alice's HOME (the working directory, shared by
    all her jobs), emptied of one an earlier JupyterLab left there before her environment starts."""
    home = Path(slurm_settings.job_working_directory.format(user="alice"))
    secret = home / ".local/share/jupyter/runtime/jupyter_cookie_secret"
    secret.unlink(missing_ok=True)
    return secret


def set_cookies(opened, path, user):
    """The names of the cookies a page through the gateway sets (every Set-Cookie header)."""
    cookie = f"aenv_session={opened.token(user)}"
    request = urllib.request.Request(opened.url + path, headers={"Cookie": cookie})
    with urllib.request.urlopen(request, timeout=10) as response:
        return [header.partition("=")[0] for header in response.headers.get_all("Set-Cookie") or []]


def test_a_viewer_is_handed_neither_the_token_nor_a_login_cookie(opened, cookie_secret, cluster_lab, core, namespace):
    """The gateway adds the token to every request, so the browser needs none: JupyterLab's pages hold
    no token (its page config, jupyter_server's own pages) and its answers set no login cookie, whose
    secret would otherwise sit in the HOME all of alice's jobs share (a sharee's cookie then opened her
    other and later servers, at node:port, unshared or not: aenv_viewers.py)."""
    environments, _, base = cluster_lab
    token = base64.b64decode(core.read_namespaced_secret("aenv-hpc", namespace).data["token"]).decode()
    environments.patch_spec("hpc", sharing={"users": ["bob"]})
    for user in ("alice", "bob"):
        _, _, page = answered(opened, base + "lab", user, 200)
        (config,) = re.findall(rb'<script id="jupyter-config-data" type="application/json">(.*?)</script>', page, re.S)
        assert json.loads(config)["token"] == "" and token.encode() not in page
        status, _, page = opened.request(base + "files/no-such-file", user)
        assert status == 404 and b"data-jupyter-api-token" not in page and token.encode() not in page
        names = set_cookies(opened, base + "lab", user)
        assert "_xsrf" in names and not [name for name in names if name.startswith("username-")], names
    assert not cookie_secret.exists(), "jupyter_server wrote its cookie secret to the shared HOME"


OWNERS_SECRET = b"a cookie secret in alice's own jupyter config, which bob could write" * 2
# An extension of alice's own (in her ~/.jupyter, as anyone running as her could put there), loaded
# after aenv_viewers (by name), that installs a page_config_hook without chaining the one before it:
# the page config it returns still holds the token. It leaves a file to say it was loaded.
LATER_HOOK = """
import os

def _jupyter_server_extension_points():
    return [{"module": "zz_page_config_hook"}]

def _load_jupyter_server_extension(serverapp):
    serverapp.web_app.settings["page_config_hook"] = lambda handler, page_config: page_config
    open(os.path.join(os.path.dirname(__file__), "zz_page_config_hook.loaded"), "w").close()
"""


@pytest.fixture
def owners_config(slurm_settings):
    """alice's own ~/.jupyter (read by every JupyterLab she starts) with a cookie secret and a later
    extension's page_config_hook, before her environment starts; removed after."""
    home = Path(slurm_settings.job_working_directory.format(user="alice"))
    entry = pwd.getpwnam("alice")
    directory, made = home / ".jupyter", []
    for path in (home, directory, directory / "jupyter_server_config.d"):
        if not path.exists():
            path.mkdir(mode=0o700)
            os.chown(path, entry.pw_uid, entry.pw_gid)
            made.append(path)
    files = {
        directory / "jupyter_server_config.py": "import os, sys\n"  # her extension importable, from ~/.jupyter
        "sys.path.insert(0, os.path.dirname(__file__))\n"
        f"c.ServerApp.cookie_secret = {OWNERS_SECRET!r}\n",
        directory / "zz_page_config_hook.py": LATER_HOOK,
        directory / "jupyter_server_config.d/zz_page_config_hook.json": json.dumps(
            {"ServerApp": {"jpserver_extensions": {"zz_page_config_hook": True}}}
        ),
    }
    for path, text in files.items():
        assert not path.exists(), f"{path}: alice's own, not the test's"
        path.write_text(text)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    yield directory
    for path in [*files, directory / "zz_page_config_hook.loaded"]:
        path.unlink(missing_ok=True)
    shutil.rmtree(directory / "__pycache__", ignore_errors=True)
    for path in reversed(made):
        path.rmdir()


def test_the_owners_config_neither_puts_the_token_back_in_a_page_nor_makes_a_cookie_log_in(
    opened, owners_config, cluster_lab, core, namespace
):
    """What alice's own config (which bob, running as her while shared, could write) may add: an
    extension whose page_config_hook replaces aenv_viewers' puts no token back in JupyterLab's pages,
    and a login cookie signed with the cookie secret it sets, sent straight to the job's node:port
    without the token, logs no one in (aenv_viewers.py)."""
    environments, ready, base = cluster_lab
    token = base64.b64decode(core.read_namespaced_secret("aenv-hpc", namespace).data["token"]).decode()
    _, _, page = answered(opened, base + "lab", "alice", 200)
    assert (owners_config / "zz_page_config_hook.loaded").exists(), "alice's extension was not loaded"
    (config,) = re.findall(rb'<script id="jupyter-config-data" type="application/json">(.*?)</script>', page, re.S)
    assert json.loads(config)["token"] == "" and token.encode() not in page
    _, _, page = opened.request(base + "lab/no/such/page", "alice")  # JupyterLab's not-found page, a page config too
    assert b"jupyter-config-data" in page and token.encode() not in page

    address = ready["status"]["backend"]["addresses"][0]
    port = int(ready["status"]["backend"]["endpoint"].rpartition(":")[2])
    certificate = core.read_namespaced_config_map("aenv-hpc-tls", namespace).data["ca.crt"]
    context = ssl.create_default_context(cadata=certificate)
    context.check_hostname = False  # the job's own certificate (its CA), asked for by address

    def status_at_node(**headers):
        connection = http.client.HTTPSConnection(address, port, context=context, timeout=10)
        try:
            connection.request("GET", base + "api/status", headers=headers)
            return connection.getresponse().status
        finally:
            connection.close()

    name = re.sub(r"[^A-Za-z0-9]", "-", f"username-{address}:{port}")  # jupyter_server's, from the Host
    user = dict(username="alice", name="alice", display_name="alice", initials="A", avatar_url=None, color=None)
    forged = signed(JUPYTERLAB / "bin/python", OWNERS_SECRET, name, json.dumps(user))
    assert status_at_node(Authorization=f"token {token}") == 200  # the server, reached at node:port
    assert status_at_node() == 403
    assert status_at_node(Cookie=f"{name}={forged}") == 403, "a login cookie signed with alice's config's secret"


def test_a_real_browser_opens_it_for_alice_and_for_bob_only_while_shared(opened, cluster_lab):
    environments, ready, base = cluster_lab
    url = ready["status"]["connection"]["url"]
    answered(opened, base + "api/status", "alice", 200)
    driver = chromium()
    try:
        sign_in(driver, opened.url, "aenv_session", opened.token("alice"))
        driver.get(url)
        wait_for(lambda: jupyterlab_shown(driver), timeout=60, what="JupyterLab's UI")
        assert "JupyterLab" in driver.title
        assert screenshot(driver, "open-slurm-jupyterlab-alice").stat().st_size > 10_000

        sign_in(driver, opened.url, "aenv_session", opened.token("bob"))
        driver.get(url)
        assert "belongs to alice" in driver.find_element(By.ID, "reason").text
        screenshot(driver, "open-slurm-bob-refused")

        environments.patch_spec("hpc", sharing={"users": ["bob"]})
        answered(opened, base + "api/status", "bob", 200)
        driver.get(url)
        wait_for(lambda: jupyterlab_shown(driver), timeout=60, what="JupyterLab for bob")
        screenshot(driver, "open-slurm-jupyterlab-bob-shared")
        # JupyterLab works with the token only in what the gateway adds (its launcher lists the kernels
        # it asked the server for), and bob's browser is handed no credential of the server
        assert (
            driver.execute_script("return JSON.parse(document.getElementById('jupyter-config-data').textContent).token")
            == ""
        )
        wait_for(
            lambda: driver.find_elements(By.CSS_SELECTOR, '.jp-LauncherCard[data-category="Notebook"]'),
            timeout=30,
            what="the launcher's kernels",
        )
        assert not [c["name"] for c in driver.get_cookies() if c["name"].startswith("username-")]

        environments.patch_spec("hpc", sharing={"users": []})
        answered(opened, base + "api/status", "bob", 403)
        driver.get(url)
        assert "not shared with you" in driver.find_element(By.ID, "reason").text
    finally:
        driver.quit()


def test_suspended_cluster_environment_releases_its_route_and_job_and_opens_again_on_resume(
    opened, cluster_lab, core, custom, namespace
):
    environments, ready, base = cluster_lab
    before = core.read_namespaced_config_map("aenv-hpc-tls", namespace).data["ca.crt"]
    environments.patch_spec("hpc", suspend=True)
    environments.wait_phase("hpc", "Suspended", timeout=60)
    wait_for(
        lambda: opened.request(base + "api/status", "alice")[0] in (404, 503),
        timeout=20,
        what="the gateway to stop routing to the suspended environment",
    )
    # Resumed: a new job with a new key and certificate, which the gateway then accepts (and only that)
    environments.patch_spec("hpc", suspend=False)
    resumed = environments.wait_phase("hpc", "Ready", timeout=90)
    assert resumed["status"]["backend"]["id"] != ready["status"]["backend"]["id"]
    assert core.read_namespaced_config_map("aenv-hpc-tls", namespace).data["ca.crt"] != before
    _, _, body = answered(opened, base + "api/status", "alice", 200)
    assert "last_activity" in json.loads(body)
