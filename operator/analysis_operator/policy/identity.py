"""Who is asking, may they name this owner, and whom does the environment run as? (pure)

The owner of an environment is a facility user ID. It comes from the
admission request's userInfo, which the API server authenticated: an
ordinary user may only create environments owned by themselves; a trusted
identity (the portal's ServiceAccount, a platform engineer's group) may
create them on behalf of a named user.

The environment then runs as that owner's POSIX identity (`posix_identity`):
the uid and primary gid of their FacilityUser, and as supplementary groups
the gids of the FacilityGroups that grant the datasets it mounts. So the
facility's own file permissions (per-proposal groups) apply inside the pod,
the VM and the Slurm job, beside the operator's read-only mounts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from analysis_operator.model.domain import Mount
from analysis_operator.model.identity import FacilityUser, PosixIdentity
from analysis_operator.policy.refusal import Refusal
from analysis_operator.settings import AdmissionSettings, IdentitySettings


def requester(userinfo: Mapping[str, Any], settings: AdmissionSettings) -> str:
    """The facility user ID of the authenticated requester."""
    username = str(userinfo.get("username") or "")
    if settings.username_prefix and username.startswith(settings.username_prefix):
        return username[len(settings.username_prefix) :]
    return username


def is_trusted(userinfo: Mapping[str, Any], settings: AdmissionSettings) -> bool:
    groups = set(userinfo.get("groups") or ())
    return userinfo.get("username") in settings.trusted_users or bool(groups & set(settings.trusted_groups))


def owner_refusal(owner: str, userinfo: Mapping[str, Any], settings: AdmissionSettings) -> Refusal | None:
    """Why this requester may not create an environment for this owner, or None."""
    if is_trusted(userinfo, settings):
        return None
    me = requester(userinfo, settings)
    if owner == me:
        return None
    return Refusal(
        "NotOwner",
        f"spec.owner {owner!r} is not you ({me!r}): you may only create environments you own; "
        f"only the portal acts on behalf of other users",
        subject=owner,
    )


# ---------------------------------------------------------------- the POSIX identity an environment runs as


class Directory(Protocol):
    """The facility's directory as the catalogue models it: FacilityUsers, FacilityGroup members and gids."""

    def user(self, user_id: str) -> FacilityUser | None: ...

    def groups_of(self, user_id: str) -> frozenset[str]: ...

    def gid(self, group: str) -> int | None: ...


@dataclass(frozen=True)
class StaticDirectory:
    """A directory held in plain data (a listing from the API server, or a test's)."""

    users: Mapping[str, FacilityUser] = field(default_factory=dict)
    members: Mapping[str, frozenset[str]] = field(default_factory=dict)  # FacilityGroup -> its members
    gids: Mapping[str, int] = field(default_factory=dict)  # FacilityGroup -> its gid, where it has one

    def user(self, user_id: str) -> FacilityUser | None:
        return self.users.get(user_id)

    def groups_of(self, user_id: str) -> frozenset[str]:
        return frozenset(group for group, members in self.members.items() if user_id in members)

    def gid(self, group: str) -> int | None:
        return self.gids.get(group)


def granting_groups(owner: str, directory: Directory, mounts: Sequence[Mount]) -> tuple[tuple[int, str], ...]:
    """(gid, FacilityGroup) of every group with a gid that grants the owner a mounted dataset: the
    dataset lists it in spec.access.groups and the owner is a member. Whatever the grounds the
    access policy recorded (the embargo may have ended, the data be public): on the facility's
    file systems a proposal's files stay group-owned, and the owner holds that gid in the
    directory anyway. Groups that grant nothing mounted here are left out."""
    mine = directory.groups_of(owner)
    found: dict[int, str] = {}
    for group in sorted({group for mount in mounts for group in mount.dataset.groups} & mine):
        gid = directory.gid(group)
        if gid is not None:
            found.setdefault(gid, group)
    return tuple(sorted(found.items()))


def posix_identity(
    owner: str, directory: Directory, mounts: Sequence[Mount], settings: IdentitySettings
) -> PosixIdentity | Refusal | None:
    """Who the owner's environment runs as: their FacilityUser's uid and gid, with the gids of the
    groups that grant its mounted datasets; None: the backends' default account (only when
    identity.require_posix_identity is off); or why it cannot run."""
    user = directory.user(owner)
    if user is None:
        if not settings.require_posix_identity:
            return None
        return Refusal(
            "NoPosixIdentity",
            subject=owner,
            message=(
                f"user {owner!r} has no FacilityUser: the facility's directory sync has not registered their POSIX "
                f"identity (uid, gid), and environments here run only as their owner's own account; ask the "
                f"facility's user office or IT to register {owner!r} in the directory (a FacilityUser named "
                f"{owner!r}), then create the environment again"
            ),
        )
    problems = list(user.problems)
    if user.uid and user.uid < settings.min_uid:
        problems.append(
            f"uid {user.uid} is below {settings.min_uid}, the first uid of a person here "
            f"(setting identity.min_uid): lower ones are system accounts"
        )
    if problems:
        return Refusal(
            "InvalidPosixIdentity",
            subject=owner,
            message=(
                f"the FacilityUser of user {owner!r} cannot be used: {'; '.join(problems)}; ask the facility's "
                f"user office or IT to correct it in the directory"
            ),
        )
    groups = granting_groups(owner, directory, mounts)
    return PosixIdentity(
        user=user.username,
        uid=user.uid,
        gid=user.gid,
        groups=tuple(gid for gid, _ in groups),
        group_names=tuple(name for _, name in groups),
    )
