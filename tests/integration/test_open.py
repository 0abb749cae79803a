"""OPEN through the real gateway (Traefik, hack/gateway.sh) for JupyterLab pods: one HTTPRoute per
Ready environment, the public URL in status, forward-auth answered by the operator. KWOK pods run no
container, so the test starts a server at the pod's IP in a network namespace of its own (echoing
what it receives): what the gateway passes on can be read back."""

from __future__ import annotations

import base64
import http.client
import json
import time
import urllib.parse
import uuid

import kubernetes
import pytest
import yaml

from analysis_operator.policy.opening import PROBE_HEADER, probe_signature
from tests.integration.authorization import (
    authorization_parameters,
    denial,
    read_parameters,
    type_warnings,
    wait_until_allowed,
)
from tests.integration.conftest import REPO, impersonating, kubectl
from tests.integration.netns import Netns
from tests.integration.test_environments import StatusLog
from tests.waiting import wait_for

GATEWAY_API = ("gateway.networking.k8s.io", "v1")
GATEWAY_NAMESPACE, GATEWAY_NAME = "analysis-gateway", "analysis"  # hack/gateway.sh's


@pytest.fixture(scope="module")
def directory(kubeconfig):
    kubectl("apply", "-f", str(REPO / "examples/users.yaml"))


def route(custom, namespace, name):
    try:
        return custom.get_namespaced_custom_object(*GATEWAY_API, namespace, "httproutes", f"aenv-{name}")
    except kubernetes.client.ApiException as error:
        if error.status == 404:
            return None
        raise


def log_lines(text: str) -> list[dict]:
    lines = []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:  # another line's part, or not JSON
            continue
    return [line for line in lines if isinstance(line, dict)]


def conditions(environment):
    return {c["type"]: c for c in (environment.get("status") or {}).get("conditions") or ()}


def served(gateway, path, user=None, **headers):
    """Wait until the test's server at the pod's address answers through the gateway. The route is
    in place at Ready, but the test's server starts only after it (KWOK pods run none): a request
    that hangs meanwhile is given up."""
    return wait_for(
        lambda: (answer := gateway.request(path, user, headers, timeout=3))[0] not in (0, 404, 502, 504) and answer,
        timeout=40,
        what=f"the gateway to route {path} to the test's server",
    )


def upgrade(gateway, path: str, user: str, origin: str) -> tuple[int, dict[str, str], bytes]:
    """A browser's websocket handshake through the gateway, signed in as `user`, from a page of `origin`
    (urllib would send Connection: close)."""
    where = urllib.parse.urlsplit(gateway.url)
    connection = http.client.HTTPConnection(where.hostname, where.port, timeout=5)
    try:
        connection.request(
            "GET",
            path,
            headers={
                "Connection": "Upgrade",
                "Upgrade": "websocket",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": base64.b64encode(b"sixteen bytes!!!").decode(),
                "Origin": origin,
                "Sec-Fetch-Mode": "websocket",
                "Cookie": f"aenv_session={gateway.token(user)}",
            },
        )
        response = connection.getresponse()
        return response.status, dict(response.headers), response.read()
    finally:
        connection.close()


def test_ready_pod_is_opened_through_the_gateway_for_its_owner_only(
    opened, directory, environments, core, custom, namespace
):
    environments.create("lab", flavor="jupyter-basic", lifetime="1h")
    ready = environments.wait_phase("lab", "Ready")
    base = f"/env/{namespace}/lab/"
    assert ready["status"]["connection"]["url"] == f"{opened.url}{base}lab"
    assert conditions(ready)["Routable"]["status"] == "True"
    made = route(custom, namespace, "lab")
    assert made["spec"]["rules"][0]["matches"][0]["path"] == {"type": "PathPrefix", "value": base}
    assert made["metadata"]["ownerReferences"][0]["uid"] == ready["metadata"]["uid"]

    pod_ip = core.read_namespaced_pod("aenv-lab", namespace).status.pod_ip
    token = core.read_namespaced_secret("aenv-lab", namespace).data["token"]
    with Netns(pod_ip) as pod:
        pod.echo_server(8888)
        status, _, body = served(opened, base + "api/status", "alice", Cookie="_xsrf=x1")
        assert status == 200
        seen = json.loads(body)
        assert seen["path"] == base + "api/status"  # JupyterLab serves under the base path: no rewrite
        assert seen["headers"]["Authorization"] == "token " + base64.b64decode(token).decode()
        assert "Cookie" not in seen["headers"]  # the session cookie stays at the gateway, and none is passed by default
        assert seen["headers"]["X-Forwarded-User"] == "alice"

        status, headers, page = opened.request(base, "bob")
        assert status == 403 and headers["X-Analysis-Reason"] == "NotShared" and b"belongs to alice" in page
        status, _, page = opened.request(base)
        assert status == 401 and b"not signed in" in page
        forged = {"X-Forwarded-User": "alice", "X-Auth-Request-User": "alice", "X-Forwarded-Uri": base}
        assert opened.request(base + "api/status", headers=forged)[0] == 401  # a header names no one
        assert opened.request(base, "support")[0] == 200  # an admin named in settings

        # shared with bob (a FacilityUser; no datasets), then unshared: the very next request decides
        environments.patch_spec("lab", sharing={"users": ["bob"]})
        wait_for(lambda: opened.request(base, "bob")[0] == 200, timeout=10, what="bob let in after sharing")
        environments.patch_spec("lab", sharing={"users": []})
        wait_for(lambda: opened.request(base, "bob")[0] == 403, timeout=10, what="bob refused after unsharing")

        # While shared, bob could read the server's token in it (echo $JUPYTER_TOKEN) and its uid: the
        # operator's probe signature they make is answered by the forward-auth itself, never passed on
        # (the server would have echoed it with 200), signed in or not.
        server_token = base64.b64decode(token).decode()
        signature = probe_signature(server_token, ready["metadata"]["uid"])
        for user in ("bob", None):
            status, headers, page = opened.request(base + "api/status", user, {PROBE_HEADER: signature})
            assert status == 403 and headers.get("X-Analysis-Reason") == "ProbeAnswered", (user, status, page)
            assert headers[PROBE_HEADER] == ready["metadata"]["uid"]
            assert server_token not in json.dumps(headers) and server_token.encode() not in page
            assert b'"headers"' not in page  # not the test's server's echo


def test_a_sharees_other_cookies_never_reach_the_owners_server(
    opened, operator, directory, environments, core, namespace
):
    """The server is its owner's, who can log what it is sent: bob's other cookies for the gateway's site
    (oauth2-proxy's in front of it, a portal's session with Path=/, JupyterLab's login cookie, JupyterHub's
    _xsrf) would let alice replay them as bob. Through the real Traefik none reaches it by default, not
    even a Cookie header (Traefik removes the browser's: authResponseHeaders); only what
    gateway.pass_cookies names when it names some."""
    environments.create("lab", flavor="jupyter-basic", lifetime="1h", sharing={"users": ["bob"]})
    environments.wait_phase("lab", "Ready")
    base = f"/env/{namespace}/lab/"
    others = "_oauth2_proxy=bobs-oauth; portal_session=bobs-portal; username-lab=bobs-login"
    with Netns(core.read_namespaced_pod("aenv-lab", namespace).status.pod_ip) as pod:
        pod.echo_server(8888)
        status, _, body = served(opened, base + "api/status", "bob", Cookie=f"{others}; _xsrf=x1")
        assert status == 200
        seen = json.loads(body)["headers"]
        assert seen["X-Forwarded-User"] == "bob" and "Cookie" not in seen, seen
        with operator.configured(ANALYSIS_OPERATOR_GATEWAY_PASS_COOKIES="_xsrf"):
            _, _, body = wait_for(
                lambda: (
                    (answer := opened.request(base + "api/status", "bob", {"Cookie": f"{others}; _xsrf=x1"}))[0] == 200
                    and answer
                ),
                timeout=40,
                what="the restarted operator's forward-auth to answer",
            )
            assert json.loads(body)["headers"].get("Cookie") == "_xsrf=x1", body  # the named one, alone
            status, _, body = opened.request(base + "api/status", "bob", {"Cookie": others})
            assert status == 200
            assert "Cookie" not in json.loads(body)["headers"], body


def test_a_page_of_another_site_gets_nothing_through_the_gateway_with_the_owners_session(
    opened, directory, environments, core, namespace
):
    """The gateway hands JupyterLab its token, so JupyterLab skips its own XSRF and Origin checks: a page
    of another site riding alice's session cookie (a POST, a websocket) is refused at the gateway by
    the forward-auth; the same from the gateway's own pages, and a link from another site, reach the server."""
    environments.create("lab", flavor="jupyter-basic", lifetime="1h")
    environments.wait_phase("lab", "Ready")
    base = f"/env/{namespace}/lab/"
    with Netns(core.read_namespaced_pod("aenv-lab", namespace).status.pod_ip) as pod:
        pod.echo_server(8888)
        assert served(opened, base + "api/status", "alice")[0] == 200
        own, evil = opened.url, "https://evil.example"
        status, headers, page = opened.request(base + "api/contents", "alice", {"Origin": evil}, method="POST")
        assert (status, headers.get("X-Analysis-Reason")) == (403, "CrossSiteRequest") and b"evil.example" in page
        status, _, body = opened.request(base + "api/contents", "alice", {"Origin": own}, method="POST")
        assert status == 200 and json.loads(body)["method"] == "POST"
        headers = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors"}
        assert opened.request(base + "api/contents", "alice", headers)[0] == 403  # no Origin said: still another site's
        headers = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
        assert opened.request(base + "lab", "alice", headers)[0] == 200  # a link on the portal's site
        status, headers, _ = upgrade(opened, base + "api/kernels/k1/channels", "alice", evil)
        assert (status, headers.get("X-Analysis-Reason")) == (403, "CrossSiteRequest")
        status, _, body = upgrade(opened, base + "api/kernels/k1/channels", "alice", own)
        assert status == 200 and json.loads(body)["headers"]["Upgrade"] == "websocket"  # the server's to answer


def test_what_the_gateway_needs_and_someone_deleted_is_made_again_and_nothing_opens_meanwhile(
    opened, directory, environments, core, custom, namespace
):
    """Someone deletes the namespace's forward-auth Middleware, its closed page and the environment's
    own route. Meanwhile no request gets past the gateway without the forward-auth's yes, and the
    operator's repair (with its orphan sweep) makes all of them again: the owner gets in again."""
    environments.create("lab", flavor="jupyter-basic", lifetime="1h")
    environments.wait_phase("lab", "Ready")
    base = f"/env/{namespace}/lab/"
    pod_ip = core.read_namespaced_pod("aenv-lab", namespace).status.pod_ip
    made = {
        ("traefik.io", "v1alpha1", "middlewares", "aenv-forward-auth"),
        ("traefik.io", "v1alpha1", "middlewares", "aenv-closed"),
        (*GATEWAY_API, "httproutes", "aenv-closed"),
        (*GATEWAY_API, "httproutes", "aenv-lab"),
    }
    with Netns(pod_ip) as pod:
        pod.echo_server(8888)
        assert served(opened, base + "api/status", "alice")[0] == 200
        for group, version, plural, name in made:
            custom.delete_namespaced_custom_object(group, version, namespace, plural, name)
        answers = opened.others_until_owner_back(base + "api/status", "alice", "bob")  # not shared with bob
        assert 200 not in answers and answers <= {401, 403, 404, 503}, answers

    # The owner is back once the forward-auth Middleware and the environment's route are; the closed
    # page's route and Middleware come in the same repair, not necessarily the same moment.
    def present(group: str, version: str, plural: str, name: str) -> bool:
        try:
            return (
                custom.get_namespaced_custom_object(group, version, namespace, plural, name)["metadata"]["name"] == name
            )
        except kubernetes.client.ApiException as error:
            if error.status != 404:
                raise
            return False

    for made_object in made:
        wait_for(lambda: present(*made_object), timeout=30, what=f"{made_object[2]} {made_object[3]} made again")


def test_a_token_known_nowhere_is_said_to_those_who_may_open_it_and_a_resume_gives_a_new_one(
    opened, operator, directory, environments, core, namespace
):
    """Someone deletes a running environment's token Secret, and the operator restarts before anyone
    opened it (the token was kept only in the old process's memory). Nothing can make that token
    again: the owner is told so and what to do, a stranger learns nothing, and a suspend and resume
    starts it with a new token that the gateway hands on."""
    environments.create("lab", flavor="jupyter-basic", lifetime="1h")
    environments.wait_phase("lab", "Ready")
    base = f"/env/{namespace}/lab/"
    old = core.read_namespaced_secret("aenv-lab", namespace).data["token"]
    core.delete_namespaced_secret("aenv-lab", namespace)
    operator.restart()
    status, headers, page = wait_for(
        lambda: (answer := opened.request(base, "alice", timeout=3))[0] == 503 and answer,
        timeout=30,
        what="the owner told that the token is gone",
    )
    assert headers["X-Analysis-Reason"] == "NoToken"
    assert b"Secret aenv-lab was deleted" in page and b"suspend and resume it" in page
    assert opened.request(base, "bob")[0] == 403  # its state is nobody else's business

    environments.patch_spec("lab", suspend=True)
    environments.wait_phase("lab", "Suspended")
    environments.patch_spec("lab", suspend=False)
    environments.wait_phase("lab", "Ready")
    new = core.read_namespaced_secret("aenv-lab", namespace).data["token"]
    assert new != old
    with Netns(core.read_namespaced_pod("aenv-lab", namespace).status.pod_ip) as pod:
        pod.echo_server(8888)
        status, _, body = served(opened, base + "api/status", "alice")
        assert status == 200
        assert json.loads(body)["headers"]["Authorization"] == "token " + base64.b64decode(new).decode()


def test_suspend_removes_the_route_and_resume_brings_it_back(opened, environments, custom, namespace):
    environments.create("lab", flavor="jupyter-basic", lifetime="1h")
    environments.wait_phase("lab", "Ready")
    assert route(custom, namespace, "lab") is not None
    environments.patch_spec("lab", suspend=True)
    suspended = environments.wait_phase("lab", "Suspended")
    wait_for(lambda: route(custom, namespace, "lab") is None, timeout=10, what="the route removed on suspend")
    assert conditions(environments.get("lab"))["Routable"]["status"] == "False"
    assert suspended["status"]["connection"]["url"].endswith(f"/env/{namespace}/lab/lab")  # the URL is kept
    # the namespace's closed page answers instead of the environment: a page saying so, not a 404
    status, headers, page = wait_for(
        lambda: (answer := opened.request(f"/env/{namespace}/lab/lab", "alice"))[0] == 503 and answer,
        timeout=10,
        what="the suspended page",
    )
    assert headers["X-Analysis-Reason"] == "NotSuspended" and b"is suspended" in page
    assert opened.request(f"/env/{namespace}/lab/lab", "bob")[0] == 403  # its state is nobody else's business
    assert opened.request(f"/env/{namespace}/nothing/", "alice")[0] == 404
    environments.patch_spec("lab", suspend=False)
    environments.wait_phase("lab", "Ready")
    wait_for(lambda: route(custom, namespace, "lab") is not None, timeout=10, what="the route back on resume")


def test_deleting_the_environment_removes_its_route(opened, environments, custom, namespace):
    environments.create("lab", flavor="jupyter-basic", lifetime="1h")
    environments.wait_phase("lab", "Ready")
    environments.delete("lab")
    wait_for(lambda: route(custom, namespace, "lab") is None, timeout=30, what="the route garbage-collected")


def test_a_gateway_that_does_not_exist_is_a_condition_not_a_failure(operator, gateway, environments, namespace):
    operator.configure(**{**gateway.settings, "ANALYSIS_OPERATOR_GATEWAY_NAME": "no-such-gateway"})
    try:
        environments.create("lab", flavor="jupyter-basic", lifetime="1h")
        ready = environments.wait_phase("lab", "Ready")
        wait_for(
            lambda: conditions(environments.get("lab")).get("Routable", {}).get("reason") == "GatewayNotFound",
            timeout=10,
            what="Routable=False GatewayNotFound",
        )
        routable = conditions(environments.get("lab"))["Routable"]
        assert routable["status"] == "False" and "no-such-gateway" in routable["message"]
        assert ready["status"]["phase"] == "Ready"
    finally:
        operator.configure(**gateway.settings)


def test_a_route_the_namespace_quota_refuses_is_a_condition_until_it_has_room(
    opened, directory, environments, core, custom, namespace
):
    """The namespace's ResourceQuota allows no HTTPRoute: the environment runs (and is charged as running),
    its Routable condition says what refused the route, in the API server's words, with one Warning; nothing
    opens meanwhile; once the quota has room the route is made (tried every 30 s) and the owner gets in."""
    quota = {"metadata": {"name": "routes"}, "spec": {"hard": {"count/httproutes.gateway.networking.k8s.io": "0"}}}
    core.create_namespaced_resource_quota(namespace, quota)
    # the API server refuses by it at once: "exceeded quota: routes", or "status unknown for quota: routes"
    # until the quota controller has counted (for a custom resource that may take its next discovery)
    environments.create("lab", flavor="jupyter-basic", lifetime="1h")
    wait_for(
        lambda: conditions(environments.get("lab")).get("Routable", {}).get("reason") == "RefusedByCluster",
        timeout=30,
        what=lambda: f"Routable=False RefusedByCluster: {json.dumps(environments.get('lab').get('status'))}",
    )
    status = environments.wait_phase("lab", "Ready")["status"]
    routable = conditions(environments.get("lab"))["Routable"]
    assert routable["status"] == "False" and "quota: routes" in routable["message"], routable
    assert status["phase"] == "Ready" and "startedAt" in status  # it runs: charged, its lifetime running
    assert route(custom, namespace, "lab") is None
    warnings = core.list_namespaced_event(
        namespace, field_selector="involvedObject.name=lab,reason=RefusedByCluster"
    ).items
    assert [event.type for event in warnings] == ["Warning"]
    closed_until(
        opened,
        core,
        environments,
        namespace,
        lambda: core.delete_namespaced_resource_quota("routes", namespace),
        "the route made once the quota has room",
    )


def closed_until(opened, core, environments, namespace, lift, what):
    """Nothing of `lab` opens for its owner (through the gateway, to an echo server at the pod's address)
    until `lift()`; then Routable is True again and the owner gets in."""
    base = f"/env/{namespace}/lab/"
    pod_ip = core.read_namespaced_pod("aenv-lab", namespace).status.pod_ip
    with Netns(pod_ip) as pod:
        pod.echo_server(8888)
        assert opened.request(base + "api/status", "alice", timeout=3)[0] != 200
        lift()
        wait_for(
            lambda: conditions(environments.get("lab")).get("Routable", {}).get("status") == "True",
            timeout=60,
            what=lambda: f"{what}: {json.dumps(environments.get('lab').get('status'))}",
        )
        # the route is new to the gateway: a moment of 503 (no endpoint loaded yet) before the owner gets in
        wait_for(
            lambda: opened.request(base + "api/status", "alice", timeout=3)[0] == 200,
            timeout=40,
            what="the owner let in through the route",
        )


def test_a_route_the_gateway_refuses_says_why_in_the_gateways_words_and_opens_once_taken(
    opened, operator, directory, environments, core, custom, namespace
):
    """The Gateway's listener takes routes only from namespaces with a label (as a facility's shared gateway
    may), and this one has none: the environment runs and says Ready, but its Routable condition is False
    with the gateway's own reason and message (what the real Traefik wrote in the HTTPRoute's
    status.parents), with one Warning; nothing opens. The operator restarts meanwhile: the refusal it
    reads again says the same, with no moment of Routable True and no second Warning. Once the Gateway
    takes the namespace's routes, Routable is True again without any change to the environment, and the
    owner gets in."""
    gateway = custom.get_namespaced_custom_object(*GATEWAY_API, GATEWAY_NAMESPACE, "gateways", GATEWAY_NAME)
    listeners = gateway["spec"]["listeners"]
    only_labelled = {"namespaces": {"from": "Selector", "selector": {"matchLabels": {"aenv-test/gateway": "yes"}}}}

    def listen(listeners: list[dict]) -> None:
        body = {"spec": {"listeners": listeners}}
        custom.patch_namespaced_custom_object(*GATEWAY_API, GATEWAY_NAMESPACE, "gateways", GATEWAY_NAME, body)

    listen([{**listener, "allowedRoutes": only_labelled} for listener in listeners])
    try:
        environments.create("lab", flavor="jupyter-basic", lifetime="1h")
        wait_for(
            lambda: conditions(environments.get("lab")).get("Routable", {}).get("status") == "False",
            timeout=60,
            what=lambda: f"Routable=False from the gateway: {json.dumps(environments.get('lab').get('status'))}",
        )
        status = environments.wait_phase("lab", "Ready")["status"]
        routable = conditions(environments.get("lab"))["Routable"]
        said = [
            condition
            for parent in route(custom, namespace, "lab")["status"]["parents"]
            for condition in parent["conditions"]
            if condition["type"] == "Accepted"
        ]
        assert [condition["status"] for condition in said] == ["False"], said
        assert routable["reason"] == said[0]["reason"] == "NotAllowedByListeners", routable
        assert f"HTTPRoute {namespace}/aenv-lab" in routable["message"] and "itself runs" in routable["message"]
        assert status["connection"]["url"].endswith(f"/env/{namespace}/lab/lab")  # where it opens, once taken
        warnings = core.list_namespaced_event(
            namespace, field_selector="involvedObject.name=lab,reason=NotAllowedByListeners"
        ).items
        assert [event.type for event in warnings] == ["Warning"]

        statuses = StatusLog(custom, namespace, environments.get("lab"))
        before = operator.log_path.stat().st_size
        operator.restart()
        wait_for(
            lambda: any(
                line.get("event") == "route.opened" and line.get("environment") == f"{namespace}/lab"
                for line in log_lines(operator.log_path.read_bytes()[before:].decode(errors="replace"))
            ),
            timeout=30,
            what="the restarted operator's converge of the environment (its route applied again)",
        )
        time.sleep(3)  # whatever that converge would write, written
        statuses.stop()
        assert conditions(environments.get("lab"))["Routable"] == routable
        flips = [status for status in statuses.statuses if conditions({"status": status})["Routable"] != routable]
        assert not flips, flips
        warnings = core.list_namespaced_event(
            namespace, field_selector="involvedObject.name=lab,reason=NotAllowedByListeners"
        ).items
        assert [event.type for event in warnings] == ["Warning"]  # each Event posted is an object of its own
        # the facility's gateway takes routes from every namespace again
        closed_until(opened, core, environments, namespace, lambda: listen(listeners), "Routable=True once taken")
    finally:
        listen(listeners)


def test_ready_means_the_gateway_already_serves_the_route(opened, directory, environments, core, custom, namespace):
    """Ready is written once the forward-auth of the environment's own route answered the operator's
    probe (settings gateway.probe_url): a browser following status.connection.url the moment it says
    Ready reaches the environment, never the gateway's 404 or the 'being opened' page. KWOK pods run no
    server, so what answers past the route is the network's (an error): that still went through the
    route. The probe itself is answered by the forward-auth and never passed on."""
    names = [f"burst-{i}" for i in range(6)]
    for name in names:
        environments.create(name, flavor="jupyter-basic", lifetime="1h")
    waiting, watch = set(names), kubernetes.watch.Watch()
    for event in watch.stream(
        custom.list_namespaced_custom_object,
        "analysis.panosc.eu",
        "v1alpha1",
        namespace,
        "analysisenvironments",
        timeout_seconds=120,
    ):
        body = event["object"]
        name, status = body["metadata"]["name"], body.get("status") or {}
        if name not in waiting or status.get("phase") != "Ready":
            continue
        waiting.discard(name)
        code, headers, page = opened.request(f"/env/{namespace}/{name}/lab", "alice", timeout=3)
        assert "X-Analysis-Reason" not in headers, (name, code, headers, page)  # not a page of ours
        assert not (code == 404 and page == b"404 page not found\n"), name  # not the gateway without a route
        if not waiting:
            watch.stop()
    assert not waiting, f"never Ready: {waiting}"
    # the probe's header is no way in for anyone else: a made-up signature is refused at the gateway
    code, headers, _ = opened.request(f"/env/{namespace}/burst-0/lab", headers={"X-Analysis-Probe": "0" * 64})
    assert code == 401 and headers["X-Analysis-Reason"] == "NotSignedIn"
    # and the real one gets the forward-auth's own answer, as the gateway returns it: status and headers
    uid = environments.get("burst-0")["metadata"]["uid"]
    secret = core.read_namespaced_secret("aenv-burst-0", namespace).data["token"]
    signature = probe_signature(base64.b64decode(secret).decode(), uid)
    code, headers, _ = opened.request(f"/env/{namespace}/burst-0/lab", headers={PROBE_HEADER: signature})
    assert (code, headers.get("X-Analysis-Reason"), headers.get(PROBE_HEADER)) == (403, "ProbeAnswered", uid)
    assert "Authorization" not in headers


def test_with_an_environment_domain_each_environment_is_opened_on_its_own_host_only(
    opened, operator, directory, environments, core, custom, namespace
):
    """gateway.environment_domain: each environment has a browser origin of its own. The owner opens it on
    its own host (the route names it; the operator's probe asks on it, so it is Ready at once); its path
    asked on another environment's host, another environment's path on its host, and what a page of
    another environment's host sends are refused at the gateway."""
    with operator.configured(ANALYSIS_OPERATOR_GATEWAY_ENVIRONMENT_DOMAIN="localhost"):
        environments.create("lab", flavor="jupyter-basic", lifetime="1h")
        ready = environments.wait_phase("lab", "Ready")
        port = urllib.parse.urlsplit(opened.url).port
        own, other = f"3-lab-{namespace}.localhost", f"4-demo-{namespace}.localhost"  # "demo": another's
        base = f"/env/{namespace}/lab/"
        assert ready["status"]["connection"]["url"] == f"http://{own}:{port}{base}lab"
        assert route(custom, namespace, "lab")["spec"]["hostnames"] == [own]
        closed = custom.get_namespaced_custom_object(*GATEWAY_API, namespace, "httproutes", "aenv-closed")
        assert closed["spec"]["hostnames"] == ["*.localhost"]

        with Netns(core.read_namespaced_pod("aenv-lab", namespace).status.pod_ip) as pod:
            pod.echo_server(8888)
            status, _, body = served(opened, base + "api/status", "alice", Host=own)
            assert status == 200 and json.loads(body)["headers"]["X-Forwarded-User"] == "alice"
            own_page = {"Host": own, "Origin": f"http://{own}:{port}"}
            status, _, body = opened.request(base + "api/contents", "alice", own_page, method="POST")
            assert status == 200 and json.loads(body)["method"] == "POST"

            # its path on another environment's host (the closed page's wildcard takes it): refused
            status, headers, page = opened.request(base + "api/status", "alice", {"Host": other})
            assert (status, headers.get("X-Analysis-Reason")) == (404, "WrongHost") and own.encode() in page
            # another environment's path on its host (a same-origin fetch by its page): refused
            status, headers, _ = opened.request(f"/env/{namespace}/demo/api/status", "alice", {"Host": own})
            assert (status, headers.get("X-Analysis-Reason")) == (404, "WrongHost")
            # what a page of another environment's host sends: refused
            other_page = {"Host": own, "Origin": f"http://{other}:{port}"}
            status, headers, _ = opened.request(base + "api/contents", "alice", other_page, method="POST")
            assert (status, headers.get("X-Analysis-Reason")) == (403, "CrossSiteRequest")
            gateway_page = {"Host": own, "Origin": opened.url}  # the gateway's host is no environment's origin now
            assert opened.request(base + "api/contents", "alice", gateway_page, method="POST")[0] == 403
            fetch = {"Host": own, "Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "cors"}
            assert opened.request(base + "api/status", "alice", fetch)[0] == 403
            link = {"Host": own, "Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "navigate"}
            assert opened.request(base + "lab", "alice", link)[0] == 200  # a link from there is fine
            # and the gateway's own host is no environment's any more: no route there
            assert opened.request(base + "api/status", "alice")[0] == 404


# A page alice's environment serves (her JupyterLab extension, say), opened by bob: it tries to reach
# bob's own environment with bob's session, every way a page can, and says what it got.
ATTACK_PAGE = """<!doctype html><html><head><title>working</title></head><body><script>
const bob = "BOB_ORIGIN/env/NAMESPACE/demo/api/contents";
const tries = {
  "bob's path on this host": ["/env/NAMESPACE/demo/api/contents?from-alice-1", {credentials: "include"}],
  "bob's host, cors POST": [bob + "?from-alice-2", {method: "POST", credentials: "include", body: "x"}],
  "bob's host, no-cors GET": [bob + "?from-alice-3", {mode: "no-cors", credentials: "include"}],
  "bob's host, no-cors POST": [bob + "?from-alice-4", {method: "POST", mode: "no-cors", credentials: "include"}],
};
(async () => {
  const results = {};
  for (const [name, [url, init]] of Object.entries(tries)) {
    try {
      const r = await fetch(url, init);
      results[name] = r.type + " " + r.status + " " + (r.type === "opaque" ? "" : await r.text());
    }
    catch (error) { results[name] = "error " + error; }
  }
  window.results = results;
  document.title = "done";
})();
</script></body></html>"""

# alice's server: the page above at .../attack.html, what it received as JSON otherwise; bob's: records each
# request's path and viewer (X-Forwarded-User) to a file, answering like the echo server.
RECORDING_SERVER = r"""
import http.server, json, sys
page, log = open(sys.argv[3]).read().encode() if sys.argv[3] != "-" else b"", sys.argv[4]
class Handler(http.server.BaseHTTPRequestHandler):
    def _answer(self):
        if log != "-":
            with open(log, "a") as out:
                out.write(json.dumps([self.path, self.headers.get("X-Forwarded-User")]) + "\n")
        html = page and self.path.endswith("/attack.html")
        body = page if html else json.dumps({"path": self.path, "method": self.command}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html" if html else "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = _answer
    def log_message(self, *arguments):
        pass
http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Handler).serve_forever()
"""


def test_in_a_real_browser_a_page_of_alices_environment_cannot_reach_bobs_with_bobs_session(
    opened, operator, directory, environments, core, namespace, tmp_path
):
    """Bob opens alice's environment (shared with him); a page in it tries to reach bob's own environment
    (same site, another origin). With gateway.environment_domain nothing of it reaches bob's server."""
    import sys

    from tests.integration.browser import chromium, diagnosis

    # Under localhost: a trustworthy origin without TLS, so the browser sends Fetch Metadata (Sec-Fetch-Site),
    # as it does over https; env.localhost is the site, each environment's host an origin of its own.
    domain = "env.localhost"
    with operator.configured(ANALYSIS_OPERATOR_GATEWAY_ENVIRONMENT_DOMAIN=domain):
        environments.create("lab", flavor="jupyter-basic", lifetime="1h", sharing={"users": ["bob"]})
        environments.create("demo", flavor="jupyter-basic", lifetime="1h", owner="bob")
        alice_url = environments.wait_phase("lab", "Ready")["status"]["connection"]["url"]
        bob_url = environments.wait_phase("demo", "Ready")["status"]["connection"]["url"]
        port = urllib.parse.urlsplit(opened.url).port
        alice_origin, bob_origin = (
            f"http://{host}.{domain}:{port}" for host in ("3-lab-" + namespace, "4-demo-" + namespace)
        )
        assert alice_url.startswith(alice_origin) and bob_url.startswith(bob_origin)
        page = tmp_path / "attack.html"
        page.write_text(ATTACK_PAGE.replace("BOB_ORIGIN", bob_origin).replace("NAMESPACE", namespace))
        received = tmp_path / "bob-received.jsonl"
        pods = (core.read_namespaced_pod(f"aenv-{name}", namespace).status.pod_ip for name in ("lab", "demo"))
        with Netns(next(pods)) as alice_pod, Netns(next(pods)) as bob_pod:
            alice_pod.run(sys.executable, "-c", RECORDING_SERVER, alice_pod.address, "8888", str(page), "-")
            bob_pod.run(sys.executable, "-c", RECORDING_SERVER, bob_pod.address, "8888", "-", str(received))
            alice_pod.wait_listening(8888)
            bob_pod.wait_listening(8888)
            alice_host, bob_host = alice_origin.split("//")[1].split(":")[0], bob_origin.split("//")[1].split(":")[0]
            assert served(opened, f"/env/{namespace}/lab/api/status", "bob", Host=alice_host)[0] == 200
            assert served(opened, f"/env/{namespace}/demo/x-from-bob", "bob", Host=bob_host)[0] == 200
            assert json.loads(received.read_text().splitlines()[-1]) == [f"/env/{namespace}/demo/x-from-bob", "bob"]

            driver = chromium(f"--host-resolver-rules=MAP *.{domain} 127.0.0.1")
            try:
                # the portal's session cookie for the parent domain, as the README asks of it
                driver.get(f"{bob_origin}/env/")
                driver.add_cookie({"name": "aenv_session", "value": opened.token("bob"), "domain": domain, "path": "/"})
                driver.get(f"{alice_origin}/env/{namespace}/lab/attack.html")
                wait_for(
                    lambda: driver.title == "done", timeout=30, what=lambda: f"the page's tries: {diagnosis(driver)}"
                )
                results = driver.execute_script("return window.results;")
            finally:
                driver.quit()
        reached = [line for line in received.read_text().splitlines() if "from-alice" in line]
        assert reached == [], (reached, results)
        assert (
            results["bob's path on this host"].startswith("basic 404")
            and "WrongHost" in results["bob's path on this host"]
        ), results


def _mallorys_namespace(api, kubeconfig) -> tuple[str, kubernetes.client.CustomObjectsApi]:
    """A namespace where mallory, a facility user, may make and change routes (as a team's namespace
    admin may), and in the Gateway's own namespace too: every refusal then is the policy's, not RBAC's."""
    name = f"t-mallory-{uuid.uuid4().hex[:6]}"
    kubernetes.client.CoreV1Api(api).create_namespace({"metadata": {"name": name}})
    rbac = kubernetes.client.RbacAuthorizationV1Api(api)
    rbac.create_cluster_role(
        {
            "metadata": {"name": name},
            "rules": [
                {
                    "apiGroups": ["gateway.networking.k8s.io"],
                    "resources": ["httproutes", "grpcroutes", "backendtlspolicies"],
                    "verbs": ["get", "create", "update", "patch"],
                },
                {"apiGroups": ["traefik.io"], "resources": ["ingressroutes"], "verbs": ["get", "create"]},
            ],
        }
    )
    for where in (name, GATEWAY_NAMESPACE):
        rbac.create_namespaced_role_binding(
            where,
            {
                "metadata": {"name": name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "mallory"}],
            },
        )
    return name, kubernetes.client.CustomObjectsApi(impersonating(kubeconfig, "mallory"))


def _route(kind: str, namespace: str, parent_refs: list[dict], path: str) -> dict:
    """A route of mallory's to her own Service, taking `path` (an HTTPRoute) or every request
    carrying her header (a GRPCRoute, which matches no path)."""
    if kind == "HTTPRoute":
        match = {"path": {"type": "PathPrefix", "value": path}}
    else:
        match = {"headers": [{"name": "X-Mallory", "value": "1"}]}
    return {
        "apiVersion": "/".join(GATEWAY_API),
        "kind": kind,
        "metadata": {"name": f"m-{uuid.uuid4().hex[:6]}", "namespace": namespace},
        "spec": {
            "parentRefs": parent_refs,
            "rules": [{"matches": [match], "backendRefs": [{"name": "mallory", "port": 8080}]}],
        },
    }


def test_only_the_operator_attaches_routes_to_the_gateway(
    opened, directory, environments, api, core, custom, kubeconfig, namespace
):
    """Mallory may make routes in her namespace. A route of hers on the analysis Gateway with a longer
    path under alice's environment's would win over its own (the more specific match wins), and alice's
    browser would send her session, or with a forward-auth Middleware the environment's token, to
    mallory's server. The API server refuses it (deploy/authorization/gateway-policy.yaml), however the
    parentRef names the Gateway, as a GRPCRoute or a Traefik IngressRoute, at create and at change;
    routes on another Gateway are hers to make; the operator's own route serves alice as before."""
    environments.create("lab", flavor="jupyter-basic", lifetime="1h")
    environments.wait_phase("lab", "Ready")
    base = f"/env/{namespace}/lab/"
    mallorys, mallory = _mallorys_namespace(api, kubeconfig)
    gateway = {"name": GATEWAY_NAME, "namespace": GATEWAY_NAMESPACE}
    refused = f"only the analysis operator attaches routes to the Gateway {GATEWAY_NAMESPACE}/{GATEWAY_NAME}"

    def create(body: dict, plural: str = "httproutes", group: tuple[str, str] = GATEWAY_API, dry_run=None):
        namespace_of = body["metadata"]["namespace"]
        return lambda: mallory.create_namespaced_custom_object(*group, namespace_of, plural, body, dry_run=dry_run)

    beside = _route("HTTPRoute", GATEWAY_NAMESPACE, [{"name": GATEWAY_NAME}], base + "lab")
    try:
        explicit = {"group": "gateway.networking.k8s.io", "kind": "Gateway", **gateway}
        for parent_refs, field in [
            ([explicit], "spec.parentRefs[0]"),
            ([{"name": "elsewhere"}, gateway], "spec.parentRefs[1]"),  # group and kind left to their defaults
        ]:
            message = denial(create(_route("HTTPRoute", mallorys, parent_refs, base + "lab")))
            assert message and f"{field}: {refused}" in message, message
        # in the Gateway's namespace a parentRef without namespace names it too
        message = denial(create(beside))
        assert message and f"spec.parentRefs[0]: {refused}" in message, message
        message = denial(create(_route("GRPCRoute", mallorys, [gateway], ""), "grpcroutes"))
        assert message and refused in message, message
        ingress_route = {
            "apiVersion": "traefik.io/v1alpha1",
            "kind": "IngressRoute",
            "metadata": {"name": "m-lab", "namespace": mallorys},
            "spec": {
                "routes": [
                    {
                        "kind": "Rule",
                        "match": f"PathPrefix(`{base}lab`)",
                        "services": [{"name": "mallory", "port": 8080}],
                    }
                ]
            },
        }
        message = denial(create(ingress_route, "ingressroutes", ("traefik.io", "v1alpha1")))
        assert message and f"IngressRoute {mallorys}/m-lab: the Traefik of the analysis Gateway" in message, message

        # A BackendTLSPolicy for an environment's Service (aenv-<name>) says which certificate the gateway
        # accepts from its server (a Slurm job's JupyterLab), and the oldest policy for a Service wins: the
        # operator's alone. One for a Service of her own is hers.
        def backend_tls(service: str, group: str = "") -> dict:
            return {
                "apiVersion": "/".join(GATEWAY_API),
                "kind": "BackendTLSPolicy",
                "metadata": {"name": f"m-{uuid.uuid4().hex[:6]}", "namespace": mallorys},
                "spec": {
                    "targetRefs": [{"group": group, "kind": "Service", "name": service}],
                    "validation": {"wellKnownCACertificates": "System", "hostname": "mallory.example.org"},
                },
            }

        for group in ("", "core"):  # the core group either way (Traefik reads both)
            message = denial(create(backend_tls("aenv-lab", group), "backendtlspolicies"))
            assert message and "spec.targetRefs[0]: only the analysis operator makes the BackendTLSPolicy" in message
        hers = backend_tls("mallory")
        assert denial(create(hers, "backendtlspolicies")) is None
        # ... but not re-pointed at an environment's Service afterwards, nor given a second target there
        for targets in (
            [{"group": "", "kind": "Service", "name": "aenv-lab"}],
            [
                {"group": "", "kind": "Service", "name": "mallory"},
                {"group": "core", "kind": "Service", "name": "aenv-lab"},
            ],
        ):
            message = denial(
                lambda targets=targets: mallory.patch_namespaced_custom_object(
                    *GATEWAY_API,
                    mallorys,
                    "backendtlspolicies",
                    hers["metadata"]["name"],
                    {"spec": {"targetRefs": targets}},
                )
            )
            where = f"spec.targetRefs[{len(targets) - 1}]"
            assert message and f"{where}: only the analysis operator makes the BackendTLSPolicy" in message, message
        # a change that leaves it naming her own Service is hers
        assert (
            denial(
                lambda: mallory.patch_namespaced_custom_object(
                    *GATEWAY_API,
                    mallorys,
                    "backendtlspolicies",
                    hers["metadata"]["name"],
                    {"metadata": {"labels": {"team": "m"}}},
                )
            )
            is None
        )

        # On another Gateway (here one of her namespace's, named like the analysis one), or on none: hers.
        own = _route("HTTPRoute", mallorys, [{"name": GATEWAY_NAME}], base + "lab")
        assert denial(create(own)) is None
        assert denial(create(_route("HTTPRoute", mallorys, [], base + "lab"))) is None
        # ... but not moved onto the analysis Gateway afterwards
        name = own["metadata"]["name"]
        moved = {"spec": {"parentRefs": [gateway]}}
        message = denial(
            lambda: mallory.patch_namespaced_custom_object(*GATEWAY_API, mallorys, "httproutes", name, moved)
        )
        assert message and f"spec.parentRefs[0]: {refused}" in message, message

        # The operator's identity (the chart's ServiceAccount, in operatorUsernames) may.
        current = (read_parameters(api).get("data") or {}).get("operatorUsernames", "")
        with authorization_parameters(core, operatorUsernames=",".join(filter(None, [current, "mallory"]))):
            wait_until_allowed(
                create(_route("HTTPRoute", mallorys, [gateway], base + "lab"), dry_run="All"),
                "the policy to take mallory for the operator",
            )

        # The CEL is sound for the routes' schemas as this API server has them (now the gateway's CRDs
        # are in): a copy of each policy, made after them, is type-checked without a warning.
        admission = kubernetes.client.AdmissionregistrationV1Api(api)
        for policy in yaml.safe_load_all((REPO / "deploy/authorization/gateway-policy.yaml").read_text()):
            policy["metadata"]["name"] = f"{policy['metadata']['name']}-{mallorys}"
            admission.create_validating_admission_policy(policy)
            try:
                assert type_warnings(api, policy["metadata"]["name"]) == [], policy["metadata"]["name"]
            finally:
                admission.delete_validating_admission_policy(policy["metadata"]["name"])

        # Nothing of hers took alice's path: the operator's route still takes it to alice's server.
        with Netns(core.read_namespaced_pod("aenv-lab", namespace).status.pod_ip) as pod:
            pod.echo_server(8888)
            status, _, body = served(opened, base + "lab", "alice")
            assert status == 200 and json.loads(body)["path"] == base + "lab"
    finally:
        kubectl("delete", "httproute", "-n", GATEWAY_NAMESPACE, beside["metadata"]["name"], "--ignore-not-found")
        kubernetes.client.RbacAuthorizationV1Api(api).delete_namespaced_role_binding(mallorys, GATEWAY_NAMESPACE)
        kubernetes.client.RbacAuthorizationV1Api(api).delete_cluster_role(mallorys)
        core.delete_namespace(mallorys, propagation_policy="Background")
