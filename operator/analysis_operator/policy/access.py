"""Who may read which dataset, and use which flavor, and where data appears (pure).

Facility data is FAIR but not all public: raw data is embargoed (typically
three years) and readable only by the experiment's team until then. These
functions decide, from the catalogue (Datasets and FacilityGroups) and the
clock passed in, exactly which datasets an environment mounts; admission and
every reconcile ask the same questions, so they give the same answers.

The rules, in order, for a user and a dataset at time `now`:
  1. no such Dataset (by name, or by PID): refused, DatasetNotFound
  2. access level public: granted
  3. embargoed, and the embargo has ended (now >= embargoedUntil): granted, no edit needed
  4. the user is listed in access.members: granted
  5. the user is a member of a FacilityGroup listed in access.groups: granted
  6. otherwise refused, DatasetEmbargoed
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from analysis_operator.model.domain import (
    EMBARGO_UNREADABLE,
    Dataset,
    DatasetRef,
    Environment,
    Flavor,
    Mount,
    format_time,
)
from analysis_operator.policy.refusal import Refusal

DATA_ROOT = "/data"
MAX_MOUNT_PATH = 255
_SEGMENT = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
# DOIs and other Handles: a numeric dotted prefix (10.5072, 20.500.12345), a slash, a suffix.
_HANDLE = re.compile(r"^[0-9]+(\.[0-9]+)+/[A-Za-z0-9._;()/:-]+$")
# A facility's own identifier: "<facility>:<local id>", e.g. "esrf:ES-1234-raw".
_FACILITY_PID = re.compile(r"^[a-z][a-z0-9-]*:[A-Za-z0-9][A-Za-z0-9._/-]*$")


# ---------------------------------------------------------------- identifiers and paths


def pid_problem(pid: str) -> str | None:
    """Why this is not a persistent identifier the catalogue accepts, or None."""
    if pid.lower().startswith(("http://", "https://", "doi:", "hdl:")):
        return f"pid {pid!r}: store the bare identifier, without 'doi:' or a resolver URL (e.g. 10.5072/p11-20231234)"
    if _HANDLE.fullmatch(pid) or _FACILITY_PID.fullmatch(pid):
        return None
    return (
        f"pid {pid!r} is neither a DOI/Handle (10.5072/p11-20231234, 20.500.12345/abc) "
        f"nor a facility PID (esrf:ES-1234)"
    )


def pid_key(pid: str) -> str:
    """The form PIDs are compared in: DOIs and Handles are case-insensitive, facility PIDs are not."""
    return pid.lower() if _HANDLE.fullmatch(pid) else pid


def mount_path_problem(path: str) -> str | None:
    """Why this mount path is unsafe, or None: it must be a plain path under /data."""
    if len(path) > MAX_MOUNT_PATH:
        return f"mountPath is longer than {MAX_MOUNT_PATH} characters"
    if not path.startswith(DATA_ROOT + "/"):
        return f"mountPath {path!r} is not under {DATA_ROOT}/"
    for segment in path[len(DATA_ROOT) + 1 :].split("/"):
        if segment in ("", ".", ".."):
            return f"mountPath {path!r} holds an empty, '.' or '..' part: write the plain path"
        if not _SEGMENT.fullmatch(segment):
            return f"mountPath {path!r}: each part may hold only letters, digits, '.', '_' and '-'"
    return None


def default_mount_path(dataset_name: str) -> str:
    return f"{DATA_ROOT}/{dataset_name}"


def collisions(paths: Sequence[str]) -> list[str]:
    """Messages for paths that are equal or nested: each mount must be its own directory,
    or one dataset would hide part of another."""
    problems = []
    for index, path in enumerate(paths):
        for other in paths[:index]:
            if path == other:
                problems.append(f"two datasets would be mounted at {path}: give each its own mountPath")
            elif path.startswith(other + "/") or other.startswith(path + "/"):
                inner, outer = (path, other) if path.startswith(other + "/") else (other, path)
                problems.append(f"mountPath {inner} is inside {outer}: datasets cannot be nested")
    return problems


# ---------------------------------------------------------------- decisions


def may_read(dataset: Dataset, user: str, user_groups: frozenset[str], now: datetime.datetime) -> Refusal | str:
    """May `user` (member of `user_groups`) read `dataset` at `now`? The grounds if so ("public", ...)."""
    if dataset.embargoed_until is None:
        return "public"
    if now >= dataset.embargoed_until:
        return f"embargo ended {format_time(dataset.embargoed_until)}"
    if user in dataset.members:
        return "team member"
    shared = sorted(dataset.groups & user_groups)
    if shared:
        return f"member of group {shared[0]}"
    if dataset.embargoed_until == EMBARGO_UNREADABLE:
        return Refusal(
            "DatasetEmbargoed",
            subject=dataset.name,
            message=(
                f"dataset {dataset.name!r} ({dataset.pid}) is embargoed and the end of its embargo cannot be read "
                f"({dataset.problem}): only its experiment team may read it until the facility corrects it"
            ),
        )
    teams = ", ".join(sorted(dataset.groups)) or "none"
    return Refusal(
        "DatasetEmbargoed",
        subject=dataset.name,
        message=(
            f"dataset {dataset.name!r} ({dataset.pid}) is embargoed until {format_time(dataset.embargoed_until)} "
            f"and readable only by its experiment team: user {user!r} is not among its members nor in its "
            f"groups ({teams}); ask the experiment's principal investigator to add you, or wait for the embargo to end"
        ),
    )


def may_use_flavor(flavor: Flavor, user: str, user_groups: frozenset[str]) -> Refusal | str:
    access = flavor.access
    if not access.restricted:
        return "open flavor"
    if user in access.users:
        return "listed user"
    shared = sorted(access.groups & user_groups)
    if shared:
        return f"member of group {shared[0]}"
    rule = ", ".join(
        [*(f"group {group}" for group in sorted(access.groups)), *(f"user {name}" for name in sorted(access.users))]
    )
    return Refusal(
        "FlavorNotAllowed",
        subject=flavor.name,
        message=(
            f"flavor {flavor.name!r} is restricted (spec.access) to {rule}: user {user!r} is none of them; "
            f"choose another flavor or ask the facility to add you to one of those groups"
        ),
    )


# ---------------------------------------------------------------- the whole environment


class Catalogue(Protocol):
    """What the decisions read: Datasets by name and PID, FacilityGroup membership."""

    def dataset(self, name: str) -> Dataset | None: ...

    def with_pid(self, pid: str) -> tuple[Dataset, ...]: ...

    def groups_of(self, user: str) -> frozenset[str]: ...


@dataclass(frozen=True)
class StaticCatalogue:
    """A catalogue held in plain data (a listing from the API, or a test's)."""

    datasets: tuple[Dataset, ...] = ()
    groups: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def dataset(self, name: str) -> Dataset | None:
        return next((dataset for dataset in self.datasets if dataset.name == name), None)

    def with_pid(self, pid: str) -> tuple[Dataset, ...]:
        return tuple(dataset for dataset in self.datasets if pid_key(dataset.pid) == pid_key(pid))

    def groups_of(self, user: str) -> frozenset[str]:
        return frozenset(name for name, members in self.groups.items() if user in members)


@dataclass(frozen=True)
class AccessPlan:
    """What an environment may have: the mounts granted, and every refusal."""

    mounts: tuple[Mount, ...] = ()
    refusals: tuple[Refusal, ...] = ()

    @property
    def allowed(self) -> bool:
        return not self.refusals

    def message(self) -> str:
        return "; ".join(refusal.message for refusal in self.refusals)


def resolve(reference_name: str, reference_pid: str, catalogue: Catalogue) -> tuple[Dataset | None, str]:
    """The Dataset a reference means, or None and why not."""
    if reference_name:
        dataset = catalogue.dataset(reference_name)
        if dataset is None:
            return None, (
                f"dataset {reference_name!r} does not exist: "
                f"see `kubectl get datasets` for the names the facility registered"
            )
        return dataset, ""
    found = catalogue.with_pid(reference_pid)
    if len(found) == 1:
        return found[0], ""
    if not found:
        return None, f"no Dataset has the PID {reference_pid!r}: see `kubectl get datasets` (column PID)"
    names = ", ".join(sorted(dataset.name for dataset in found))
    return None, f"the PID {reference_pid!r} is registered twice ({names}): name the dataset by name"


# Why a backend cannot reach a dataset's storage (None: it can); each backend sees data its own way.
Reach = Callable[[Dataset], "str | None"]


def plan_access(
    environment: Environment,
    flavor: Flavor | None,
    catalogue: Catalogue,
    now: datetime.datetime,
    reach: Reach | None = None,
) -> AccessPlan:
    """Decide every dataset of an environment, its mount paths, and its flavor, for its owner.
    `reach` is the flavor's backend's view of where data lives (None: not checked)."""
    user = environment.owner
    refusals: list[Refusal] = []
    candidates: list[tuple[DatasetRef, Mount]] = []
    needs_groups = (flavor is not None and flavor.access.groups) or environment.datasets
    user_groups = catalogue.groups_of(user) if needs_groups else frozenset()
    if flavor is not None:
        verdict = may_use_flavor(flavor, user, user_groups)
        if isinstance(verdict, Refusal):
            refusals.append(verdict)
    for reference in environment.datasets:
        if reference.mount_path and (problem := mount_path_problem(reference.mount_path)):
            refusals.append(Refusal("InvalidMountPath", problem, subject=reference.reference))
            continue
        dataset, why_not = resolve(reference.name, reference.pid, catalogue)
        if dataset is None:
            reason = "DatasetNotFound" if "registered twice" not in why_not else "DatasetAmbiguous"
            refusals.append(Refusal(reason, why_not, subject=reference.reference))
            continue
        verdict = may_read(dataset, user, user_groups, now)
        if isinstance(verdict, Refusal):
            refusals.append(Refusal(verdict.reason, verdict.message, subject=reference.reference))
            continue
        if reach is not None and (problem := reach(dataset)):
            refusals.append(
                Refusal(
                    "DatasetNotAvailable",
                    f"{problem}: pick a flavor on another backend or ask the facility",
                    subject=reference.reference,
                )
            )
            continue
        path = reference.mount_path or default_mount_path(dataset.name)
        candidates.append((reference, Mount(dataset, path, verdict)))
    refusals.extend(_listing_problems(candidates))
    if refusals:
        return AccessPlan(refusals=tuple(refusals))
    return AccessPlan(mounts=tuple(mount for _, mount in candidates))


def _listing_problems(candidates: Sequence[tuple[DatasetRef, Mount]]) -> list[Refusal]:
    """The same dataset twice (once by name, once by PID), and colliding mount paths."""
    problems = []
    seen: dict[str, str] = {}
    for reference, mount in candidates:
        if mount.dataset.name in seen:
            problems.append(
                Refusal(
                    "DatasetListedTwice",
                    f"dataset {mount.dataset.name!r} is listed twice "
                    f"(as {seen[mount.dataset.name]!r} and as {reference.reference!r})",
                    subject=mount.dataset.name,
                )
            )
        seen.setdefault(mount.dataset.name, reference.reference)
    problems.extend(
        Refusal("MountPathCollision", message, subject=DATA_ROOT)
        for message in collisions([mount.path for _, mount in candidates])
    )
    return problems
