"""Typed views of the custom resources, and small pure helpers on them.

Everything here is plain data: no I/O, no clock. Handlers turn the raw
Kubernetes bodies into these once, and everything below them works on these.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import functools
import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

GROUP = "analysis.panosc.eu"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Labels put on every object the operator creates, so it can find its children
# (indexes, orphan sweeps) without listing everything.
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "analysis-operator"
MANAGED_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGER}"  # the same, as a label selector
LABEL_ENVIRONMENT = f"{GROUP}/environment"
LABEL_ENVIRONMENT_UID = f"{GROUP}/environment-uid"
LABEL_OWNER = f"{GROUP}/owner"
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_HASHED = "sha256_"  # "_" is never part of a Kubernetes object name: no name reads as a hash


def label_text(text: str) -> str:
    """`text` as a label value or label name: itself when it is one (at most 63 characters of
    letters, digits, '-', '_', '.'), else sha256_ and the first 56 hex digits of its SHA-256."""
    if len(text) <= 63 and _LABEL_NAME.match(text):
        return text
    return _HASHED + hashlib.sha256(text.encode()).hexdigest()[:56]


# Set on environments whose backend lives outside Kubernetes (slurm, openstack):
# it makes kopf add a finalizer, so the job or VM is removed before the object goes.
LABEL_BACKEND = f"{GROUP}/backend"
FINALIZER = f"{GROUP}/finalizer"  # the operator's (kopf's: handlers/lifecycle.py), on those with LABEL_BACKEND


class Phase(str, enum.Enum):  # noqa: UP042  (str() of a phase is relied on as the enum's)
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


# Durations are days, hours, minutes, seconds in that order ("8h", "1d12h", "90m"). The CRDs
# allow at most 4, 5, 6 and 8 digits and a total between MIN_DURATION and MAX_DURATION; the
# parser takes any number of digits (objects stored before the CRDs had bounds) and never
# overflows: whatever it reads is capped at MAX_DURATION.
_DURATION = re.compile(r"(?:([0-9]+)d)?(?:([0-9]+)h)?(?:([0-9]+)m)?(?:([0-9]+)s)?")
MIN_DURATION = datetime.timedelta(seconds=1)
MAX_DURATION = datetime.timedelta(days=366)
_UNIT_SECONDS = (86400, 3600, 60, 1)
DURATION_HINT = "use a duration such as 8h, 90m or 1d12h (days, hours, minutes, seconds, in that order)"


def _duration_seconds(text: str) -> int:
    match = _DURATION.fullmatch(text) if isinstance(text, str) and text else None
    if match is None:
        raise ValueError(f"invalid duration {text!r}: {DURATION_HINT}")
    return sum(int(part or 0) * unit for part, unit in zip(match.groups(), _UNIT_SECONDS, strict=True))


def parse_duration(text: str) -> datetime.timedelta:
    """Parse '8h', '1d12h', '90m', '30s' into a timedelta, at most MAX_DURATION (the CRDs'
    ceiling): a longer one reads as the ceiling. ValueError (in words) for anything else."""
    if isinstance(text, str):  # the sweep reads the same few durations of every environment
        return _parse_duration(text)
    _duration_seconds(text)  # raises, in words
    raise AssertionError("unreachable")


@functools.lru_cache(maxsize=4096)
def _parse_duration(text: str) -> datetime.timedelta:
    seconds = _duration_seconds(text)  # a Python int: no overflow however many digits
    return datetime.timedelta(seconds=min(seconds, int(MAX_DURATION.total_seconds())))


def duration_problem(text: str, field_name: str) -> str | None:
    """Why `text` is not a duration the CRDs accept for `field_name`, in words; None if it is."""
    try:
        seconds = _duration_seconds(text)
    except ValueError:
        return f"{field_name} {text!r} is not a duration: {DURATION_HINT}"
    if seconds < MIN_DURATION.total_seconds():
        return f"{field_name} {text!r} is zero: a duration is at least 1s"
    if seconds > MAX_DURATION.total_seconds():
        return f"{field_name} {text!r} is longer than {MAX_DURATION.days} days, the most the operator accepts"
    return None


def read_duration(text: str, field_name: str) -> tuple[datetime.timedelta, str | None]:
    """A duration field of a stored object, never raising: the value within [MIN_DURATION,
    MAX_DURATION] (unreadable text reads as MIN_DURATION, the safe side for a lifetime) and
    what was wrong with it, if anything."""
    problem = duration_problem(text, field_name)
    try:
        value = parse_duration(text)
    except ValueError:
        value = MIN_DURATION
    return max(value, MIN_DURATION), problem


def format_time(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime.datetime | None:
    """The operator's own timestamps (format_time); see parse_timestamp for what people write.
    Cached: the sweep and the idle check read every environment's times every round."""
    if not text:
        return None
    return _parse_time(text)


@functools.lru_cache(maxsize=65536)
def _parse_time(text: str) -> datetime.datetime:
    if len(text) != 20 or text[10] != "T" or text[-1] != "Z":
        raise ValueError(f"time data {text!r} does not match format '%Y-%m-%dT%H:%M:%SZ'")
    return datetime.datetime.fromisoformat(text[:-1]).replace(tzinfo=datetime.UTC)


def parse_timestamp(text: str) -> datetime.datetime:
    """An RFC 3339 time as people write it (2027-03-01T12:00:00Z, with fractions or an offset),
    in UTC. ValueError in words, never a Python message, for anything else."""
    try:
        moment = datetime.datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in "zZ" and text else text)
    except (TypeError, ValueError):
        raise ValueError(f"{text!r} is not a time such as 2027-03-01T12:00:00Z") from None
    if moment.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone: end it with Z (UTC), e.g. 2027-03-01T12:00:00Z")
    return moment.astimezone(datetime.UTC)


# A Kubernetes quantity: a decimal number, then a binary (Ki) or decimal (k, m) suffix or a
# decimal exponent (1e3), as the API server accepts it.
_QUANTITY = re.compile(r"((?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?")
_SUFFIX = {
    None: 1.0,
    "n": 1e-9,
    "u": 1e-6,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2.0**10,
    "Mi": 2.0**20,
    "Gi": 2.0**30,
    "Ti": 2.0**40,
    "Pi": 2.0**50,
    "Ei": 2.0**60,
}


def parse_quantity(text: str | int | float) -> float:
    """A Kubernetes quantity ('500m', '16Gi', '1e3', 2) as a number of base units (finite).
    ValueError for anything else."""
    match = _QUANTITY.fullmatch(str(text))
    if not match:
        raise ValueError(f"invalid quantity {text!r}: use e.g. 500m, 2 or 16Gi")
    number, suffix = match.groups()
    if suffix is not None and len(suffix) > 1 and suffix[0] in "eE":  # an exponent, not E (exa)
        value = float(number + suffix)  # float() of text saturates to inf, it never raises on size
    else:
        value = float(number) * _SUFFIX[suffix]
    if not math.isfinite(value):
        raise ValueError(f"invalid quantity {text!r}: too large")
    return value


def _number_text(value: Any, default: str) -> str:
    """A number from the API (1, 0.5, 1e-05) as quantity text without an exponent."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return default
    if isinstance(value, str):
        return value
    if isinstance(value, int) or value.is_integer():
        return str(int(value)) if math.isfinite(value) else default
    return format(decimal.Decimal(repr(value)), "f")


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
    idle_timeout: datetime.timedelta | None = None  # None: never culled for idleness
    idle_warn_before: datetime.timedelta | None = None  # None: the default (policy/idle.py)
    idle_action: str = "Suspend"  # or "Stop"
    slurm: SlurmSpec = field(default_factory=SlurmSpec)
    openstack: OpenStackSpec = field(default_factory=OpenStackSpec)
    access: FlavorAccess = field(default_factory=lambda: FlavorAccess())

    problems: tuple[str, ...] = ()  # what from_body could not read (and read on the safe side instead)

    @classmethod
    def from_body(cls, name: str, spec: Mapping[str, Any]) -> Flavor:
        """Never raises: anything the CRD lets through reads as written; anything else (an object
        stored before the CRD had its bounds) reads as a default and is named in `problems`."""
        problems: list[str] = []
        resources, slurm, openstack = (_mapping(spec.get(key)) for key in ("resources", "slurm", "openstack"))
        idle = spec.get("idleTimeout")
        max_lifetime, problem = read_duration(str(spec.get("maxLifetime") or "8h"), "spec.maxLifetime")
        idle_timeout, idle_problem = read_duration(str(idle), "spec.idleTimeout") if idle else (None, None)
        warn = spec.get("idleWarnBefore")
        idle_warn_before, warn_problem = read_duration(str(warn), "spec.idleWarnBefore") if warn else (None, None)
        if warn_problem:
            problems.append(warn_problem)
        idle_action = _text(spec.get("idleAction")) or "Suspend"
        if idle_action not in ("Suspend", "Stop"):
            problems.append(f"spec.idleAction {idle_action!r} is neither Suspend nor Stop: read as Suspend")
            idle_action = "Suspend"
        time_limit = slurm.get("timeLimitMinutes")
        backend = _text(spec.get("backend"))
        problems.extend(p for p in (problem, idle_problem, None if backend else "spec.backend is missing") if p)
        return cls(
            name=name,
            backend=backend,
            display_name=_text(spec.get("displayName")),
            resources=Resources(
                cpu=_quantity_text(resources.get("cpu", 1), "1", "spec.resources.cpu", problems),
                memory=_quantity_text(resources.get("memory", "16Gi"), "16Gi", "spec.resources.memory", problems),
                gpu=_count(resources.get("gpu", 0), 0, "spec.resources.gpu", problems),
            ),
            image=_text(spec.get("image")),
            allow_custom_image=spec.get("allowCustomImage") is True,
            max_lifetime=max_lifetime,
            idle_timeout=idle_timeout,
            idle_warn_before=idle_warn_before,
            idle_action=idle_action,
            slurm=SlurmSpec(
                partition=_text(slurm.get("partition")),
                account=_text(slurm.get("account")),
                time_limit_minutes=None
                if time_limit is None
                else _count(time_limit, None, "spec.slurm.timeLimitMinutes", problems),
                qos=_text(slurm.get("qos")),
                modules=_texts(slurm.get("modules")),
            ),
            openstack=OpenStackSpec(
                flavor=_text(openstack.get("flavor")),
                image=_text(openstack.get("image")),
                network=_text(openstack.get("network")),
                key_name=_text(openstack.get("keyName")),
            ),
            access=FlavorAccess.from_spec(_mapping(spec.get("access"))),
            problems=tuple(problems),
        )


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def finalizing(metadata: Mapping[str, Any]) -> bool:
    """Is the environment being deleted and its deletion waiting on the operator's finalizer, that is on
    its backend to confirm its Slurm job or VM gone (handlers/environments.on_environment_deleted)?
    That may take hours (slurmrestd or OpenStack not answering, a cancel refused), and the job or VM
    runs on meanwhile: it keeps its budget slot and is charged until the finalizer goes
    (engine/budget_gate.py). Pure, and cheap: a kopf filter calls it for every event."""
    return bool(metadata.get("deletionTimestamp")) and FINALIZER in _texts(metadata.get("finalizers"))


def _texts(value: Any) -> tuple[str, ...]:
    return tuple(item for item in value if isinstance(item, str)) if isinstance(value, (list, tuple)) else ()


def _quantity_text(value: Any, default: str, field_name: str, problems: list[str]) -> str:
    """Quantity text that parse_quantity reads, from a number (cpu: 0.5) or text (memory: 16Gi)."""
    text = _number_text(value, "")
    try:
        if parse_quantity(text) > 0:
            return text
    except ValueError:
        pass
    problems.append(f"{field_name} {value!r} is not a positive Kubernetes quantity; read as {default}")
    return default


def _count(value: Any, default: Any, field_name: str, problems: list[str]) -> Any:
    """A whole number at least 0, or the default (and a problem)."""
    try:
        number = (
            int(value) if not isinstance(value, bool) and (not isinstance(value, float) or value.is_integer()) else None
        )
    except (TypeError, ValueError, OverflowError):
        number = None
    if number is None or number < 0:
        problems.append(f"{field_name} {value!r} is not a whole number; read as {default}")
        return default
    return number


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
    deleting: bool = False  # deletionTimestamp set: only the finalizer's cleanup may act now
    finalizing: bool = False  # deleting, and the operator's finalizer still on: its backend has not said it is gone
    budget: str = ""  # ComputeBudget named in spec.budget; "" = the owner's personal one
    shared_users: frozenset[str] = frozenset()  # spec.sharing: who besides the owner may open it
    shared_groups: frozenset[str] = frozenset()

    problems: tuple[str, ...] = ()  # what from_body could not read (and read on the safe side instead)

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Environment:
        """Never raises. The lifetime is None (the flavor's) or within [MIN_DURATION, MAX_DURATION]:
        "0s" is a lifetime of one second, never "no lifetime"; a longer one (stored before the CRD
        had its ceiling) reads as the ceiling, which no flavor allows, and is named in `problems`."""
        metadata, spec = _mapping(body.get("metadata")), _mapping(body.get("spec"))
        text = spec.get("lifetime")
        lifetime, problem = (None, None) if text is None or text == "" else read_duration(str(text), "spec.lifetime")
        return cls(
            namespace=_text(metadata.get("namespace")),
            name=_text(metadata.get("name")),
            uid=_text(metadata.get("uid")),
            owner=_text(spec.get("owner")),
            flavor=_text(spec.get("flavor")),
            image=_text(spec.get("image")),
            datasets=tuple(
                DatasetRef(
                    name=_text(ref.get("name")), mount_path=_text(ref.get("mountPath")), pid=_text(ref.get("pid"))
                )
                for ref in spec.get("datasets") or ()
                if isinstance(ref, Mapping)
            ),
            lifetime=lifetime,
            suspend=spec.get("suspend") is True,
            generation=_count(metadata.get("generation", 0), 0, "metadata.generation", []),
            deleting=bool(metadata.get("deletionTimestamp")),
            finalizing=finalizing(metadata),
            budget=_text(spec.get("budget")),
            shared_users=frozenset(_texts(_mapping(spec.get("sharing")).get("users"))),
            shared_groups=frozenset(_texts(_mapping(spec.get("sharing")).get("groups"))),
            problems=(problem,) if problem else (),
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
    def from_spec(cls, access: Mapping[str, Any]) -> FlavorAccess:
        return cls(users=frozenset(_texts(access.get("users"))), groups=frozenset(_texts(access.get("groups"))))


_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_UTC_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
# An embargo whose end cannot be read has not ended: its team keeps access, nobody else gains it.
EMBARGO_UNREADABLE = datetime.datetime.max.replace(tzinfo=datetime.UTC)


def parse_embargo(text: str | None) -> datetime.datetime | None:
    """'2027-03-01' (the start of that day, UTC) or '2027-03-01T12:00:00Z'. ValueError in words
    (never Python's "day is out of range for month") for anything else, e.g. '2026-02-30'."""
    if not text:
        return None
    form = "%Y-%m-%d" if _DATE.fullmatch(text) else "%Y-%m-%dT%H:%M:%SZ" if _UTC_TIME.fullmatch(text) else ""
    if not form:
        raise ValueError(f"{text!r} is not a date such as 2027-03-01 nor a UTC time such as 2027-03-01T12:00:00Z")
    try:
        return datetime.datetime.strptime(text, form).replace(tzinfo=datetime.UTC)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a real {'date' if len(text) == 10 else 'time'} (no such day or hour in the calendar)"
        ) from None


@dataclass(frozen=True)
class DatasetStorage:
    """Where a dataset lives, as each backend sees it (spec.storage)."""

    claim_name: str = ""  # PersistentVolumeClaim in the environment's namespace (kubernetes)
    sub_path: str = ""  # the dataset's directory inside that claim
    nfs_server: str = ""  # NFS export: kubernetes when there is no claim, and VMs
    nfs_path: str = ""
    path: str = ""  # the same data as a path on the Slurm cluster's nodes

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
    embargoed_until: datetime.datetime | None = None  # None: public
    members: frozenset[str] = frozenset()  # user IDs who may read it during the embargo
    groups: frozenset[str] = frozenset()  # FacilityGroups who may read it during the embargo

    problem: str = ""  # what from_body could not read; an unreadable embargo has not ended

    @classmethod
    def from_body(cls, name: str, spec: Mapping[str, Any]) -> Dataset:
        """Never raises: an embargo whose end cannot be read (or is missing) is read as not ended
        (EMBARGO_UNREADABLE) and named in `problem`, so one bad Dataset affects only itself."""
        storage = _mapping(spec.get("storage"))
        claim = _mapping(storage.get("persistentVolumeClaim"))
        nfs = _mapping(storage.get("nfs"))
        access = _mapping(spec.get("access"))
        embargoed_until, problem = None, ""
        if access.get("level") != "public":  # embargoed, or a level this operator does not know: closed
            try:
                embargoed_until = parse_embargo(_text(access.get("embargoedUntil"))) or EMBARGO_UNREADABLE
                if embargoed_until is EMBARGO_UNREADABLE:
                    problem = "spec.access.embargoedUntil is missing"
            except ValueError as error:
                embargoed_until, problem = EMBARGO_UNREADABLE, f"spec.access.embargoedUntil {error}"
        return cls(
            name=name,
            pid=_text(spec.get("pid")),
            title=_text(spec.get("title")),
            size=_text(spec.get("size")),
            storage=DatasetStorage(
                claim_name=_text(claim.get("claimName")),
                sub_path=_text(claim.get("subPath")),
                nfs_server=_text(nfs.get("server")),
                nfs_path=_text(nfs.get("path")),
                path=_text(storage.get("path")),
            ),
            embargoed_until=embargoed_until,
            members=frozenset(_texts(access.get("members"))),
            groups=frozenset(_texts(access.get("groups"))),
            problem=problem,
        )


@dataclass(frozen=True)
class Mount:
    """A dataset granted to an environment: where it appears, and on what grounds."""

    dataset: Dataset
    path: str
    grounds: str = ""  # e.g. "public", "embargo ended", "team member", "group p11-20231234"
