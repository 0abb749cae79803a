"""The periodic sweep over the environments index: expiry, polled backends, lifetime warnings, orphans.

One loop for all environments instead of a timer per object (handlers/lifecycle.py
runs it on the active replica only).
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Callable, Collection, Mapping
from typing import Any

import structlog

from analysis_operator.backends.base import Backend, BackendUnavailable, ManagedObject
from analysis_operator.engine.converge import Outcome, expiry
from analysis_operator.engine.events import environment_reference, post_event
from analysis_operator.engine.reconciler import Reconciler
from analysis_operator.engine.terms import flavor_for
from analysis_operator.engine.tokens import delete_token
from analysis_operator.engine.views import EnvironmentRecord, Index, values
from analysis_operator.model.domain import (
    Environment,
    Phase,
    format_time,
    is_terminal,
    parse_time,
)
from analysis_operator.policy.budgets import expiry_warning_due

log = structlog.get_logger("analysis_operator.sweep")
# What an ended environment still holds is the orphan sweep's only once its stop's own removal has had
# time (a pod's grace period, a Slurm job's cancel): a pod still terminating is no orphan.
ENDED_GRACE_SECONDS = 120.0


def due(record: EnvironmentRecord, flavors: Index, polled: frozenset[str], moment: datetime.datetime) -> bool:
    """Does the sweep need to act on this environment now? (pure)

    Environments on polled backends on every sweep, since nothing pushes their
    state to us; the others only when their lifetime is over (their events do the rest).
    """
    if is_terminal(record.status.get("phase")) or not record.status.get("phase"):
        return False
    flavor = flavor_for(record.environment, record.status, flavors)
    if flavor is None:
        return False
    return flavor.backend in polled or expiry(record.environment, flavor, record.status, moment)[1] <= moment


def _none(records: list[EnvironmentRecord]) -> Collection[str]:
    return ()


async def sweep(
    reconciler: Reconciler,
    moment: datetime.datetime,
    parallel: int = 8,
    unheld: Callable[[list[EnvironmentRecord]], Collection[str]] = _none,
) -> int:
    """Reconcile what is due (`due`), and the environments `unheld` names (uids): started ones whose
    budget went from under them (engine/budget_gate.BudgetGate.unheld)."""
    polled = frozenset(kind for kind, backend in reconciler.context.backends.items() if backend.polled)
    records = list(values(reconciler.environments))
    again = unheld(records)
    due_records = [
        record
        for record in records
        if record.environment.uid in again or due(record, reconciler.flavors, polled, moment)
    ]
    limit = asyncio.Semaphore(parallel)

    async def one(record: EnvironmentRecord) -> Outcome:
        async with limit:
            return await reconciler.reconcile(record, moment)

    await asyncio.gather(*(one(record) for record in due_records))  # reconcile logs and retries its own failures
    return len(due_records)


async def warn_expiring(reconciler: Reconciler, warn_before: float, moment: datetime.datetime) -> None:
    """A Warning Event a configurable time before an environment expires, once per expiry time,
    so the portal can offer an extension (a lifetime BudgetRequest)."""
    kube = reconciler.context.kube
    for record in values(reconciler.environments):
        if record.status.get("phase") not in (Phase.READY.value, Phase.PROVISIONING.value):
            continue
        flavor = flavor_for(record.environment, record.status, reconciler.flavors)
        if flavor is None:
            continue
        _, expires_at = expiry(record.environment, flavor, record.status, moment)
        if expiry_warning_due(expires_at, moment, warn_before, record.status.get("expiryWarnedFor")):
            environment = record.environment
            await kube.patch_environment_status(
                environment.namespace, environment.name, {"expiryWarnedFor": format_time(expires_at)}
            )
            await post_event(
                kube,
                environment_reference(environment),
                "Warning",
                "ExpiresSoon",
                f"expires at {format_time(expires_at)}; to keep it longer, create a BudgetRequest "
                f"with spec.environment {environment.name!r} and spec.lifetime",
            )


def _ended_before(status: Mapping[str, Any], moment: datetime.datetime) -> bool:
    stopped = parse_time(status.get("stoppedAt"))
    return stopped is None or stopped < moment


async def sweep_orphans(reconciler: Reconciler) -> int:
    """Remove what backends made for environments that no longer exist (deleted while the operator was
    down, or by a user with --cascade=orphan), and their token Secrets. Secrets are not listed: the
    operator may not read every Secret of the cluster; a token goes with the pod, Service, job or VM
    that is found. Also what an ended environment (a terminal phase) still holds: converge.stop writes
    the end before it removes anything, and nothing converges an ended environment again, so a removal
    that failed then (the backend away, the operator killed between the two) is done here.

    Each backend's listing and each removal fails on its own: Slurm down, or one locked VM, must not
    keep the other backends' orphans running (an ended one uncharged) until it answers again."""
    records = {record.environment.uid: record for record in values(reconciler.environments)}
    settled = reconciler.clock() - datetime.timedelta(seconds=ENDED_GRACE_SECONDS)
    removed = 0
    for kind, backend in reconciler.context.backends.items():
        try:
            found = await backend.list_managed()
        except Exception as error:
            _log_failure("orphan.list_failed", kind, error)
            continue
        for managed in found:
            try:
                removed += await _remove_orphan(reconciler, kind, backend, managed, records.get(managed.uid), settled)
            except BackendUnavailable as error:  # once per sweep: the backend's other orphans would wait too
                _log_failure("orphan.remove_failed", kind, error, managed)
                break
            except Exception as error:  # this one refused (a locked VM, a job Slurm will not cancel): the rest go
                _log_failure("orphan.remove_failed", kind, error, managed)
    return removed


async def _remove_orphan(
    reconciler: Reconciler,
    kind: str,
    backend: Backend,
    managed: ManagedObject,
    record: EnvironmentRecord | None,
    settled: datetime.datetime,
) -> int:
    """Remove `managed` if it is an orphan (1) or leave it (0)."""
    kube = reconciler.context.kube
    ended = record is not None and is_terminal(record.status.get("phase"))  # for good: no lag to wait out
    if record is not None and not (ended and _ended_before(record.status, settled)):
        return 0  # live, or ended a moment ago: its stop's own removal (a pod terminating) is under way
    # The index may lag; only the API server's answer makes it an orphan.
    if record is None and await kube.environment_exists(managed.namespace, managed.name, managed.uid):
        return 0
    orphan = Environment(managed.namespace, managed.name, managed.uid, owner="", flavor="")
    await backend.delete(orphan)
    await reconciler.context.routes.close(orphan)  # its HTTPRoute and endpoint, orphaned with it
    await delete_token(kube, orphan)
    log.warning(
        "orphan.removed",
        backend=kind,
        environment=f"{managed.namespace}/{managed.name}",
        backend_id=managed.backend_id,
        ended=record.status.get("phase") if record is not None else None,
    )
    return 1


def _log_failure(event: str, kind: str, error: Exception, managed: ManagedObject | None = None) -> None:
    """The backend unavailable is told as it says; anything else with its type, to be looked into."""
    where = {"environment": f"{managed.namespace}/{managed.name}", "backend_id": managed.backend_id} if managed else {}
    unavailable = isinstance(error, BackendUnavailable)
    log.warning(event, backend=kind, **where, unavailable=unavailable, error=str(error) if unavailable else repr(error))
