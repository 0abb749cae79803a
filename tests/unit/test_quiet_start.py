"""A start's first status ("starting") held a moment and written with Ready in one write
(engine/reconciler.apply, Context.quiet_start): the holding rules, without a server. The
tests against the API server are in tests/integration/test_environments.py."""

from __future__ import annotations

import asyncio
import time

import pytest

from analysis_operator.backends.base import Observation, State
from analysis_operator.engine.converge import Context, Outcome, _quiet_start
from analysis_operator.engine.reconciler import Reconciler, apply
from analysis_operator.engine.views import EnvironmentRecord
from analysis_operator.handlers.budgets import slot_to_release
from analysis_operator.handlers.environments import status_event_matters
from analysis_operator.model.conditions import apply_merge_patch, compose_merge_patches
from analysis_operator.model.domain import FINALIZER, LABEL_BACKEND, Environment

ENVIRONMENT = Environment(namespace="ns", name="lab", uid="u-1", owner="alice", flavor="jupyter")
STARTING = {
    "phase": "Provisioning",
    "reason": "PodStarting",
    "startedAt": "2026-12-02T10:00:00Z",
    "terms": {"flavor": "jupyter", "maxLifetime": "8h"},
    "backend": {"kind": "kubernetes", "node": None, "state": "Pending"},
}
READY = {"phase": "Ready", "reason": "PodReady", "backend": {"node": "kwok-1", "state": "Running"}}


class Recorder:
    """Records the status writes and Events apply sends (the client's two calls apply makes)."""

    def __init__(self, fail: bool = False) -> None:
        self.patches: list[dict] = []
        self.events: list[tuple] = []
        self.fail = fail

    async def patch_environment_status(self, namespace, name, patch):
        if self.fail:
            raise ConnectionError("the API server went away")
        self.patches.append(patch)

    async def post_event(self, involved, type_, reason, message):
        self.events.append((type_, reason))


def context(quiet_start: float = 5.0, fail: bool = False) -> Context:
    return Context(kube=Recorder(fail), backends={}, quiet_start=quiet_start)


def test_composed_patches_have_the_effect_of_both_in_turn():
    target = {"phase": "", "backend": {"kind": "kubernetes", "id": "x", "node": "old"}, "keep": 1}
    first = {"phase": "Provisioning", "backend": {"node": None, "state": "Pending"}, "terms": {"a": 1}}
    second = {"phase": "Ready", "backend": {"node": "kwok-1"}, "keep": None}
    composed = compose_merge_patches(first, second)
    assert apply_merge_patch(target, composed) == apply_merge_patch(apply_merge_patch(target, first), second)
    assert composed["terms"] == {"a": 1} and composed["keep"] is None  # a removal is kept for the server
    assert first["backend"] == {"node": None, "state": "Pending"}  # the arguments are not changed


def test_a_quiet_first_status_is_held_and_written_whole_with_ready():
    ctx = context()

    async def scenario():
        held = await apply(ctx, ENVIRONMENT, Outcome(STARTING, quiet=True))
        assert held == pytest.approx(5.0) and ctx.kube.patches == []
        assert ctx.written == {}  # nothing written: the forward-auth is not told a phase either
        assert await apply(ctx, ENVIRONMENT, Outcome(READY, event=("Normal", "PodReady", "up"))) is None

    asyncio.run(scenario())
    # no Event: the first status anyone sees is Ready, with the condition's time and message
    assert len(ctx.kube.patches) == 1 and ctx.kube.events == []
    written = ctx.kube.patches[0]
    assert written["phase"] == "Ready" and written["terms"] == STARTING["terms"]
    assert written["startedAt"] == STARTING["startedAt"] and written["backend"]["node"] == "kwok-1"
    assert ctx.unwritten == {} and ctx.written == {"u-1": "Ready"}


FAILED = {"phase": "Failed", "reason": "PodFailed", "backend": {"state": "Failed"}}


@pytest.mark.parametrize(
    "held, outcome, told",
    [
        # seen waiting (Provisioning was written, nothing held): how the start ended is told
        (False, Outcome(READY, event=("Normal", "PodReady", "up")), [("Normal", "PodReady")]),
        # a Warning is told whatever was written before
        (True, Outcome(FAILED, event=("Warning", "PodFailed", "ended")), [("Warning", "PodFailed")]),
        (False, Outcome(FAILED, event=("Warning", "PodFailed", "ended")), [("Warning", "PodFailed")]),
        # Ready as the first status anyone sees: the status alone
        (True, Outcome(READY, event=("Normal", "PodReady", "up")), []),
    ],
)
def test_only_a_start_that_was_seen_waiting_or_went_wrong_is_told_by_an_event(held, outcome, told):
    ctx = context()

    async def scenario():
        if held:
            await apply(ctx, ENVIRONMENT, Outcome(STARTING, quiet=True))
        await apply(ctx, ENVIRONMENT, outcome)

    asyncio.run(scenario())
    assert ctx.kube.events == told and ctx.kube.patches[-1]["phase"] == outcome.status["phase"]


def test_a_held_status_stays_held_while_nothing_new_is_decided_and_is_written_when_due():
    ctx = context(quiet_start=0.2)

    async def scenario():
        await apply(ctx, ENVIRONMENT, Outcome(STARTING, quiet=True))
        left = await apply(ctx, ENVIRONMENT, Outcome())  # converged again, nothing new: still held
        assert left is not None and 0 < left <= 0.2 and ctx.kube.patches == []
        await asyncio.sleep(0.25)
        assert await apply(ctx, ENVIRONMENT, Outcome()) is None  # due: written alone

    asyncio.run(scenario())
    assert ctx.kube.patches == [STARTING] and ctx.unwritten == {}


@pytest.mark.parametrize(
    "outcome",
    [
        Outcome(STARTING),  # not quiet (a polled backend, a waiting reason, a status written before)
        Outcome(STARTING, quiet=True),  # quiet, but quiet_start 0: at once
    ],
)
def test_nothing_is_held_when_quiet_start_is_off_or_the_status_is_not_quiet(outcome):
    ctx = context(quiet_start=0.0 if outcome.quiet else 5.0)
    assert asyncio.run(apply(ctx, ENVIRONMENT, outcome)) is None
    assert ctx.kube.patches == [STARTING] and ctx.unwritten == {}


def test_a_failed_write_of_a_held_status_is_decided_again_not_kept():
    ctx = context(fail=True)

    async def scenario():
        await apply(ctx, ENVIRONMENT, Outcome(STARTING, quiet=True))
        with pytest.raises(ConnectionError):
            await apply(ctx, ENVIRONMENT, Outcome(READY))

    asyncio.run(scenario())
    assert ctx.unwritten == {} and ctx.written == {}  # the next converge starts from what the API shows


def test_a_held_status_goes_with_its_environment():
    ctx = context()
    asyncio.run(apply(ctx, ENVIRONMENT, Outcome(STARTING, quiet=True)))
    ctx.retain(["another-uid"])
    assert ctx.unwritten == {}


class Pods:
    polled = False


class Jobs:
    polled = True


@pytest.mark.parametrize(
    "backend, before, outcome, quiet",
    [
        (Pods(), {}, Outcome(STARTING), True),
        (Jobs(), {}, Outcome(STARTING), False),  # a Slurm job or a VM: minutes, and its id is recorded at once
        (Pods(), {"phase": "Pending"}, Outcome(STARTING), False),  # a status was written: it moves at once
        (Pods(), {}, Outcome(READY), False),  # Ready itself is never held
        (Pods(), {}, Outcome(STARTING, event=("Warning", "ClaimNotFound", "m")), False),  # a person must act
        (Pods(), {}, Outcome(STARTING, retry_after=30), False),  # waits on something (the gateway's route)
        (Pods(), {}, Outcome(None), False),
    ],
)
def test_which_first_statuses_are_quiet(backend, before, outcome, quiet):
    assert _quiet_start(backend, not before.get("phase"), outcome) is quiet


def test_quiet_start_is_not_a_wait_for_the_caller():
    """apply returns at once while it holds (the reconciler converges again when it is due)."""
    ctx = context(quiet_start=30.0)
    began = time.monotonic()
    assert asyncio.run(apply(ctx, ENVIRONMENT, Outcome(STARTING, quiet=True))) == pytest.approx(30.0)
    assert time.monotonic() - began < 1.0


class Counting(Reconciler):
    """The reconciler's timers as they are, with reconcile counted instead of run."""

    def __init__(self, ctx: Context) -> None:
        record = EnvironmentRecord(ENVIRONMENT, {})
        super().__init__(ctx, {(ENVIRONMENT.namespace, ENVIRONMENT.name): [record]}, {})
        self.reconciled = 0

    async def reconcile(self, record, now=None):
        self.reconciled += 1
        return Outcome()


@pytest.mark.parametrize(
    "asks, still_held, reconciled",
    [
        ([True], True, 1),  # the held status is due: converge (and write it)
        ([True], False, 0),  # it went out with Ready meanwhile: the timer has nothing to do
        ([True, False], False, 1),  # a retry asked for too, merged into the sooner timer: kept
        ([False, True], False, 1),
    ],
)
def test_a_hold_timer_is_skipped_only_when_all_it_was_for_is_done(asks, still_held, reconciled):
    ctx = context()
    reconciler = Counting(ctx)

    async def scenario():
        for index, hold in enumerate(asks):
            reconciler.requeue(EnvironmentRecord(ENVIRONMENT, {}), 0.01 * (index + 1), hold=hold)
        if still_held:
            ctx.unwritten[ENVIRONMENT.uid] = (ENVIRONMENT, STARTING, 0.0)
        await asyncio.sleep(0.1)

    asyncio.run(scenario())
    assert reconciler.reconciled == reconciled and reconciler.pending == 0


def test_a_second_quiet_status_joins_the_held_one_and_keeps_its_deadline():
    """Pod Ready, the gateway still opening its route: still "starting", held together, written with Ready."""
    ctx = context()
    opening = {"reason": "Opening", "connection": {"url": "http://gw/env/ns/lab/"}}

    async def scenario():
        first = await apply(ctx, ENVIRONMENT, Outcome(STARTING, quiet=True))
        assert await apply(ctx, ENVIRONMENT, Outcome(opening, quiet=True)) <= first
        assert ctx.kube.patches == []
        await apply(ctx, ENVIRONMENT, Outcome(READY))

    asyncio.run(scenario())
    (written,) = ctx.kube.patches
    assert written["phase"] == "Ready" and written["connection"]["url"] == "http://gw/env/ns/lab/"
    assert written["terms"] == STARTING["terms"]


@pytest.mark.parametrize(
    "body, said",
    [
        (
            '{"kind":"Status","message":"analysisenvironments.analysis.panosc.eu \\"lab\\" is forbidden: User '
            '\\"system:serviceaccount:ops:aop\\" cannot patch resource \\"analysisenvironments/status\\" in API '
            'group \\"analysis.panosc.eu\\" in the namespace \\"t-1\\"","reason":"Forbidden","code":403}',
            'User "system:serviceaccount:ops:aop" cannot patch resource "analysisenvironments/status" in API group '
            '"analysis.panosc.eu" in the namespace "t-1"',
        ),
        ('{"kind":"Status","message":"admission webhook denied the request: token=s3cret","code":403}', ""),
        ("not json", ""),
    ],
)
def test_a_refusal_names_the_missing_rule_and_nothing_of_the_object(body, said):
    from analysis_operator.infra.kube import KubeError

    error = KubeError("PATCH", "/apis/x/lab/status", 403, "Forbidden", body)
    assert error.denial == said and "s3cret" not in repr(error)
    assert repr(error).endswith(f": {said})" if said else "/apis/x/lab/status)")


class Gateway:
    enabled = True


STILL_STARTING = Observation(State.PROVISIONING, "PodStarting", "JupyterLab is starting", {"node": "kwok-1"}, cpus=1)


@pytest.mark.parametrize(
    "held, observation, gateway, skipped",
    [
        (STARTING, STILL_STARTING, False, True),  # created, then scheduled: the same start
        (None, STILL_STARTING, False, False),  # nothing held (written, or never quiet): converge
        (STARTING, Observation(State.READY, "PodReady"), False, False),  # Ready is written at once
        (STARTING, Observation(State.PENDING, "Unschedulable"), False, False),  # a person must be told
        (STARTING, Observation(State.PROVISIONING, "PodTerminating"), False, False),  # going: decided now
        (STARTING, Observation(State.GONE, "PodMissing"), False, False),  # deleted: brought back now
        (STARTING, Observation(State.FAILED, "PodFailed"), False, False),
        (STARTING, STILL_STARTING, True, False),  # the gateway's route not yet opened for it: converge opens it
        ({**STARTING, "connection": {"url": "https://gw/ns/lab/"}}, STILL_STARTING, True, True),
    ],
)
def test_a_pod_event_converges_unless_it_can_only_hold_the_same_start_again(held, observation, gateway, skipped):
    ctx = Context(kube=Recorder(), backends={}, quiet_start=5.0, **({"routes": Gateway()} if gateway else {}))
    if held is not None:
        ctx.unwritten[ENVIRONMENT.uid] = (ENVIRONMENT, held, time.monotonic() + 5)
    reconciler = Reconciler(ctx, {}, {})
    assert reconciler.holds_start(ENVIRONMENT.uid, observation) is skipped
    assert not reconciler.holds_start("another-uid", STILL_STARTING)


@pytest.mark.parametrize(
    "type_, phase, handed",
    [
        ("MODIFIED", "Provisioning", True),  # a pod may have turned Ready before this status said Provisioning
        ("DELETED", "Ready", True),  # what this process kept for it goes
        ("MODIFIED", "Ready", False),  # the operator's own status write coming back: nothing to do
        ("ADDED", "Provisioning", False),  # listed at start: the resume handler converges it
        ("MODIFIED", None, False),
    ],
)
def test_which_environment_events_reach_the_status_handler(type_, phase, handed):
    body = {"metadata": {"uid": "u-1"}, "status": {"phase": phase} if phase else {}}
    assert status_event_matters(type=type_, body=body) is handed


DELETED_AT = "2026-12-06T10:00:00Z"


@pytest.mark.parametrize(
    "type_, metadata, handed",
    [
        # a pod's environment deleted and kept by someone's finalizer (or a foreground or orphan deletion):
        # every event of it, also the listing at start (None), until what it runs is gone
        (None, {"deletionTimestamp": DELETED_AT, "finalizers": ["x.org/hold"]}, True),
        ("MODIFIED", {"deletionTimestamp": DELETED_AT, "finalizers": ["orphan"]}, True),
        # a Slurm job or VM: the operator's own finalizer and its deletion handler remove it
        ("MODIFIED", {"deletionTimestamp": DELETED_AT, "labels": {LABEL_BACKEND: "slurm"}}, False),
        ("MODIFIED", {"finalizers": ["x.org/hold"]}, False),  # not deleted
    ],
)
def test_an_environment_held_in_its_deletion_reaches_the_status_handler(type_, metadata, handed):
    body = {"metadata": {"uid": "u-1", **metadata}, "status": {"phase": "Ready"}}
    assert status_event_matters(type=type_, body=body) is handed


@pytest.mark.parametrize(
    "type_, metadata, phase, held, handed",
    [
        ("MODIFIED", {}, "Ready", True, False),  # running: the slot stays taken
        ("MODIFIED", {}, "Suspended", True, False),  # resuming never fails: the slot stays
        ("MODIFIED", {}, "Stopped", True, True),
        ("MODIFIED", {}, "Expired", True, True),
        ("MODIFIED", {"deletionTimestamp": "2026-12-03T10:00:00Z"}, "Ready", True, True),  # a pod: goes with it
        # A Slurm job or VM whose deletion the operator's finalizer holds (its backend has not confirmed it
        # gone): it may run on, so it keeps its slot and is charged until the finalizer goes.
        ("MODIFIED", {"deletionTimestamp": "2026-12-03T10:00:00Z", "finalizers": [FINALIZER]}, "Ready", True, False),
        ("MODIFIED", {"deletionTimestamp": "2026-12-03T10:00:00Z", "finalizers": [FINALIZER]}, "Stopped", True, True),
        ("MODIFIED", {"deletionTimestamp": "2026-12-03T10:00:00Z", "finalizers": ["x.org/hold"]}, "Ready", True, True),
        ("DELETED", {}, "Ready", True, True),
        ("DELETED", {}, "Ready", False, False),  # no ledger holds a slot for it (no budgets): nothing to settle
        ("MODIFIED", {}, "Stopped", False, False),
    ],
)
def test_which_environment_events_reach_the_slot_release(type_, metadata, phase, held, handed):
    body = {"metadata": {"uid": "u-1", **metadata}, "status": {"phase": phase}}
    ledger_entries = {"u-1": ["budget-a"]} if held else {"u-2": ["budget-a"]}
    assert slot_to_release(type=type_, body=body, ledger_entries=ledger_entries) is handed
