"""Quota decisions and accounting arithmetic (policy/budgets.py), over simulated hours."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from analysis_operator.model.domain import BackendKind, Environment, Flavor, Phase, Resources, format_time
from analysis_operator.policy.budgets import (
    Budget,
    Held,
    admission_refusal,
    apply_grant,
    charge,
    expiry_warning_due,
    release,
    reserve,
    select_budget,
)
from analysis_operator.policy.refusal import Refusal

T0 = datetime.datetime(2026, 3, 10, 12, 0, tzinfo=datetime.UTC)
HOUR = datetime.timedelta(hours=1)
CPU = Flavor("basic", BackendKind.KUBERNETES, resources=Resources(cpu="2"))
GPU = Flavor("gpu", BackendKind.KUBERNETES, resources=Resources(cpu="1", gpu=1))


def budget(limits=None, status=None, **fields) -> Budget:
    return Budget(
        name=fields.pop("name", "b"),
        user=fields.pop("user", "alice"),
        limits=limits or {},
        status=status or {},
        **fields,
    )


def environment(uid="u1", name="e1") -> Environment:
    return Environment("ns", name, uid, owner="alice", flavor="basic")


def running(b: Budget, *uids: str, flavor: Flavor = CPU, at=T0) -> Budget:
    for uid in uids:
        result = reserve(b, environment(uid, f"e-{uid}"), flavor, at)
        assert isinstance(result, dict)
        b = Budget(**{**b.__dict__, "status": result})
    return b


def after(b: Budget, result) -> Budget:
    return Budget(**{**b.__dict__, "status": result.status})


# --- which budget ----------------------------------------------------------------------------------

PERSONAL, GROUP = budget(name="alice"), budget(name="p11", user="", group="proposal-1")
BUDGETS = {"alice": PERSONAL, "p11": GROUP}


@pytest.mark.parametrize(
    "owner, named, expected",
    [
        ("alice", "", "alice"),  # the personal budget by default
        ("alice", "p11", "p11"),  # a group budget she is a member of
        ("alice", "alice", "alice"),  # naming her own
        ("bob", "", "NoBudget"),
        ("bob", "alice", "NotBudgetMember"),
        ("carol", "p11", "NotBudgetMember"),
        ("alice", "nope", "BudgetNotFound"),
    ],
)
def test_select_budget(owner, named, expected):
    selected = select_budget(
        owner,
        named,
        BUDGETS,
        {"alice": "alice"},
        lambda group, user: group == "proposal-1" and user in {"alice", "bob"},
    )
    assert (selected.reason if isinstance(selected, Refusal) else selected.name) == expected


# --- may it start ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "limits, status, flavor, holding, gpus, reason",
    [
        ({"cpuHours": 10}, {}, CPU, 0, 0, None),
        ({"cpuHours": 10}, {"settled": {"cpuHours": 10}}, CPU, 0, 0, "CpuHoursExhausted"),
        ({"gpuHours": 20}, {"settled": {"gpuHours": 20}}, GPU, 0, 0, "GpuHoursExhausted"),
        ({"gpuHours": 20}, {"settled": {"gpuHours": 20}}, CPU, 0, 0, None),  # no GPU needed
        ({"maxEnvironments": 2}, {}, CPU, 1, 0, None),
        ({"maxEnvironments": 2}, {}, CPU, 2, 0, "TooManyEnvironments"),
        ({"maxGpus": 1}, {}, GPU, 0, 1, "TooManyGpus"),
        ({"maxGpus": 1}, {}, CPU, 0, 1, None),
        ({"cpuHours": 10}, {"settled": {"cpuHours": 10}, "grants": {"r1": {"cpuHours": 5}}}, CPU, 0, 0, None),
        ({}, {"settled": {"cpuHours": 1e9}}, CPU, 99, 99, None),  # no limits: unlimited
    ],
)
def test_admission_refusal(limits, status, flavor, holding, gpus, reason):
    refusal = admission_refusal(budget(limits, status), flavor, holding, gpus, T0)
    assert (refusal.reason if refusal else None) == reason
    if refusal:
        assert refusal.phase is Phase.REJECTED and "budget" in refusal.message


def test_refusal_message_reads_like_the_dashboard():
    group = Budget("p11", group="proposal-1", limits={"gpuHours": 20}, status={"settled": {"gpuHours": 20}})
    refusal = admission_refusal(group, GPU, 0, 0, T0)
    assert refusal.message.startswith(
        "GPU-hours budget of group 'proposal-1' (ComputeBudget 'p11') exhausted: 20.0 of 20.0 used"
    )


@pytest.mark.parametrize(
    "limit, used, words",
    [
        (0.001, 0.001, "0.001 of 0.001 used"),  # before: "0.0 of 0.0 used"
        (0.001, 0.0012, "0.0012 of 0.0010 used"),
        (20, 20.04, "20.04 of 20.00 used"),  # before: "20.0 of 20.0 used", which reads as not over
        (20, 20, "20.0 of 20.0 used"),
        (140, 141.5, "141.5 of 140.0 used"),
        (0, 0, "0.0 of 0.0 used"),
    ],
)
def test_exhaustion_message_tells_the_numbers_apart(limit, used, words):
    refusal = admission_refusal(budget({"cpuHours": limit}, {"settled": {"cpuHours": used}}), CPU, 0, 0, T0)
    assert refusal is not None and f"exhausted: {words}; ask for more" in refusal.message


@pytest.mark.parametrize(
    "spec, problem",
    [
        (
            {"user": "alice", "limits": {"cpuHours": 1}, "period": {"validUntil": "2027-02-30T00:00:00Z"}},
            "spec.period.validUntil '2027-02-30T00:00:00Z' is not a time",
        ),
        ({"user": "alice", "limits": {"cpuHours": "lots"}}, "spec.limits.cpuHours is not a number"),
        ({}, ""),
    ],
)
def test_budget_from_body_never_raises(spec, problem):
    read = Budget.from_body({"metadata": {"name": "b"}, "spec": spec})
    assert read.problem.startswith(problem) and bool(read.problem) == bool(problem)


def test_budget_valid_until_reads_any_rfc3339_time():
    read = Budget.from_body(
        {"metadata": {"name": "b"}, "spec": {"limits": {}, "period": {"validUntil": "2026-03-10T14:00:00.5+02:00"}}}
    )
    assert read.valid_until == T0.replace(microsecond=500000) and read.problem == ""


def test_an_expired_budget_refuses():
    refusal = admission_refusal(budget({"cpuHours": 10}, valid_until=T0), CPU, 0, 0, T0)
    assert refusal.reason == "BudgetExpired"


def test_reserve_takes_a_slot_once_and_refuses_the_next():
    b = running(budget({"maxEnvironments": 1}), "u1")
    assert reserve(b, environment("u1"), CPU, T0) is None  # already holds it: no write
    refusal = reserve(b, environment("u2", "e2"), CPU, T0)
    assert isinstance(refusal, Refusal) and refusal.reason == "TooManyEnvironments"
    assert b.status["display"] == {"cpuHours": "0.0 / -", "gpuHours": "0.0 / -", "environments": "1 / 1"}


# --- slots free at once ----------------------------------------------------------------------------


def test_an_ended_entry_holds_no_slot_and_is_settled_in_the_write_that_takes_it():
    b = running(budget({"maxEnvironments": 1, "cpuHours": 100}), "old")  # 2 CPUs from T0
    assert reserve(b, environment("new", "e-new"), CPU, T0 + HOUR).reason == "TooManyEnvironments"
    result = reserve(b, environment("new", "e-new"), CPU, T0 + HOUR, ended={"old": T0 + HOUR / 2})
    assert isinstance(result, dict)
    after_reserve = Budget(**{**b.__dict__, "status": result})
    assert set(after_reserve.entries) == {"new"}
    assert after_reserve.status["settled"]["cpuHours"] == pytest.approx(1.0)  # 2 CPUs x half an hour
    assert after_reserve.status["running"] == {"environments": 1, "gpus": 0}


def test_an_ended_gpu_entry_frees_its_gpus():
    b = running(budget({"maxGpus": 1}), "old", flavor=GPU)
    assert reserve(b, environment("new", "e-new"), GPU, T0).reason == "TooManyGpus"
    assert isinstance(reserve(b, environment("new", "e-new"), GPU, T0, ended={"old": None}), dict)


def test_ended_entries_of_other_budgets_change_nothing():
    b = running(budget({"maxEnvironments": 1}), "u1")
    assert reserve(b, environment("u2", "e2"), CPU, T0, ended={"elsewhere": None}).reason == "TooManyEnvironments"
    assert release(b, {"elsewhere": None}, T0) is None


def test_release_charges_until_the_end_never_past_now_and_never_backwards():
    b = running(budget({"cpuHours": 100}), "u1", "u2")
    b = after(b, charge(b, {}, T0 + 2 * HOUR, 80))  # both charged up to T0 + 2h
    status = release(b, {"u1": T0 + 3 * HOUR, "u2": T0 + HOUR}, T0 + 2.5 * HOUR)
    released = Budget(**{**b.__dict__, "status": status})
    assert released.entries == {}
    # u1: until now (its end is later); u2: already charged past its end, nothing more.
    assert released.status["settled"]["cpuHours"] == pytest.approx(2 * 2.5 + 2 * 2)
    assert released.used("cpuHours") == pytest.approx(9)


@given(st.integers(0, 7200), st.integers(0, 600), st.integers(0, 7200), st.booleans())
def test_releasing_at_once_costs_what_the_tick_would_have_charged(ended_after, seen_after, tick_after, unknown_end):
    """Settling an ended entry when it is seen, then ticking, uses exactly the hours that the tick
    alone settles for it: freeing the slot early neither loses nor adds usage. (An unknown end, a
    deleted environment, is when it was seen.)"""
    b = running(budget({"cpuHours": 100}), "gone", "stays")
    end = None if unknown_end else T0 + datetime.timedelta(seconds=ended_after)
    release_at = T0 + datetime.timedelta(seconds=ended_after + seen_after)
    tick_at = release_at + datetime.timedelta(seconds=tick_after)
    released = Budget(**{**b.__dict__, "status": release(b, {"gone": end}, release_at)})
    early = after(released, charge(released, {}, tick_at, 80))
    late = after(b, charge(b, {"gone": end or release_at}, tick_at, 80))
    assert early.used("cpuHours") == pytest.approx(late.used("cpuHours"), abs=1e-6)
    assert set(early.entries) == set(late.entries) == {"stays"}


def test_release_waits_for_the_tick_at_a_new_period():
    """A month boundary passed: the tick starts the period (forgetting what came before) and
    settles ended entries in the same step; a release before it would be forgotten with it."""
    b = running(budget({"cpuHours": 100}, reset="Monthly"), "u1", at=T0)
    b = after(b, charge(b, {}, T0, 80))  # periodStart March
    assert release(b, {"u1": None}, T0 + HOUR) is not None
    next_month = datetime.datetime(2026, 4, 1, 0, 30, tzinfo=datetime.UTC)
    assert release(b, {"u1": None}, next_month) is None
    refusal_free = reserve(
        Budget(**{**b.__dict__, "limits": {"maxEnvironments": 1}}),
        environment("u2", "e2"),
        CPU,
        next_month,
        ended={"u1": None},
    )
    assert isinstance(refusal_free, dict) and set(refusal_free["environments"]) == {"u1", "u2"}  # u1 left to the tick


# --- accounting over simulated time ------------------------------------------------------------------


def test_charge_is_resources_times_wall_time():
    b = running(budget({"cpuHours": 100, "gpuHours": 100}), "cpu")
    b = running(b, "gpu", flavor=GPU)
    for hour in range(1, 4):
        b = after(b, charge(b, {}, T0 + hour * HOUR, 80))
    assert b.used("cpuHours") == pytest.approx(3 * 2 + 3 * 1)
    assert b.used("gpuHours") == pytest.approx(3)
    assert b.status["used"]["cpuHours"] == pytest.approx(9) and b.status["remaining"]["cpuHours"] == pytest.approx(91)


def test_repeating_a_tick_charges_nothing_more():
    """A restart re-runs the tick from what was persisted: chargedUntil makes it idempotent."""
    b = running(budget({"cpuHours": 100}), "u1")
    once = after(b, charge(b, {}, T0 + HOUR, 80))
    twice = after(once, charge(once, {}, T0 + HOUR, 80))
    assert once.used("cpuHours") == twice.used("cpuHours") == pytest.approx(2)


def test_downtime_is_charged_at_the_next_tick():
    b = running(budget({"cpuHours": 100}), "u1")
    b = after(b, charge(b, {}, T0 + HOUR, 80))
    b = after(b, charge(b, {}, T0 + 5 * HOUR, 80))  # the operator was down for 4 hours
    assert b.used("cpuHours") == pytest.approx(10)


def test_an_ended_environment_is_charged_until_it_stopped_and_settled():
    b = running(budget({"cpuHours": 100}), "u1", "u2")
    b = after(b, charge(b, {"u1": T0 + 2 * HOUR}, T0 + 3 * HOUR, 80))
    assert set(b.entries) == {"u2"}
    assert b.status["settled"]["cpuHours"] == pytest.approx(4)
    assert b.used("cpuHours") == pytest.approx(4 + 6)


def test_a_suspended_environment_keeps_its_slot_and_is_not_charged():
    b = running(budget({"cpuHours": 100}), "u1")
    b = after(b, charge(b, {}, T0 + 2 * HOUR, 80, paused={"u1"}))
    assert "u1" in b.entries and b.used("cpuHours") == 0


def test_a_slurm_job_is_charged_for_its_allocation_from_its_start_time_only_while_running():
    """Queued: nothing. Running: Slurm's allocation (not the flavor's), from Slurm's start time."""
    b = running(budget({"cpuHours": 100, "gpuHours": 100}), "job")  # flavor says 2 CPUs
    b = after(b, charge(b, {}, T0 + HOUR, 80, paused={"job"}))  # pending in the queue
    assert b.used("cpuHours") == 0
    started = T0 + HOUR + datetime.timedelta(minutes=30)  # between two ticks
    b = after(b, charge(b, {}, T0 + 2 * HOUR, 80, held={"job": Held(cpus=8, gpus=1, since=started)}))
    assert b.used("cpuHours") == pytest.approx(8 * 0.5)
    assert b.used("gpuHours") == pytest.approx(0.5)
    b = after(b, charge(b, {}, T0 + 3 * HOUR, 80, held={"job": Held(cpus=8, gpus=1, since=started)}))
    assert b.used("cpuHours") == pytest.approx(8 * 1.5)  # the start time counts once


def test_a_job_seen_running_late_is_charged_from_its_start():
    """The tick before the status showed the allocation saw it queued; Slurm's start time still counts."""
    b = running(budget({"cpuHours": 100}), "job")
    b = after(b, charge(b, {}, T0 + 2 * HOUR, 80, paused={"job"}))  # status still said queued
    started = T0 + HOUR  # but it started an hour ago
    b = after(b, charge(b, {}, T0 + 3 * HOUR, 80, held={"job": Held(cpus=4, gpus=0, since=started)}))
    assert b.used("cpuHours") == pytest.approx(4 * 2)


def test_exhaustion_stops_what_uses_the_spent_resource_and_warns_once():
    b = running(budget({"cpuHours": 100, "gpuHours": 10}), "cpu")
    b = running(b, "gpu", flavor=GPU)
    result = charge(b, {}, T0 + 8 * HOUR, 80)  # 8 GPU-hours: 80%
    assert [reason for _, reason, _ in result.events] == ["BudgetWarning"] and not result.stop
    b = after(b, result)
    assert charge(b, {}, T0 + 9 * HOUR, 80).events == ()  # warned once
    result = charge(b, {}, T0 + 10 * HOUR, 80)
    assert result.stop == ("gpu",) and "GPU-hours budget of user 'alice'" in result.reason
    assert [c for c in result.status["conditions"] if c["type"] == "Exhausted"][0]["status"] == "True"


def test_a_monthly_budget_starts_from_zero():
    b = running(budget({"cpuHours": 100}, reset="Monthly"), "u1", at=T0)
    b = after(b, charge(b, {}, T0 + HOUR, 80))
    assert b.status["periodStart"] == "2026-03-01T00:00:00Z"
    next_month = datetime.datetime(2026, 4, 1, 2, 0, tzinfo=datetime.UTC)
    b = after(b, charge(b, {}, next_month, 80))
    assert b.status["periodStart"] == "2026-04-01T00:00:00Z"
    assert b.used("cpuHours") == pytest.approx(4)  # 2 CPUs x 2 hours since midnight, not since March


@given(st.lists(st.integers(min_value=0, max_value=7200), min_size=1, max_size=20))
def test_ticks_at_any_moments_sum_to_the_wall_time(steps):
    b = running(budget({"cpuHours": 1e6}), "u1")
    moment = T0
    for step in steps:
        moment += datetime.timedelta(seconds=step)
        b = after(b, charge(b, {}, moment, 80))
    assert b.used("cpuHours") == pytest.approx(2 * (moment - T0).total_seconds() / 3600, abs=1e-4)


# --- requests ---------------------------------------------------------------------------------------


def test_a_grant_raises_the_limit_exactly_once():
    b = budget({"cpuHours": 140, "maxEnvironments": 1})
    status = apply_grant(b, "req-1", "ns/more", {"cpuHours": 60, "maxEnvironments": 2}, "dora", format_time(T0), T0)
    b = Budget(**{**b.__dict__, "status": status})
    assert b.limit("cpuHours") == 200 and b.limit("maxEnvironments") == 3
    assert apply_grant(b, "req-1", "ns/more", {"cpuHours": 60}, "dora", format_time(T0), T0) is None
    assert b.status["grants"]["req-1"]["approvedBy"] == "dora"


APRIL = datetime.datetime(2026, 4, 1, 0, 1, tzinfo=datetime.UTC)


def granted(b: Budget, uid: str, extra: dict, at: datetime.datetime) -> Budget:
    status = apply_grant(b, uid, f"ns/{uid}", extra, "dora", format_time(at), at)
    assert status is not None
    return Budget(**{**b.__dict__, "status": status})


def test_hours_granted_on_a_monthly_budget_raise_that_month_only():
    """ "+10 GPU-hours for this beamtime" is not +10 in every month after it; a grant of maxGpus or
    maxEnvironments (what may run at once, not per period) stays."""
    b = budget({"gpuHours": 20, "maxGpus": 1}, reset="Monthly")
    b = after(b, charge(b, {}, T0, 80))
    b = granted(b, "req-1", {"gpuHours": 10, "maxGpus": 1}, T0)
    b = after(b, charge(b, {}, T0 + HOUR, 80))
    assert b.status["limits"] == {"gpuHours": 30, "maxGpus": 2}
    b = after(b, charge(b, {}, APRIL, 80))
    assert b.status["limits"] == {"gpuHours": 20, "maxGpus": 2}
    assert "req-1" in b.status["grants"]  # the record of the approval stays
    b = granted(b, "req-2", {"gpuHours": 5}, APRIL)
    assert b.status["limits"]["gpuHours"] == 25


def test_hours_granted_on_a_budget_without_a_period_last_as_long_as_it():
    b = granted(budget({"cpuHours": 100}), "req-1", {"cpuHours": 50}, T0)
    b = after(b, charge(b, {}, APRIL, 80))
    assert b.status["limits"]["cpuHours"] == 150


@pytest.mark.parametrize(
    "approved_at",
    [
        "2026-03-02T09:00:00Z",  # approved this month
        "2026-02-27T09:00:00Z",  # approved last month, when grants counted for good: not taken away mid-month
        "",
    ],
)
def test_a_grant_stored_without_its_period_counts_in_the_period_it_is_found_in_then_no_more(approved_at):
    march, april = 30, 20
    grant = {"request": "ns/old", "approvedBy": "dora", "approvedAt": approved_at, "gpuHours": 10}
    status = {"periodStart": "2026-03-01T00:00:00Z", "grants": {"r": grant}}
    b = budget({"gpuHours": 20}, reset="Monthly", status=status)
    b = after(b, charge(b, {}, T0, 80))
    assert b.status["limits"]["gpuHours"] == march
    b = after(b, charge(b, {}, APRIL, 80))
    assert b.status["limits"]["gpuHours"] == april


@pytest.mark.parametrize(
    "remaining_minutes, warned_for, due",
    [(20, None, True), (40, None, False), (20, "2026-03-10T12:20:00Z", False), (-1, None, False)],
)
def test_expiry_warning(remaining_minutes, warned_for, due):
    expires = T0 + datetime.timedelta(minutes=remaining_minutes)
    assert expiry_warning_due(expires, T0, 1800, warned_for) is due


@given(st.lists(st.floats(min_value=0, max_value=90, allow_nan=False), min_size=1, max_size=30))
def test_ticks_between_whole_seconds_never_count_a_fraction_twice(steps):
    """chargedUntil is stored to the second; ticks at fractional moments must not drift upwards."""
    b = running(budget({"cpuHours": 1e6}), "u1")
    moment = T0
    for step in steps:
        moment += datetime.timedelta(seconds=step)
        b = after(b, charge(b, {}, moment, 80))
    assert b.used("cpuHours") * 3600 == pytest.approx(2 * int((moment - T0).total_seconds()), abs=1e-3)
