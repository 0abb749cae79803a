"""Status of an AnalysisEnvironment as pure functions: phase, conditions, patches."""
from __future__ import annotations

import datetime
from typing import Any, Mapping

from analysis_operator.backends.base import Observation, State
from analysis_operator.domain import Phase, format_time

# Backend states as environment phases, while the environment should run.
PHASE_OF_STATE = {
    State.PENDING: Phase.PENDING,
    State.PROVISIONING: Phase.PROVISIONING,
    State.READY: Phase.READY,
    State.FAILED: Phase.FAILED,
    State.EXPIRED: Phase.EXPIRED,
    State.GONE: Phase.PROVISIONING,
}


def build_condition(previous: Mapping[str, Any] | None, *, type_: str, status: bool, reason: str,
                    message: str, generation: int, now: datetime.datetime) -> dict[str, Any]:
    word = "True" if status else "False"
    unchanged = previous is not None and previous.get("status") == word
    return {
        "type": type_,
        "status": word,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": previous["lastTransitionTime"] if unchanged and previous.get("lastTransitionTime")
        else format_time(now),
    }


def merge_conditions(current: list[Mapping[str, Any]] | None, *updates: dict[str, Any]) -> list[dict[str, Any]]:
    by_type = {condition["type"]: dict(condition) for condition in current or ()}
    for update in updates:
        by_type[update["type"]] = update
    return list(by_type.values())


def build_transition(status: Mapping[str, Any] | None, *, phase: Phase, reason: str, message: str,
                     generation: int, now: datetime.datetime, **fields: Any) -> dict[str, Any] | None:
    """The status merge patch moving to `phase`, or None if status already says it.

    Only phase, reason, message and observedGeneration decide whether to write:
    details such as the backend's own state word ride along with the next real
    transition instead of costing a write each. A field given as None is removed.
    """
    status = status or {}
    wanted = {"phase": phase.value, "reason": reason, "message": message, "observedGeneration": generation}
    if all(status.get(key) == value for key, value in wanted.items()):
        return None
    wanted.update({key: value for key, value in fields.items() if value is not None or key in status})
    previous = {c.get("type"): c for c in status.get("conditions") or ()}
    ready = build_condition(previous.get("Ready"), type_="Ready", status=phase is Phase.READY,
                            reason=reason, message=message, generation=generation, now=now)
    wanted["conditions"] = merge_conditions(status.get("conditions"), ready)
    return wanted


def phase_from_observation(observation: Observation) -> Phase:
    return PHASE_OF_STATE[observation.state]


# Each backend's own words for its reference, as the CRD's status.backend fields.
_REFERENCE_FIELDS = {"jobId": "id", "serverId": "id", "novaStatus": "state", "jobState": "state",
                     "name": "name", "id": "id", "state": "state", "node": "node", "host": "node",
                     "addresses": "addresses", "startTime": "startedAt"}


def backend_status(kind: str, observation: Observation) -> dict[str, Any]:
    status: dict[str, Any] = {"kind": kind}
    for key, value in observation.reference.items():
        field = _REFERENCE_FIELDS.get(key)
        if not field or value in (None, "", []):
            continue
        status[field] = [str(address) for address in value] if field == "addresses" else str(value)
    if observation.cpus or observation.gpus:  # a Slurm job or VM holding resources: what budgets charge
        status.update(allocatedCpus=observation.cpus, allocatedGpus=observation.gpus)
    return status
