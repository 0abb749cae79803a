"""AnalysisEnvironment handlers: create, spec changes, operator restart, and
the pod events that move an environment to Ready (or bring its pod back)."""
from __future__ import annotations

import datetime
from typing import Any

import kopf
import structlog

from analysis_operator.domain import API_VERSION, GROUP, LABEL_BACKEND, LABEL_ENVIRONMENT, VERSION, Environment
from analysis_operator.backends.base import BackendUnavailable
from analysis_operator.handlers.indexes import MANAGED, EnvironmentRecord, first
from analysis_operator.metrics import RECONCILE_SECONDS
from analysis_operator.reconcile import Context, Outcome, converge


log = structlog.get_logger("analysis_operator.handlers")


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def reference(environment: Environment) -> dict[str, Any]:
    """Enough of the object for kopf to post an Event about it."""
    return {"apiVersion": API_VERSION, "kind": "AnalysisEnvironment",
            "metadata": {"namespace": environment.namespace, "name": environment.name, "uid": environment.uid}}


async def post(context: Context, environment: Environment, outcome: Outcome) -> None:
    if outcome.event is None:
        return
    kind, reason, message = outcome.event
    try:
        await context.kube.post_event(reference(environment), kind, reason, message)
    except Exception as error:  # an Event lost must not undo the reconcile that caused it
        log.warning("event.not_posted", environment=f"{environment.namespace}/{environment.name}",
                    reason=reason, error=repr(error))


async def apply(context: Context, environment: Environment, outcome: Outcome) -> None:
    """Write an outcome from outside kopf's own handler patch (pod events, sweeps)."""
    if outcome.status is not None:
        await context.kube.patch_environment_status(environment.namespace, environment.name, outcome.status)
    await post(context, environment, outcome)


@kopf.on.create(GROUP, VERSION, "analysisenvironments")
@kopf.on.update(GROUP, VERSION, "analysisenvironments", field="spec")
@kopf.on.resume(GROUP, VERSION, "analysisenvironments")
async def on_environment(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, flavors: kopf.Index, **_: Any) -> None:
    environment = Environment.from_body(body)
    flavor = first(flavors, environment.flavor)
    if flavor is not None and flavor.backend.value != "kubernetes" and LABEL_BACKEND not in body.metadata.labels:
        # Label first: kopf then adds the finalizer before anything exists outside Kubernetes.
        patch.metadata.setdefault("labels", {})[LABEL_BACKEND] = flavor.backend.value
        raise kopf.TemporaryError("waiting for the finalizer before creating the job or VM", delay=0.2)
    with RECONCILE_SECONDS.time():
        outcome = await converge(memo.context, environment, body.get("status") or {}, flavor, now())
    if outcome.status is not None:
        patch.status.update(outcome.status)
    await post(memo.context, environment, outcome)
    if outcome.retry_after is not None:
        raise kopf.TemporaryError(outcome.status and outcome.status.get("message") or "retrying",
                                  delay=outcome.retry_after)


@kopf.on.delete(GROUP, VERSION, "analysisenvironments", labels={LABEL_BACKEND: kopf.PRESENT})
async def on_environment_deleted(body: kopf.Body, labels: dict[str, str], memo: kopf.Memo, **_: Any) -> None:
    """Remove the Slurm job or VM; the finalizer stays until the backend confirms it is gone."""
    environment = Environment.from_body(body)
    backend = memo.context.backends.get(labels[LABEL_BACKEND])
    if backend is None:
        raise kopf.TemporaryError(f"the {labels[LABEL_BACKEND]} backend is not enabled; cannot clean up", delay=60)
    try:
        gone = await backend.delete(environment)
    except BackendUnavailable as error:
        raise kopf.TemporaryError(str(error), delay=10)
    if not gone:
        raise kopf.TemporaryError("waiting for the backend to confirm the deletion", delay=2)


@kopf.on.event(GROUP, VERSION, "analysisenvironments")
async def on_environment_status(type: str, body: kopf.Body, memo: kopf.Memo, flavors: kopf.Index,
                                **_: Any) -> None:
    """The other half of the pod join: a pod can turn Ready before the status says Provisioning."""
    status = body.get("status") or {}
    if type != "MODIFIED" or status.get("phase") != "Provisioning":
        return
    environment = Environment.from_body(body)
    observation = await memo.context.backends["kubernetes"].observe(environment)
    if observation.state.value == "Ready":
        await apply(memo.context, environment,
                    await converge(memo.context, environment, status, first(flavors, environment.flavor), now()))


@kopf.on.event("pods", labels=MANAGED)
async def on_pod(namespace: str, labels: dict[str, str], memo: kopf.Memo, environments: kopf.Index,
                 flavors: kopf.Index, **_: Any) -> None:
    record: EnvironmentRecord | None = first(environments, (namespace, labels.get(LABEL_ENVIRONMENT, "")))
    if record is None or not record.status.get("phase"):
        return  # environment gone (the garbage collector follows), or its handler has not written yet
    environment = record.environment
    backend = memo.context.backends["kubernetes"]
    if (await backend.observe(environment)).state.value == "Gone" and not await memo.context.kube.environment_exists(
            environment.namespace, environment.name, environment.uid):
        return  # deleted together with its environment: do not bring it back
    outcome = await converge(memo.context, environment, record.status, first(flavors, environment.flavor), now())
    await apply(memo.context, environment, outcome)
