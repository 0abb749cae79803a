"""Idle culling decisions (policy/idle.py) and reading a server's activity (engine/idle.py), pure."""

from __future__ import annotations

import asyncio
import datetime

import pytest

from analysis_operator.engine.idle import parse_server, server_url
from analysis_operator.model.domain import Environment, Flavor, format_time
from analysis_operator.policy.idle import (
    Action,
    Activity,
    ServerActivity,
    Verdict,
    decide,
    decide_unusable,
    gpu_hours_saved,
    latest_activity,
    policy_of,
    policy_problem,
    unusable_since,
)
from analysis_operator.settings import Settings

NOW = datetime.datetime(2026, 11, 30, 12, 0, tzinfo=datetime.UTC)
MINUTE = datetime.timedelta(minutes=1)
SKEW = datetime.timedelta(minutes=2)
GPU = Flavor.from_body(
    "gpu", {"backend": "slurm", "idleTimeout": "30m", "idleWarnBefore": "10m", "resources": {"gpu": 2}}
)
POLICY = policy_of(GPU)
STARTED = NOW - datetime.timedelta(hours=2)


def test_policy_from_the_flavor_and_culling_off():
    assert POLICY.timeout == 30 * MINUTE and POLICY.warn_before == 10 * MINUTE and POLICY.action is Action.SUSPEND
    assert policy_of(Flavor.from_body("basic", {"backend": "kubernetes"})) is None  # no idleTimeout: never culled
    stop = policy_of(Flavor.from_body("s", {"backend": "slurm", "idleTimeout": "1h", "idleAction": "Stop"}))
    assert stop.action is Action.STOP and stop.warn_before == 15 * MINUTE  # the default warning


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"idleTimeout": "90s"}, "shorter than two activity checks"),
        ({"idleTimeout": "30m", "idleWarnBefore": "30m"}, "not shorter than idleTimeout"),
        ({"idleTimeout": "30m", "idleWarnBefore": "1h"}, "not shorter than idleTimeout"),
    ],
)
def test_policies_that_cannot_be_enforced_are_named(spec, words):
    flavor = Flavor.from_body("f", {"backend": "slurm", **spec})
    assert words in policy_problem(flavor, check_interval=MINUTE)


def test_a_bad_action_reads_as_suspend_and_is_named():
    flavor = Flavor.from_body("f", {"backend": "slurm", "idleTimeout": "1h", "idleAction": "Explode"})
    assert flavor.idle_action == "Suspend" and "idleAction" in flavor.problems[0]


def at(minutes_ago):
    return NOW - minutes_ago * MINUTE


@pytest.mark.parametrize(
    ("last", "verdict"),
    [
        (at(5), Verdict.ACTIVE),
        (at(19), Verdict.ACTIVE),
        (at(20), Verdict.WARN),
        (at(29), Verdict.WARN),
        (at(30), Verdict.CULL),
    ],
)
def test_warned_then_culled(last, verdict):
    decision = decide(POLICY, Activity(last, "server"), STARTED, NOW)
    assert decision.verdict is verdict
    if verdict is not Verdict.ACTIVE:
        assert decision.cull_at == last + 30 * MINUTE


def test_a_fresh_environment_gets_its_whole_timeout():
    assert decide(POLICY, Activity(at(600), "server"), at(5), NOW).verdict is Verdict.ACTIVE


def test_unknown_activity_is_never_culled_unless_configured():
    unknown = Activity(None, "unknown", "the server did not answer within 5 s")
    decision = decide(POLICY, unknown, STARTED, NOW)
    assert decision.verdict is Verdict.UNKNOWN and "did not answer" in decision.message
    assert decide(POLICY, unknown, STARTED, NOW, cull_unknown=True).verdict is Verdict.CULL


def test_every_source_counts_the_latest_wins():
    server = ServerActivity(last=at(40))
    assert latest_activity(server, at(3), NOW, SKEW) == Activity(at(3), "gateway")  # a browser tab
    assert latest_activity(ServerActivity(last=at(40), busy=True), None, NOW, SKEW).last == NOW  # a long cell
    assert latest_activity(server, None, NOW, SKEW).source == "server"
    assert latest_activity(None, None, NOW, SKEW).last is None


def test_a_server_clock_ahead_is_not_believed_idle():
    activity = latest_activity(ServerActivity(last=NOW + datetime.timedelta(hours=3)), None, NOW, SKEW)
    assert activity.last == NOW and activity.source == "clock skew" and "ahead" in activity.note
    within = latest_activity(ServerActivity(last=NOW + MINUTE), None, NOW, SKEW)
    assert within.last == NOW and within.source == "server"  # small skew: read as now, never in the future


@pytest.mark.parametrize(
    ("status", "kernels", "expected"),
    [
        (
            {"last_activity": "2026-11-30T11:00:00.000000+00:00", "kernels": 1},
            [{"execution_state": "idle"}],
            (at(60), False),
        ),
        ({"last_activity": "2026-11-30T11:00:00Z"}, [{"execution_state": "busy"}, "junk"], (at(60), True)),
        ({"last_activity": 12}, [], (None, False)),
        ({"last_activity": "yesterday"}, [], (None, False)),
        ("<html>", None, (None, False)),
        (None, None, (None, False)),
    ],
)
def test_server_answers_read_defensively(status, kernels, expected):
    server = parse_server(status, kernels)
    assert (server.last, server.busy) == expected
    assert bool(server.problem) == (expected[0] is None)


def test_server_url_for_addresses_and_services():
    environment = Environment(namespace="ns", name="lab", uid="u", owner="a", flavor="f")
    settings = Settings()
    assert server_url(environment, "10.250.0.2:20001", settings) == "http://10.250.0.2:20001/env/ns/lab/"
    assert server_url(environment, "fd00::2:20001", settings) == "http://[fd00::2]:20001/env/ns/lab/"
    # fully qualified: no walk through a pod's DNS search list (ndots 5) for each of 10,000 names a round
    assert (
        server_url(environment, "aenv-lab:8888", settings) == "http://aenv-lab.ns.svc.cluster.local.:8888/env/ns/lab/"
    )
    # a desktop is served at its root (the gateway strips the prefix before noVNC and the agent's file)
    assert server_url(environment, "198.51.100.7:6080", settings, desktop=True) == "http://198.51.100.7:6080/"


def test_a_desktop_with_an_open_connection_is_active():
    """The desktop's activity agent: the last time a connection was open, and how many are now."""
    open_now = parse_server({"last_activity": "2026-11-30T10:00:00Z", "connections": 1}, None)
    assert open_now.busy and latest_activity(open_now, None, NOW, SKEW).last == NOW
    closed = parse_server({"last_activity": "2026-11-30T11:00:00Z", "connections": 0}, None)
    assert not closed.busy and latest_activity(closed, None, NOW, SKEW).last == at(60)
    for junk in ("1", True, -1, None):  # nothing but a positive count says open
        assert not parse_server({"last_activity": "2026-11-30T11:00:00Z", "connections": junk}, None).busy


def test_the_gateway_alone_proves_activity_never_idleness():
    """A server that cannot be read (a long cell, a desktop on one long websocket, an image without
    the agent) is not culled on the gateway's old requests: it may be working unseen."""
    unreadable = ServerActivity(problem="the server did not answer within 5 s")
    old = latest_activity(unreadable, at(45), NOW, SKEW)
    assert old.partial and old.last == at(45)
    decision = decide(POLICY, old, STARTED, NOW)
    assert decision.verdict is Verdict.UNKNOWN and "did not answer" in decision.message
    assert decide(POLICY, latest_activity(unreadable, at(25), NOW, SKEW), STARTED, NOW).verdict is Verdict.UNKNOWN
    assert decide(POLICY, latest_activity(unreadable, at(3), NOW, SKEW), STARTED, NOW).verdict is Verdict.ACTIVE
    assert decide(POLICY, old, STARTED, NOW, cull_unknown=True).verdict is Verdict.CULL  # the setting says so
    readable = latest_activity(ServerActivity(last=at(50)), at(45), NOW, SKEW)
    assert not readable.partial and decide(POLICY, readable, STARTED, NOW).verdict is Verdict.CULL


def test_gpu_hours_saved():
    assert gpu_hours_saved(2, NOW, NOW + datetime.timedelta(hours=3)) == 6.0
    assert gpu_hours_saved(0, NOW, NOW + datetime.timedelta(hours=3)) == 0.0
    assert gpu_hours_saved(2, NOW, NOW - MINUTE) == 0.0


def test_an_idle_stop_ends_the_environment_on_the_backend_it_started_on():
    """The policy is today's flavor's; the stop is the flavor's it started with (status.terms): a flavor
    moved to another backend since must not have a Slurm job deleted for a pod that runs on uncharged."""
    from analysis_operator.engine.converge import Context
    from analysis_operator.engine.idle import GatewayActivity, IdleChecker
    from analysis_operator.engine.terms import build_terms
    from analysis_operator.engine.views import EnvironmentRecord
    from analysis_operator.policy.idle import Decision
    from tests.unit.test_accounting import Recorder
    from tests.unit.test_backend_interface import Cluster

    started_on = Flavor.from_body("lab", {"backend": "kubernetes", "idleTimeout": "30m", "resources": {"gpu": 1}})
    today = Flavor.from_body("lab", {"backend": "slurm", "idleTimeout": "30m", "idleAction": "Stop"})
    pods, slurm, cluster = Recorder(), Recorder(), Cluster()
    context = Context(kube=cluster, backends={"kubernetes": pods, "slurm": slurm})
    lab = Environment(namespace="ns", name="lab", uid="u-1", owner="alice", flavor="lab")
    status = {"phase": "Ready", "terms": build_terms(started_on), "backend": {"kind": "kubernetes"}}
    checker = IdleChecker(context, Settings(), {}, {"lab": [today]}, GatewayActivity(), clock=lambda: NOW)
    decision = Decision(Verdict.CULL, "idle for 31m")
    asyncio.run(checker._cull(EnvironmentRecord(lab, status), today, Action.STOP, decision, NOW))
    assert (pods.deleted, slurm.deleted) == (["u-1"], [])
    assert cluster.status[("ns", "lab")]["phase"] == "Stopped"


def provisioning(since_minutes_ago, held=True, ready_ever=True, **backend):
    """A status fallen back to Provisioning: Ready turned False that long ago; `held`: status.backend
    says CPUs are allocated (a pod on its node, a running job, a VM up)."""
    allocated = {"allocatedCpus": 4, "allocatedGpus": 2} if held else {}
    ready = {"type": "Ready", "status": "False", "lastTransitionTime": format_time(at(since_minutes_ago))}
    return {
        "phase": "Provisioning",
        "reason": "ServerCrashing",
        "backend": {"kind": "kubernetes", **allocated, **backend},
        "conditions": [ready] if ready_ever else [],
    }


EARLY = at(600)  # the idle check has known it long (its floor is earlier than anything else)


@pytest.mark.parametrize(
    ("status", "floor", "since"),
    [
        (provisioning(40), EARLY, at(40)),  # fell back from Ready 40 minutes ago
        (provisioning(40, held=False), EARLY, None),  # a pod unschedulable, a job in the queue: holds nothing
        ({**provisioning(40), "phase": "Pending"}, EARLY, None),
        ({**provisioning(40), "phase": "Ready"}, EARLY, None),  # Ready: its server is read instead
        (provisioning(40, allocatedGpus=None, allocatedCpus=0.5), EARLY, at(40)),  # a CPU-only pod
        # never Ready: from its backend's start (a Slurm job, not from its wait in the queue)
        (provisioning(120, startedAt=format_time(at(25))), EARLY, at(25)),
        # resumed a minute ago (Ready turned False when it was suspended, a day ago): from the resume
        (provisioning(1440), at(1), at(1)),
        (provisioning(40, ready_ever=False), at(7), at(7)),  # no Ready condition at all: the floor
        ({**provisioning(40), "reason": "ImagePullFailed"}, EARLY, at(40)),
        ({**provisioning(40), "reason": "ContainerNotCreated"}, EARLY, at(40)),
        # merely not Ready: a server slow to answer its probe under load, a job or VM the operator
        # cannot reach (its kernels may be working): not this rule's
        ({**provisioning(40), "reason": "PodStarting"}, EARLY, None),
        ({**provisioning(40), "reason": "ServerNotAnswering"}, EARLY, None),
    ],
)
def test_since_when_an_environment_holds_resources_without_being_ready(status, floor, since):
    assert unusable_since(status, floor) == since


def test_holding_without_being_ready_past_the_timeout_is_culled_and_says_so():
    decision = decide_unusable(POLICY, at(31), (at(45), None), NOW)
    assert decision.verdict is Verdict.CULL and decision.cull_at == at(1)
    assert decision.message.startswith(f"not Ready since {format_time(at(31))}")


@pytest.mark.parametrize(
    ("since", "used", "verdict"),
    [
        (at(5), (None, None), Verdict.ACTIVE),  # not Ready for less than the timeout: kept
        (at(19), (None, None), Verdict.ACTIVE),
        (at(20), (None, None), Verdict.WARN),
        (at(29), (at(90), None), Verdict.WARN),
        (at(30), (None, None), Verdict.CULL),
        (at(45), (None, at(3)), Verdict.ACTIVE),  # the gateway let a request through 3 minutes ago
        (at(45), (at(12), None), Verdict.ACTIVE),  # status.lastActivity 12 minutes ago
        (at(45), (at(25), at(22)), Verdict.WARN),
    ],
)
def test_holding_without_being_ready_is_warned_then_culled(since, used, verdict):
    decision = decide_unusable(POLICY, since, used, NOW)
    assert decision.verdict is verdict and "not Ready since" in decision.message
    if verdict is Verdict.WARN:
        assert "will be suspended at" in decision.message


def test_one_that_holds_nothing_is_never_culled_however_long_it_waits():
    """A job in the queue for a week, a pod no node can take: not culled, nothing to decide."""
    week = provisioning(7 * 24 * 60, held=False)
    assert unusable_since(week, EARLY) is None
    assert unusable_since({"phase": "Pending", "backend": {"kind": "kubernetes"}}, EARLY) is None


class Judged:
    """Stands in for IdleChecker._check_one: notes the `since` each environment is judged with."""

    def __init__(self):
        self.since = []

    async def __call__(self, record, flavor, since):
        self.since.append(since)


def checker_over(environments, clock):
    from analysis_operator.engine.converge import Context
    from analysis_operator.engine.idle import GatewayActivity, IdleChecker
    from tests.unit.test_backend_interface import Cluster

    context = Context(kube=Cluster(), backends={})
    checker = IdleChecker(context, Settings(), environments, {"gpu": [GPU]}, GatewayActivity(), clock)
    checker._check_one = judged = Judged()  # the verdicts are decide_unusable's (above)
    return checker, judged


def test_the_check_counts_from_the_fall_back_it_saw_else_from_its_first_look():
    """Ready in its last round, then not: from its Ready condition's transition. Seen not Ready first
    (a resume leaves that transition at the suspension; a restarted operator, or one that was the
    passive replica meanwhile, knows nothing of what happened): from then."""
    from analysis_operator.engine.views import EnvironmentRecord

    now = [at(60)]
    lab = Environment(namespace="ns", name="lab", uid="u-1", owner="alice", flavor="gpu")
    index = {"lab": [EnvironmentRecord(lab, {"phase": "Ready"})]}
    checker, judged = checker_over(index, lambda: now[0])
    asyncio.run(checker.check())
    assert judged.since == [None]  # Ready: its server is read
    index["lab"] = [EnvironmentRecord(lab, provisioning(59))]  # Ready turned False a minute later
    for minutes_ago in range(58, 19, -1):  # a round a minute, still so 38 minutes later: the same start
        now[0] = at(minutes_ago)
        asyncio.run(checker.check())
    assert judged.since == [None] + [at(59)] * 39
    restarted, judged = checker_over(index, lambda: now[0])
    asyncio.run(restarted.check())
    assert judged.since == [at(20)]
    now[0] = at(5)  # the next round a quarter of an hour later (passive meanwhile)
    asyncio.run(restarted.check())
    assert judged.since == [at(20), at(5)]
    index["lab"] = [EnvironmentRecord(lab, provisioning(59, held=False))]  # its pod gone, the new one waits
    now[0] = at(4)
    asyncio.run(restarted.check())
    assert judged.since == [at(20), at(5)]  # not judged: it holds nothing


def test_a_crash_loops_glimpse_of_a_starting_server_does_not_start_the_count_again():
    """Each restart of a crash-looping container shows PodStarting for a moment: a round that lands
    then judges nothing, and the next counts on from the same start (not from then: a back-off of
    minutes against a round a minute would put the cull off again and again)."""
    from analysis_operator.engine.views import EnvironmentRecord

    now = [at(60)]
    lab = Environment(namespace="ns", name="lab", uid="u-1", owner="alice", flavor="gpu")
    index = {"lab": [EnvironmentRecord(lab, provisioning(90))]}
    checker, judged = checker_over(index, lambda: now[0])
    asyncio.run(checker.check())  # first seen crash-looping now: from now
    index["lab"] = [EnvironmentRecord(lab, {**provisioning(90), "reason": "PodStarting"})]
    now[0] = at(59)
    asyncio.run(checker.check())  # the glimpse: not judged
    index["lab"] = [EnvironmentRecord(lab, provisioning(90))]
    now[0] = at(58)
    asyncio.run(checker.check())
    assert judged.since == [at(60), at(60)]
