"""The one interface every backend implements, and all the engine knows of backends.

A backend turns (environment, flavor, access token, granted mounts) into a
running thing and reports what it sees as an `Observation`. The engine
(engine/converge.py) decides with those alone: it never asks which backend it
talks to, and no module outside backends/ knows a backend's own states or
reasons. A fourth backend is one more module here and one line in the
registry (backends/registry.py); tests/unit/test_backend_interface.py plugs an
in-memory one into the engine without touching anything else.

Level-triggered: `ensure` is called on every reconcile and must converge
(create with a deterministic identity, treat "already exists" as success,
adopt what it finds); `suspend`, `resume` and `delete` must be safe to call
again and again.
"""

from __future__ import annotations

import datetime
import enum
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Protocol

from analysis_operator.infra.server_tls import ServerCertificate
from analysis_operator.model.domain import Dataset, Environment, Flavor, Mount
from analysis_operator.model.identity import PosixIdentity
from analysis_operator.policy.refusal import Refusal


class State(enum.StrEnum):
    PENDING = "Pending"  # accepted by the backend, waiting (queue, scheduling)
    PROVISIONING = "Provisioning"  # starting up
    READY = "Ready"  # reachable at `url`
    SUSPENDED = "Suspended"  # stopped with what resuming needs kept (a shelved VM's disk)
    FAILED = "Failed"  # will not become ready without a change
    EXPIRED = "Expired"  # the backend ended it for its time limit
    GONE = "Gone"  # nothing exists on the backend side

    @property
    def holds(self) -> bool:
        """Does something run (or wait to run) on the backend, holding or about to hold resources?"""
        return self in (State.PENDING, State.PROVISIONING, State.READY)


class Charging(enum.StrEnum):
    """How a backend's environments are charged to their ComputeBudget."""

    FLAVOR = "flavor"  # the flavor's resources, from the moment the budget slot is taken (pods)
    ALLOCATION = "allocation"  # what the backend reports holding (Observation.cpus/gpus), only while held


@dataclass(frozen=True)
class Upstream:
    """Where the gateway sends an environment's traffic (engine/routes.py makes the route to it).

    Either an IP address and port (a compute node, a VM: the operator makes a Service without
    selector and an EndpointSlice for it) or a Service of the environment's own (pods)."""

    port: int
    address: str = ""  # an IP address, never a hostname (EndpointSlices hold addresses)
    service: str = ""  # or: the environment's own Service, which already selects its server
    landing: str = ""  # what OPEN shows, relative to the environment's base path ("lab", "vnc.html?...")
    strip_prefix: bool = False  # the server serves at "/" (noVNC), not under the base path (JupyterLab)
    # TLS to the server, checked against the environment's own certificate for this name (a Slurm job's
    # JupyterLab, infra/server_tls.py); "" for plain HTTP
    server_name: str = ""
    # which certificate the server was given (infra/server_tls.certificate_id), when its text says so:
    # one that is not the stored one cannot be opened (engine/converge.py replaces it); "" when not known
    certificate_id: str = ""


@dataclass(frozen=True)
class Observation:
    state: State
    reason: str = ""  # CamelCase, for conditions and Events
    message: str = ""  # for people
    # status.backend in the CRD's own words: id, name, state, node, addresses, startedAt
    reference: dict[str, Any] = field(default_factory=dict)
    url: str = ""  # connection URL once Ready, never holding the token
    cpus: float = 0.0  # resources held right now, for accounting
    gpus: int = 0
    upstream: Upstream | None = None  # where a gateway reaches it once Ready (None: nowhere)
    attention: bool = False  # it waits on something only a person can fix: told as a Warning Event
    # its work runs now and holds what its flavor asks, whether or not its server answers (what a
    # backend charged by the flavor is charged for: accounting); Ready or not
    runs: bool = False


@dataclass(frozen=True)
class Launch:
    """Everything the engine decided for starting an environment: backends add no decisions of their own."""

    environment: Environment
    flavor: Flavor
    token: str  # the access token (its Secret is the engine's)
    mounts: tuple[Mount, ...] = ()  # exactly the datasets granted, read-only
    identity: PosixIdentity | None = None  # who it runs as; None: the backend's documented default
    # when the engine ends it (status.expiresAt): a backend's own time limit need not run past it
    expires_at: datetime.datetime | None = None
    # a new key and certificate for the server, the certificate stored for the gateway and the operator
    # to check (infra/server_tls.py): for a backend whose server listens where others could listen after it
    certificate: Callable[[], Awaitable[ServerCertificate]] | None = None
    # the id of a certificate the running server holds that is not the stored one (engine/converge.py): a
    # server holding it is not adopted, a new one is started in its place (only backends whose Upstream
    # names a certificate_id are given one)
    stale_certificate: str = ""


@dataclass(frozen=True)
class ManagedObject:
    """Something a backend created, found by its identity (for orphan sweeps)."""

    namespace: str
    name: str
    uid: str
    backend_id: str


class Backend(Protocol):
    @property
    def kind(self) -> str:
        """The key flavors name in spec.backend."""

    @property
    def needs_finalizer(self) -> bool:
        """True: what runs lives outside Kubernetes, so the environment carries a finalizer and is
        deleted only once `delete` confirms; False: owner references and garbage collection suffice."""

    @property
    def polled(self) -> bool:
        """True: nothing pushes state changes to the operator, so the sweep observes it every round."""

    @property
    def charging(self) -> Charging:
        """How its environments are charged to their ComputeBudget."""

    def validate(self, environment: Environment, flavor: Flavor) -> Refusal | None:
        """What this backend requires of a request beyond the common rules (pure)."""

    def dataset_problem(self, dataset: Dataset) -> str | None:
        """Why this backend cannot reach the dataset's storage, or None (pure)."""

    async def ensure(self, launch: Launch) -> Observation:
        """Create or adopt the running thing exactly as `launch` says; return what is seen now."""

    async def observe(self, environment: Environment) -> Observation:
        """What the backend says about this environment now (no changes)."""

    async def suspend(self, environment: Environment) -> Observation:
        """Stop what runs, keeping what `resume` needs; return what is seen now."""

    async def resume(self, launch: Launch) -> Observation:
        """Run a suspended environment again (GONE if there was nothing to resume: then `ensure`)."""

    async def extend(self, environment: Environment, until: datetime.datetime) -> bool:
        """Let what runs last until `until` (an approved lifetime extension moved expiresAt); True if
        that changed anything. Called on every pass while something runs: must be cheap when nothing
        is to change. Backends without a time limit of their own return False."""

    async def delete(self, environment: Environment) -> bool:
        """Remove everything of it; True once confirmed gone."""

    async def list_managed(self) -> list[ManagedObject]:
        """Everything this operator created on the backend, for orphan sweeps."""

    def forget(self, uids: Collection[str]) -> None:
        """These environments are gone (their objects deleted): drop what this process kept for them."""

    async def repair(self, live: Collection[str]) -> None:
        """Make again what someone deleted under live environments (uids `live`) and nothing would
        otherwise make again (Context.repair, with the orphan sweep)."""

    def close(self) -> None:
        """Release threads and connections at operator shutdown."""


class BackendUnavailable(Exception):
    """The backend cannot be reached now; retry later, nothing is lost."""


class Retry(Exception):
    """Not now: converge again after `delay` seconds (kopf's retry, or the reconciler's requeue)."""

    def __init__(self, message: str, delay: float) -> None:
        super().__init__(message)
        self.delay = delay
