"""Data permissions at reconcile: the datasets an environment may mount, decided once per pass.

One policy (policy/access.py) asked at four moments:
  - admission (handlers/admission.py): refuse what the owner may not have;
  - every reconcile (`DataAccess.grant`): a webhook can be bypassed and access
    can change, so nothing starts or keeps running without it; the mounts it
    grants are exactly what converge hands the backend;
  - mount time (`DataAccess.mounted`): the grant is recorded (audit, Event);
  - catalogue changes (handlers/datasets.py): running environments that lost
    access are converged, and stopped, at once (`affected`).

Decisions read kopf's in-memory indexes. A refusal is confirmed against the
API server before it is acted on, since an index can lag a moment behind a
Dataset or group just created; grants from the index are safe, as a revocation
is followed by a reconcile of everything it affects. Every grant and refusal is
an audit record (log event `audit.data_access`).
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Mapping, Sequence
from typing import Any

import structlog

from analysis_operator.engine.events import environment_reference, post_event
from analysis_operator.engine.views import EnvironmentRecord, Index, first, member_of
from analysis_operator.infra.kube import KubeClient
from analysis_operator.model.domain import Dataset, Environment, Flavor, Mount, Phase, is_terminal
from analysis_operator.policy.access import AccessPlan, Reach, StaticCatalogue, pid_key, plan_access
from analysis_operator.policy.opening import sharing_refusals
from analysis_operator.policy.refusal import Refusal

log = structlog.get_logger("analysis_operator.data_access")
# Phases in which an environment has (or had, and would again on resume) its data mounted.
STARTED = {Phase.PROVISIONING.value, Phase.READY.value, Phase.SUSPENDED.value, Phase.STOPPING.value}


class IndexCatalogue:
    """The policy's Catalogue over kopf's indexes (datasets, dataset_pids, groups)."""

    def __init__(self, datasets_index: Index, pids_index: Index, groups_index: Index) -> None:
        self._datasets, self._pids, self._groups = datasets_index, pids_index, groups_index

    def dataset(self, name: str) -> Dataset | None:
        found: Dataset | None = first(self._datasets, name)
        return found

    def with_pid(self, pid: str) -> tuple[Dataset, ...]:
        found = (first(self._datasets, name) for name in self._pids.get(pid_key(pid), ()))
        return tuple(dataset for dataset in found if dataset is not None)

    def groups_of(self, user: str) -> frozenset[str]:
        return frozenset(group for group in list(self._groups) if member_of(self._groups, group, user))


async def api_catalogue(kube: KubeClient) -> StaticCatalogue:
    """The catalogue as the API server has it now."""
    dataset_bodies, group_bodies = await asyncio.gather(
        kube.list_cluster_objects("datasets"), kube.list_cluster_objects("facilitygroups")
    )
    return StaticCatalogue(
        datasets=tuple(Dataset.from_body(body["metadata"]["name"], body.get("spec") or {}) for body in dataset_bodies),
        groups={
            body["metadata"]["name"]: frozenset((body.get("spec") or {}).get("members") or ()) for body in group_bodies
        },
    )


def audit(environment: Environment, plan: AccessPlan, stage: str, **context: Any) -> None:
    """One structured record per dataset decided: who, which dataset, decision, reason."""
    where = f"{environment.namespace}/{environment.name}"
    for mount in plan.mounts:
        log.info(
            "audit.data_access",
            stage=stage,
            environment=where,
            owner=environment.owner,
            dataset=mount.dataset.name,
            pid=mount.dataset.pid,
            mount_path=mount.path,
            decision="granted",
            reason=mount.grounds,
            **context,
        )
    for refusal in plan.refusals:
        log.warning(
            "audit.data_access",
            stage=stage,
            environment=where,
            owner=environment.owner,
            dataset=refusal.subject,
            decision="refused",
            reason=refusal.reason,
            message=refusal.message,
            **context,
        )


def describe_mounts(mounts: Sequence[Mount]) -> str:
    return "; ".join(f"{mount.dataset.name} ({mount.dataset.pid}) at {mount.path}, {mount.grounds}" for mount in mounts)


ANNOUNCED_BOUND = 100_000  # uids remembered as announced (DataAccess.mounted); forgotten all at once beyond


class DataAccess:
    """converge's Access: the mounts granted now, or why not (engine/converge.py)."""

    def __init__(self, kube: KubeClient, indexes: Mapping[str, Index]) -> None:
        self._kube = kube
        self.catalogue = IndexCatalogue(indexes["datasets"], indexes["dataset_pids"], indexes["groups"])
        self._announced: set[str] = set()  # uids whose mounts were announced since their last launch

    async def plan(
        self, environment: Environment, flavor: Flavor | None, moment: datetime.datetime, reach: Reach | None = None
    ) -> AccessPlan:
        plan = plan_access(environment, flavor, self.catalogue, moment, reach)
        if plan.allowed:
            return plan
        # Confirm against the API server before refusing: the index may lag a new Dataset or group.
        return plan_access(environment, flavor, await api_catalogue(self._kube), moment, reach)

    async def grant(
        self, environment: Environment, flavor: Flavor, reach: Reach, status: Mapping[str, Any], now: datetime.datetime
    ) -> Refusal | tuple[Mount, ...]:
        if not environment.datasets and not flavor.access.restricted:
            return ()
        plan = await self.plan(environment, flavor, now, reach)
        if plan.allowed:
            return plan.mounts
        audit(environment, plan, stage="reconcile")
        if status.get("phase") in STARTED or status.get("startedAt"):  # it ran, or was queued to
            return Refusal(
                "AccessRevoked", f"access withdrawn, the environment was stopped: {plan.message()}", phase=Phase.STOPPED
            )
        return Refusal(plan.refusals[0].reason, plan.message())

    async def handed(self, environment: Environment, mounts: Sequence[Mount]) -> None:
        audit(environment, AccessPlan(mounts=tuple(mounts)), stage="mount")
        self._announced.discard(environment.uid)  # a new launch: its Ready announces the mounts again

    async def mounted(self, environment: Environment, mounts: Sequence[Mount]) -> None:
        """Once per launch: two converges that both see the step to Ready (the index a moment behind
        the first one's write) post one Event."""
        if environment.uid in self._announced:
            return
        if len(self._announced) >= ANNOUNCED_BOUND:
            self._announced.clear()
        self._announced.add(environment.uid)
        await post_event(
            self._kube,
            environment_reference(environment),
            "Normal",
            "DatasetsMounted",
            f"mounted read-only: {describe_mounts(mounts)}",
        )


def affected(record: EnvironmentRecord, flavors: Index, catalogue: IndexCatalogue, moment: datetime.datetime) -> bool:
    """Does this live environment now hold something it may not? (in memory, no API call)"""
    phase = record.status.get("phase")
    if not phase or is_terminal(phase) or record.environment.deleting:
        return False
    flavor = first(flavors, record.environment.flavor)
    if not record.environment.datasets and (flavor is None or not flavor.access.restricted):
        return False
    return not plan_access(record.environment, flavor, catalogue, moment).allowed


class Sharing:
    """spec.sharing at admission (policy/opening.py): the index first; a refusal is confirmed against
    the API server, since a FacilityUser, group or Dataset made a moment ago may not be indexed yet."""

    def __init__(self, kube: KubeClient, indexes: Mapping[str, Index], catalogue: IndexCatalogue) -> None:
        self._kube, self._users, self._groups, self._catalogue = (
            kube,
            indexes["facility_users"],
            indexes["groups"],
            catalogue,
        )

    async def check(self, environment: Environment, now: datetime.datetime) -> list[Refusal]:
        refusals = sharing_refusals(
            environment,
            self._catalogue,
            lambda user: first(self._users, user) is not None,
            lambda group: first(self._groups, group),
            now,
        )
        if not refusals:
            return refusals
        catalogue, users = await asyncio.gather(
            api_catalogue(self._kube), self._kube.list_cluster_objects("facilityusers")
        )
        known = {body["metadata"]["name"] for body in users}
        return sharing_refusals(environment, catalogue, known.__contains__, catalogue.groups.get, now)
