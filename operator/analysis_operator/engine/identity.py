"""Who an environment runs as, at admission and on every reconcile (converge's Identities).

One policy (policy/identity.py `posix_identity`) over the facility's directory
as kopf's indexes hold it: FacilityUsers by name (handlers/identity.py), the
members of each FacilityGroup (handlers/indexes.py) and their gids
(handlers/identity.py). Asked:
  - at admission (handlers/admission.py): an owner without a usable
    FacilityUser is refused when identity.require_posix_identity is on;
  - on every reconcile (`DirectoryIdentities.posix`): a webhook can be
    bypassed and the directory can change, so nothing starts without it; the
    identity it returns is what converge hands the backend in the Launch.

Like data access, a refusal read from an index is confirmed against the API
server first: a FacilityUser synced a moment ago is never refused for lag.

The identity is used when something is started (created, resumed, recreated
after its pod was deleted): a running pod or VM keeps the identity it started
with even if the directory changes its uid or groups. An environment whose
owner loses their FacilityUser altogether is stopped (phase Stopped, reason
NoPosixIdentity), as one whose owner loses access to its data.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import structlog

from analysis_operator.engine.views import Index, first, member_of
from analysis_operator.infra.kube import KubeClient
from analysis_operator.model.domain import Environment, Mount, Phase
from analysis_operator.model.identity import FacilityUser, PosixIdentity, parse_posix_id
from analysis_operator.policy.identity import StaticDirectory, posix_identity
from analysis_operator.policy.refusal import Refusal
from analysis_operator.settings import IdentitySettings

log = structlog.get_logger("analysis_operator.identity")


class IndexDirectory:
    """The policy's Directory over kopf's indexes (facility_users, groups, group_gids)."""

    def __init__(self, users_index: Index, groups_index: Index, gids_index: Index) -> None:
        self._users, self._groups, self._gids = users_index, groups_index, gids_index

    def user(self, user_id: str) -> FacilityUser | None:
        found: FacilityUser | None = first(self._users, user_id)
        return found

    def groups_of(self, user_id: str) -> frozenset[str]:
        return frozenset(group for group in list(self._groups) if member_of(self._groups, group, user_id))

    def gid(self, group: str) -> int | None:
        found: int | None = first(self._gids, group)
        return found


async def api_directory(kube: KubeClient, user_id: str) -> StaticDirectory:
    """The owner's FacilityUser and the FacilityGroups as the API server has them now."""
    body, group_bodies = await asyncio.gather(
        kube.get_cluster_object("facilityusers", user_id), kube.list_cluster_objects("facilitygroups")
    )
    users = {user_id: FacilityUser.from_body(user_id, body.get("spec") or {})} if body else {}
    members, gids = {}, {}
    for group in group_bodies:
        name, spec = group["metadata"]["name"], group.get("spec") or {}
        members[name] = frozenset(member for member in spec.get("members") or () if isinstance(member, str))
        gid = parse_posix_id(spec.get("gid"))
        if gid is not None:
            gids[name] = gid
    return StaticDirectory(users=users, members=members, gids=gids)


class DirectoryIdentities:
    """converge's Identities: the owner's POSIX identity from the facility's directory."""

    def __init__(
        self, kube: KubeClient, settings: IdentitySettings, indexes: Mapping[str, Index], environments: Index
    ) -> None:
        self._kube, self._settings, self._environments = kube, settings, environments
        self.directory = IndexDirectory(indexes["facility_users"], indexes["groups"], indexes["group_gids"])

    async def decide(self, owner: str, mounts: tuple[Mount, ...] = ()) -> PosixIdentity | Refusal | None:
        decision = posix_identity(owner, self.directory, mounts, self._settings)
        if isinstance(decision, Refusal):  # confirm: the index may lag a FacilityUser just synced
            decision = posix_identity(owner, await api_directory(self._kube, owner), mounts, self._settings)
        return decision

    async def admit(self, owner: str) -> Refusal | None:
        """Admission: may an environment of this owner run at all? (groups are decided at start)"""
        decision = await self.decide(owner)
        return decision if isinstance(decision, Refusal) else None

    async def posix(self, environment: Environment, mounts: tuple[Mount, ...]) -> PosixIdentity | Refusal | None:
        decision = await self.decide(environment.owner, mounts)
        if not isinstance(decision, Refusal):
            return decision
        where = f"{environment.namespace}/{environment.name}"
        log.warning(
            "identity.refused",
            environment=where,
            owner=environment.owner,
            reason=decision.reason,
            message=decision.message,
        )
        record = first(self._environments, (environment.namespace, environment.name))
        if record is not None and record.environment.uid == environment.uid and record.status.get("startedAt"):
            return Refusal(
                decision.reason,
                f"the environment was stopped: {decision.message}",
                phase=Phase.STOPPED,
                subject=decision.subject,
            )
        return decision
