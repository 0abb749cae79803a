"""Async access to the Kubernetes API for what kopf does not write itself.

One aiohttp session per event loop, its connections kept alive: no thread hop per call and no
new TLS handshake per call (the blocking client in a thread pool before it leaked its pooled
connections under load: a handshake for most calls, in the operator and in kube-apiserver,
bench/RESULTS.md). Credentials come from the official client's loaders (in-cluster or
kubeconfig), so a ServiceAccount token that rotates is read again when it expires.
Answers are plain JSON; a refusal raises the official client's ApiException, as before.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import kubernetes
from kubernetes.client.rest import ApiException

from analysis_operator.model.domain import GROUP, VERSION

ENVIRONMENTS = "analysisenvironments"
FIELD_MANAGER = "analysis-operator"
USER_AGENT = "analysis-operator"
CUSTOM = f"/apis/{GROUP}/{VERSION}"
MERGE_PATCH = "application/merge-patch+json"
# apiVersion -> (path prefix, kind -> plural) for the objects applied by server-side apply.
_PATHS = {
    "v1": ("/api/v1", {"Service": "services", "ConfigMap": "configmaps"}),
    "discovery.k8s.io/v1": ("/apis/discovery.k8s.io/v1", {"EndpointSlice": "endpointslices"}),
    "gateway.networking.k8s.io/v1": (
        "/apis/gateway.networking.k8s.io/v1",
        {"HTTPRoute": "httproutes", "Gateway": "gateways", "BackendTLSPolicy": "backendtlspolicies"},
    ),
    "traefik.io/v1alpha1": ("/apis/traefik.io/v1alpha1", {"Middleware": "middlewares"}),
}
_CORE_PLURALS = {
    "Pod": "pods",
    "Service": "services",
    "Secret": "secrets",
    "PersistentVolumeClaim": "persistentvolumeclaims",
}
# Lists of many objects read for their metadata only (the API server leaves out spec and status), in
# pages: kubectl's and client-go's metadata-only lists, with JSON when a server cannot do it.
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1, application/json"
URGENT_CONNECTIONS = 2  # kept for calls an admission webhook's answer waits for (KubeClient._session_here)
LIST_PAGE = 500  # objects per page, of these lists and of kopf's (client-go's informers use the same)
ATTEMPTS = 3  # a connection refused or dropped before an answer is tried again at once, as urllib3 did
# Seconds for one call once it has a connection, as kopf's own (settings.networking.request_timeout).
# The wait for one of the kept connections is not part of it: under a burst (1,000 creates queued on 16
# connections) the queue is long and every call in it still gets its answer; only a server that does
# not answer a call it was sent within this time fails it.
TIMEOUT = 60.0
# How long a namespace counts as being deleted after the API server refused a create in it for that reason
# (KubeClient.terminating). Bounded: a namespace of the same name may be made again once the old one is gone.
TERMINATING_SECONDS = 30.0
NOT_TERMINATING_SECONDS = 1.0  # how long "not being deleted" is taken as the answer (KubeClient.namespace_going)
_NAMESPACE_IN_PATH = re.compile(r"/namespaces/([^/]+)/")
REFUSAL_CHARACTERS = 800  # of the API server's message quoted in status (cluster_refusal)
# A watch is ended by the server after this long (the client then watches again from where it was); a
# connection silent for longer than that plus a margin is taken for dead.
WATCH_SECONDS = 600


class Expired(Exception):
    """The resource version a list or watch started from is no longer served (410 Gone): list again."""


def _bytes(body: Any) -> bytes:
    return body if isinstance(body, bytes) else str(body or "").encode()


# The API server's words for an RBAC refusal: who may not do what where. Names only, never an object's values.
_RBAC_DENIAL = re.compile(
    r'is forbidden: (User "[^"]*" cannot [a-z]+ resource "[^"]*"'
    r'(?: in API group "[^"]*")?(?: in the namespace "[^"]*"| at the cluster scope)?)'
)


class KubeError(ApiException):
    """A refusal, as the official client raises it, whose repr (what the log shows) says which call was
    refused and how: never the answer's message, which may quote an object's values; only, for an RBAC
    refusal, which rule is missing (the user, verb, resource and namespace the API server names)."""

    def __init__(self, method: str, path: str, status: int, reason: str, body: str) -> None:
        super().__init__(status=status, reason=reason, body=body)
        self.call = f"{method} {path}"
        self.denial = rbac_denial(body) if status == 403 else ""

    def __repr__(self) -> str:
        return f"KubeError({self.status} {self.reason}: {self.call}{': ' + self.denial if self.denial else ''})"

    __str__ = __repr__  # what kopf's log line and a traceback's last line show: never the answer's message


def rbac_denial(body: str | bytes | None) -> str:
    """'User "x" cannot patch resource "y" in API group "g" in the namespace "n"' from a 403's Status (pure)."""
    try:
        message = str((json.loads(body or b"{}") or {}).get("message") or "")
    except (ValueError, AttributeError):
        return ""
    found = _RBAC_DENIAL.search(message)
    return found.group(1) if found else ""


def cluster_refusal(error: BaseException) -> str:
    """The API server's own words for a call a rule of the cluster refused, one that the same call made
    again does not get past by itself (Pod Security, a ResourceQuota or LimitRange, an admission policy
    or webhook of the facility's, the operator's RBAC, validation): for the environment's status, which
    its owner reads (pure). "" for anything else (not found, a conflict, a namespace being deleted, the
    server away or overloaded), which callers retry as they did."""
    if not isinstance(error, ApiException) or error.status not in (403, 422) or namespace_terminating(error):
        return ""
    try:
        message = str((json.loads(error.body or b"{}") or {}).get("message") or "")
    except (ValueError, AttributeError):
        message = ""
    return (message or f"{error.status} {error.reason}")[:REFUSAL_CHARACTERS]


def namespace_terminating(error: BaseException) -> bool:
    """The API server's refusal of new objects in a namespace being deleted: nothing is to be made there
    any more (its environments go with it), and nothing is wrong with the operator's rights."""
    return isinstance(error, ApiException) and error.status == 403 and b"being terminated" in _bytes(error.body)


def event_body(involved: dict[str, Any], type_: str, reason: str, message: str) -> dict[str, Any]:
    """A core/v1 Event on an object (pure but for the clock and the host name)."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    metadata = involved["metadata"]
    return {
        "metadata": {"generateName": f"{metadata['name']}.", "namespace": metadata["namespace"]},
        "involvedObject": {"apiVersion": involved["apiVersion"], "kind": involved["kind"], **metadata},
        "type": type_,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": "analysis-operator"},
        "reportingComponent": "analysis-operator",
        "reportingInstance": socket.gethostname(),
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


def watch_event(path: str, event: dict[str, Any]) -> dict[str, Any]:
    """One event of a watch; an ERROR the server sends in the stream raised as its status says."""
    if event.get("type") != "ERROR":
        return event
    status = event.get("object") or {}
    if status.get("code") == 410:  # "too old resource version"
        raise Expired(path)
    raise KubeError("WATCH", path, int(status.get("code") or 500), str(status.get("reason") or ""), "")


def object_path(api_version: str, kind: str, namespace: str, name: str) -> str:
    prefix, plurals = _PATHS[api_version]
    return f"{prefix}/namespaces/{namespace}/{plurals[kind]}/{name}"


def core_path(kind: str, namespace: str, name: str = "") -> str:
    path = f"/api/v1/namespaces/{namespace}/{_CORE_PLURALS[kind]}"
    return f"{path}/{name}" if name else path


def custom_path(plural: str, name: str, namespace: str = "", group: str = GROUP, version: str = VERSION) -> str:
    where = f"/namespaces/{namespace}" if namespace else ""
    return f"/apis/{group}/{version}{where}/{plural}/{name}"


def _json_default(value: Any) -> str:
    if isinstance(value, datetime.datetime | datetime.date):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _load_configuration() -> kubernetes.client.Configuration:
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=configuration)
    return configuration


def auth_headers(configuration: kubernetes.client.Configuration) -> dict[str, str]:
    """The credentials headers, as the official client sends them: a bearer token (ServiceAccount,
    kubeconfig token or exec plugin) read again through the loaders' refresh hook when it expires.
    Client certificates are in the TLS context instead."""
    settings: dict[str, Any] = dict(configuration.auth_settings())
    return {
        str(setting["key"]): str(setting["value"])
        for setting in settings.values()
        if setting.get("in") == "header" and setting.get("value")
    }


def ssl_context(configuration: kubernetes.client.Configuration) -> ssl.SSLContext | bool:
    if not configuration.host.startswith("https"):
        return False
    context = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
    if not configuration.verify_ssl:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if configuration.cert_file:
        context.load_cert_chain(configuration.cert_file, configuration.key_file)
    return context


class KubeClient:
    def __init__(self, connections: int = 16, namespace: str = "", timeout: float = TIMEOUT) -> None:
        self.namespace = namespace  # the one namespace this operator serves; "" = all
        self._configuration = _load_configuration()
        self._base = self._configuration.host.rstrip("/")
        self._ssl = ssl_context(self._configuration)
        self._connections = connections
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._sessions: dict[
            asyncio.AbstractEventLoop, tuple[aiohttp.ClientSession, asyncio.Semaphore, asyncio.Semaphore]
        ] = {}
        self._terminating: dict[str, float] = {}  # namespace -> when a create in it was refused: being deleted
        self._staying: dict[str, float] = {}  # namespace -> when a dry-run create in it was accepted
        self._asking: dict[str, asyncio.Future[bool]] = {}  # namespace -> the question under way

    async def namespace_going(self, involved: dict[str, Any]) -> bool:
        """Is the namespace of this object being deleted? Asked by a dry run of the Event that would tell of
        it (the API server refuses new content in a namespace being deleted; no right to read namespaces is
        needed): one question per namespace at a time, shared by everyone asking meanwhile; a yes kept for
        TERMINATING_SECONDS, a no for NOT_TERMINATING_SECONDS."""
        namespace = involved["metadata"]["namespace"]
        if self.terminating(namespace):
            return True
        if time.monotonic() - self._staying.get(namespace, -NOT_TERMINATING_SECONDS) < NOT_TERMINATING_SECONDS:
            return False
        asking = self._asking.get(namespace)
        if asking is None:
            asking = self._asking[namespace] = asyncio.ensure_future(self._ask_going(involved))
            asking.add_done_callback(lambda _: self._asking.pop(namespace, None))
        return await asyncio.shield(asking)

    async def _ask_going(self, involved: dict[str, Any]) -> bool:
        namespace = involved["metadata"]["namespace"]
        body = event_body(involved, "Normal", "NamespaceCheck", "dry run: is the namespace being deleted?")
        try:
            await self._request("POST", f"/api/v1/namespaces/{namespace}/events", body, parsed=False, dryRun="All")
        except ApiException as error:
            if namespace_terminating(error):
                return True  # and remembered by _request
            raise
        if len(self._staying) >= 1024:
            self._staying.clear()
        self._staying[namespace] = time.monotonic()
        return False

    def terminating(self, namespace: str) -> bool:
        """Did the API server refuse a create in this namespace because it is being deleted, within the
        last TERMINATING_SECONDS? Learnt from its answers (no right to read namespaces is needed)."""
        at = self._terminating.get(namespace)
        return at is not None and time.monotonic() - at < TERMINATING_SECONDS

    def _session_here(self, urgent: bool = False) -> tuple[aiohttp.ClientSession, asyncio.Semaphore]:
        """The session of the running loop and its free connections: one client may serve two loops (the
        forward-auth's thread has one of its own), and a session belongs to the loop it was made in.
        A call takes a connection (queueing without a time limit) before its own time starts. Urgent
        calls (an admission webhook waits for them) have URGENT_CONNECTIONS of their own, so they do
        not queue behind a burst of reconciles."""
        loop = asyncio.get_running_loop()
        found = self._sessions.get(loop)
        if found is None or found[0].closed:
            for gone in [other for other in self._sessions if other.is_closed()]:
                del self._sessions[gone]
            connector = aiohttp.TCPConnector(limit=self._connections + URGENT_CONNECTIONS, ssl=self._ssl)
            session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
            found = self._sessions[loop] = (
                session,
                asyncio.Semaphore(self._connections),
                asyncio.Semaphore(URGENT_CONNECTIONS),
            )
        session, common, kept = found
        return session, kept if urgent else common

    def _headers(self, content_type: str, accept: str = "application/json") -> dict[str, str]:
        headers = {"Accept": accept, "User-Agent": USER_AGENT}  # the user agent is also the default field manager
        if content_type:
            headers["Content-Type"] = content_type
        return {**headers, **auth_headers(self._configuration)}

    def _options(
        self, query: dict[str, str], headers: dict[str, str], timeout: aiohttp.ClientTimeout | None
    ) -> dict[str, Any]:
        options: dict[str, Any] = {"params": query or None, "headers": headers}
        if timeout is not None:
            options["timeout"] = timeout
        if self._configuration.tls_server_name:
            options["server_hostname"] = self._configuration.tls_server_name
        return options

    async def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "",
        accept: str = "application/json",
        allow: tuple[int, ...] = (),
        timeout: float | None = None,
        parsed: bool = True,
        urgent: bool = False,
        **query: str,
    ) -> tuple[int, dict[str, Any]]:
        """One call: (status, JSON answer). A refusal raises ApiException unless its status is allowed
        (404 and 409 are often answers: not there, there already, changed meanwhile). parsed=False: the
        answer is not parsed ({}), for calls that need only its status (a create's answer is the whole
        object, parsed for nothing: about 1 % of the operator's CPU in a burst, per kind of call)."""
        data = None if body is None else json.dumps(body, default=_json_default).encode()
        headers = self._headers(content_type or ("application/json" if data is not None else ""), accept)
        options = self._options(query, headers, None if timeout is None else aiohttp.ClientTimeout(total=timeout))
        options["data"] = data
        session, free = self._session_here(urgent)
        async with free:
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    async with session.request(method, self._base + path, **options) as response:
                        status, reason, answer = response.status, response.reason or "", await response.read()
                    break
                except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                    if attempt == ATTEMPTS:
                        raise
        if status >= 400 and status not in allow:
            error = KubeError(method, path, status, reason, answer.decode(errors="replace"))
            if namespace_terminating(error) and (found := _NAMESPACE_IN_PATH.search(path)):
                if len(self._terminating) >= 1024:
                    self._terminating.clear()
                self._terminating[found.group(1)] = time.monotonic()
            raise error
        return status, (json.loads(answer) if answer and parsed else {})

    async def _get(self, path: str, urgent: bool = False) -> dict[str, Any] | None:
        """An object, None when it is not there."""
        status, answer = await self._request("GET", path, allow=(404,), urgent=urgent)
        return None if status == 404 else answer

    async def create(self, kind: str, namespace: str, body: dict[str, Any]) -> bool:
        """Create; False if it already exists (deterministic names make that success)."""
        status, _ = await self._request("POST", core_path(kind, namespace), body, allow=(409,), parsed=False)
        return status != 409

    async def read_metadata(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """An object's metadata, or None if it does not exist."""
        body = await self._get(core_path(kind, namespace, name))
        return None if body is None else dict(body.get("metadata") or {})

    async def delete_owned(self, kind: str, namespace: str, name: str, label: str, value: str) -> bool:
        """Delete the object only if it carries label=value (a child of exactly one environment uid,
        never a namesake's), and only that very object (uid precondition); False if there was none."""
        metadata = await self.read_metadata(kind, namespace, name)
        if metadata is None or (metadata.get("labels") or {}).get(label) != value:
            return False
        return await self.delete(kind, namespace, name, uid=str(metadata.get("uid", "")))

    def _kind_path(self, kind: str) -> str:
        """Where the objects of a kind (core, or one of _PATHS) in the namespaces this operator serves are listed."""
        if kind in _CORE_PLURALS:
            return core_path(kind, self.namespace) if self.namespace else f"/api/v1/{_CORE_PLURALS[kind]}"
        prefix, plural = next((prefix, plurals[kind]) for prefix, plurals in _PATHS.values() if kind in plurals)
        return f"{prefix}/namespaces/{self.namespace}/{plural}" if self.namespace else f"{prefix}/{plural}"

    async def _pages(
        self, path: str, selector: str, accept: str, fields: str = "", urgent: bool = False
    ) -> AsyncIterator[dict[str, Any]]:
        """A list in pages of LIST_PAGE objects (one consistent snapshot: the pages continue the first)."""
        page: dict[str, Any] = {"labelSelector": selector, "limit": str(LIST_PAGE)}  # "continue" is a keyword
        if fields:
            page["fieldSelector"] = fields
        while True:
            status, listing = await self._request("GET", path, accept=accept, allow=(410,), urgent=urgent, **page)
            if status == 410:  # the snapshot the pages continue was compacted away
                raise Expired(path)
            yield listing
            page["continue"] = str((listing.get("metadata") or {}).get("continue") or "")
            if not page["continue"]:
                return

    async def labelled_metadata(self, kind: str, selector: str) -> list[dict[str, Any]]:
        """The metadata (without managedFields) of every object of a kind carrying these labels, in the
        namespaces this operator serves (orphan sweeps). Read in pages of metadata only: the whole list
        of an operator's 10,000 Services in one answer timed out after 60 s (bench/RESULTS.md)."""
        found: list[dict[str, Any]] = []
        async for listing in self._pages(self._kind_path(kind), selector, METADATA_LIST):
            for item in listing.get("items") or ():
                metadata = item.get("metadata") or {}
                found.append({key: value for key, value in metadata.items() if key != "managedFields"})
        return found

    async def labelled(self, kind: str, selector: str) -> AsyncIterator[tuple[list[dict[str, Any]], str]]:
        """Every object of a kind carrying these labels, in the namespaces served, page by page: each
        page's objects and the resource version of the snapshot (where a watch of them starts). A page
        is read when the one before has been taken: the whole list of 10,000 pods parsed at once was
        a restart's peak (bench/RESULTS.md, stop 34)."""
        async for listing in self._pages(self._kind_path(kind), selector, "application/json"):
            yield listing.get("items") or [], str((listing.get("metadata") or {}).get("resourceVersion") or "")

    async def watch(self, kind: str, selector: str, resource_version: str) -> AsyncIterator[dict[str, Any]]:
        """The changes to the objects of a kind carrying these labels after resource_version, as the
        server sends them (ADDED, MODIFIED, DELETED, BOOKMARK), until it ends the watch (WATCH_SECONDS).
        Raises Expired when that version is no longer served. Holds one of the client's connections
        for as long as it runs: give a watch a client of its own."""
        query = {
            "labelSelector": selector,
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_SECONDS),
        }
        silent = aiohttp.ClientTimeout(total=None, sock_connect=TIMEOUT, sock_read=WATCH_SECONDS + TIMEOUT)
        session, free = self._session_here()
        path = self._kind_path(kind)
        async with free, session.get(self._base + path, **self._options(query, self._headers(""), silent)) as response:
            if response.status == 410:
                raise Expired(path)
            if response.status >= 400:
                raise KubeError("GET", path, response.status, response.reason or "", await response.text())
            pending = bytearray()
            async for chunk in response.content.iter_any():  # not by line: aiohttp limits a line's length
                pending += chunk
                *lines, rest = pending.split(b"\n")
                pending = bytearray(rest)
                for line in lines:
                    if line.strip():
                        yield watch_event(path, json.loads(line))

    async def delete(self, kind: str, namespace: str, name: str, uid: str = "") -> bool:
        """Delete (only the object with this uid, when given); False if it was already gone
        (or, with a uid, another object by that name is there now: 409)."""
        return await self._delete(core_path(kind, namespace, name), uid)

    async def _delete(self, path: str, uid: str) -> bool:
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        status, _ = await self._request("DELETE", path, body, allow=(404, 409) if uid else (404,), parsed=False)
        return status < 400

    async def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._get(core_path("Secret", namespace, name))

    async def replace_secret(self, namespace: str, name: str, body: dict[str, Any]) -> bool:
        """Replace, guarded by body's resourceVersion; False when someone changed it first (409)."""
        status, _ = await self._request("PUT", core_path("Secret", namespace, name), body, allow=(409,), parsed=False)
        return status != 409

    async def get_cluster_path(self, path: str) -> dict[str, Any] | None:
        """GET any object by its API path; None when it is not there."""
        return await self._get(path)

    async def json_patch(self, path: str, operations: list[dict[str, Any]]) -> None:
        """A JSON patch (RFC 6902) of the object at path; a failed `test` operation raises."""
        await self._request("PATCH", path, operations, content_type="application/json-patch+json", parsed=False)

    async def read_secret_value(self, namespace: str, name: str, key: str) -> str | None:
        secret = await self.read_secret(namespace, name)
        encoded = ((secret or {}).get("data") or {}).get(key)
        return base64.b64decode(encoded).decode() if encoded else None

    async def patch_environment_status(self, namespace: str, name: str, status: dict[str, Any]) -> bool:
        """Merge-patch an environment's status; False if the environment is gone."""
        return await self.patch_namespaced_status(ENVIRONMENTS, namespace, name, status)

    async def patch_environment_spec(self, namespace: str, name: str, spec: dict[str, Any]) -> bool:
        """Merge-patch an environment's spec (idle culling sets suspend); False if it is gone."""
        path = custom_path(ENVIRONMENTS, name, namespace)
        status, _ = await self._request(
            "PATCH", path, {"spec": spec}, content_type=MERGE_PATCH, allow=(404,), parsed=False
        )
        return status != 404

    async def get_environment(self, namespace: str, name: str, urgent: bool = False) -> dict[str, Any] | None:
        return await self._get(custom_path(ENVIRONMENTS, name, namespace), urgent)

    async def environments_of(self, namespace: str, owner: str, urgent: bool = False) -> list[dict[str, Any]]:
        """Every environment of one owner in a namespace, read from the API server (a consistent read,
        as a GET is): spec.owner is a selectable field of the CRD, so this is one call, not one each."""
        path = custom_path(ENVIRONMENTS, "", namespace).rstrip("/")
        items: list[dict[str, Any]] = []
        async for listing in self._pages(path, "", "application/json", f"spec.owner={owner}", urgent):
            items.extend(listing.get("items") or ())
        return items

    async def environment_exists(self, namespace: str, name: str, uid: str) -> bool:
        body = await self.get_environment(namespace, name)
        metadata = (body or {}).get("metadata", {})
        return body is not None and metadata.get("uid") == uid and not metadata.get("deletionTimestamp")

    async def list_cluster_objects(self, plural: str) -> list[dict[str, Any]]:
        """Every object of one of our cluster-scoped kinds, straight from the API server
        (to confirm what an index says before acting on it)."""
        _, listing = await self._request("GET", f"{CUSTOM}/{plural}")
        return list(listing.get("items") or ())

    async def post_event(self, involved: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on an object (kopf can post only from inside its own handlers)."""
        metadata = involved["metadata"]
        body = event_body(involved, type_, reason, message)
        try:
            await self._request("POST", f"/api/v1/namespaces/{metadata['namespace']}/events", body, parsed=False)
        except ApiException as error:
            if namespace_terminating(error):
                return  # the namespace is going, and every Event in it with it: nothing to tell anyone
            raise

    async def get_cluster_object(self, plural: str, name: str) -> dict[str, Any] | None:
        """A cluster-scoped custom object of this API group, or None if it does not exist."""
        return await self._get(custom_path(plural, name))

    async def peers(self, peering: str, namespace: str = "") -> dict[str, Any]:
        """kopf's peering record (identity -> priority, lifetime, lastseen), empty if absent."""
        plural = "kopfpeerings" if namespace else "clusterkopfpeerings"
        body = await self._get(custom_path(plural, peering, namespace, group="kopf.dev", version="v1"))
        return dict((body or {}).get("status") or {})

    async def label_pod(self, namespace: str, name: str, labels: dict[str, str]) -> bool:
        """Merge these labels into a pod's; False if there is no such pod."""
        path = core_path("Pod", namespace, name)
        body = {"metadata": {"labels": labels}}
        status, _ = await self._request("PATCH", path, body, content_type=MERGE_PATCH, allow=(404,), parsed=False)
        return status != 404

    async def replace_cluster_status(self, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        """PUT the status of a cluster-scoped object; raises ApiException 409 when body's
        resourceVersion is no longer current (optimistic concurrency: re-read and decide again)."""
        _, answer = await self._request("PUT", custom_path(plural, body["metadata"]["name"]) + "/status", body)
        return answer

    async def patch_namespaced_status(self, plural: str, namespace: str, name: str, status: dict[str, Any]) -> bool:
        """Merge-patch the status of a namespaced custom object; False if it is gone."""
        path = custom_path(plural, name, namespace) + "/status"
        code, _ = await self._request(
            "PATCH", path, {"status": status}, content_type=MERGE_PATCH, allow=(404,), parsed=False
        )
        return code != 404

    async def apply(self, body: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply: create or bring to exactly these fields (owned by this operator)."""
        metadata = body["metadata"]
        path = object_path(body["apiVersion"], body["kind"], metadata["namespace"], metadata["name"])
        _, answer = await self._request(
            "PATCH", path, body, content_type="application/apply-patch+yaml", fieldManager=FIELD_MANAGER, force="true"
        )
        return answer

    async def present(self, api_version: str, kind: str, selector: str, fields: str = "") -> set[tuple[str, str]]:
        """(namespace, name) of every object of a kind (one of those applied) carrying these labels, in
        the namespaces served: a list of metadata only, in pages."""
        prefix, plurals = _PATHS[api_version]
        path = f"{prefix}{f'/namespaces/{self.namespace}' if self.namespace else ''}/{plurals[kind]}"
        found = set()
        async for listing in self._pages(path, selector, METADATA_LIST, fields):
            for item in listing.get("items") or ():
                metadata = item.get("metadata") or {}
                found.add((str(metadata.get("namespace") or ""), str(metadata.get("name") or "")))
        return found

    async def get_object(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._get(object_path(api_version, kind, namespace, name))

    async def delete_object(self, api_version: str, kind: str, namespace: str, name: str, uid: str = "") -> bool:
        """Delete (only the object with this uid, when given); False if it was not there."""
        return await self._delete(object_path(api_version, kind, namespace, name), uid)

    async def review_token(self, token: str, timeout: float = 5.0) -> dict[str, Any]:
        """Who a bearer token belongs to (TokenReview status: authenticated, user)."""
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}}
        _, answer = await self._request("POST", "/apis/authentication.k8s.io/v1/tokenreviews", body, timeout=timeout)
        return dict(answer.get("status") or {})

    async def close(self) -> None:
        """Close this loop's connections (each loop closes its own)."""
        found = self._sessions.pop(asyncio.get_running_loop(), None)
        if found is not None:
            await found[0].close()
