"""Typed views of the custom resources, and small pure helpers on them.

Everything here is plain data: no I/O, no clock. Handlers turn the raw
Kubernetes bodies into these once, and everything below them works on these.
"""
from __future__ import annotations

import datetime
import enum
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

GROUP = "analysis.panosc.eu"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Labels put on every object the operator creates, so it can find its children
# (indexes, orphan sweeps) without listing everything.
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "analysis-operator"
LABEL_ENVIRONMENT = f"{GROUP}/environment"
LABEL_ENVIRONMENT_UID = f"{GROUP}/environment-uid"
LABEL_OWNER = f"{GROUP}/owner"
# Set on environments whose backend lives outside Kubernetes (slurm, openstack):
# it makes kopf add a finalizer, so the job or VM is removed before the object goes.
LABEL_BACKEND = f"{GROUP}/backend"


class Phase(str, enum.Enum):
    PENDING = "Pending"
    PROVISIONING = "Provisioning"
    READY = "Ready"
    SUSPENDED = "Suspended"
    STOPPING = "Stopping"
    STOPPED = "Stopped"
    EXPIRED = "Expired"
    FAILED = "Failed"
    REJECTED = "Rejected"
    BUDGET_EXHAUSTED = "BudgetExhausted"  # stopped because its ComputeBudget ran out (policy/budgets.py)


# Phases after which nothing runs and nothing is recreated.
TERMINAL_PHASES = frozenset({Phase.STOPPED, Phase.EXPIRED, Phase.FAILED, Phase.REJECTED, Phase.BUDGET_EXHAUSTED})
_TERMINAL_WORDS = frozenset(phase.value for phase in TERMINAL_PHASES)


def is_terminal(phase: str | None) -> bool:
    """Is this status.phase one after which nothing runs and nothing is recreated?"""
    return phase in _TERMINAL_WORDS


class BackendKind(enum.StrEnum):
    """The backends this project ships. A flavor names its backend as a plain string (the key
    of the operator's backend registry), so another backend needs no change here."""

    KUBERNETES = "kubernetes"
    SLURM = "slurm"
    OPENSTACK = "openstack"


_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def parse_duration(text: str) -> datetime.timedelta:
    """Parse '8h', '1d12h', '90m', '30s' into a timedelta (the CRD pattern)."""
    match = _DURATION.fullmatch(text or "")
    if not text or not match:
        raise ValueError(f"invalid duration {text!r}: use e.g. '8h', '1d12h', '30m'")
    days, hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return datetime.timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)


def format_time(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)


_QUANTITY = re.compile(r"^([0-9.]+)(m|k|Ki|Mi|Gi|Ti|M|G|T)?$")
_SUFFIX = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def parse_quantity(text: str | int | float) -> float:
    """A Kubernetes quantity ('500m', '16Gi', 2) as a number of base units."""
    match = _QUANTITY.fullmatch(str(text))
    if not match:
        raise ValueError(f"invalid quantity {text!r}")
    return float(match.group(1)) * _SUFFIX[match.group(2)]


@dataclass(frozen=True)
class Resources:
    cpu: str = "1"
    memory: str = "16Gi"
    gpu: int = 0

    @property
    def cpus(self) -> float:
        return parse_quantity(self.cpu)

    @property
    def memory_mib(self) -> int:
        return int(parse_quantity(self.memory) // 2**20)


@dataclass(frozen=True)
class SlurmSpec:
    partition: str = ""
    account: str = ""
    time_limit_minutes: int | None = None
    qos: str = ""
    modules: tuple[str, ...] = ()


@dataclass(frozen=True)
class OpenStackSpec:
    flavor: str = ""
    image: str = ""
    network: str = ""
    key_name: str = ""


@dataclass(frozen=True)
class Flavor:
    name: str
    backend: str  # a key of the backend registry, e.g. BackendKind.SLURM
    display_name: str = ""
    resources: Resources = field(default_factory=Resources)
    image: str = ""
    allow_custom_image: bool = False
    max_lifetime: datetime.timedelta = datetime.timedelta(hours=8)
    idle_timeout: datetime.timedelta | None = None
    slurm: SlurmSpec = field(default_factory=SlurmSpec)
    openstack: OpenStackSpec = field(default_factory=OpenStackSpec)
    access: FlavorAccess = field(default_factory=lambda: FlavorAccess())

    @classmethod
    def from_body(cls, name: str, spec: Mapping[str, Any]) -> "Flavor":
        resources = spec.get("resources") or {}
        slurm = spec.get("slurm") or {}
        openstack = spec.get("openstack") or {}
        idle = spec.get("idleTimeout")
        return cls(
            name=name,
            backend=str(spec["backend"]),
            display_name=spec.get("displayName", ""),
            resources=Resources(
                cpu=str(resources.get("cpu", "1")),
                memory=str(resources.get("memory", "16Gi")),
                gpu=int(resources.get("gpu", 0)),
            ),
            image=spec.get("image", ""),
            allow_custom_image=bool(spec.get("allowCustomImage", False)),
            max_lifetime=parse_duration(spec.get("maxLifetime", "8h")),
            idle_timeout=parse_duration(idle) if idle else None,
            slurm=SlurmSpec(
                partition=slurm.get("partition", ""),
                account=slurm.get("account", ""),
                time_limit_minutes=slurm.get("timeLimitMinutes"),
                qos=slurm.get("qos", ""),
                modules=tuple(slurm.get("modules", ())),
            ),
            openstack=OpenStackSpec(
                flavor=openstack.get("flavor", ""),
                image=openstack.get("image", ""),
                network=openstack.get("network", ""),
                key_name=openstack.get("keyName", ""),
            ),
            access=FlavorAccess.from_spec(spec.get("access") or {}),
        )


@dataclass(frozen=True)
class DatasetRef:
    """One entry of spec.datasets: a Dataset by name, or by its persistent identifier."""
    name: str = ""
    mount_path: str = ""
    pid: str = ""

    @property
    def reference(self) -> str:
        """How the user named it, for messages."""
        return self.name or self.pid


@dataclass(frozen=True)
class Environment:
    namespace: str
    name: str
    uid: str
    owner: str
    flavor: str
    image: str = ""
    datasets: tuple[DatasetRef, ...] = ()
    lifetime: datetime.timedelta | None = None
    suspend: bool = False
    generation: int = 0
    deleting: bool = False      # deletionTimestamp set: only the finalizer's cleanup may act now
    budget: str = ""            # ComputeBudget named in spec.budget; "" = the owner's personal one

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> "Environment":
        metadata = body["metadata"]
        spec = body.get("spec") or {}
        lifetime = spec.get("lifetime")
        return cls(
            namespace=metadata["namespace"],
            name=metadata["name"],
            uid=metadata["uid"],
            owner=spec["owner"],
            flavor=spec["flavor"],
            image=spec.get("image", ""),
            datasets=tuple(
                DatasetRef(name=ref.get("name", ""), mount_path=ref.get("mountPath", ""), pid=ref.get("pid", ""))
                for ref in spec.get("datasets") or ()
            ),
            lifetime=parse_duration(lifetime) if lifetime else None,
            suspend=bool(spec.get("suspend", False)),
            generation=int(metadata.get("generation", 0)),
            deleting=bool(metadata.get("deletionTimestamp")),
            budget=spec.get("budget", ""),
        )

    @property
    def child_name(self) -> str:
        """Deterministic name of every child object (pod, service, secret, job, server)."""
        return f"aenv-{self.name}"

    @property
    def owner_references(self) -> list[dict[str, Any]]:
        """Makes the environment the controller of a child, so garbage collection removes it."""
        return [
            {
                "apiVersion": API_VERSION,
                "kind": "AnalysisEnvironment",
                "name": self.name,
                "uid": self.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]

    @property
    def identity_labels(self) -> dict[str, str]:
        return {
            LABEL_MANAGED_BY: MANAGER,
            LABEL_ENVIRONMENT: self.name,
            LABEL_ENVIRONMENT_UID: self.uid,
        }


@dataclass(frozen=True)
class FlavorAccess:
    """Who may use a flavor (spec.access): users by ID, or members of FacilityGroups
    (roles such as staff, approved proposals). Both empty: everyone."""
    users: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()

    @property
    def restricted(self) -> bool:
        return bool(self.users or self.groups)

    @classmethod
    def from_spec(cls, access: Mapping[str, Any]) -> "FlavorAccess":
        return cls(users=frozenset(access.get("users") or ()), groups=frozenset(access.get("groups") or ()))


def parse_embargo(text: str | None) -> datetime.datetime | None:
    """'2027-03-01' (the start of that day, UTC) or '2027-03-01T12:00:00Z'."""
    if not text:
        return None
    if len(text) == 10:
        return datetime.datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=datetime.timezone.utc)
    return parse_time(text)


@dataclass(frozen=True)
class DatasetStorage:
    """Where a dataset lives, as each backend sees it (spec.storage)."""
    claim_name: str = ""   # PersistentVolumeClaim in the environment's namespace (kubernetes)
    sub_path: str = ""     # the dataset's directory inside that claim
    nfs_server: str = ""   # NFS export: kubernetes when there is no claim, and VMs
    nfs_path: str = ""
    path: str = ""         # the same data as a path on the Slurm cluster's nodes

    @property
    def nfs_share(self) -> str:
        return f"{self.nfs_server}:{self.nfs_path}" if self.nfs_server and self.nfs_path else ""


@dataclass(frozen=True)
class Dataset:
    """A Dataset of the facility catalogue: what it is, where it lives, who may read it."""
    name: str
    pid: str
    title: str = ""
    size: str = ""
    storage: DatasetStorage = field(default_factory=DatasetStorage)
    embargoed_until: datetime.datetime | None = None   # None: public
    members: frozenset[str] = frozenset()               # user IDs who may read it during the embargo
    groups: frozenset[str] = frozenset()                # FacilityGroups who may read it during the embargo

    @classmethod
    def from_body(cls, name: str, spec: Mapping[str, Any]) -> "Dataset":
        storage = spec.get("storage") or {}
        claim = storage.get("persistentVolumeClaim") or {}
        nfs = storage.get("nfs") or {}
        access = spec.get("access") or {}
        embargoed = access.get("level") == "embargoed"
        return cls(
            name=name,
            pid=spec.get("pid", ""),
            title=spec.get("title", ""),
            size=str(spec.get("size", "")),
            storage=DatasetStorage(claim_name=claim.get("claimName", ""), sub_path=claim.get("subPath", ""),
                                   nfs_server=nfs.get("server", ""), nfs_path=nfs.get("path", ""),
                                   path=storage.get("path", "")),
            embargoed_until=parse_embargo(access.get("embargoedUntil")) if embargoed else None,
            members=frozenset(access.get("members") or ()),
            groups=frozenset(access.get("groups") or ()),
        )


@dataclass(frozen=True)
class Mount:
    """A dataset granted to an environment: where it appears, and on what grounds."""
    dataset: Dataset
    path: str
    grounds: str = ""   # e.g. "public", "embargo ended", "team member", "group p11-20231234"
