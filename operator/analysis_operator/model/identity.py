"""Who an environment runs as on every backend: the owner's POSIX identity (pure data)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PosixIdentity:
    """The owner as the facility's file systems know them: the pod's runAsUser/runAsGroup and
    supplementalGroups, the Slurm job's Unix account, the VM desktop user."""

    user: str  # the Unix account name
    uid: int
    gid: int  # primary group
    groups: tuple[int, ...] = ()  # supplementary groups (e.g. the groups that grant their data)
