"""The reconciler's own timers (retries, a held first status, a route served) on a replica that does not
act now (kopf peering: another outranks it, its kopf handlers and indexes paused): nothing converged or
written there, asked again later, converged once it acts again. The two processes against the API server
are in tests/integration/test_peering.py."""

from __future__ import annotations

import asyncio

import pytest

from analysis_operator.engine import reconciler as reconciler_module
from analysis_operator.engine.converge import Outcome
from analysis_operator.engine.views import EnvironmentRecord
from tests.unit.test_quiet_start import ENVIRONMENT, STARTING, Counting, context


class Role:
    """What the peering record says, one answer per ask (the last one repeats)."""

    def __init__(self, *answers: bool | Exception) -> None:
        self.answers, self.asked = list(answers), 0

    async def __call__(self) -> bool:
        self.asked += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.fixture(autouse=True)
def short_standby(monkeypatch):
    monkeypatch.setattr(reconciler_module, "STANDBY_SECONDS", 0.02)


@pytest.mark.parametrize(
    "answers, reconciled, pending",
    [
        ((True,), 1, 0),  # acting: converged at once
        ((False,), 0, 1),  # outranked all along: never converged, still asked again later
        ((False, False, True), 1, 0),  # outranked, then acting again: converged then, once
        ((ConnectionError("the API server went away"), True), 1, 0),  # the role unknown: not now, later
    ],
)
def test_a_timer_due_converges_only_where_the_replica_acts(answers, reconciled, pending):
    ctx = context()
    reconciler = Counting(ctx)
    reconciler.acting = role = Role(*answers)

    async def scenario():
        reconciler.requeue(EnvironmentRecord(ENVIRONMENT, {}), 0.01)
        await asyncio.sleep(0.2)
        return reconciler.pending

    assert asyncio.run(scenario()) == pending
    assert reconciler.reconciled == reconciled
    assert role.asked >= len(answers)


def test_a_held_first_status_is_not_written_by_a_replica_that_no_longer_acts():
    """A quiet "starting" held when kopf paused this replica: the one that acts has decided since (Ready,
    perhaps); written from here it would overwrite that, at its timer or at shutdown."""
    ctx = context(quiet_start=0.01)
    real = reconciler_module.Reconciler(ctx, {(ENVIRONMENT.namespace, ENVIRONMENT.name): []}, {})
    real.acting = Role(False)

    async def scenario():
        held = await reconciler_module.apply(ctx, ENVIRONMENT, Outcome(STARTING, quiet=True))
        assert held is not None and ENVIRONMENT.uid in ctx.unwritten
        await real.flush()

    asyncio.run(scenario())
    assert ctx.kube.patches == [] and ctx.unwritten == {}


def test_a_held_first_status_is_written_at_shutdown_where_the_replica_acts():
    ctx = context(quiet_start=30.0)
    real = reconciler_module.Reconciler(ctx, {}, {})
    real.acting = Role(True)

    async def scenario():
        await reconciler_module.apply(ctx, ENVIRONMENT, Outcome(STARTING, quiet=True))
        await real.flush()

    asyncio.run(scenario())
    assert [patch["phase"] for patch in ctx.kube.patches] == ["Provisioning"] and ctx.unwritten == {}
