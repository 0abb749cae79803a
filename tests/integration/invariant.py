"""The one invariant, written once, checked after every integration test and by the chaos run.

At every moment, once the operator has had one sweep to converge:
  1. a finished environment (Rejected, Failed, Expired, Stopped, BudgetExhausted) holds no pod,
     Service, token Secret, Slurm job or VM, and is not charged past the moment it stopped;
  2. a live environment that has started is in its budget's ledger (when its owner has a budget)
     and will expire (status.expiresAt is set, and not long past);
  3. every pod, Service, token Secret, Slurm job or VM the operator made belongs to a live
     environment (that exists with that uid, and has not finished);
  4. an HTTPRoute or EndpointSlice the operator made (OPEN) belongs to an environment that is
     starting or Ready: nothing suspended, finished or gone stays routable.

Slurm jobs and VMs are checked when their stacks run: their conftests register a probe (a
function listing what the operator made there, as backends' `list_managed` does).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import kubernetes

GROUP, VERSION = "analysis.panosc.eu", "v1alpha1"
MANAGED = "app.kubernetes.io/managed-by=analysis-operator"
UID_LABEL = f"{GROUP}/environment-uid"
TERMINAL = {"Rejected", "Failed", "Expired", "Stopped", "BudgetExhausted"}
STARTED = {"Provisioning", "Ready", "Suspended"}
EXPIRY_GRACE = datetime.timedelta(seconds=30)  # expiry is acted on by the next sweep (1 s in the tests)


@dataclass(frozen=True)
class Managed:
    """Something the operator made outside Kubernetes, by the environment it says it belongs to."""

    kind: str
    namespace: str
    name: str
    uid: str
    backend_id: str


# Registered by tests/integration/slurm/conftest.py and openstack/conftest.py while their stacks run.
PROBES: dict[str, Callable[[], Iterable[Managed]]] = {}


def _parse(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)


def violations(
    api: kubernetes.client.ApiClient, namespaces: Iterable[str] | None = None, now: datetime.datetime | None = None
) -> list[str]:
    """Every breach of the invariant, in words (empty: it holds). `namespaces` limits the check to
    those (a test's own); None checks the whole cluster, except namespaces being deleted."""
    now = now or datetime.datetime.now(datetime.UTC)
    core, custom = kubernetes.client.CoreV1Api(api), kubernetes.client.CustomObjectsApi(api)
    wanted = set(namespaces) if namespaces is not None else None
    terminating = {item.metadata.name for item in core.list_namespace().items if item.metadata.deletion_timestamp}

    def in_scope(namespace: str) -> bool:
        return namespace not in terminating and (wanted is None or namespace in wanted)

    environments = [
        item
        for item in custom.list_cluster_custom_object(GROUP, VERSION, "analysisenvironments")["items"]
        if in_scope(item["metadata"]["namespace"])
    ]
    by_uid = {item["metadata"]["uid"]: item for item in environments}
    budgets = custom.list_cluster_custom_object(GROUP, VERSION, "computebudgets")["items"]
    ledger = {
        uid: (budget["metadata"]["name"], entry)
        for budget in budgets
        for uid, entry in ((budget.get("status") or {}).get("environments") or {}).items()
    }
    found: list[str] = []

    def name_of(item: dict) -> str:
        return f"{item['metadata']['namespace']}/{item['metadata']['name']}"

    def finished(item: dict) -> bool:
        return (item.get("status") or {}).get("phase") in TERMINAL

    # 3. (and 1. for Kubernetes children) everything the operator made belongs to a live environment
    children = []
    for kind, listing in (
        ("Pod", core.list_pod_for_all_namespaces),
        ("Service", core.list_service_for_all_namespaces),
        ("Secret", core.list_secret_for_all_namespaces),
    ):
        for child in listing(label_selector=MANAGED).items:
            if child.metadata.deletion_timestamp or not in_scope(child.metadata.namespace):
                continue
            if (child.metadata.labels or {}).get(UID_LABEL):  # a home claim's pod-less objects carry none
                children.append(
                    Managed(
                        kind,
                        child.metadata.namespace,
                        child.metadata.name,
                        (child.metadata.labels or {}).get(UID_LABEL, ""),
                        child.metadata.uid,
                    )
                )
    for probe in PROBES.values():
        children.extend(managed for managed in probe() if in_scope(managed.namespace))
    for route in _routing(api):
        owner = by_uid.get(route.uid)
        if not in_scope(route.namespace) or (owner is not None and owner["metadata"].get("deletionTimestamp")):
            continue
        phase = ((owner or {}).get("status") or {}).get("phase")
        if owner is None or phase not in ("Provisioning", "Ready"):
            found.append(
                f"{route.kind} {route.namespace}/{route.name} routes to "
                f"{name_of(owner) + ' which is ' + str(phase) if owner else 'no environment'}: it should be gone"
            )
    for child in children:
        owner = by_uid.get(child.uid)
        if owner is None:
            found.append(
                f"{child.kind} {child.namespace}/{child.name} ({child.backend_id}) belongs to no environment "
                f"(uid {child.uid or 'missing'})"
            )
        elif owner["metadata"].get("deletionTimestamp"):
            continue  # its finalizer or the garbage collector is removing it
        elif finished(owner):
            found.append(
                f"{child.kind} {child.namespace}/{child.name} ({child.backend_id}) still exists although "
                f"{name_of(owner)} is {owner['status']['phase']}"
            )

    for item in environments:
        status = item.get("status") or {}
        phase, uid = status.get("phase"), item["metadata"]["uid"]
        if item["metadata"].get("deletionTimestamp"):
            continue
        # 1. finished: not charged past its stop
        if phase in TERMINAL and uid in ledger:
            budget, entry = ledger[uid]
            charged, stopped = _parse(entry.get("chargedUntil")), _parse(status.get("stoppedAt"))
            if stopped is None or (charged is not None and charged > stopped):
                found.append(
                    f"{name_of(item)} is {phase} but ComputeBudget {budget!r} charged it until "
                    f"{entry.get('chargedUntil')} (stopped {status.get('stoppedAt')})"
                )
        # 2. live and started: charged, and will expire
        if phase in STARTED:
            expires = _parse(status.get("expiresAt"))
            if expires is None:
                found.append(f"{name_of(item)} is {phase} with no expiresAt: it would never expire")
            elif phase != "Suspended" and now > expires + EXPIRY_GRACE:
                found.append(f"{name_of(item)} is {phase} {int((now - expires).total_seconds())} s past its expiry")
            owner = item["spec"]["owner"]
            named = item["spec"].get("budget")
            covered = [
                budget
                for budget in budgets
                if (named and budget["metadata"]["name"] == named)
                or (not named and (budget.get("spec") or {}).get("user") == owner)
            ]
            if covered and uid not in ledger:
                found.append(
                    f"{name_of(item)} is {phase} but not in the ledger of ComputeBudget "
                    f"{covered[0]['metadata']['name']!r}: it runs uncharged"
                )
    return found


def _routing(api: kubernetes.client.ApiClient) -> list[Managed]:
    """The operator's HTTPRoutes and EndpointSlices (none where the Gateway API is not installed)."""
    custom, discovery = kubernetes.client.CustomObjectsApi(api), kubernetes.client.DiscoveryV1Api(api)
    found = []
    try:
        routes = custom.list_cluster_custom_object(
            "gateway.networking.k8s.io", "v1", "httproutes", label_selector=MANAGED
        )
    except kubernetes.client.ApiException as error:
        if error.status != 404:
            raise
        routes = {"items": []}
    for route in routes["items"]:
        metadata = route["metadata"]
        labels = metadata.get("labels") or {}
        if not metadata.get("deletionTimestamp") and UID_LABEL in labels:  # not a namespace's closed page
            found.append(
                Managed(
                    "HTTPRoute", metadata["namespace"], metadata["name"], labels.get(UID_LABEL, ""), metadata["uid"]
                )
            )
    for endpoints in discovery.list_endpoint_slice_for_all_namespaces(
        label_selector="endpointslice.kubernetes.io/managed-by=analysis-operator"  # not the controller's copies
    ).items:
        if not endpoints.metadata.deletion_timestamp:
            labels = endpoints.metadata.labels or {}
            found.append(
                Managed(
                    "EndpointSlice",
                    endpoints.metadata.namespace,
                    endpoints.metadata.name,
                    labels.get(UID_LABEL, ""),
                    endpoints.metadata.uid,
                )
            )
    return found
