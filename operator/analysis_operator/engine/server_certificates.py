"""Where a server's certificate is kept (infra/server_tls.py makes it): a ConfigMap `aenv-<name>-tls`
in the environment's namespace, `ca.crt` (the key Gateway API's BackendTLSPolicy reads), owned by the
environment. Written before the job that holds its key is submitted, so that whoever checks the server
(the gateway, the operator's idle and viewer checks) finds it; replaced by the next job's. A
certificate is public: only the key is secret, and that goes to the job alone."""

from __future__ import annotations

import asyncio
import collections
import datetime
import time
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from analysis_operator.backends.base import BackendUnavailable, Upstream
from analysis_operator.infra.kube import KubeClient
from analysis_operator.infra.server_tls import CA_KEY, ServerCertificate, certificate_id, client_context, issue
from analysis_operator.model.domain import GROUP, LABEL_ENVIRONMENT_UID, VERSION, Environment

KEPT = 10_000
# environment uid -> (server name, certificate) as this process wrote or read it
_KNOWN: collections.OrderedDict[str, tuple[str, str]] = collections.OrderedDict()


def config_map_name(environment: Environment) -> str:
    return f"{environment.child_name}-tls"


def build_config_map(environment: Environment, certificate: ServerCertificate) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": config_map_name(environment),
            "namespace": environment.namespace,
            "labels": environment.identity_labels,
            "ownerReferences": environment.owner_references,
        },
        "data": {CA_KEY: certificate.certificate},
    }


CRD_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions?fieldSelector=metadata.name%3D" + (
    f"analysisenvironments.{GROUP}"
)
SCHEMA_CHECK_SECONDS = 60.0
_schema: list[tuple[float, str | None]] = []  # when the CRD was last read, and what was found
_SCHEMA_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


def backend_fields(crd: Mapping[str, Any]) -> set[str]:
    """The fields of status.backend in the schema of the CRD's version this operator writes (pure)."""
    for version in crd.get("spec", {}).get("versions") or ():
        if version.get("name") == VERSION:
            schema = (version.get("schema") or {}).get("openAPIV3Schema") or {}
            status = (schema.get("properties") or {}).get("status") or {}
            backend = (status.get("properties") or {}).get("backend") or {}
            return set(backend.get("properties") or {})
    return set()


async def schema_problem(kube: KubeClient) -> str | None:
    """Why no server certificate may be issued with the CRD installed (read at most once a minute): one
    older than this operator (Helm does not upgrade CRDs) prunes status.backend.serverName."""
    lock = _SCHEMA_LOCKS.setdefault(asyncio.get_running_loop(), asyncio.Lock())
    async with lock:  # one read for the submissions of a burst
        if _schema and time.monotonic() - _schema[0][0] < SCHEMA_CHECK_SECONDS:
            return _schema[0][1]
        found = await kube.get_cluster_path(CRD_PATH) or {}
        crds = found.get("items") or []
        problem = None
        if not crds or "serverName" not in backend_fields(crds[0]):
            problem = (
                "the AnalysisEnvironment CRD installed is older than this operator (its status.backend has no "
                "serverName, which says the server speaks TLS): apply the CRDs of this version (kubectl apply "
                "--server-side -f crds/; Helm does not upgrade CRDs), or set slurm.server_tls false"
            )
        _schema[:] = [(time.monotonic(), problem)]
        return problem


def remember(uid: str, server_name: str, certificate: str) -> None:
    _KNOWN[uid] = (server_name, certificate)
    _KNOWN.move_to_end(uid)
    if len(_KNOWN) > KEPT:
        _KNOWN.popitem(last=False)


async def issue_certificate(kube: KubeClient, environment: Environment) -> ServerCertificate:
    """A new key and certificate for the environment's next server, the certificate stored first. Not
    while the installed CRD would drop status.backend.serverName (schema_problem): the operator's own
    checks would then take the server for a plain HTTP one and send its token to whatever listens there."""
    problem = await schema_problem(kube)
    if problem:
        raise BackendUnavailable(problem)
    certificate = issue(environment, datetime.datetime.now(datetime.UTC))
    await kube.apply(build_config_map(environment, certificate))
    remember(environment.uid, certificate.server_name, certificate.certificate)
    return certificate


async def read_certificate(kube: KubeClient, environment: Environment, server_name: str) -> str | None:
    """The certificate the environment's server must present for `server_name`, as stored (None: not
    stored, or another environment's of the same name)."""
    known = _KNOWN.get(environment.uid)
    if known is not None and known[0] == server_name:
        return known[1]
    found = await kube.get_object("v1", "ConfigMap", environment.namespace, config_map_name(environment))
    if not found or ((found.get("metadata") or {}).get("labels") or {}).get(LABEL_ENVIRONMENT_UID) != environment.uid:
        return None
    certificate = (found.get("data") or {}).get(CA_KEY)
    if not isinstance(certificate, str) or not certificate:
        return None
    remember(environment.uid, server_name, certificate)
    return certificate


async def tls_options(kube: KubeClient, environment: Environment, backend: Mapping[str, Any]) -> dict[str, Any] | None:
    """aiohttp's options for a request to the environment's own server, from its status.backend: {} for
    plain HTTP; with status.backend.serverName, TLS that accepts only its stored certificate, for that
    name; None when that certificate is not stored (then nothing is sent: not the token, not anything)."""
    name = str(backend.get("serverName") or "")
    if not name:
        return {}
    certificate = await read_certificate(kube, environment, name)
    if certificate is None:
        return None
    return {"ssl": client_context(certificate), "server_hostname": name}


async def unmatched(kube: KubeClient, environment: Environment, upstream: Upstream) -> bool:
    """Whether the server at `upstream` holds a certificate (by its id) other than the one stored for it."""
    if not upstream.server_name or not upstream.certificate_id:
        return False  # plain HTTP, or a server whose certificate is not known by id
    stored = await read_certificate(kube, environment, upstream.server_name)
    if stored is not None and certificate_id(stored) != upstream.certificate_id:
        forget([environment.uid])  # what this process kept: another replica may have replaced it since
        stored = await read_certificate(kube, environment, upstream.server_name)
    return stored is not None and certificate_id(stored) != upstream.certificate_id


def not_stored(environment: Environment) -> str:
    return (
        f"its server's certificate is not stored (ConfigMap {config_map_name(environment)} was deleted), so "
        "the operator does not reach it: suspend and resume it to start it with a new one"
    )


def forget(uids: Iterable[str]) -> None:
    """The certificates kept for these environments: read from their ConfigMaps again at the next use."""
    for uid in uids:
        _KNOWN.pop(uid, None)
