"""A Slurm job's server certificate (infra/server_tls.py, engine/server_certificates.py): what is built, and the
operator's own requests (viewers) against real local servers: the server holding the environment's key
gets them, with the token; a server with another certificate, or plain HTTP, on the same address is sent
nothing (it is what another user's process on a freed port would be)."""

from __future__ import annotations

import asyncio
import copy
import datetime
import json
import ssl
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from kubernetes.client.rest import ApiException

from analysis_operator.backends.base import BackendUnavailable, Observation, State, Upstream
from analysis_operator.backends.slurm import (
    TLS_CERT_ENV,
    TLS_KEY_ENV,
    build_observation,
    held_certificate,
    serves_tls,
    tls_environment,
)
from analysis_operator.backends.slurm_api import SlurmJob
from analysis_operator.engine import server_certificates, tokens
from analysis_operator.engine.converge import Context
from analysis_operator.engine.idle import GatewayActivity, IdleChecker, server_url
from analysis_operator.engine.routes import build_endpoint, kind_not_served
from analysis_operator.engine.status import backend_status
from analysis_operator.engine.viewers import Disconnector, Unanswered
from analysis_operator.engine.views import EnvironmentRecord
from analysis_operator.infra.server_tls import ServerCertificate, certificate_id, issue, server_name
from analysis_operator.model.domain import LABEL_ENVIRONMENT_UID, Environment
from analysis_operator.policy.access import StaticCatalogue
from analysis_operator.settings import Settings

TOKEN = "server-token-that-must-stay-secret"
LAB = Environment(namespace="team-a", name="lab", uid="u-tls", owner="alice", flavor="slurm-jl")
NOW = datetime.datetime.now(datetime.UTC)  # the local servers check the validity against the clock


def test_the_certificate_is_for_the_environment_s_name_and_the_key_never_in_its_repr():
    made = issue(LAB, NOW)
    certificate = x509.load_pem_x509_certificate(made.certificate.encode())
    assert made.server_name == server_name(LAB) == "aenv-lab.team-a.jupyter.invalid"
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["aenv-lab.team-a.jupyter.invalid"]
    usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    # valid for years: an approved extension moves the environment's end (and its job's time limit) later
    assert certificate.not_valid_before_utc < NOW and certificate.not_valid_after_utc > NOW + datetime.timedelta(
        days=3000
    )
    assert "PRIVATE KEY" in made.key and "PRIVATE KEY" not in repr(made)
    assert issue(LAB, NOW).key != made.key  # a new pair for every job


def test_a_job_with_a_certificate_is_told_so_by_its_nonce_and_gets_both_in_its_environment():
    made = issue(LAB, NOW)
    nonce = certificate_id(made.certificate) + "0a1b2c3d"  # the id, and 8 random digits
    assert serves_tls(nonce) and serves_tls("0" * 24)  # 24: the version before's
    assert not serves_tls("deadbeef") and not serves_tls("") and not serves_tls(certificate_id(made.certificate))
    # only the id says which certificate the job holds: the version before's random 24 digits say nothing
    assert held_certificate(nonce) == certificate_id(made.certificate)
    assert held_certificate("0" * 24) == held_certificate("deadbeef") == ""
    assert tls_environment(made) == {TLS_CERT_ENV: made.certificate, TLS_KEY_ENV: made.key}
    assert tls_environment(None) == {}


def test_a_certificate_s_id_is_its_own_and_fits_a_job_s_nonce():
    made, other = issue(LAB, NOW), issue(LAB, NOW)
    assert certificate_id(made.certificate) == certificate_id(made.certificate)  # the same for one certificate
    assert certificate_id(made.certificate) != certificate_id(other.certificate)  # same name, another key
    assert len(certificate_id(made.certificate)) == 32 and int(certificate_id(made.certificate), 16) >= 0


def test_a_server_holding_another_certificate_than_the_stored_one_is_told_unmatched():
    """The lost-submission race: the job holds the first certificate, the ConfigMap the second. A server
    whose certificate is not known by id (plain HTTP, the version before's) or none stored is not."""
    held, stored = issue(LAB, NOW), issue(LAB, NOW)
    server_certificates.forget([LAB.uid])
    server_certificates.remember(LAB.uid, stored.server_name, stored.certificate)

    def upstream(certificate: str, name: str = server_name(LAB)) -> Upstream:
        return Upstream(port=1, address="10.0.0.1", server_name=name, certificate_id=certificate)

    unmatched, kube = server_certificates.unmatched, _ConfigMap(stored)
    try:
        assert asyncio.run(unmatched(kube, LAB, upstream(certificate_id(held.certificate))))
        assert not asyncio.run(unmatched(kube, LAB, upstream(certificate_id(stored.certificate))))
        assert not asyncio.run(unmatched(kube, LAB, upstream("")))  # not known by id: not judged
        assert not asyncio.run(unmatched(kube, LAB, upstream(certificate_id(held.certificate), name="")))
    finally:
        server_certificates.forget([LAB.uid])
    # none stored (a ConfigMap someone deleted): not_stored says what to do; nothing is replaced for it
    assert not asyncio.run(unmatched(_ConfigMap(), LAB, upstream(certificate_id(held.certificate))))
    # what this process kept is stale (another replica replaced the job since): read again before judging
    server_certificates.remember(LAB.uid, stored.server_name, stored.certificate)
    try:
        assert not asyncio.run(unmatched(_ConfigMap(held), LAB, upstream(certificate_id(held.certificate))))
        assert server_certificates._KNOWN[LAB.uid][1] == held.certificate
    finally:
        server_certificates.forget([LAB.uid])


class _ConfigMap:
    """The API server's answer (the only call made here): LAB's ConfigMap holding this certificate, or
    none (someone deleted it)."""

    def __init__(self, certificate: ServerCertificate | None = None) -> None:
        self.certificate = certificate

    async def get_object(self, api_version: str, kind: str, namespace: str, name: str) -> dict | None:
        assert (api_version, kind, namespace, name) == ("v1", "ConfigMap", "team-a", "aenv-lab-tls")
        if self.certificate is None:
            return None
        labels = {LABEL_ENVIRONMENT_UID: LAB.uid}
        return {"metadata": {"labels": labels}, "data": {"ca.crt": self.certificate.certificate}}


def test_a_tls_upstream_is_routed_over_https_checked_by_its_backendtlspolicy():
    upstream = Upstream(port=23456, address="10.250.0.2", server_name=server_name(LAB))
    policy, service, endpoints = build_endpoint(LAB, upstream)
    assert service["spec"]["ports"][0] | {"port": 0, "targetPort": 0} == {
        "name": "https",
        "appProtocol": "https",
        "port": 0,
        "targetPort": 0,
        "protocol": "TCP",
    }
    assert endpoints["ports"][0]["name"] == "https" and endpoints["ports"][0]["appProtocol"] == "https"
    assert policy["kind"] == "BackendTLSPolicy" and policy["metadata"]["ownerReferences"] == LAB.owner_references
    assert policy["spec"] == {
        "targetRefs": [{"group": "", "kind": "Service", "name": "aenv-lab"}],
        "validation": {
            "caCertificateRefs": [{"group": "", "kind": "ConfigMap", "name": "aenv-lab-tls"}],
            "hostname": "aenv-lab.team-a.jupyter.invalid",
        },
    }
    plain = build_endpoint(LAB, Upstream(port=23456, address="10.250.0.2"))
    assert [each["kind"] for each in plain] == ["Service", "EndpointSlice"]
    assert "appProtocol" not in plain[0]["spec"]["ports"][0]


def test_the_certificate_s_config_map_is_the_environment_s_and_holds_no_key():
    made = issue(LAB, NOW)
    config_map = server_certificates.build_config_map(LAB, made)
    assert config_map["metadata"]["name"] == "aenv-lab-tls"  # never aenv-jupyter's (an environment "jupyter")
    assert config_map["metadata"]["ownerReferences"] == LAB.owner_references
    assert config_map["data"] == {"ca.crt": made.certificate}


def test_a_ready_job_with_a_certificate_reports_https_and_its_server_name():
    job = SlurmJob(job_id="7", state="RUNNING", nodes="n1", batch_host="n1", cpus=1)
    upstream = Upstream(address="10.250.0.2", port=4000, landing="lab", server_name=server_name(LAB))
    observation = build_observation(job, True, "n1:4000", upstream=upstream, path="/env/team-a/lab/")
    assert (observation.state, observation.url) == (State.READY, "https://n1:4000/env/team-a/lab/")
    status = backend_status("slurm", observation)
    assert status["serverName"] == "aenv-lab.team-a.jupyter.invalid" and status["endpoint"] == "10.250.0.2:4000"
    plain = build_observation(job, True, "n1:4000", upstream=Upstream(address="10.250.0.2", port=4000))
    assert plain.url.startswith("http://") and backend_status("slurm", plain)["serverName"] is None
    assert server_url(LAB, "10.250.0.2:4000", Settings(), tls=True) == "https://10.250.0.2:4000/env/team-a/lab/"
    pod = Observation(State.READY, upstream=Upstream(port=8888, service="aenv-lab"))
    assert "serverName" not in backend_status("kubernetes", pod)  # nothing more in a pod's one status write


# ---------------------------------------------------------------- against real local servers


@pytest.fixture(autouse=True)
def _known():
    tokens.remember(LAB.uid, TOKEN)
    yield
    tokens.forget([LAB.uid])
    server_certificates.forget([LAB.uid])


def _server_context(made: ServerCertificate, directory: Path) -> ssl.SSLContext:
    (directory / "server.crt").write_text(made.certificate)
    (directory / "server.key").write_text(made.key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(directory / "server.crt", directory / "server.key")
    return context


async def _serve(handler: Any, served_with: ServerCertificate | None) -> tuple[web.AppRunner, int]:
    """A local server answering every path with `handler`, with `served_with`'s key and certificate (None:
    plain HTTP): its runner and port."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    with tempfile.TemporaryDirectory() as directory:
        context = _server_context(served_with, Path(directory)) if served_with else None
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


async def _ask(served_with: ServerCertificate | None, stored: ServerCertificate | None) -> tuple[list[dict], str]:
    """A viewers check of LAB (status naming its server name), against a local server that answers with
    `served_with` (None: plain HTTP), the operator knowing `stored` as its certificate: what the server
    received, and what the check said."""
    received: list[dict] = []

    async def viewers(request: web.Request) -> web.Response:
        received.append(dict(request.headers))
        return web.json_response({"viewers": {"alice": 1}})

    runner, port = await _serve(viewers, served_with)
    if stored is not None:
        server_certificates.remember(LAB.uid, stored.server_name, stored.certificate)
    backend = {"kind": "slurm", "endpoint": f"127.0.0.1:{port}", "serverName": server_name(LAB)}
    environments = {("team-a", "lab"): [EnvironmentRecord(LAB, {"phase": "Ready", "backend": backend})]}
    kube = _ConfigMap()
    disconnector = Disconnector(kube, Settings(), environments, StaticCatalogue(), timeout=5, retry_seconds=())
    try:
        try:
            said = repr(await disconnector.recheck("team-a", "lab"))
        except Unanswered as error:
            said = str(error)
    finally:
        await disconnector.close()
        await runner.cleanup()
    return received, said


def test_the_server_holding_the_environment_s_key_is_asked_with_its_token():
    made = issue(LAB, NOW)
    received, said = asyncio.run(_ask(made, made))
    assert said == "{}" and len(received) == 1 and received[0]["Authorization"] == f"token {TOKEN}"


@pytest.mark.parametrize("impostor", ["another certificate for the same name", "plain HTTP"])
def test_a_server_without_the_environment_s_key_is_sent_nothing(impostor):
    made = issue(LAB, NOW)
    other = issue(LAB, NOW) if impostor != "plain HTTP" else None
    received, said = asyncio.run(_ask(other, made))
    assert received == [] and TOKEN not in said
    assert said.startswith("GET https://127.0.0.1:") and "aenv/viewers" in said


def test_without_its_stored_certificate_nothing_is_sent():
    made = issue(LAB, NOW)
    received, said = asyncio.run(_ask(made, None))
    assert received == [] and "ConfigMap aenv-lab-tls" in said and TOKEN not in said


async def _idle_read(served_with: ServerCertificate | None, stored: ServerCertificate) -> tuple[list[dict], Any]:
    """The idle check's read of LAB's server (its status naming its server name), served as in _ask."""
    received: list[dict] = []

    async def api(request: web.Request) -> web.Response:
        received.append(dict(request.headers))
        if request.path.endswith("api/kernels"):
            return web.json_response([])
        return web.json_response({"last_activity": "2026-12-06T07:00:00Z", "connections": 0, "kernels": 0})

    runner, port = await _serve(api, served_with)
    server_certificates.remember(LAB.uid, stored.server_name, stored.certificate)
    status = {"backend": {"kind": "slurm", "endpoint": f"127.0.0.1:{port}", "serverName": server_name(LAB)}}
    checker = IdleChecker(Context(kube=_ConfigMap(), backends={}), Settings(), {}, {}, GatewayActivity())
    try:
        return received, await checker._server(LAB, status, desktop=False)
    finally:
        if checker._session is not None:
            await checker._session.close()
        await runner.cleanup()


def test_the_idle_check_reads_the_server_holding_the_key_and_sends_an_impostor_nothing():
    made = issue(LAB, NOW)
    received, activity = asyncio.run(_idle_read(made, made))
    assert not activity.problem and activity.last == datetime.datetime(2026, 12, 6, 7, 0, tzinfo=datetime.UTC)
    assert len(received) == 2
    assert {each["Authorization"] for each in received} == {f"token {TOKEN}"}
    for impostor in (issue(LAB, NOW), None):  # another key for the same name; plain HTTP
        received, activity = asyncio.run(_idle_read(impostor, made))
        assert received == [] and activity.problem and TOKEN not in activity.problem
        # a failed check drops the certificate kept: a newer one (a resume by another replica) is read next
        assert server_certificates._KNOWN.get(LAB.uid) is None


def test_a_policy_type_the_cluster_does_not_serve_is_told_from_a_missing_namespace():
    missing_kind = ApiException(status=404)
    missing_kind.body = "404 page not found\n"  # what kube-apiserver answers for a path it does not serve
    missing_namespace = ApiException(status=404)
    missing_namespace.body = json.dumps({"reason": "NotFound", "details": {"name": "t", "kind": "namespaces"}})
    assert kind_not_served(missing_kind)
    assert not kind_not_served(missing_namespace) and not kind_not_served(ApiException(status=403))


def test_the_shipped_crd_records_the_server_name_and_an_older_one_is_told():
    crd = yaml.safe_load((Path(__file__).parents[2] / "crds" / "analysisenvironments.yaml").read_text())
    assert "serverName" in server_certificates.backend_fields(crd)
    backend = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    del backend["backend"]["properties"]["serverName"]
    assert "serverName" not in server_certificates.backend_fields(
        crd
    ) and "endpoint" in server_certificates.backend_fields(crd)


class _Crds:
    """The API server's answers to the operator's one CRD read (a list by name), counted."""

    def __init__(self, crd: dict | None) -> None:
        self.crd, self.reads = crd, 0

    async def get_cluster_path(self, path: str) -> dict:
        assert path == server_certificates.CRD_PATH
        self.reads += 1
        await asyncio.sleep(0.01)
        return {"items": [self.crd] if self.crd else []}


def test_no_certificate_is_issued_while_the_installed_crd_would_drop_its_server_name(monkeypatch):
    shipped = yaml.safe_load((Path(__file__).parents[2] / "crds" / "analysisenvironments.yaml").read_text())
    older = copy.deepcopy(shipped)
    del older["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["backend"][
        "properties"
    ]["serverName"]

    async def burst(crds: _Crds) -> list[str | None]:
        monkeypatch.setattr(server_certificates, "_schema", [])
        return list(await asyncio.gather(*(server_certificates.schema_problem(crds) for _ in range(20))))

    current, old, none = _Crds(shipped), _Crds(older), _Crds(None)
    assert asyncio.run(burst(current)) == [None] * 20 and current.reads == 1  # one read for a burst
    problems = asyncio.run(burst(old))
    assert old.reads == 1 and len(set(problems)) == 1 and "apply the CRDs of this version" in str(problems[0])
    assert asyncio.run(burst(none))[0] and none.reads == 1
    with pytest.raises(BackendUnavailable, match=r"slurm\.server_tls false"):
        monkeypatch.setattr(server_certificates, "_schema", [])
        asyncio.run(server_certificates.issue_certificate(old, LAB))  # type: ignore[arg-type]


@pytest.mark.parametrize("gateway", [True, False])
def test_a_server_gets_a_certificate_only_behind_the_gateway(gateway):
    """Without the gateway browsers reach the server itself: a certificate they cannot check would only
    stand in their way."""
    from analysis_operator.engine.converge import _Launcher
    from analysis_operator.engine.routes import NoRoutes
    from tests.unit.test_backend_interface import Cluster

    routes = NoRoutes()
    routes.enabled = gateway  # only whether it is on matters to the launch
    context = Context(kube=Cluster(), backends={}, routes=routes)
    launch = asyncio.run(_Launcher(context, LAB, None, (), None, NOW).launch())  # type: ignore[arg-type]
    assert launch.token and (launch.certificate is not None) is gateway
