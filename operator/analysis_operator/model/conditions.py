"""Status conditions and phase transitions as pure functions (Kubernetes' condition conventions)."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

from analysis_operator.model.domain import TERMINAL_PHASES, Phase, format_time


def build_condition(
    previous: Mapping[str, Any] | None,
    *,
    type_: str,
    status: bool,
    reason: str,
    message: str,
    generation: int,
    now: datetime.datetime,
) -> dict[str, Any]:
    word = "True" if status else "False"
    unchanged = previous is not None and previous.get("status") == word
    return {
        "type": type_,
        "status": word,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": previous["lastTransitionTime"]
        if unchanged and previous is not None and previous.get("lastTransitionTime")
        else format_time(now),
    }


def merge_conditions(current: list[Mapping[str, Any]] | None, *updates: dict[str, Any]) -> list[dict[str, Any]]:
    by_type = {condition["type"]: dict(condition) for condition in current or ()}
    for update in updates:
        by_type[update["type"]] = update
    return list(by_type.values())


def apply_merge_patch(target: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """`target` with a JSON merge patch applied (RFC 7386: None removes a key, a mapping merges, anything
    else replaces); neither argument is changed."""
    merged = dict(target)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping):
            current = merged.get(key)
            merged[key] = apply_merge_patch(current if isinstance(current, Mapping) else {}, value)
        else:
            merged[key] = value
    return merged


def compose_merge_patches(first: Mapping[str, Any], second: Mapping[str, Any]) -> dict[str, Any]:
    """One merge patch with the effect of `first` then `second` (RFC 7386); a None (remove) is kept,
    for the server to apply. Neither argument is changed."""
    composed = dict(first)
    for key, value in second.items():
        current = composed.get(key)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            composed[key] = compose_merge_patches(current, value)
        else:
            composed[key] = value
    return composed


def build_transition(
    status: Mapping[str, Any] | None,
    *,
    phase: Phase,
    reason: str,
    message: str,
    generation: int,
    now: datetime.datetime,
    **fields: Any,
) -> dict[str, Any] | None:
    """The status merge patch moving to `phase`, or None if status already says it.

    Only phase, reason, message and observedGeneration decide whether to write:
    details such as the backend's own state word ride along with the next real
    transition instead of costing a write each. A field given as None is removed.

    Conditions: Ready (True only in phase Ready) and, once the environment is in a
    terminal phase (Rejected, Failed, Expired, Stopped, BudgetExhausted), Stalled
    True with the phase's reason: nothing more will happen to it, which `kubectl wait
    --for=condition=Stalled` and kstatus-based health checks (Argo CD, Flux) understand
    as a final answer instead of waiting for Ready until they time out. Stalled is not
    written before that (an environment never leaves a terminal phase).
    """
    status = status or {}
    wanted: dict[str, Any] = {
        "phase": phase.value,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
    }
    if all(status.get(key) == value for key, value in wanted.items()):
        return None
    wanted.update({key: value for key, value in fields.items() if value is not None or key in status})
    previous = {c.get("type"): c for c in status.get("conditions") or ()}
    ready = build_condition(
        previous.get("Ready"),
        type_="Ready",
        status=phase is Phase.READY,
        reason=reason,
        message=message,
        generation=generation,
        now=now,
    )
    updates = [ready]
    if phase in TERMINAL_PHASES or "Stalled" in previous:
        updates.append(
            build_condition(
                previous.get("Stalled"),
                type_="Stalled",
                status=phase in TERMINAL_PHASES,
                reason=reason,
                message=message,
                generation=generation,
                now=now,
            )
        )
    wanted["conditions"] = merge_conditions(status.get("conditions"), *updates)
    return wanted
