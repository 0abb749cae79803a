"""Idle culling decisions (policy/idle.py) and reading a server's activity (engine/idle.py), pure."""

from __future__ import annotations

import asyncio
import datetime

import pytest

from analysis_operator.engine.idle import parse_server, server_url
from analysis_operator.model.domain import Environment, Flavor
from analysis_operator.policy.idle import (
    Action,
    Activity,
    ServerActivity,
    Verdict,
    decide,
    gpu_hours_saved,
    latest_activity,
    policy_of,
    policy_problem,
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
