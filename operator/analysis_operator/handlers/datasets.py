"""Data permissions and flavor restrictions: admission, reconcile, mounts, revocation.

One policy (policy/access.py) asked at four moments:
  - admission (the `environment-admission` webhook): refuse what the owner may not have;
  - every reconcile (`DataAccess.check`, a converge gate): a webhook can be
    bypassed and access can change, so nothing starts or keeps running without it;
  - mount time (`DataAccess.granted`, given to the backends): the pod, job or VM
    gets exactly the datasets granted now, and the grant is recorded;
  - catalogue changes (Dataset or FacilityGroup modified or deleted): running
    environments that lost access are stopped at once, not at the next sweep.

Decisions read kopf's in-memory indexes. A refusal is confirmed against the
API server before it is acted on, since an index can lag a moment behind a
Dataset or group just created; grants from the index are safe, as a revocation
is followed by a reconcile of everything it affects. Every grant and refusal is
an audit record (log event `audit.data_access`) and a Kubernetes Event.
"""
from __future__ import annotations

import asyncio
import datetime
from typing import Any, Mapping

import kopf
import structlog

from analysis_operator.domain import GROUP, TERMINAL_PHASES, VERSION, API_VERSION, Dataset, Environment, Flavor, \
    Mount, Phase
from analysis_operator.handlers.environments import apply, now, reference
from analysis_operator.handlers.indexes import EnvironmentRecord, first, member_of
from analysis_operator.kube import KubeClient
from analysis_operator.policy.access import AccessPlan, StaticCatalogue, pid_key, plan_access
from analysis_operator.policy.requests import Rejection
from analysis_operator.reconcile import converge

log = structlog.get_logger("analysis_operator.datasets")
TERMINAL = {phase.value for phase in TERMINAL_PHASES}
# Phases in which an environment has (or had, and would again on resume) its data mounted.
STARTED = {Phase.PROVISIONING.value, Phase.READY.value, Phase.SUSPENDED.value, Phase.STOPPING.value}


# ---------------------------------------------------------------- indexes


@kopf.index(GROUP, VERSION, "datasets")
def datasets(name: str, spec: Mapping[str, Any], **_: Any) -> dict[str, Dataset]:
    return {name: Dataset.from_body(name, spec)}


@kopf.index(GROUP, VERSION, "datasets")
def dataset_pids(name: str, spec: Mapping[str, Any], **_: Any) -> dict[str, str]:
    """PID (in its compared form) -> Dataset name, for references by PID."""
    return {pid_key(str(spec.get("pid", ""))): name}


class IndexCatalogue:
    """The policy's Catalogue over kopf's indexes (datasets, dataset_pids, groups)."""

    def __init__(self, datasets_index: kopf.Index, pids_index: kopf.Index, groups_index: kopf.Index) -> None:
        self._datasets, self._pids, self._groups = datasets_index, pids_index, groups_index

    def dataset(self, name: str) -> Dataset | None:
        return first(self._datasets, name)

    def with_pid(self, pid: str) -> tuple[Dataset, ...]:
        found = (first(self._datasets, name) for name in self._pids.get(pid_key(pid), ()))
        return tuple(dataset for dataset in found if dataset is not None)

    def groups_of(self, user: str) -> frozenset[str]:
        return frozenset(group for group in list(self._groups) if member_of(self._groups, group, user))


async def api_catalogue(kube: KubeClient) -> StaticCatalogue:
    """The catalogue as the API server has it now."""
    dataset_bodies, group_bodies = await asyncio.gather(kube.list_cluster_objects("datasets"),
                                                        kube.list_cluster_objects("facilitygroups"))
    return StaticCatalogue(
        datasets=tuple(Dataset.from_body(body["metadata"]["name"], body.get("spec") or {}) for body in dataset_bodies),
        groups={body["metadata"]["name"]: frozenset((body.get("spec") or {}).get("members") or ())
                for body in group_bodies})


# ---------------------------------------------------------------- audit


def audit(environment: Environment, plan: AccessPlan, stage: str, **context: Any) -> None:
    """One structured record per dataset decided: who, which dataset, decision, reason."""
    where = f"{environment.namespace}/{environment.name}"
    for mount in plan.mounts:
        log.info("audit.data_access", stage=stage, environment=where, owner=environment.owner,
                 dataset=mount.dataset.name, pid=mount.dataset.pid, mount_path=mount.path,
                 decision="granted", reason=mount.grounds, **context)
    for refusal in plan.refusals:
        log.warning("audit.data_access", stage=stage, environment=where, owner=environment.owner,
                    dataset=refusal.reference, decision="refused", reason=refusal.reason,
                    message=refusal.message, **context)


def describe_mounts(mounts: tuple[Mount, ...]) -> str:
    return "; ".join(f"{mount.dataset.name} ({mount.dataset.pid}) at {mount.path}, {mount.grounds}"
                     for mount in mounts)


# ---------------------------------------------------------------- reconcile and mounts


class DataAccess:
    """The converge gate (`check`) and the backends' source of mounts (`granted`)."""

    def __init__(self, kube: KubeClient, indexes: Mapping[str, kopf.Index]) -> None:
        self._kube = kube
        self._catalogue = IndexCatalogue(indexes["datasets"], indexes["dataset_pids"], indexes["groups"])

    async def plan(self, environment: Environment, flavor: Flavor | None, moment: datetime.datetime) -> AccessPlan:
        plan = plan_access(environment, flavor, self._catalogue, moment)
        if plan.allowed:
            return plan
        return plan_access(environment, flavor, await api_catalogue(self._kube), moment)  # confirm before refusing

    async def check(self, environment: Environment, flavor: Flavor, status: Mapping[str, Any],
                    now: datetime.datetime) -> Rejection | None:
        plan = await self.plan(environment, flavor, now)
        if plan.allowed:
            return None
        audit(environment, plan, stage="reconcile")
        if status.get("phase") in STARTED or status.get("startedAt"):  # it ran, or was queued to
            return Rejection("AccessRevoked", f"access withdrawn, the environment was stopped: {plan.message()}",
                             phase=Phase.STOPPED)
        return Rejection(plan.refusals[0].reason, plan.message())

    async def granted(self, environment: Environment, flavor: Flavor) -> tuple[Mount, ...]:
        """What the pod, job or VM mounts, decided now; recorded as the grant."""
        if not environment.datasets:
            return ()
        plan = await self.plan(environment, flavor, now())
        if not plan.allowed:  # changed since the gate ran a moment ago: the next reconcile stops it
            raise kopf.TemporaryError(f"data access changed while starting: {plan.message()}", delay=1)
        audit(environment, plan, stage="mount")
        await _post(self._kube, reference(environment), "Normal", "DatasetsMounted",
                    f"mounted read-only: {describe_mounts(plan.mounts)}")
        return plan.mounts


async def _post(kube: KubeClient, involved: dict[str, Any], type_: str, reason: str, message: str) -> None:
    try:
        await kube.post_event(involved, type_, reason, message)
    except Exception as error:  # a lost Event must not undo the decision; the audit log has it
        log.warning("event.not_posted", reason=reason, error=repr(error))


# ---------------------------------------------------------------- admission


async def check_data_access(body: kopf.Body, name: str, namespace: str, spec: kopf.Spec, dryrun: bool,
                            userinfo: dict[str, Any], memo: kopf.Memo, flavors: kopf.Index,
                            datasets: kopf.Index, dataset_pids: kopf.Index, groups: kopf.Index,
                            **_: Any) -> None:
    """Refuse datasets the owner may not read, bad mount paths, and flavors the owner may not use."""
    environment = Environment.from_body({
        "metadata": {"namespace": namespace, "name": name, "uid": body.metadata.get("uid") or ""},
        "spec": dict(spec)})
    flavor = first(flavors, environment.flavor)  # unknown flavor: not refused here, the environment waits
    access = DataAccess(memo.context.kube, {"datasets": datasets, "dataset_pids": dataset_pids, "groups": groups})
    plan = await access.plan(environment, flavor, now())
    audit(environment, plan, stage="admission", requester=userinfo.get("username"), dry_run=dryrun)
    if plan.allowed:
        return
    if not dryrun:
        involved = {"apiVersion": API_VERSION, "kind": "AnalysisEnvironment",
                    "metadata": {"namespace": namespace, "name": name}}
        for refusal in plan.refusals:
            await _post(memo.context.kube, involved, "Warning", refusal.reason,
                        f"refused at admission: {refusal.message}")
    raise kopf.AdmissionError(plan.message(), code=403)


# ---------------------------------------------------------------- revocation


def affected(record: EnvironmentRecord, flavors: kopf.Index, catalogue: IndexCatalogue,
             moment: datetime.datetime) -> bool:
    """Does this live environment now hold something it may not? (in memory, no API call)"""
    phase = record.status.get("phase")
    if not phase or phase in TERMINAL or record.environment.deleting:
        return False
    flavor = first(flavors, record.environment.flavor)
    if not record.environment.datasets and (flavor is None or not flavor.access.restricted):
        return False
    return not plan_access(record.environment, flavor, catalogue, moment).allowed


@kopf.on.event(GROUP, VERSION, "datasets")
@kopf.on.event(GROUP, VERSION, "facilitygroups")
@kopf.on.event(GROUP, VERSION, "environmentflavors")
async def on_catalogue_change(type: str, memo: kopf.Memo, environments: kopf.Index, flavors: kopf.Index,
                              datasets: kopf.Index, dataset_pids: kopf.Index, groups: kopf.Index,
                              **_: Any) -> None:
    """A Dataset, group or flavor changed or went: stop the environments that lost access now."""
    if type not in ("MODIFIED", "DELETED"):
        return  # something new grants, never withdraws
    moment = now()
    catalogue = IndexCatalogue(datasets, dataset_pids, groups)
    records = [first(environments, key) for key in list(environments)]
    for record in records:
        if record is None or not affected(record, flavors, catalogue, moment):
            continue
        environment = record.environment
        outcome = await converge(memo.context, environment, record.status, first(flavors, environment.flavor), moment)
        await apply(memo.context, environment, outcome)
