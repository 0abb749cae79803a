"""What a backend's Observation means for an environment's status (pure)."""

from __future__ import annotations

from typing import Any

from analysis_operator.backends.base import Observation, State
from analysis_operator.model.domain import Phase

# Backend states as environment phases, while the environment should run.
PHASE_OF_STATE = {
    State.PENDING: Phase.PENDING,
    State.PROVISIONING: Phase.PROVISIONING,
    State.READY: Phase.READY,
    State.SUSPENDED: Phase.SUSPENDED,
    State.FAILED: Phase.FAILED,
    State.EXPIRED: Phase.EXPIRED,
    State.GONE: Phase.PROVISIONING,
}

# status.backend's fields (the CRD); backends report their reference in these words.
BACKEND_FIELDS = ("name", "id", "state", "node", "addresses", "startedAt")


def phase_from_observation(observation: Observation) -> Phase:
    return PHASE_OF_STATE[observation.state]


def backend_status(kind: str, observation: Observation) -> dict[str, Any]:
    """status.backend as a merge patch: a field the backend no longer reports is removed (None),
    so a suspended job does not keep showing RUNNING or the CPUs it held."""
    status: dict[str, Any] = {"kind": kind}
    for key in BACKEND_FIELDS:
        value = observation.reference.get(key)
        if value in (None, "", []):
            status[key] = None
        else:
            status[key] = [str(address) for address in value] if key == "addresses" else str(value)
    upstream = observation.upstream
    status["endpoint"] = f"{upstream.service or upstream.address}:{upstream.port}" if upstream is not None else None
    if upstream is None or not upstream.service:  # a pod's Service never speaks TLS: nothing to write or remove
        status["serverName"] = (upstream.server_name or None) if upstream is not None else None
    held = bool(observation.cpus or observation.gpus)  # what budgets charge backends that charge by allocation
    status.update(allocatedCpus=observation.cpus if held else None, allocatedGpus=observation.gpus if held else None)
    return status
