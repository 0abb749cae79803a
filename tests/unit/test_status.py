"""Status as pure functions: when to write, what the patch says, how conditions move."""

from __future__ import annotations

import datetime

import pytest

from analysis_operator.backends.base import Observation, State
from analysis_operator.engine.status import phase_from_observation
from analysis_operator.model.conditions import build_transition, merge_conditions
from analysis_operator.model.domain import Phase

NOW = datetime.datetime(2024, 3, 1, 12, 0, 0, tzinfo=datetime.UTC)
NOW_TEXT = "2024-03-01T12:00:00Z"
EARLIER = "2024-02-28T08:00:00Z"


def ready_condition(status: str, since: str = EARLIER, reason: str = "PodStarting", generation: int = 2) -> dict:
    return {
        "type": "Ready",
        "status": status,
        "reason": reason,
        "message": "m",
        "observedGeneration": generation,
        "lastTransitionTime": since,
    }


def current_status(
    phase="Provisioning", reason="PodStarting", message="JupyterLab is starting", generation=2, conditions=None, **extra
) -> dict:
    status = {"phase": phase, "reason": reason, "message": message, "observedGeneration": generation, **extra}
    if conditions is not None:
        status["conditions"] = conditions
    return status


def transition(
    status, phase=Phase.PROVISIONING, reason="PodStarting", message="JupyterLab is starting", generation=2, **fields
):
    return build_transition(
        status, phase=phase, reason=reason, message=message, generation=generation, now=NOW, **fields
    )


def ready_of(patch: dict) -> dict:
    [ready] = [condition for condition in patch["conditions"] if condition["type"] == "Ready"]
    return ready


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"startedAt": "2024-03-01T11:00:00Z"},  # details ride along with the next real transition
        {"startedAt": None},
    ],
)
def test_no_patch_when_status_already_says_it(fields):
    status = current_status(conditions=[ready_condition("False")], startedAt=EARLIER)
    assert transition(status, **fields) is None


@pytest.mark.parametrize(
    "change",
    [
        dict(phase=Phase.READY),
        dict(reason="PodReady"),
        dict(message="something else"),
        dict(generation=3),
    ],
)
def test_any_of_phase_reason_message_generation_makes_a_patch(change):
    status = current_status(conditions=[ready_condition("False")])
    patch = transition(status, **change)
    assert patch is not None
    expected = {
        "phase": "Provisioning",
        "reason": "PodStarting",
        "message": "JupyterLab is starting",
        "observedGeneration": 2,
    }
    expected.update({"phase": change["phase"].value} if "phase" in change else {})
    expected.update({key: value for key, value in change.items() if key in ("reason", "message")})
    expected.update({"observedGeneration": change["generation"]} if "generation" in change else {})
    assert {key: patch[key] for key in expected} == expected


@pytest.mark.parametrize("status", [None, {}])
def test_first_status_is_written(status):
    patch = transition(status, phase=Phase.PENDING, reason="Accepted", message="waiting")
    assert patch["phase"] == "Pending"
    assert patch["conditions"] == [
        {
            "type": "Ready",
            "status": "False",
            "reason": "Accepted",
            "message": "waiting",
            "observedGeneration": 2,
            "lastTransitionTime": NOW_TEXT,
        }
    ]


@pytest.mark.parametrize("phase, ready", [(phase, "True" if phase is Phase.READY else "False") for phase in Phase])
def test_ready_condition_is_true_only_when_ready(phase, ready):
    patch = transition(None, phase=phase, reason="Why", message="what")
    condition = ready_of(patch)
    assert condition["status"] == ready
    assert (condition["reason"], condition["message"], condition["observedGeneration"]) == ("Why", "what", 2)


TERMINAL = {Phase.REJECTED, Phase.FAILED, Phase.EXPIRED, Phase.STOPPED, Phase.BUDGET_EXHAUSTED}


@pytest.mark.parametrize("phase", list(Phase))
def test_stalled_is_true_exactly_in_the_terminal_phases_with_their_reason(phase):
    """kubectl wait --for=condition=Stalled and kstatus (Argo CD, Flux) get a final answer; before
    that there is no Stalled condition at all (an environment never leaves a terminal phase)."""
    patch = transition(current_status(conditions=[ready_condition("False")]), phase=phase, reason="Why", message="m")
    conditions = {condition["type"]: condition for condition in patch["conditions"]}
    assert conditions["Ready"]["status"] == ("True" if phase is Phase.READY else "False")
    if phase in TERMINAL:
        stalled = conditions["Stalled"]
        assert (stalled["status"], stalled["reason"], stalled["message"]) == ("True", "Why", "m")
        assert (stalled["observedGeneration"], stalled["lastTransitionTime"]) == (2, NOW_TEXT)
    else:
        assert "Stalled" not in conditions


def test_stalled_keeps_its_time_and_follows_a_later_terminal_reason():
    stalled = {**ready_condition("True", reason="TooManyEnvironments"), "type": "Stalled"}
    status = current_status(
        phase="Rejected", reason="TooManyEnvironments", conditions=[ready_condition("False"), stalled]
    )
    patch = transition(status, phase=Phase.REJECTED, reason="NotOwner", message="other")
    [condition] = [c for c in patch["conditions"] if c["type"] == "Stalled"]
    assert (condition["status"], condition["reason"], condition["lastTransitionTime"]) == ("True", "NotOwner", EARLIER)


def test_a_stalled_condition_outside_a_terminal_phase_turns_false():
    """Never written so by the operator; should one be there (restored from a backup), it says False."""
    stalled = {**ready_condition("True"), "type": "Stalled"}
    patch = transition(current_status(conditions=[stalled]), phase=Phase.PENDING, reason="Accepted", message="m")
    [condition] = [c for c in patch["conditions"] if c["type"] == "Stalled"]
    assert condition["status"] == "False" and condition["lastTransitionTime"] == NOW_TEXT


@pytest.mark.parametrize(
    "previous, phase, expected_time",
    [
        (ready_condition("False"), Phase.PENDING, EARLIER),  # False -> False keeps the time
        (ready_condition("True"), Phase.READY, EARLIER),  # True -> True keeps the time
        (ready_condition("False"), Phase.READY, NOW_TEXT),  # False -> True moves it
        (ready_condition("True"), Phase.FAILED, NOW_TEXT),  # True -> False moves it
        (None, Phase.PROVISIONING, NOW_TEXT),  # no condition yet
        ({"type": "Ready", "status": "False"}, Phase.PENDING, NOW_TEXT),  # no time recorded yet
    ],
)
def test_last_transition_time_moves_only_with_the_status(previous, phase, expected_time):
    status = current_status(phase="Provisioning", reason="Before", conditions=[previous] if previous else [])
    patch = transition(status, phase=phase, reason="After", message="now")
    assert ready_of(patch)["lastTransitionTime"] == expected_time
    assert ready_of(patch)["reason"] == "After"  # reason and message always follow


@pytest.mark.parametrize(
    "present, fields, expected",
    [
        ({"startedAt": EARLIER}, {"startedAt": None}, {"startedAt": None}),  # removed (merge-patch null)
        ({}, {"startedAt": None}, {}),  # absent: nothing to remove
        ({}, {"startedAt": NOW_TEXT}, {"startedAt": NOW_TEXT}),
        ({"startedAt": EARLIER}, {"startedAt": NOW_TEXT}, {"startedAt": NOW_TEXT}),
        ({"backend": {"id": "1"}}, {"backend": None, "expiresAt": None}, {"backend": None}),
    ],
)
def test_fields_ride_along_and_none_removes_only_what_is_there(present, fields, expected):
    status = current_status(reason="Before", **present)
    patch = transition(status, **fields)
    assert {key: patch[key] for key in fields if key in patch} == expected


def test_other_conditions_survive_a_transition():
    other = {
        "type": "DatasetsMounted",
        "status": "True",
        "reason": "Mounted",
        "message": "",
        "lastTransitionTime": EARLIER,
    }
    status = current_status(reason="Before", conditions=[other, ready_condition("False")])
    patch = transition(status, phase=Phase.READY, reason="PodReady")
    assert patch["conditions"][0] == other
    assert [condition["type"] for condition in patch["conditions"]] == ["DatasetsMounted", "Ready"]


@pytest.mark.parametrize(
    "current, updates, expected",
    [
        (None, [], []),
        ([], [{"type": "Ready", "status": "True"}], [{"type": "Ready", "status": "True"}]),
        (
            [{"type": "Ready", "status": "False"}],
            [{"type": "Ready", "status": "True"}],
            [{"type": "Ready", "status": "True"}],
        ),
        (
            [{"type": "A", "status": "True"}, {"type": "Ready", "status": "False"}, {"type": "B", "status": "False"}],
            [{"type": "Ready", "status": "True"}],
            [{"type": "A", "status": "True"}, {"type": "Ready", "status": "True"}, {"type": "B", "status": "False"}],
        ),
        (
            [{"type": "A", "status": "True"}],
            [{"type": "B", "status": "True"}, {"type": "A", "status": "False"}],
            [{"type": "A", "status": "False"}, {"type": "B", "status": "True"}],
        ),
    ],
)
def test_merge_conditions_replaces_by_type_and_keeps_the_rest(current, updates, expected):
    assert merge_conditions(current, *updates) == expected


def test_merge_conditions_does_not_mutate_its_input():
    current = [{"type": "Ready", "status": "False"}]
    merge_conditions(current, {"type": "Ready", "status": "True"})
    assert current == [{"type": "Ready", "status": "False"}]


@pytest.mark.parametrize(
    "state, phase",
    [
        (State.PENDING, Phase.PENDING),
        (State.PROVISIONING, Phase.PROVISIONING),
        (State.READY, Phase.READY),
        (State.FAILED, Phase.FAILED),
        (State.EXPIRED, Phase.EXPIRED),
        (State.GONE, Phase.PROVISIONING),  # gone while it should run: it is being (re)created
    ],
)
def test_phase_from_observation(state, phase):
    assert phase_from_observation(Observation(state)) is phase


def test_every_state_has_a_phase():
    for state in State:  # a KeyError here means a new State nobody mapped
        assert isinstance(phase_from_observation(Observation(state)), Phase)
