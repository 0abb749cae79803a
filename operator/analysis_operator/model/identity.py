"""Who an environment runs as on every backend: the owner's POSIX identity (pure data).

The facility's directory (LDAP, FreeIPA, the user office's IdM) is the source:
the facility syncs one cluster-scoped `FacilityUser` per user (uid, primary gid,
Unix account name; crds/facilityusers.yaml) and a `gid` on each FacilityGroup
that is a POSIX group on its file systems (crds/facilitygroups.yaml). Both are
read here without raising: a value that is not a usable id is a problem named
in words, never an exception and never a guess.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

POSIX_ID_MAX = 2**31 - 1  # what every kernel and file system here takes as a uid or gid
UNIX_NAME = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")  # useradd's portable names, at most 32 characters


@dataclass(frozen=True)
class PosixIdentity:
    """The owner as the facility's file systems know them: the pod's runAsUser/runAsGroup and
    supplementalGroups, the Slurm job's Unix account, the VM desktop user."""

    user: str  # the Unix account name
    uid: int
    gid: int  # primary group
    groups: tuple[int, ...] = ()  # supplementary groups (e.g. the groups that grant their data)
    group_names: tuple[str, ...] = ()  # the FacilityGroup naming each of `groups`, same order (VMs create them)

    def named_groups(self) -> tuple[tuple[int, str], ...]:
        """(gid, name) for each supplementary group; a group with no name known is called g<gid>."""
        names = (*self.group_names, *(f"g{gid}" for gid in self.groups[len(self.group_names) :]))
        return tuple(zip(self.groups, names, strict=False))


def parse_posix_id(value: Any) -> int | None:
    """A uid or gid as the CRDs allow it (1 .. 2^31-1; 0 is root's), else None. Never raises."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 1 <= value <= POSIX_ID_MAX else None


@dataclass(frozen=True)
class FacilityUser:
    """A FacilityUser object: the facility user ID (its name) and their POSIX account."""

    name: str  # the facility user ID, as in AnalysisEnvironment spec.owner
    uid: int
    gid: int
    username: str  # the Unix account name (spec.username, default the name)
    problems: tuple[str, ...] = ()  # why it cannot be used as it is; empty: usable

    @classmethod
    def from_body(cls, name: str, spec: Mapping[str, Any]) -> FacilityUser:
        """Never raises: what cannot be read is 0 or empty and named in `problems`."""
        spec = spec if isinstance(spec, Mapping) else {}
        problems = []
        uid, gid = parse_posix_id(spec.get("uid")), parse_posix_id(spec.get("gid"))
        if uid is None:
            problems.append(f"spec.uid {spec.get('uid')!r} is not a user ID from 1 to {POSIX_ID_MAX} (0 would be root)")
        if gid is None:
            problems.append(
                f"spec.gid {spec.get('gid')!r} is not a group ID from 1 to {POSIX_ID_MAX} (0 would be root's group)"
            )
        username = spec.get("username") or name
        if not isinstance(username, str) or not UNIX_NAME.fullmatch(username):
            problems.append(
                f"the Unix account name {username!r} is not valid (lowercase letters, digits, "
                f"'_', '.', '-', at most 32 characters, not starting with a digit): set spec.username"
            )
            username = ""
        return cls(name=name, uid=uid or 0, gid=gid or 0, username=username, problems=tuple(problems))
