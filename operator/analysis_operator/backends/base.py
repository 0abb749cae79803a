"""The one small interface every backend implements.

A backend turns (environment, flavor, access token) into a running thing and
reports what it sees. It is level-triggered: `ensure` is called on every
reconcile and must converge (create with a deterministic identity, treat
"already exists" as success, adopt what it finds); `delete` must be safe to
call again and again until it reports the thing gone.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol

from analysis_operator.domain import Environment, Flavor, Mount


class State(str, enum.Enum):
    PENDING = "Pending"            # accepted by the backend, waiting (queue, scheduling)
    PROVISIONING = "Provisioning"  # starting up
    READY = "Ready"                # reachable at `url`
    FAILED = "Failed"              # will not become ready without a change
    EXPIRED = "Expired"            # the backend ended it for its time limit
    GONE = "Gone"                  # nothing exists on the backend side


@dataclass(frozen=True)
class Observation:
    state: State
    reason: str = ""                # CamelCase, for conditions and Events
    message: str = ""               # for people
    reference: dict[str, Any] = field(default_factory=dict)  # status.backend, e.g. {"jobId": "42"}
    url: str = ""                   # connection URL once Ready, never holding the token
    cpus: float = 0.0               # resources held right now, for accounting
    gpus: int = 0


@dataclass(frozen=True)
class ManagedObject:
    """Something a backend created, found by its identity (for orphan sweeps)."""
    namespace: str
    name: str
    uid: str
    backend_id: str


class Backend(Protocol):
    kind: str

    async def ensure(self, environment: Environment, flavor: Flavor, token: str) -> Observation:
        """Create or adopt the running thing; return what is seen now."""

    async def observe(self, environment: Environment) -> Observation:
        """What the backend says about this environment now (no changes)."""

    async def delete(self, environment: Environment) -> bool:
        """Remove it; True once confirmed gone."""

    async def list_managed(self) -> list[ManagedObject]:
        """Everything this operator created on the backend, for orphan sweeps."""


class BackendUnavailable(Exception):
    """The backend cannot be reached now; retry later, nothing is lost."""


# The datasets an environment may mount, decided and recorded by the data-access
# policy (handlers/datasets.py) at the moment a backend creates the pod, job or VM.
GrantedMounts = Callable[[Environment, Flavor], Awaitable[tuple[Mount, ...]]]


async def no_datasets(environment: Environment, flavor: Flavor) -> tuple[Mount, ...]:
    """For backends built without the data-access policy (backend tests): never mount blindly."""
    if environment.datasets:
        raise ValueError(f"{environment.namespace}/{environment.name} lists datasets, "
                         "but this backend was built without a data-access policy")
    return ()
