"""AnalysisEnvironment handlers: create, spec changes, operator restart, deletion, and the
pod events that move an environment to Ready (or bring its pod back)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from analysis_operator.backends.base import Backend, BackendUnavailable, State
from analysis_operator.engine.converge import Context, converge
from analysis_operator.engine.events import environment_reference, post_event
from analysis_operator.engine.reconciler import Reconciler, utcnow
from analysis_operator.engine.terms import flavor_for
from analysis_operator.engine.views import EnvironmentRecord, Index, first
from analysis_operator.handlers.indexes import MANAGED
from analysis_operator.infra.metrics import RECONCILE_SECONDS
from analysis_operator.model.domain import GROUP, LABEL_BACKEND, LABEL_ENVIRONMENT, VERSION, Environment

# An unexpected error (the API server restarting, a 500) is retried in seconds, not kopf's default minute.
RETRY_SECONDS = 5


@kopf.on.create(GROUP, VERSION, "analysisenvironments", backoff=RETRY_SECONDS)
@kopf.on.update(GROUP, VERSION, "analysisenvironments", field="spec", backoff=RETRY_SECONDS)
@kopf.on.resume(GROUP, VERSION, "analysisenvironments", backoff=RETRY_SECONDS)
async def on_environment(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, flavors: kopf.Index, **_: Any) -> None:
    context = memo.context
    environment = Environment.from_body(body)
    flavor = first(flavors, environment.flavor)
    backend = backend_of(context, environment, body.get("status") or {}, flavors)
    if backend is not None and backend.needs_finalizer and LABEL_BACKEND not in body.metadata.labels:
        # Label first: kopf then adds the finalizer before anything exists outside Kubernetes.
        patch.metadata.setdefault("labels", {})[LABEL_BACKEND] = backend.kind
        raise kopf.TemporaryError("waiting for the finalizer before creating the job or VM", delay=0.2)
    with RECONCILE_SECONDS.time():
        outcome = await converge(context, environment, body.get("status") or {}, flavor, utcnow())
    if outcome.status is not None:
        patch.status.update(outcome.status)
    if outcome.event is not None:
        await post_event(context.kube, environment_reference(environment), *outcome.event)
    if outcome.retry_after is not None:
        raise kopf.TemporaryError(outcome.message or "retrying", delay=outcome.retry_after)


@kopf.on.delete(GROUP, VERSION, "analysisenvironments", labels={LABEL_BACKEND: kopf.PRESENT}, backoff=RETRY_SECONDS)
async def on_environment_deleted(body: kopf.Body, labels: dict[str, str], memo: kopf.Memo, **_: Any) -> None:
    """Remove the Slurm job or VM; the finalizer stays until the backend confirms it is gone."""
    environment = Environment.from_body(body)
    backend = memo.context.backends.get(labels[LABEL_BACKEND])
    if backend is None:
        raise kopf.TemporaryError(f"the {labels[LABEL_BACKEND]} backend is not enabled; cannot clean up", delay=60)
    try:
        gone = await backend.delete(environment)
    except BackendUnavailable as error:
        raise kopf.TemporaryError(str(error), delay=10) from None
    if not gone:
        raise kopf.TemporaryError("waiting for the backend to confirm the deletion", delay=2)


@kopf.on.event(GROUP, VERSION, "analysisenvironments")
async def on_environment_status(type: str, body: kopf.Body, memo: kopf.Memo, flavors: kopf.Index, **_: Any) -> None:
    """The other half of the pod join: a pod can turn Ready before the status says Provisioning."""
    status = body.get("status") or {}
    if type != "MODIFIED" or status.get("phase") != "Provisioning":
        return
    environment = Environment.from_body(body)
    backend = backend_of(memo.context, environment, status, flavors)
    if backend is None or backend.polled:
        return  # polled backends are observed by the sweep; an event-driven one is cheap to ask here
    if (await backend.observe(environment)).state is State.READY:
        reconciler: Reconciler = memo.reconciler
        await reconciler.reconcile(EnvironmentRecord(environment, status))


@kopf.on.event("pods", labels=MANAGED)
async def on_pod(namespace: str, labels: dict[str, str], memo: kopf.Memo, environments: kopf.Index, **_: Any) -> None:
    record: EnvironmentRecord | None = first(environments, (namespace, labels.get(LABEL_ENVIRONMENT, "")))
    if record is None or not record.status.get("phase"):
        return  # environment gone (the garbage collector follows), or its handler has not written yet
    environment = record.environment
    backend = backend_of(memo.context, environment, record.status, memo.reconciler.flavors)
    if (
        backend is not None
        and (await backend.observe(environment)).state is State.GONE
        and not await memo.context.kube.environment_exists(environment.namespace, environment.name, environment.uid)
    ):
        return  # deleted together with its environment: do not bring it back
    await memo.reconciler.reconcile(record)


def backend_of(context: Context, environment: Environment, status: Mapping[str, Any], flavors: Index) -> Backend | None:
    """The backend an environment runs on: its recorded terms' once started (the flavor may have
    changed or gone since), else its flavor's."""
    flavor = flavor_for(environment, status, flavors)
    return context.backends.get(flavor.backend) if flavor is not None else None
