"""Async access to the Kubernetes API for what kopf does not write itself.

The official client is blocking; its calls run in a bounded thread pool of
their own (never kopf's), and responses are parsed as plain JSON instead of
the client's slow model classes.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import datetime
import functools
import json
import socket
from collections.abc import Callable
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException

from analysis_operator.model.domain import GROUP, VERSION

ENVIRONMENTS = "analysisenvironments"
FIELD_MANAGER = "analysis-operator"
# apiVersion -> (path prefix, kind -> plural) for the objects applied by server-side apply.
_PATHS = {
    "v1": ("/api/v1", {"Service": "services", "ConfigMap": "configmaps"}),
    "discovery.k8s.io/v1": ("/apis/discovery.k8s.io/v1", {"EndpointSlice": "endpointslices"}),
    "gateway.networking.k8s.io/v1": (
        "/apis/gateway.networking.k8s.io/v1",
        {"HTTPRoute": "httproutes", "Gateway": "gateways"},
    ),
    "traefik.io/v1alpha1": ("/apis/traefik.io/v1alpha1", {"Middleware": "middlewares"}),
}


def _bytes(body: Any) -> bytes:
    return body if isinstance(body, bytes) else str(body or "").encode()


def object_path(api_version: str, kind: str, namespace: str, name: str) -> str:
    prefix, plurals = _PATHS[api_version]
    return f"{prefix}/namespaces/{namespace}/{plurals[kind]}/{name}"


def _load_configuration(workers: int) -> kubernetes.client.Configuration:
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=configuration)
    configuration.connection_pool_maxsize = workers
    return configuration


class KubeClient:
    def __init__(self, workers: int = 16, namespace: str = "") -> None:
        self.namespace = namespace  # the one namespace this operator serves; "" = all
        api_client = kubernetes.client.ApiClient(_load_configuration(workers))
        self.core: Any = kubernetes.client.CoreV1Api(api_client)
        self.custom: Any = kubernetes.client.CustomObjectsApi(api_client)
        self._executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="kube")

    async def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        call = functools.partial(method, *args, _preload_content=False, **kwargs)
        response = await asyncio.get_running_loop().run_in_executor(self._executor, call)
        return json.loads(response.data or b"{}")

    async def create(self, kind: str, namespace: str, body: dict[str, Any]) -> bool:
        """Create; False if it already exists (deterministic names make that success)."""
        method: Callable[..., Any] = {
            "Pod": self.core.create_namespaced_pod,
            "Service": self.core.create_namespaced_service,
            "Secret": self.core.create_namespaced_secret,
            "PersistentVolumeClaim": self.core.create_namespaced_persistent_volume_claim,
        }[kind]
        try:
            await self._call(method, namespace, body)
        except ApiException as error:
            if error.status == 409:
                return False
            raise
        return True

    async def read_metadata(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """An object's metadata, or None if it does not exist."""
        method = {
            "Pod": self.core.read_namespaced_pod,
            "Service": self.core.read_namespaced_service,
            "Secret": self.core.read_namespaced_secret,
        }[kind]
        try:
            body = await self._call(method, name, namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        metadata: dict[str, Any] = body.get("metadata") or {}
        return metadata

    async def delete_owned(self, kind: str, namespace: str, name: str, label: str, value: str) -> bool:
        """Delete the object only if it carries label=value (a child of exactly one environment uid,
        never a namesake's), and only that very object (uid precondition); False if there was none."""
        metadata = await self.read_metadata(kind, namespace, name)
        if metadata is None or (metadata.get("labels") or {}).get(label) != value:
            return False
        return await self.delete(kind, namespace, name, uid=str(metadata.get("uid", "")))

    async def list_labelled(self, kind: str, selector: str) -> list[dict[str, Any]]:
        """Every object of a kind carrying these labels, in the namespaces this operator serves (orphan sweeps)."""
        if self.namespace:
            namespaced = {
                "Pod": self.core.list_namespaced_pod,
                "Service": self.core.list_namespaced_service,
                "Secret": self.core.list_namespaced_secret,
            }[kind]
            listing = await self._call(namespaced, self.namespace, label_selector=selector)
            return list(listing.get("items") or ())
        method = {
            "Pod": self.core.list_pod_for_all_namespaces,
            "Service": self.core.list_service_for_all_namespaces,
            "Secret": self.core.list_secret_for_all_namespaces,
        }[kind]
        listing = await self._call(method, label_selector=selector)
        return list(listing.get("items") or ())

    async def delete(self, kind: str, namespace: str, name: str, uid: str = "") -> bool:
        """Delete (only the object with this uid, when given); False if it was already gone."""
        method: Callable[..., Any] = {
            "Pod": self.core.delete_namespaced_pod,
            "Service": self.core.delete_namespaced_service,
            "Secret": self.core.delete_namespaced_secret,
        }[kind]
        try:
            body: dict[str, Any] = {"propagationPolicy": "Background"}
            if uid:
                body["preconditions"] = {"uid": uid}
            await self._call(method, name, namespace, body=body)
        except ApiException as error:
            if error.status == 404 or (uid and error.status == 409):  # 409: another object by that name now
                return False
            raise
        return True

    async def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self._call(self.core.read_namespaced_secret, name, namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    async def replace_secret(self, namespace: str, name: str, body: dict[str, Any]) -> bool:
        """Replace, guarded by body's resourceVersion; False when someone changed it first (409)."""
        try:
            await self._call(self.core.replace_namespaced_secret, name, namespace, body)
        except ApiException as error:
            if error.status == 409:
                return False
            raise
        return True

    async def get_cluster_path(self, path: str) -> dict[str, Any] | None:
        """GET any object by its API path; None when it is not there."""
        status, answer = await self._request("GET", path)
        return None if status == 404 else answer

    async def json_patch(self, path: str, operations: list[dict[str, Any]]) -> None:
        """A JSON patch (RFC 6902) of the object at path; a failed `test` operation raises."""
        status, answer = await self._request("PATCH", path, operations, content_type="application/json-patch+json")
        if status >= 400:
            raise ApiException(status=status, reason=str(answer.get("message", "")))

    async def read_secret_value(self, namespace: str, name: str, key: str) -> str | None:

        try:
            secret = await self._call(self.core.read_namespaced_secret, name, namespace)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        encoded = (secret.get("data") or {}).get(key)
        return base64.b64decode(encoded).decode() if encoded else None

    async def patch_environment_status(self, namespace: str, name: str, status: dict[str, Any]) -> bool:
        """Merge-patch an environment's status; False if the environment is gone."""
        return await self.patch_namespaced_status(ENVIRONMENTS, namespace, name, status)

    async def patch_environment_spec(self, namespace: str, name: str, spec: dict[str, Any]) -> bool:
        """Merge-patch an environment's spec (idle culling sets suspend); False if it is gone."""
        try:
            await self._call(
                self.custom.patch_namespaced_custom_object,
                GROUP,
                VERSION,
                namespace,
                ENVIRONMENTS,
                name,
                {"spec": spec},
            )
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        return True

    async def get_environment(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self._call(
                self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, ENVIRONMENTS, name
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    async def environment_exists(self, namespace: str, name: str, uid: str) -> bool:
        try:
            body = await self._call(
                self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, ENVIRONMENTS, name
            )
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        metadata = body.get("metadata", {})
        return metadata.get("uid") == uid and not metadata.get("deletionTimestamp")

    async def list_cluster_objects(self, plural: str) -> list[dict[str, Any]]:
        """Every object of one of our cluster-scoped kinds, straight from the API server
        (to confirm what an index says before acting on it)."""
        listing = await self._call(self.custom.list_cluster_custom_object, GROUP, VERSION, plural)
        return list(listing.get("items") or ())

    async def post_event(self, involved: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on an object (kopf can post only from inside its own handlers)."""
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        metadata = involved["metadata"]
        body = {
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
        try:
            await self._call(self.core.create_namespaced_event, metadata["namespace"], body)
        except ApiException as error:
            if error.status == 403 and b"being terminated" in _bytes(error.body):
                return  # the namespace is going, and every Event in it with it: nothing to tell anyone
            raise

    async def get_cluster_object(self, plural: str, name: str) -> dict[str, Any] | None:
        """A cluster-scoped custom object of this API group, or None if it does not exist."""
        try:
            return await self._call(self.custom.get_cluster_custom_object, GROUP, VERSION, plural, name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    async def peers(self, peering: str, namespace: str = "") -> dict[str, Any]:
        """kopf's peering record (identity -> priority, lifetime, lastseen), empty if absent."""
        try:
            if namespace:
                body = await self._call(
                    self.custom.get_namespaced_custom_object, "kopf.dev", "v1", namespace, "kopfpeerings", peering
                )
            else:
                body = await self._call(
                    self.custom.get_cluster_custom_object, "kopf.dev", "v1", "clusterkopfpeerings", peering
                )
        except ApiException as error:
            if error.status == 404:
                return {}
            raise
        return dict(body.get("status") or {})

    async def replace_cluster_status(self, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        """PUT the status of a cluster-scoped object; raises ApiException 409 when body's
        resourceVersion is no longer current (optimistic concurrency: re-read and decide again)."""
        return await self._call(
            self.custom.replace_cluster_custom_object_status, GROUP, VERSION, plural, body["metadata"]["name"], body
        )

    async def patch_namespaced_status(self, plural: str, namespace: str, name: str, status: dict[str, Any]) -> bool:
        """Merge-patch the status of a namespaced custom object; False if it is gone."""
        try:
            await self._call(
                self.custom.patch_namespaced_custom_object_status,
                GROUP,
                VERSION,
                namespace,
                plural,
                name,
                {"status": status},
            )
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        return True

    async def _request(
        self, method: str, path: str, body: Any = None, content_type: str = "", **query: Any
    ) -> tuple[int, dict[str, Any]]:
        """One request to any path: (status, JSON body); 404 and 409 are answers, not errors."""
        api = self.core.api_client
        headers = {"Accept": "application/json"}
        if method == "PATCH":
            headers["Content-Type"] = content_type or "application/apply-patch+yaml"  # JSON is YAML
        params = api.param_serialize(
            method=method,
            resource_path=path,
            query_params=list(query.items()),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = await asyncio.get_running_loop().run_in_executor(self._executor, lambda: api.call_api(*params))
        data = response.read() if response.data is None else response.data
        if response.status >= 400 and response.status not in (404, 409):
            raise ApiException(status=response.status, reason=response.reason, body=data)
        return response.status, json.loads(data or b"{}")

    async def apply(self, body: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply: create or bring to exactly these fields (owned by this operator)."""
        metadata = body["metadata"]
        path = object_path(body["apiVersion"], body["kind"], metadata["namespace"], metadata["name"])
        status, answer = await self._request("PATCH", path, body, fieldManager=FIELD_MANAGER, force="true")
        if status >= 400:
            raise ApiException(status=status, reason=str(answer.get("message", "")))
        return answer

    async def get_object(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        status, answer = await self._request("GET", object_path(api_version, kind, namespace, name))
        return None if status == 404 else answer

    async def delete_object(self, api_version: str, kind: str, namespace: str, name: str, uid: str = "") -> bool:
        """Delete (only the object with this uid, when given); False if it was not there."""
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        status, _ = await self._request("DELETE", object_path(api_version, kind, namespace, name), body)
        return status < 400

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
