"""AnalysisEnvironment handlers: create, spec changes, operator restart, deletion, and the
pod changes that move an environment to Ready (or bring its pod back)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf
import structlog

from analysis_operator.backends.base import Backend, BackendUnavailable, State
from analysis_operator.engine.converge import Context, environment_lock
from analysis_operator.engine.events import environment_reference, post_event
from analysis_operator.engine.reconciler import Reconciler, utcnow
from analysis_operator.engine.terms import flavor_for
from analysis_operator.engine.tokens import delete_token
from analysis_operator.engine.views import EnvironmentRecord, Index, first, values
from analysis_operator.handlers.indexes import PodKey
from analysis_operator.infra.kube import namespace_terminating
from analysis_operator.infra.metrics import RECONCILE_SECONDS
from analysis_operator.model.conditions import build_condition, merge_conditions
from analysis_operator.model.domain import FINALIZER, GROUP, LABEL_BACKEND, VERSION, Environment
from analysis_operator.policy.opening import viewers_unchecked

log = structlog.get_logger("analysis_operator.environments")

# An unexpected error (the API server restarting, a 500) is retried in seconds, not kopf's default minute.
RETRY_SECONDS = 5


@kopf.on.create(GROUP, VERSION, "analysisenvironments", backoff=RETRY_SECONDS)
@kopf.on.update(GROUP, VERSION, "analysisenvironments", field="spec", backoff=RETRY_SECONDS)
@kopf.on.resume(GROUP, VERSION, "analysisenvironments", backoff=RETRY_SECONDS)
async def on_environment(
    body: kopf.Body,
    patch: kopf.Patch,
    memo: kopf.Memo,
    flavors: kopf.Index,
    old: Any = None,
    new: Any = None,
    **_: Any,
) -> None:
    context = memo.context
    environment = Environment.from_body(body)
    viewers = getattr(memo, "viewers", None)  # with the gateway on (handlers/lifecycle.py)
    # old, new: the spec before and after; at a restart's resume, a sharing changed while no operator ran
    unchecked = old is None and viewers_unchecked(environment, body.get("status") or {})
    if viewers is not None and (sharing_changed(old, new) or unchecked):
        viewers.soon(environment.namespace, environment.name)
    flavor = first(flavors, environment.flavor)
    backend = backend_of(context, environment, body.get("status") or {}, flavors)
    if backend is not None and backend.needs_finalizer and LABEL_BACKEND not in body.metadata.labels:
        # Label first: kopf then adds the finalizer before anything exists outside Kubernetes.
        patch.metadata.setdefault("labels", {})[LABEL_BACKEND] = backend.kind
        raise kopf.TemporaryError("waiting for the finalizer before creating the job or VM", delay=0.2)
    reconciler: Reconciler = memo.reconciler
    with RECONCILE_SECONDS.time():  # written in turn with pod events' decisions (Reconciler.decide)
        try:
            outcome = await reconciler.decide(environment, body.get("status") or {}, flavor)
        except Exception as error:
            if namespace_terminating(error):
                return  # nothing more is made in a namespace being deleted, and the environment goes with it
            raise
    if outcome.retry_after is not None:
        raise kopf.TemporaryError(outcome.message or "retrying", delay=outcome.retry_after)


@kopf.on.delete(GROUP, VERSION, "analysisenvironments", labels={LABEL_BACKEND: kopf.PRESENT}, backoff=RETRY_SECONDS)
async def on_environment_deleted(
    body: kopf.Body, labels: dict[str, str], patch: kopf.Patch, memo: kopf.Memo, **_: Any
) -> None:
    """Remove the Slurm job or VM; the finalizer stays until the backend confirms it is gone, or
    there is nothing to remove (see cleanup_blocked), or an admin abandons it (ABANDON)."""
    environment = Environment.from_body(body)
    kind, status = labels[LABEL_BACKEND], body.get("status") or {}
    held = any(finalizer != FINALIZER for finalizer in body.metadata.get("finalizers") or ())
    backend = memo.context.backends.get(kind)
    reference = environment_reference(environment)
    if body.metadata.annotations.get(ABANDON) == "true":
        message = left_behind(kind, status)
        log.warning("environment.backend_abandoned", environment=f"{environment.namespace}/{environment.name}")
        await post_event(memo.context.kube, reference, "Warning", "BackendAbandoned", message)
        return await _release(memo, environment, held)
    if backend is None:
        blocked = cleanup_blocked(kind, status)
        if blocked is None:  # nothing was ever made there: nothing to wait for
            log.info("environment.released", environment=f"{environment.namespace}/{environment.name}", backend=kind)
            return await _release(memo, environment, held)
        await _cleanup_condition(memo, environment, status, patch, "BackendNotEnabled", blocked)
        raise kopf.TemporaryError(blocked, delay=ABANDON_CHECK_SECONDS)
    try:
        # After a converge creating the job or VM (a submit, a server create: 15-30 s), never during it: it
        # would find nothing, the finalizer would go, and what the converge made would run on as an orphan.
        # Converges that waited behind this one create nothing (Context.deleting).
        async with environment_lock(environment.uid):
            memo.context.deleting.add(environment.uid)
            gone = await backend.delete(environment)
    except BackendUnavailable as error:
        message = f"{error}; {what_was_made(kind, status)} is removed when it answers again, or {ABANDON_HINT}"
        await _cleanup_condition(memo, environment, status, patch, "BackendUnavailable", message)
        raise kopf.TemporaryError(str(error), delay=10) from None
    if not gone:
        raise kopf.TemporaryError("waiting for the backend to confirm the deletion", delay=2)
    await _release(memo, environment, held)


async def _release(memo: kopf.Memo, environment: Environment, held: bool = False) -> None:
    """The environment's token Secret, removed with the backend's work before the finalizer goes, not
    left to the garbage collector alone: it does not see the deletion of a kind it has not discovered
    yet (the first seconds after the CRD is installed), and the access token then stayed behind its
    environment (tests/integration/test_authorization.py). Its route stays the collector's: closing it
    would set up the namespace's closed page again, which a namespace being deleted refuses, and a route
    to an environment that is gone opens nothing (the forward-auth answers for environments only). Unless
    something else keeps the object (`held`: someone's finalizer, or an orphaning delete, which would leave
    the route, its Service and EndpointSlice to nobody): then it is closed here too."""
    await delete_token(memo.context.kube, environment)
    if held:
        try:
            await memo.context.routes.close(environment)
        except Exception as error:
            if not namespace_terminating(error):
                raise


# An admin's way out when the backend will not come back (a decommissioned cloud project): the finalizer
# is released without asking the backend. Only the operator and admins may set annotations under
# analysis.panosc.eu/ (deploy/authorization); what is left behind is removed by the orphan sweep
# (engine/sweep.py) once the backend is enabled and answers again, or by hand.
ABANDON = f"{GROUP}/abandon-backend"
ABANDON_CHECK_SECONDS = 20  # a blocked deletion looks again this often (for the backend, or the annotation)
ABANDON_HINT = f'an admin may let the environment go without it: annotate it {ABANDON}="true"'
_MADE = {"slurm": "Slurm job", "openstack": "OpenStack server"}


def what_was_made(kind: str, status: Mapping[str, Any]) -> str:
    """'Slurm job 4711', 'OpenStack server 3f2a...' (pure)."""
    made = _MADE.get(kind, f"{kind} object")
    recorded = str((status.get("backend") or {}).get("id") or "")
    return f"{made} {recorded}" if recorded else f"its {made}"


def cleanup_blocked(kind: str, status: Mapping[str, Any]) -> str | None:
    """Deleting an environment whose backend is not enabled (pure): None when status records nothing
    made there (no job id, no server id), so the finalizer goes at once; else what blocks the deletion
    and what to do, for the condition and the Event."""
    if (status.get("backend") or {}).get("id") and (status.get("backend") or {}).get("kind", kind) == kind:
        return (
            f"cannot remove {what_was_made(kind, status)}: the {kind} backend is not enabled in this operator; "
            f"enable it again and the deletion completes, or {ABANDON_HINT} (then remove it by hand, or the "
            f"operator's orphan sweep does once the backend is enabled)"
        )
    return None


def left_behind(kind: str, status: Mapping[str, Any]) -> str:
    return (
        f"{what_was_made(kind, status)} was not removed ({ABANDON}): remove it by hand, or the operator's "
        f"orphan sweep does once the {kind} backend is enabled and answers"
    )


async def _cleanup_condition(
    memo: kopf.Memo, environment: Environment, status: Mapping[str, Any], patch: kopf.Patch, reason: str, message: str
) -> None:
    """Condition CleanedUp=False says why the deletion waits; the Event is posted when that changes."""
    previous = {c.get("type"): c for c in status.get("conditions") or ()}.get("CleanedUp")
    if previous is not None and previous.get("reason") == reason and previous.get("message") == message:
        return
    condition = build_condition(
        previous,
        type_="CleanedUp",
        status=False,
        reason=reason,
        message=message,
        generation=environment.generation,
        now=utcnow(),
    )
    patch.status["conditions"] = merge_conditions(status.get("conditions"), condition)
    await post_event(memo.context.kube, environment_reference(environment), "Warning", reason, message)


def status_event_matters(type: str, body: Mapping[str, Any], **_: Any) -> bool:
    """kopf's filter for on_environment_status (pure): the environment's deletion, one being deleted that
    something else holds (held_in_deletion), or a change while its status says Provisioning. Every other event
    (most are the operator's own status writes coming back) is not handed to the handler at all: kopf's
    invocation of a handler costs more than this test (bench/RESULTS.md, stop 38)."""
    if type == "DELETED" or held_in_deletion(body.get("metadata") or {}):
        return True
    return type == "MODIFIED" and (body.get("status") or {}).get("phase") == "Provisioning"


def held_in_deletion(metadata: Mapping[str, Any]) -> bool:
    """Deleted, but kept by a finalizer that is not the operator's, and it runs nothing the operator's own
    finalizer waits for (a pod: no backend label). Someone's finalizer (only admins may set one), or a
    foreground or orphan deletion. Its budget slot was freed and its charge ended at the deletion, so what
    it runs must go then too, not when the object finally does (pure)."""
    return bool(metadata.get("deletionTimestamp")) and LABEL_BACKEND not in (metadata.get("labels") or {})


@kopf.on.event(GROUP, VERSION, "analysisenvironments", when=status_event_matters)
async def on_environment_status(type: str, body: kopf.Body, memo: kopf.Memo, flavors: kopf.Index, **_: Any) -> None:
    """The other half of the pod join: a pod can turn Ready, or the scheduler give up on it (a missing
    claim), before the status says Provisioning; its change was then dropped (see pod_changed). And the end:
    once it is deleted, what this process kept for it (engine/reconciler.Reconciler.forget)."""
    status = body.get("status") or {}
    environment = Environment.from_body(body)
    try:
        # also at its last event: the one before may not have been handed over
        if held_in_deletion(body.metadata) and environment.uid not in memo.context.removed_held:
            await remove_held(memo.context, environment, backend_of(memo.context, environment, status, flavors))
    finally:
        if type == "DELETED":  # its last event: what this process kept for it goes too
            memo.diffbase.forget(environment.uid)
            memo.reconciler.forget({environment.uid})
    if type == "DELETED" or environment.deleting:
        return  # a removal that failed here is tried again by the sweep (remove_held_ones)
    backend = backend_of(memo.context, environment, status, flavors)
    if backend is None or backend.polled:
        return  # polled backends are observed by the sweep; an event-driven one is cheap to ask here
    observation = await backend.observe(environment)
    if observation.state is State.READY or (
        observation.state is State.PENDING and observation.reason != status.get("reason")
    ):
        reconciler: Reconciler = memo.reconciler
        await reconciler.reconcile(EnvironmentRecord(environment, status))


async def remove_held(context: Context, environment: Environment, backend: Backend | None) -> None:
    """What an environment held in its deletion runs (held_in_deletion): its pod, Service, token and route,
    now (an orphaning delete would leave them to nobody; the forward-auth lets nobody into an environment
    being deleted meanwhile). Converges that wait behind this one create nothing (Context.deleting)."""
    async with environment_lock(environment.uid):
        context.deleting.add(environment.uid)
        if backend is not None:
            await backend.delete(environment)
    await delete_token(context.kube, environment)
    try:
        await context.routes.close(environment)
    except Exception as error:
        if not namespace_terminating(error):  # its namespace going: its route goes with it
            raise
    context.removed_held.add(environment.uid)
    log.info("environment.removed_while_held", environment=f"{environment.namespace}/{environment.name}")


async def remove_held_ones(reconciler: Reconciler) -> None:
    """The sweep's part: what runs for environments kept after their deletion whose removal failed at their
    event (kopf does not retry an event handler) or was never handed over (the operator down), tried again."""
    context = reconciler.context
    for record in values(reconciler.environments):
        environment = record.environment
        if not environment.deleting or environment.finalizing or environment.uid in context.removed_held:
            continue
        backend = backend_of(context, environment, record.status, reconciler.flavors)
        if backend is not None and backend.needs_finalizer:
            continue  # a Slurm job or VM: its finalizer's handler removes it
        try:
            await remove_held(context, environment, backend)
        except Exception as error:  # the next sweep tries again
            log.warning(
                "environment.removal_failed",
                environment=f"{environment.namespace}/{environment.name}",
                error=repr(error),
            )


async def pod_changed(memo: kopf.Memo, key: PodKey) -> None:
    """An environment's pod changed (the operator's watch of its pods, infra/watch.py)."""
    reconciler: Reconciler = memo.reconciler
    record: EnvironmentRecord | None = first(reconciler.environments, key)
    if record is None:
        return  # environment gone (the garbage collector follows)
    if not record.status.get("phase") and not reconciler.started(record.environment.uid):
        return  # its handler has not run yet: it will see the pod as it is now
    environment = record.environment
    backend = backend_of(memo.context, environment, record.status, memo.reconciler.flavors)
    observation = await backend.observe(environment) if backend is not None else None
    if observation is not None and reconciler.holds_start(environment.uid, observation):
        return  # created, then scheduled: still starting, as its held first status says (Reconciler.holds_start)
    going = observation is not None and (observation.state is State.GONE or observation.reason == "PodTerminating")
    if going and await memo.context.kube.namespace_going(environment_reference(environment)):
        # Its namespace is being deleted (its pods usually go before the environments): the environment
        # goes with it. Nothing to tell (Ready -> Provisioning was a status write and a refused Event for
        # every environment in the namespace) and nothing to bring back.
        return
    if (
        observation is not None
        and observation.state is State.GONE
        and not await memo.context.kube.environment_exists(environment.namespace, environment.name, environment.uid)
    ):
        return  # deleted together with its environment: do not bring it back
    await reconciler.reconcile(record)


def sharing_changed(old: Any, new: Any) -> bool:
    """A spec change (not a create or resume) that changed spec.sharing (pure)."""
    if not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return False
    return old.get("sharing") != new.get("sharing")


def backend_of(context: Context, environment: Environment, status: Mapping[str, Any], flavors: Index) -> Backend | None:
    """The backend an environment runs on: its recorded terms' once started (the flavor may have
    changed or gone since), else its flavor's."""
    flavor = flavor_for(environment, status, flavors)
    return context.backends.get(flavor.backend) if flavor is not None else None
