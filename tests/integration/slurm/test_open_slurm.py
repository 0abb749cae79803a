"""OPEN for the Cluster card, end to end: a real JupyterLab in a real Slurm job on a compute node with
an address of its own (hack/slurm.sh), reached through the real gateway (Traefik, hack/gateway.sh)
by a selector-less Service and EndpointSlice, opened in a real browser (Debian's chromium) as the
owner, refused to others, opened for a sharee and refused again once unshared."""

from __future__ import annotations

import json
import time

import kubernetes
import pytest
import websockets.sync.client
from selenium.webdriver.common.by import By

from tests.integration.browser import chromium, jupyterlab_shown, screenshot, sign_in
from tests.integration.conftest import REPO, kubectl
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

        environments.patch_spec("hpc", sharing={"users": []})
        answered(opened, base + "api/status", "bob", 403)
        driver.get(url)
        assert "not shared with you" in driver.find_element(By.ID, "reason").text
    finally:
        driver.quit()


def test_suspended_cluster_environment_releases_its_route_and_job(opened, cluster_lab, custom, namespace):
    environments, _, base = cluster_lab
    environments.patch_spec("hpc", suspend=True)
    environments.wait_phase("hpc", "Suspended", timeout=60)
    wait_for(
        lambda: opened.request(base + "api/status", "alice")[0] in (404, 503),
        timeout=20,
        what="the gateway to stop routing to the suspended environment",
    )
