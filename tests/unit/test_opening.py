"""OPEN as pure decisions: paths, who may open what, sharing rules, route manifests (policy/opening.py,
engine/routes.py), and converge opening and closing routes through the Routes interface."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json

import pytest

from analysis_operator.backends.base import Upstream
from analysis_operator.engine.converge import Context, converge
from analysis_operator.engine.routes import (
    AUTH_RESPONSE_HEADERS,
    Route,
    build_closed_route,
    build_endpoint,
    build_forward_auth,
    build_route,
    public_url,
)
from analysis_operator.infra.kube import KubeError
from analysis_operator.model.domain import Dataset, DatasetRef, Environment
from analysis_operator.policy.access import StaticCatalogue
from analysis_operator.policy.opening import (
    Viewer,
    base_path,
    cross_site_refusal,
    environment_of,
    is_probe,
    may_open,
    origin_of,
    probe_signature,
    sharing_refusals,
)
from analysis_operator.settings import GatewaySettings
from tests.unit.test_backend_interface import ENVIRONMENT, FLAVOR, NOW, Catalogue, Cluster, MemoryBackend

EMBARGOED = Dataset(
    name="raw", pid="10.5072/raw", embargoed_until=NOW + datetime.timedelta(days=300), groups=frozenset({"p11"})
)
PUBLIC = Dataset(name="open", pid="10.5072/open")
CATALOGUE = StaticCatalogue(
    datasets=(EMBARGOED, PUBLIC), groups={"p11": frozenset({"alice", "bob"}), "staff": frozenset({"carol", "dave"})}
)
LAB = Environment(namespace="team-a", name="lab", uid="u-1", owner="alice", flavor="jl", datasets=(DatasetRef("raw"),))
SETTINGS = GatewaySettings(enabled=True, url="https://analysis.example.org/", auth_url="http://op:9100/authorize")


# ---------------------------------------------------------------- paths


def test_base_path_and_its_inverse():
    assert base_path("/env", "team-a", "lab") == "/env/team-a/lab/"
    assert base_path("/env/", "team-a", "lab") == "/env/team-a/lab/"
    assert environment_of("/env", "/env/team-a/lab/") == ("team-a", "lab")
    assert environment_of("/env", "/env/team-a/lab/api/kernels?x=1") == ("team-a", "lab")


@pytest.mark.parametrize(
    "path",
    ["/", "/env/team-a/lab", "/env/team-a/", "/other/team-a/lab/", "/env/Team-A/lab/", "/env/../x/lab/", "/envx/a/b/"],
)
def test_paths_that_are_no_environment(path):
    assert environment_of("/env", path) is None


def test_no_path_is_a_prefix_of_another_environments():
    """PathPrefix matches whole elements and every path ends in '/': lab never catches lab-2's requests."""
    paths = [base_path("/env", ns, name) for ns in ("a", "a-b") for name in ("lab", "lab-2", "b")]
    for path in paths:
        for other in paths:
            assert path == other or not other.startswith(path)


# ---------------------------------------------------------------- who may open it


def decide(viewer, environment=LAB, phase="Ready", admins=frozenset()):
    return may_open(environment, phase, viewer, admins, CATALOGUE, NOW)


def test_owner_opens_a_ready_environment():
    verdict = decide(Viewer("alice"))
    assert verdict.allowed and verdict.role == "owner"


def test_another_user_is_refused_with_whose_it_is():
    verdict = decide(Viewer("mallory"))
    assert verdict.status == 403 and verdict.reason == "NotShared"
    assert "belongs to alice" in verdict.message and "mallory" in verdict.message


def test_sharee_who_may_read_the_data_opens_it():
    shared = dataclasses.replace(LAB, shared_users=frozenset({"bob"}))
    assert decide(Viewer("bob"), shared).role == "shared"


def test_sharee_who_may_not_read_a_mounted_dataset_is_refused_naming_it():
    shared = dataclasses.replace(LAB, shared_users=frozenset({"carol"}))
    verdict = decide(Viewer("carol"), shared)
    assert verdict.status == 403 and verdict.reason == "DatasetNotReadable" and "'raw'" in verdict.message


def test_group_sharing_and_embargo_end():
    shared = dataclasses.replace(LAB, shared_groups=frozenset({"staff"}))
    assert decide(Viewer("dave", frozenset({"staff"})), shared).status == 403  # embargoed data
    later = EMBARGOED.embargoed_until + datetime.timedelta(seconds=1)
    verdict = may_open(shared, "Ready", Viewer("dave", frozenset({"staff"})), frozenset(), CATALOGUE, later)
    assert verdict.allowed and verdict.role == "shared"
    assert decide(Viewer("erin", frozenset({"other"})), shared).reason == "NotShared"


def test_admin_opens_anything_but_a_forged_group_claim_does_not():
    assert decide(Viewer("root-support"), admins=frozenset({"root-support"})).role == "admin"
    # groups come from FacilityGroups, never from the request: a viewer not in `staff` gets nothing
    shared = dataclasses.replace(LAB, shared_groups=frozenset({"staff"}))
    assert decide(Viewer("mallory"), shared).reason == "NotShared"


@pytest.mark.parametrize("phase", ["Suspended", "Expired", "Stopped", "Rejected", "Provisioning", ""])
def test_an_environment_not_running_answers_with_its_phase(phase):
    verdict = decide(Viewer("alice"), phase=phase)
    assert verdict.status == 503 and verdict.role == "owner"
    assert "team-a/lab" in verdict.message


def test_an_environment_being_deleted_opens_for_nobody_whatever_keeps_the_object():
    """Its pod is removed at its deletion (handlers/environments.remove_held), though a finalizer keeps the
    object a while: said so, not let through to nothing (or to what runs on until the finalizer goes)."""
    deleting = dataclasses.replace(LAB, deleting=True)
    for viewer in (Viewer("alice"), Viewer("root-support")):
        verdict = decide(viewer, deleting, admins=frozenset({"root-support"}))
        assert (verdict.status, verdict.reason) == (503, "Deleting")
    assert decide(Viewer("mallory"), deleting).status == 403


def test_not_running_is_not_revealed_to_strangers():
    assert decide(Viewer("mallory"), phase="Suspended").status == 403


# ---------------------------------------------------------------- sharing at admission


def check(environment, users=frozenset({"alice", "bob", "carol", "dave"})):
    groups = dict(CATALOGUE.groups)
    return sharing_refusals(environment, CATALOGUE, users.__contains__, groups.get, NOW)


def test_sharing_with_team_members_is_accepted():
    assert check(dataclasses.replace(LAB, shared_users=frozenset({"bob"}), shared_groups=frozenset({"p11"}))) == []


def test_unknown_user_and_group_are_named():
    refusals = check(dataclasses.replace(LAB, shared_users=frozenset({"zed"}), shared_groups=frozenset({"nope"})))
    assert [r.reason for r in refusals] == ["UnknownUser", "UnknownGroup"]
    assert "'zed'" in refusals[0].message and "'nope'" in refusals[1].message


def test_sharing_embargoed_data_names_the_person_and_the_dataset():
    refusals = check(dataclasses.replace(LAB, shared_groups=frozenset({"staff"})))
    assert {r.subject for r in refusals} == {"carol", "dave"}
    assert all(r.reason == "SharingNotAllowed" and "'raw'" in r.message for r in refusals)


def test_public_data_may_be_shared_with_anyone_known():
    public = dataclasses.replace(LAB, datasets=(DatasetRef("open"),), shared_users=frozenset({"carol"}))
    assert check(public) == []


# ---------------------------------------------------------------- manifests


def test_route_for_a_pod_goes_to_its_service_through_forward_auth():
    route = build_route(SETTINGS, LAB, Upstream(port=8888, service="aenv-lab", landing="lab"))
    assert route["metadata"]["name"] == "aenv-lab" and route["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    rule = route["spec"]["rules"][0]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/env/team-a/lab/"}}]
    assert rule["filters"] == [
        {
            "type": "ExtensionRef",
            "extensionRef": {"group": "traefik.io", "kind": "Middleware", "name": "aenv-forward-auth"},
        }
    ]
    assert rule["backendRefs"] == [{"name": "aenv-lab", "port": 8888}]
    assert route["spec"]["parentRefs"][0] == {
        "group": "gateway.networking.k8s.io",
        "kind": "Gateway",
        "name": "analysis",
        "namespace": "analysis-gateway",
    }
    assert "hostnames" not in route["spec"]


def test_route_for_a_desktop_strips_the_prefix_and_lands_on_novnc():
    upstream = Upstream(port=6080, address="10.0.0.7", landing="vnc.html?path={path}websockify", strip_prefix=True)
    route = build_route(dataclasses.replace(SETTINGS, hostname="a.example.org"), LAB, upstream)
    assert route["spec"]["hostnames"] == ["a.example.org"]
    assert route["spec"]["rules"][0]["filters"][1]["urlRewrite"]["path"]["replacePrefixMatch"] == "/"
    assert public_url(SETTINGS, LAB, upstream) == (
        "https://analysis.example.org/env/team-a/lab/vnc.html?path=env/team-a/lab/websockify"
    )


def test_endpoint_for_an_address_and_refusal_of_hostnames():
    service, endpoints = build_endpoint(LAB, Upstream(port=23456, address="10.250.0.2"))
    assert "selector" not in service["spec"] and service["spec"]["ports"][0]["port"] == 23456
    assert endpoints["metadata"]["labels"]["kubernetes.io/service-name"] == "aenv-lab"
    assert endpoints["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] == "analysis-operator"
    assert endpoints["endpoints"][0]["addresses"] == ["10.250.0.2"] and endpoints["addressType"] == "IPv4"
    assert build_endpoint(LAB, Upstream(port=1, address="fd00::2"))[1]["addressType"] == "IPv6"
    with pytest.raises(ValueError):
        build_endpoint(LAB, Upstream(port=1, address="node1.cluster"))


def test_forward_auth_never_trusts_client_forwarded_headers():
    middleware = build_forward_auth(SETTINGS, "team-a")
    auth = middleware["spec"]["forwardAuth"]
    assert auth["address"] == "http://op:9100/authorize" and auth["trustForwardHeader"] is False
    assert auth["authResponseHeaders"] == AUTH_RESPONSE_HEADERS and "Authorization" in AUTH_RESPONSE_HEADERS


# ---------------------------------------------------------------- converge opens and closes routes


class RecordingRoutes:
    enabled = True

    def __init__(self, routable=True, serving=True):
        self.open_routes: dict[str, Upstream] = {}
        self.ready: dict[str, bool] = {}
        self.routable, self.serving = routable, serving
        self.asked: list[str] = []  # served() calls: what the probe was asked about

    def url(self, environment, upstream):
        return f"https://gw/env/{environment.namespace}/{environment.name}/{upstream.landing}"

    async def open(self, environment, upstream, ready=True):
        if self.routable:
            self.open_routes[environment.uid] = upstream
            self.ready[environment.uid] = ready
            return Route(self.url(environment, upstream), True, "Routed", "open")
        return Route(self.url(environment, upstream), False, "GatewayNotFound", "Gateway x/y does not exist")

    async def close(self, environment):
        self.open_routes.pop(environment.uid, None)

    def served(self, environment, upstream):
        self.asked.append(environment.uid)
        return self.serving

    def forget(self, uids):
        for uid in uids:
            self.open_routes.pop(uid, None)


class UpstreamBackend(MemoryBackend):
    def _observation(self, uid):
        observation = super()._observation(uid)
        if observation.state.value == "Ready":
            return dataclasses.replace(observation, upstream=Upstream(port=9999, address="10.1.1.1", landing="lab"))
        return observation


def run_scenario(routes):
    backend = UpstreamBackend()
    context = Context(kube=Cluster(), backends={"memory": backend}, access=Catalogue(), routes=routes)

    async def step(environment, status):
        outcome = await converge(context, environment, status, FLAVOR, NOW)
        return {**status, **(outcome.status or {})}, outcome

    return backend, step


def conditions(status):
    return {c["type"]: c for c in status.get("conditions") or ()}


def test_route_opens_before_ready_is_written_and_closes_on_suspend_and_stop():
    routes = RecordingRoutes()
    backend, step = run_scenario(routes)

    async def scenario():
        status, _ = await step(ENVIRONMENT, {})
        assert status["phase"] == "Provisioning" and not routes.open_routes and "Routable" not in conditions(status)
        backend.running["u-1"] = "ready"
        status, _ = await step(ENVIRONMENT, status)
        assert status["phase"] == "Ready" and status["connection"]["url"] == "https://gw/env/ns/lab/lab"
        assert routes.open_routes["u-1"].address == "10.1.1.1" and conditions(status)["Routable"]["status"] == "True"
        status, outcome = await step(ENVIRONMENT, status)
        assert outcome.status is None  # steady state: nothing to write
        status, _ = await step(dataclasses.replace(ENVIRONMENT, suspend=True), status)
        assert status["phase"] == "Suspended" and not routes.open_routes
        assert conditions(status)["Routable"]["status"] == "False"
        status, _ = await step(ENVIRONMENT, status)  # resumed
        backend.running["u-1"] = "ready"
        status, _ = await step(ENVIRONMENT, status)
        assert status["phase"] == "Ready" and "u-1" in routes.open_routes
        expired = NOW + datetime.timedelta(hours=3)
        outcome = await converge(
            Context(kube=Cluster(), backends={"memory": backend}, access=Catalogue(), routes=routes),
            ENVIRONMENT,
            status,
            FLAVOR,
            expired,
        )
        assert outcome.status["phase"] == "Expired" and not routes.open_routes
        assert conditions(outcome.status)["Routable"]["status"] == "False"

    asyncio.run(scenario())


def test_missing_gateway_keeps_the_environment_ready_and_says_why():
    routes = RecordingRoutes(routable=False)
    backend, step = run_scenario(routes)

    async def scenario():
        status, _ = await step(ENVIRONMENT, {})
        backend.running["u-1"] = "ready"
        status, outcome = await step(ENVIRONMENT, status)
        assert status["phase"] == "Ready"
        routable = conditions(status)["Routable"]
        assert routable["status"] == "False" and routable["reason"] == "GatewayNotFound"
        assert outcome.retry_after == 30  # checked again: a Gateway made later is picked up
        routes.routable = True
        status, _ = await step(ENVIRONMENT, status)
        assert conditions(status)["Routable"]["status"] == "True" and "u-1" in routes.open_routes

    asyncio.run(scenario())


def test_closed_page_route_covers_the_namespace_and_passes_nothing_on():
    route = build_closed_route(SETTINGS, "team-a")
    rule = route["spec"]["rules"][0]
    assert rule["matches"][0]["path"] == {"type": "PathPrefix", "value": "/env/team-a/"}
    assert "backendRefs" not in rule and rule["filters"][0]["extensionRef"]["name"] == "aenv-closed"
    assert "environment-uid" not in str(route["metadata"])  # the namespace's, no environment's
    middleware = build_forward_auth(SETTINGS, "team-a", "aenv-closed")
    assert middleware["spec"]["forwardAuth"]["address"] == "http://op:9100/authorize/closed"


class EarlyUpstreamBackend(MemoryBackend):
    """Knows where its server will be while it starts (a pod's Service)."""

    def _observation(self, uid):
        observation = super()._observation(uid)
        if observation.state.holds:
            return dataclasses.replace(observation, upstream=Upstream(port=8888, service="aenv-lab", landing="lab"))
        return observation


def test_route_is_made_while_starting_and_its_endpoint_made_ready_at_ready():
    routes = RecordingRoutes()
    backend = EarlyUpstreamBackend()
    context = Context(kube=Cluster(), backends={"memory": backend}, access=Catalogue(), routes=routes)

    async def scenario():
        outcome = await converge(context, ENVIRONMENT, {}, FLAVOR, NOW)
        status = outcome.status
        assert status["phase"] == "Provisioning" and routes.ready["u-1"] is False
        backend.running["u-1"] = "ready"
        outcome = await converge(context, ENVIRONMENT, status, FLAVOR, NOW)
        assert outcome.status["phase"] == "Ready" and routes.ready["u-1"] is True

    asyncio.run(scenario())


def test_ready_waits_for_the_gateway_to_serve_the_route_but_a_ready_one_never_goes_back():
    """With a probe URL set, the backend being ready is not yet Ready: Provisioning/Opening until the
    gateway serves its route (its endpoint is ready meanwhile, so it can); an environment already
    Ready (an operator restart forgets what was probed) stays Ready."""
    routes = RecordingRoutes(serving=False)
    backend = EarlyUpstreamBackend()
    context = Context(kube=Cluster(), backends={"memory": backend}, access=Catalogue(), routes=routes)

    async def scenario():
        status = (await converge(context, ENVIRONMENT, {}, FLAVOR, NOW)).status
        backend.running["u-1"] = "ready"
        status = {**status, **(await converge(context, ENVIRONMENT, status, FLAVOR, NOW)).status}
        assert (status["phase"], status["reason"]) == ("Provisioning", "Opening") and routes.ready["u-1"] is True
        assert "https://gw/env/" in status["message"] and routes.asked == ["u-1"]
        routes.serving = True  # the probe answered (it is converged again)
        status = {**status, **(await converge(context, ENVIRONMENT, status, FLAVOR, NOW)).status}
        assert status["phase"] == "Ready"
        routes.serving, routes.asked = False, []
        assert (await converge(context, ENVIRONMENT, status, FLAVOR, NOW)).status is None  # stays Ready
        assert routes.asked == []

    asyncio.run(scenario())


def test_endpoint_is_not_ready_until_the_environment_is():
    _, endpoints = build_endpoint(LAB, Upstream(port=1, address="10.0.0.1"), ready=False)
    assert endpoints["endpoints"][0]["conditions"] == {"ready": False}


class ListingKube:
    """The API server as GatewayRoutes sees it: objects applied are there until deleted (`gone`);
    every list is recorded by kind."""

    def __init__(self) -> None:
        self.objects: set[tuple[str, str, str]] = set()  # (kind, namespace, name)
        self.applied: list[tuple[str, str]] = []
        self.listed: list[str] = []

    async def get_object(self, api_version: str, kind: str, namespace: str, name: str) -> dict | None:
        return {"metadata": {"name": name}}  # the Gateway exists

    async def apply(self, body: dict) -> dict:
        metadata = body["metadata"]
        self.objects.add((body["kind"], metadata["namespace"], metadata["name"]))
        self.applied.append((body["kind"], metadata["name"]))
        return body

    async def present(self, api_version: str, kind: str, selector: str, fields: str = "") -> set[tuple[str, str]]:
        self.listed.append(kind)
        return {(namespace, name) for each, namespace, name in self.objects if each == kind}

    def gone(self, kind: str, name: str) -> None:
        self.objects = {o for o in self.objects if o[0] != kind or o[2] != name}


@pytest.mark.parametrize("deleted", ["Service", "EndpointSlice", "HTTPRoute"])
def test_the_service_and_endpointslice_of_an_address_deleted_by_someone_are_made_again(deleted):
    """A Slurm job's node or a VM is routed by a Service without selector and an EndpointSlice that
    nothing but the operator makes: one deleted, the repair converges the environment again (which
    applies all three); nothing deleted, nothing is converged; a gone environment is left alone."""
    from analysis_operator.engine.routes import GatewayRoutes

    kube = ListingKube()
    routes = GatewayRoutes(kube, SETTINGS)  # type: ignore[arg-type]
    converged: list[str] = []
    routes.converge = lambda environment: converged.append(environment.uid)
    node = Upstream(port=20001, address="10.1.2.3", landing="lab")

    async def scenario() -> None:
        await routes.open(LAB, node)
        await routes.repair({LAB.uid})
        assert converged == []
        kube.gone(deleted, "aenv-lab")
        await routes.repair(set())  # gone from the index meanwhile: nothing made for it
        assert converged == []
        await routes.repair({LAB.uid})
        assert converged == [LAB.uid]
        kube.applied.clear()
        await routes.open(LAB, node)  # the converge it asked for
        assert sorted(kind for kind, _ in kube.applied) == ["EndpointSlice", "HTTPRoute", "Service"]
        await routes.repair({LAB.uid})
        assert converged == [LAB.uid]

    asyncio.run(scenario())


def test_a_route_applied_while_the_routes_are_listed_is_not_converged_again():
    """In a burst, environments are routed while the repair lists HTTPRoutes (and, for addresses,
    Services and EndpointSlices): what is applied after a list's snapshot is not in it, and was
    converged again (a false route.missing and a second apply) each time. Only what was applied
    before the lists began is asked about; what someone deletes later is made again by the next repair."""
    from analysis_operator.engine.routes import GatewayRoutes

    other = dataclasses.replace(LAB, name="other", uid="u-2")
    node = Upstream(port=20001, address="10.1.2.3", landing="lab")

    class Burst(ListingKube):
        async def present(self, api_version: str, kind: str, selector: str, fields: str = "") -> set[tuple[str, str]]:
            listed = await super().present(api_version, kind, selector, fields)
            if kind == "HTTPRoute" and other.uid not in routes._applied:
                await routes.open(other, node)  # started while the list was read: not in its snapshot
            return listed

    kube = Burst()
    routes = GatewayRoutes(kube, SETTINGS)  # type: ignore[arg-type]
    converged: list[str] = []
    routes.converge = lambda environment: converged.append(environment.uid)

    async def scenario() -> None:
        await routes.open(LAB, node)
        await routes.repair({LAB.uid, other.uid})
        assert converged == []
        kube.gone("HTTPRoute", other.child_name)  # someone deletes it later
        await routes.repair({LAB.uid, other.uid})
        assert converged == [other.uid]

    asyncio.run(scenario())


class PolicyKube(ListingKube):
    """ListingKube that keeps what is applied, with its labels, and deletes by name."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: dict[tuple[str, str], dict] = {}
        self.deleted: list[tuple[str, str]] = []

    async def get_object(self, api_version: str, kind: str, namespace: str, name: str) -> dict | None:
        if kind == "Gateway":
            return {"metadata": {"name": name}}
        return self.bodies.get((kind, name))

    async def apply(self, body: dict) -> dict:
        self.bodies[(body["kind"], body["metadata"]["name"])] = {**body, "metadata": {**body["metadata"], "uid": "x"}}
        return await super().apply(body)

    async def delete_object(self, api_version: str, kind: str, namespace: str, name: str, uid: str = "") -> None:
        self.deleted.append((kind, name))
        self.bodies.pop((kind, name), None)


def test_a_server_with_a_certificate_replaced_by_one_without_loses_its_backendtlspolicy():
    """slurm.server_tls turned off, then the job replaced without a close between (a replacement, a lost
    submission): the policy left behind would have the gateway speak TLS to a plain server, and fail. It
    goes with the route's next apply, also in a process that did not make it (a restart); a policy of
    that name that is not the environment's (no label of its uid) is left alone."""
    from analysis_operator.engine.routes import GatewayRoutes
    from analysis_operator.infra.server_tls import server_name

    kube = PolicyKube()
    tls = Upstream(port=20001, address="10.1.2.3", landing="lab", server_name=server_name(LAB))
    plain = Upstream(port=20002, address="10.1.2.3", landing="lab")

    async def scenario() -> None:
        routes = GatewayRoutes(kube, SETTINGS)  # type: ignore[arg-type]
        await routes.open(LAB, tls)
        assert ("BackendTLSPolicy", "aenv-lab") in kube.bodies and kube.deleted == []
        await routes.open(LAB, tls)  # nothing changed: nothing read or deleted
        assert kube.deleted == []
        await routes.open(LAB, plain)
        assert kube.deleted == [("BackendTLSPolicy", "aenv-lab")]
        assert kube.bodies[("Service", "aenv-lab")]["spec"]["ports"][0]["name"] == "http"
        await routes.open(LAB, tls)
        restarted = GatewayRoutes(kube, SETTINGS)  # type: ignore[arg-type]
        await restarted.open(LAB, plain)
        assert kube.deleted == [("BackendTLSPolicy", "aenv-lab")] * 2
        kube.bodies[("BackendTLSPolicy", "aenv-lab")] = {"metadata": {"name": "aenv-lab", "labels": {}}}
        await GatewayRoutes(kube, SETTINGS).open(LAB, plain)  # type: ignore[arg-type]
        assert len(kube.deleted) == 2

    asyncio.run(scenario())


class QuotaKube(ListingKube):
    """A namespace whose ResourceQuota has no room for Services (a Slurm job's or a VM's route) until `room`."""

    room = False

    async def apply(self, body: dict) -> dict:
        if body["kind"] == "Service" and not self.room:
            message = 'services "aenv-lab" is forbidden: exceeded quota: q, requested: services=1, used: services=5'
            raise KubeError(
                "PATCH",
                "/api/v1/namespaces/team-a/services/aenv-lab",
                403,
                "Forbidden",
                json.dumps({"message": message}),
            )
        return await super().apply(body)


def test_a_route_the_cluster_refuses_is_not_routable_says_why_and_is_made_once_allowed():
    """A compute node's route (Service without selector, EndpointSlice, HTTPRoute) refused by a quota: a
    Route that is not routable with the API server's words (converge makes it the Routable condition, with
    the job's allocation still recorded and charged); nothing is taken for applied, so the next converge
    applies it all once there is room. Any other error is not taken for a refusal."""
    from analysis_operator.engine.routes import GatewayRoutes

    kube = QuotaKube()
    routes = GatewayRoutes(kube, SETTINGS)  # type: ignore[arg-type]
    node = Upstream(port=20001, address="10.1.2.3", landing="lab")

    async def scenario() -> None:
        refused = await routes.open(LAB, node)
        assert (refused.routable, refused.reason) == (False, "RefusedByCluster")
        assert (
            "exceeded quota: q, requested: services=1" in refused.message
            and "the environment itself runs" in refused.message
        )
        kube.room = True
        opened = await routes.open(LAB, node)
        assert (opened.routable, opened.reason) == (True, "Routed")
        assert sorted(kind for kind, _ in kube.applied if kind != "Middleware") == [
            "EndpointSlice",
            "HTTPRoute",
            "HTTPRoute",
            "Service",
        ]

    asyncio.run(scenario())

    class Broken(ListingKube):
        async def apply(self, body: dict) -> dict:
            raise KubeError("PATCH", "/apis/x", 500, "Internal Server Error", "{}")

    with pytest.raises(KubeError):
        asyncio.run(GatewayRoutes(Broken(), SETTINGS).open(LAB, node))  # type: ignore[arg-type]


def test_a_pod_routed_by_its_own_service_lists_no_services_or_endpointslices_for_the_repair():
    """A pod's Service is the Kubernetes backend's (its repair makes it again); the routes' repair lists
    Services and EndpointSlices only while some environment is routed to an address."""
    from analysis_operator.engine.routes import GatewayRoutes

    kube = ListingKube()
    routes = GatewayRoutes(kube, SETTINGS)  # type: ignore[arg-type]
    routes.converge = lambda environment: None

    async def scenario() -> None:
        await routes.open(LAB, Upstream(port=8888, service=LAB.child_name, landing="lab"))
        await routes.repair({LAB.uid})
        assert sorted(kube.listed) == ["HTTPRoute", "Middleware"]

    asyncio.run(scenario())


def test_probe_requests_are_paced_across_environments_in_the_order_they_asked(monkeypatch):
    """A burst's probes share PROBE_RATE requests a second (each waits for its slot), so a thousand
    routes the gateway has not taken yet do not become a thousand requests a second at its closed
    page; a lone probe goes at once."""
    from analysis_operator.engine import routes as module
    from analysis_operator.settings import GatewaySettings

    routes = module.GatewayRoutes(kube=None, settings=GatewaySettings(enabled=True))
    clock = [100.0]
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(round(seconds, 6))

    monkeypatch.setattr(module.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(module.asyncio, "sleep", sleep)

    async def scenario() -> None:
        await routes._pace()  # alone: no wait
        assert waits == []
        for _ in range(3):
            await routes._pace()  # asked at the same moment: one slot each, 1/PROBE_RATE apart
        clock[0] += 60  # a minute later, the slots long past: at once again
        await routes._pace()

    asyncio.run(scenario())
    step = 1 / module.PROBE_RATE
    assert waits == [round(step, 6), round(2 * step, 6), round(3 * step, 6)]


def test_the_phase_is_remembered_as_decided_before_its_status_patch_is_sent():
    """The forward-auth (its own thread) may be asked by someone who saw Ready before the operator's
    loop has the patch's answer back: Context.written already says Ready while the patch is in flight."""
    from analysis_operator.engine.converge import Outcome
    from analysis_operator.engine.reconciler import apply

    seen: list[str | None] = []

    class Kube:
        async def patch_environment_status(self, namespace, name, status):
            seen.append(context.written.get(ENVIRONMENT.uid))

    context = Context(kube=Kube(), backends={})
    asyncio.run(apply(context, ENVIRONMENT, Outcome({"phase": "Ready"})))
    assert seen == ["Ready"] and context.written == {ENVIRONMENT.uid: "Ready"}


# ---------------------------------------------------------------- requests from other sites, the probe


GATEWAY = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "gw.example.org"}


@pytest.mark.parametrize(
    ("headers", "refused"),
    [
        ({}, False),  # curl, oauth2-proxy's bearer clients: no browser headers
        ({"Origin": "https://gw.example.org"}, False),
        ({"Origin": "https://GW.example.org:443/"}, False),
        ({"Origin": "https://analysis.example.org"}, False),  # the configured URL's (TLS ended in front)
        ({"Origin": "https://evil.example"}, True),
        ({"Origin": "https://gw.example.org.evil.example"}, True),
        ({"Origin": "http://gw.example.org"}, True),
        ({"Origin": "https://gw.example.org:444"}, True),
        ({"Origin": "null"}, True),
        ({"Origin": ""}, True),
        ({"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}, False),
        ({"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "websocket"}, False),
        ({"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "X-Forwarded-Method": "GET"}, False),
        ({"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "X-Forwarded-Method": "HEAD"}, False),
        ({"Sec-Fetch-Site": "Cross-Site", "Sec-Fetch-Mode": "navigate", "X-Forwarded-Method": "POST"}, True),
        ({"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}, True),  # no method said: not a GET
        ({"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "X-Forwarded-Method": "GET"}, True),
        ({"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "websocket", "X-Forwarded-Method": "GET"}, True),
        (
            {
                "Sec-Fetch-Site": "cross-site",
                "Sec-Fetch-Mode": "navigate",
                "Sec-Fetch-Dest": "iframe",
                "X-Forwarded-Method": "GET",
            },
            True,
        ),
    ],
)
def test_requests_another_sites_page_sent_are_refused(headers, refused):
    verdict = cross_site_refusal({**GATEWAY, **headers}, SETTINGS.url)
    assert (verdict is not None) == refused
    if verdict is not None:
        assert (verdict.status, verdict.reason) == (403, "CrossSiteRequest")


def test_without_forwarded_headers_the_configured_urls_origin_is_the_own_one():
    assert cross_site_refusal({"Origin": "https://analysis.example.org"}, SETTINGS.url) is None
    assert cross_site_refusal({"Origin": "https://gw.example.org"}, SETTINGS.url) is not None
    assert origin_of("http://[::1]:8000/env/") == "http://[::1]:8000" and origin_of("ftp://x") == ""


def test_a_probe_signature_is_compared_as_bytes():
    good = probe_signature("server-secret", "u-1")
    assert is_probe(good, "server-secret", "u-1")
    assert not is_probe(good, "server-secret", "u-2") and not is_probe(good.upper(), "server-secret", "u-1")
    assert not is_probe("é" * 64, "server-secret", "u-1") and not is_probe("", "server-secret", "u-1")


# ---------------------------------------------------------------- open connections (engine/viewers.py)


def test_only_people_no_longer_allowed_have_their_connections_closed():
    from analysis_operator.engine.viewers import refused_viewers

    shared = dataclasses.replace(LAB, shared_users=frozenset({"bob"}), shared_groups=frozenset({"staff"}))
    viewers = ["alice", "bob", "carol", "support", "mallory"]
    # bob may read raw (p11); carol is in staff but may not (embargo): a sharee who cannot read is refused too
    refused = refused_viewers(shared, viewers, frozenset({"support"}), CATALOGUE, NOW)
    assert refused == {"carol": "DatasetNotReadable", "mallory": "NotShared"}
    unshared = dataclasses.replace(shared, shared_users=frozenset(), shared_groups=frozenset())
    refused = refused_viewers(unshared, viewers, frozenset({"support"}), CATALOGUE, NOW)
    assert refused == {"bob": "NotShared", "carol": "NotShared", "mallory": "NotShared"}
    # bob leaves the group the environment is shared with
    by_group = dataclasses.replace(LAB, shared_groups=frozenset({"p11"}))
    assert refused_viewers(by_group, ["bob"], frozenset(), CATALOGUE, NOW) == {}
    left = StaticCatalogue(datasets=CATALOGUE.datasets, groups={"p11": frozenset({"alice"})})
    assert refused_viewers(by_group, ["bob"], frozenset(), left, NOW) == {"bob": "NotShared"}


@pytest.mark.parametrize(
    "old, new, changed",
    [
        (None, {"sharing": {"users": ["bob"]}}, False),  # a create or resume: nobody was let in before
        ({"sharing": {"users": ["bob"]}}, {"sharing": {"users": []}}, True),
        ({"sharing": {"users": ["bob"]}}, {}, True),
        ({"suspend": False}, {"suspend": True}, False),
        ({"sharing": {"groups": ["p11"]}}, {"sharing": {"groups": ["p11"]}, "lifetime": "2h"}, False),
    ],
)
def test_a_spec_change_rechecks_open_connections_only_when_sharing_changed(old, new, changed):
    from analysis_operator.handlers.environments import sharing_changed

    assert sharing_changed(old, new) is changed


def test_a_catalogue_change_rechecks_only_running_shared_environments():
    from analysis_operator.engine.viewers import affected_by_catalogue
    from analysis_operator.engine.views import EnvironmentRecord

    ready = {"phase": "Ready"}
    assert affected_by_catalogue(EnvironmentRecord(dataclasses.replace(LAB, shared_groups=frozenset({"p11"})), ready))
    assert affected_by_catalogue(EnvironmentRecord(dataclasses.replace(LAB, shared_users=frozenset({"bob"})), ready))
    assert not affected_by_catalogue(EnvironmentRecord(LAB, ready))
    assert not affected_by_catalogue(
        EnvironmentRecord(dataclasses.replace(LAB, shared_users=frozenset({"alice"})), ready)
    )
    suspended = {"phase": "Suspended"}
    assert not affected_by_catalogue(
        EnvironmentRecord(dataclasses.replace(LAB, shared_users=frozenset({"bob"})), suspended)
    )


# ---------------------------------------------------------------- the gateway's verdict on a route


def _route_with(parents: list, generation: int = 2, namespace: str = "team-a") -> dict:
    return {"metadata": {"namespace": namespace, "generation": generation}, "status": {"parents": parents}}


def _parent(name: str = "analysis", namespace: str | None = "analysis-gateway", **conditions: tuple) -> dict:
    reference = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": name}
    if namespace is not None:
        reference["namespace"] = namespace
    return {
        "parentRef": reference,
        "controllerName": "traefik.io/gateway-controller",
        "conditions": [
            {"type": kind, "status": status, "reason": reason, "message": message, "observedGeneration": observed}
            for kind, (status, reason, message, observed) in conditions.items()
        ],
    }


def test_the_gateways_verdict_is_read_from_its_own_parent_entry_for_the_routes_version():
    from analysis_operator.policy.opening import GatewayVerdict, gateway_verdict

    def verdict(route: dict) -> GatewayVerdict:
        return gateway_verdict(route, "analysis-gateway", "analysis")

    taken = _parent(Accepted=("True", "Accepted", "", 2), ResolvedRefs=("True", "ResolvedRefs", "", 2))
    assert verdict(_route_with([taken])) == GatewayVerdict(True, "Accepted")
    refused = _parent(Accepted=("False", "NotAllowedByListeners", "no listener allows team-a", 2))
    assert verdict(_route_with([refused])) == GatewayVerdict(
        False, "NotAllowedByListeners", "no listener allows team-a"
    )
    unresolved = _parent(Accepted=("True", "Accepted", "", 2), ResolvedRefs=("False", "BackendNotFound", "no svc", 2))
    assert verdict(_route_with([unresolved])) == GatewayVerdict(False, "BackendNotFound", "no svc")
    # nothing said yet; said about the route before it changed; said by or of another gateway
    assert verdict(_route_with([])) == GatewayVerdict(None)
    assert verdict({"metadata": {}}) == GatewayVerdict(None)
    stale = _parent(Accepted=("False", "NotAllowedByListeners", "old", 1))
    assert verdict(_route_with([stale])).accepted is None
    other = _parent(name="public", Accepted=("False", "NotAllowedByListeners", "", 2))
    assert verdict(_route_with([other, taken])) == GatewayVerdict(True, "Accepted")
    elsewhere = _parent(namespace="other", Accepted=("False", "NotAllowedByListeners", "", 2))
    assert verdict(_route_with([elsewhere])).accepted is None
    # a parentRef without namespace means the route's own
    local = _parent(namespace=None, Accepted=("False", "NotAllowedByListeners", "", 2))
    assert verdict(_route_with([local], namespace="analysis-gateway")).accepted is False
    assert verdict(_route_with([local], namespace="team-a")).accepted is None
    # whatever a status holds, reading it never raises
    assert verdict({"metadata": [], "status": {"parents": [None, {"conditions": "x"}]}}) == GatewayVerdict(None)


def test_a_route_the_gateway_refuses_is_not_routable_with_its_words_until_it_takes_it():
    """The verdicts (watched, infra/watch.py) say the gateway refused the route: open() gives a Route that is
    not routable, with the gateway's reason and message (converge makes them the Routable condition and a
    Warning Event), and stops the probe; the change of verdict converges the environment again, and once the
    gateway takes the route it is Routed again (and converged once more, to say so). A verdict about an
    environment this process does not route converges nothing."""
    from analysis_operator.engine.routes import GatewayRoutes

    kube = ListingKube()
    routes = GatewayRoutes(kube, SETTINGS)  # type: ignore[arg-type]
    converged: list[str] = []
    routes.converge = lambda environment: converged.append(environment.uid)
    pod = Upstream(port=8888, service=LAB.child_name, landing="lab")

    def route_status(
        accepted: str, reason: str, message: str = "", namespace: str = LAB.namespace, name: str = "aenv-lab"
    ) -> dict:
        parent = _parent(Accepted=(accepted, reason, message, 1))
        return {
            "metadata": {
                "uid": f"route-{namespace}-{name}",
                "namespace": namespace,
                "name": name,
                "generation": 1,
                "labels": {"analysis.panosc.eu/environment-uid": LAB.uid},
            },
            "status": {"parents": [parent]},
        }

    async def scenario() -> None:
        assert (await routes.open(LAB, pod)).routable
        # someone's route elsewhere (or under another name) carrying the environment's uid label, refused:
        # not the environment's route, so not its verdict
        for namespace, name in (("team-b", "aenv-lab"), (LAB.namespace, "aenv-other")):
            routes.verdicts.put(route_status("False", "NotAllowedByListeners", namespace=namespace, name=name))
            await routes._verdict_changed(LAB.uid)
        assert converged == [] and (await routes.open(LAB, pod)).routable
        routes.verdicts.put(route_status("False", "NotAllowedByListeners", "namespace team-a is not allowed"))
        await routes._verdict_changed(LAB.uid)
        assert converged == [LAB.uid]
        refused = await routes.open(LAB, pod)
        assert (refused.routable, refused.reason) == (False, "NotAllowedByListeners")
        assert "namespace team-a is not allowed" in refused.message and "HTTPRoute team-a/aenv-lab" in refused.message
        routes.verdicts.put(route_status("True", "Accepted"))
        await routes._verdict_changed(LAB.uid)
        assert converged == [LAB.uid, LAB.uid]
        assert (await routes.open(LAB, pod)).routable
        await routes._verdict_changed(LAB.uid)  # taken, and told so: nothing more to converge
        assert converged == [LAB.uid, LAB.uid]
        other = dataclasses.replace(LAB, uid="u-2", name="other")
        refused_other = route_status("False", "NotAllowedByListeners", name="aenv-other")
        refused_other["metadata"]["labels"]["analysis.panosc.eu/environment-uid"] = other.uid
        routes.verdicts.put(refused_other)
        await routes._verdict_changed(other.uid)
        assert converged == [LAB.uid, LAB.uid]

    asyncio.run(scenario())


class RefusingRoutes(RecordingRoutes):
    """A gateway that took the route it was given, and then refused it (the route is in place)."""

    closed = 0

    async def open(self, environment, upstream, ready=True):
        self.open_routes[environment.uid] = upstream
        return Route(self.url(environment, upstream), False, "NotAllowedByListeners", "not here", retry=False)

    async def close(self, environment):
        self.closed += 1
        await super().close(environment)


@pytest.mark.parametrize("end", ["suspend", "expire"])
def test_a_route_the_gateway_refuses_is_not_retried_on_a_timer_and_is_removed_when_the_environment_ends(end):
    """The gateway's refusal is told by the watch, so converge asks for no 30 s retry (an admin narrowing a
    listener must not start a converge every 30 s for each environment); and a refused route is in place all
    the same, so a suspend or the end of its lifetime removes it and says NotRunning (before: Routable was
    False, taken for nothing routed, and the route and its Service stayed)."""
    routes = RefusingRoutes()
    backend, step = run_scenario(routes)

    async def scenario():
        status, _ = await step(ENVIRONMENT, {})
        backend.running["u-1"] = "ready"
        status, outcome = await step(ENVIRONMENT, status)
        assert status["phase"] == "Ready" and outcome.retry_after is None
        assert conditions(status)["Routable"]["reason"] == "NotAllowedByListeners"
        # known at Ready already: the Warning, not the Normal "Up" of the same pass (the status says Ready)
        assert outcome.event == ("Warning", "NotAllowedByListeners", "not here")
        context = Context(kube=Cluster(), backends={"memory": backend}, access=Catalogue(), routes=routes)
        ended, now = ENVIRONMENT, NOW + datetime.timedelta(hours=3)  # past its lifetime
        if end == "suspend":
            ended, now = dataclasses.replace(ENVIRONMENT, suspend=True), NOW
        status = {**status, **(await converge(context, ended, status, FLAVOR, now)).status}
        assert status["phase"] == ("Suspended" if end == "suspend" else "Expired")
        assert not routes.open_routes, "the refused route was left in place"
        assert conditions(status)["Routable"]["reason"] == "NotRunning"
        assert (await converge(context, ended, status, FLAVOR, now)).status is None  # nothing more to write
        assert routes.closed == 1  # and closed once, not at every converge

    asyncio.run(scenario())


def test_a_route_never_applied_is_not_closed_and_one_no_longer_reachable_is():
    """No Gateway (GatewayNotFound: nothing was applied, and with the Gateway API not installed a close would
    fail on the closed page it sets up): a suspend closes nothing, suspends, and says NotRunning. A Ready
    environment whose backend reports no address any more while it still counts as starting (a Slurm job
    completing, a VM shut off) has its route closed before NotRunning is written, not left pointing there."""
    routes = RecordingRoutes(routable=False)
    backend, step = run_scenario(routes)
    closed: list[str] = []

    async def close(environment):
        closed.append(environment.uid)

    routes.close = close

    async def scenario():
        status, _ = await step(ENVIRONMENT, {})
        backend.running["u-1"] = "ready"
        status, _ = await step(ENVIRONMENT, status)
        assert conditions(status)["Routable"]["reason"] == "GatewayNotFound"
        status, _ = await step(dataclasses.replace(ENVIRONMENT, suspend=True), status)
        assert status["phase"] == "Suspended" and backend.running["u-1"] == "suspended" and closed == []
        assert conditions(status)["Routable"]["reason"] == "NotRunning"

        routes.routable, routes.close = True, RecordingRoutes.close.__get__(routes)
        status, _ = await step(ENVIRONMENT, status)  # resumed
        backend.running["u-1"] = "ready"
        status, _ = await step(ENVIRONMENT, status)
        assert status["phase"] == "Ready" and "u-1" in routes.open_routes
        backend.running["u-1"] = "starting"  # still counted as starting, no address (UpstreamBackend)
        status, _ = await step(ENVIRONMENT, status)
        assert "u-1" not in routes.open_routes and conditions(status)["Routable"]["reason"] == "NotRunning"

    asyncio.run(scenario())


def test_a_refused_route_deleted_or_changed_stays_refused_until_the_gateway_takes_it():
    """While the gateway has said nothing yet of the route's new version (changed: its generation went up;
    deleted and made again), the refusal told before stands: no Routable True for a moment, no second
    Warning. A refused route deleted by someone is made again by the converge its deletion starts."""
    from analysis_operator.engine.routes import GatewayRoutes

    kube = ListingKube()
    routes = GatewayRoutes(kube, SETTINGS)  # type: ignore[arg-type]
    converged: list[str] = []
    routes.converge = lambda environment: converged.append(environment.uid)
    pod = Upstream(port=8888, service=LAB.child_name, landing="lab")

    def route_at(generation: int, accepted: str | None, observed: int | None = None) -> dict:
        parents = [] if accepted is None else [_parent(Accepted=(accepted, "NotAllowedByListeners", "", observed))]
        metadata = {"uid": "r-1", "namespace": LAB.namespace, "name": "aenv-lab", "generation": generation}
        metadata["labels"] = {"analysis.panosc.eu/environment-uid": LAB.uid}
        return {"metadata": metadata, "status": {"parents": parents}}

    async def scenario() -> None:
        await routes.open(LAB, pod)
        routes.verdicts.put(route_at(1, "False", 1))
        assert not (await routes.open(LAB, pod)).routable
        routes.verdicts.put(route_at(2, "False", 1))  # changed: the gateway has not looked at version 2 yet
        assert routes.refusal(LAB) is not None and not (await routes.open(LAB, pod)).routable
        applied = len(kube.applied)
        routes.verdicts.remove("r-1")  # deleted by someone
        await routes._verdict_changed(LAB.uid)
        assert converged[-1] == LAB.uid
        again = await routes.open(LAB, pod)
        assert ("HTTPRoute", "aenv-lab") in kube.applied[applied:] and not again.routable
        routes.verdicts.put(route_at(1, None))  # made again; nothing said yet
        assert not (await routes.open(LAB, pod)).routable
        routes.verdicts.put(route_at(1, "True", 1))
        assert (await routes.open(LAB, pod)).routable
        # refused, then closed (a pod unschedulable for a while: Pending) and opened again: still refused
        # until the gateway speaks of the new route, not "Routed" for a moment (and its probe started)
        routes.verdicts.put(route_at(1, "False", 1))
        assert not (await routes.open(LAB, pod)).routable
        await routes.close(LAB)
        routes.verdicts.remove("r-1")
        assert not (await routes.open(LAB, pod)).routable
        routes.forget([LAB.uid])  # the environment is gone: nothing kept for it
        assert routes.refusal(LAB) is None

    asyncio.run(scenario())


def test_a_true_in_one_entry_does_not_hide_a_refusal_in_another_and_another_listener_is_not_asked():
    from analysis_operator.policy.opening import gateway_verdict

    taken = _parent(Accepted=("True", "Accepted", "", 2))
    refused = _parent(Accepted=("False", "NotAllowedByListeners", "", 2))
    assert gateway_verdict(_route_with([taken, refused]), "analysis-gateway", "analysis").accepted is False
    web = {**refused, "parentRef": {**refused["parentRef"], "sectionName": "web"}}
    assert gateway_verdict(_route_with([web]), "analysis-gateway", "analysis", "web").accepted is False
    assert gateway_verdict(_route_with([web]), "analysis-gateway", "analysis", "websecure").accepted is None


def test_closing_where_the_closed_page_cannot_be_made_still_closes():
    """A route refused by the namespace's quota (Routable False, RefusedByCluster) is now closed at a suspend
    too: the closed page the close sets up is refused by the same quota, which must not fail the converge
    (it would be retried for as long as the quota stays); any other error still fails it."""
    from analysis_operator.engine.routes import GatewayRoutes

    class NoRoutesAllowed(ListingKube):
        error = 403

        async def apply(self, body: dict) -> dict:
            if body["kind"] == "HTTPRoute":
                message = 'httproutes "aenv-closed" is forbidden: exceeded quota: routes'
                raise KubeError("PATCH", "/apis/x", self.error, "Forbidden", json.dumps({"message": message}))
            return await super().apply(body)

    kube = NoRoutesAllowed()
    asyncio.run(GatewayRoutes(kube, SETTINGS).close(LAB))  # type: ignore[arg-type]
    assert ("Middleware", "aenv-forward-auth") in kube.applied  # it tried
    kube.error = 404  # the Gateway API or Traefik's CRDs not installed: "404 page not found"

    async def not_served(body: dict) -> dict:
        raise KubeError("PATCH", "/apis/traefik.io/v1alpha1/x", 404, "Not Found", "404 page not found")

    kube.apply = not_served  # type: ignore[method-assign]
    asyncio.run(GatewayRoutes(kube, SETTINGS).close(LAB))  # type: ignore[arg-type]

    async def broken(body: dict) -> dict:
        raise KubeError("PATCH", "/apis/x", 500, "Internal Server Error", "{}")

    kube.apply = broken  # type: ignore[method-assign]
    with pytest.raises(KubeError):
        asyncio.run(GatewayRoutes(kube, SETTINGS).close(LAB))  # type: ignore[arg-type]


def test_the_same_verdict_in_other_words_updates_routable_without_a_second_warning():
    """The gateway changes its words but not its reason (a listener renamed, another hostname), or a quota's
    numbers change in a refusal: Routable says the words now, keeps the time it turned False, and no second
    Warning is posted; the same words again write nothing; another reason is news (a Warning)."""
    from analysis_operator.engine.converge import Outcome, _with_routable

    earlier = NOW - datetime.timedelta(minutes=5)
    told = {
        "type": "Routable",
        "status": "False",
        "reason": "NotAllowedByListeners",
        "message": "listener web: namespace team-a is not allowed",
        "observedGeneration": 1,
        "lastTransitionTime": earlier.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    status = {"phase": "Ready", "conditions": [told]}

    def routable(reason: str, message: str) -> Outcome:
        route = Route("https://analysis.example.org/lab", False, reason, message, retry=False)
        return _with_routable(Outcome(), LAB, status, NOW, route)

    same = routable("NotAllowedByListeners", told["message"])
    assert same.status is None and same.event is None
    reworded = routable("NotAllowedByListeners", "listener websecure: namespace team-a is not allowed")
    (condition,) = reworded.status["conditions"]
    assert condition["message"] == "listener websecure: namespace team-a is not allowed"
    assert condition["lastTransitionTime"] == told["lastTransitionTime"] and reworded.event is None
    other = routable("BackendNotFound", "service aenv-lab not found")
    assert other.event == ("Warning", "BackendNotFound", "service aenv-lab not found")


def test_a_refusal_retried_on_a_timer_is_not_rewritten_for_its_words_alone():
    """A namespace's quota refusing the route's Service is retried every 30 s, and the API server's words
    carry the quota's numbers, which may change between retries: only a change of reason is written."""
    from analysis_operator.engine.converge import Outcome, _with_routable

    told = {"type": "Routable", "status": "False", "reason": "RefusedByCluster", "message": "used: services=3"}
    status = {"phase": "Ready", "conditions": [told]}
    route = Route("https://analysis.example.org/lab", False, "RefusedByCluster", "used: services=4")
    assert _with_routable(Outcome(), LAB, status, NOW, route).status is None
