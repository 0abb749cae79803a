"""The reconciler's own timers (retries, a held first status, a route served) on a replica that does not
act now (kopf peering: another outranks it, its kopf handlers and indexes paused): nothing converged or
written there; converged once it acts again, from the API server's answer (the index is as it was at the
pause); the peering record asked once for all of them. The two processes against the API server are in
tests/integration/test_peering.py."""

from __future__ import annotations

import asyncio

import pytest

from analysis_operator.engine import reconciler as reconciler_module
from analysis_operator.engine.converge import Context, Outcome
from analysis_operator.engine.views import EnvironmentRecord
from analysis_operator.model.domain import Environment
from tests.unit.test_quiet_start import ENVIRONMENT, STARTING, Recorder, context


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


class Reading(Recorder):
    """The API server's answer for an environment: as it is now, not as the paused index has it."""

    def __init__(self, bodies: dict[str, dict]) -> None:
        super().__init__()
        self.bodies, self.reads = bodies, 0

    async def get_environment(self, namespace, name, urgent=False):
        self.reads += 1
        return self.bodies.get(name)


def body(environment: Environment, phase: str) -> dict:
    metadata = {"namespace": environment.namespace, "name": environment.name, "uid": environment.uid}
    spec = {"owner": environment.owner, "flavor": environment.flavor}
    return {"metadata": metadata, "spec": spec, "status": {"phase": phase}}


class Counting(reconciler_module.Reconciler):
    """The reconciler's timers as they are, with what reconcile was given recorded instead of run."""

    def __init__(self, ctx, records: list[EnvironmentRecord]) -> None:
        index = {(r.environment.namespace, r.environment.name): [r] for r in records}
        super().__init__(ctx, index, {})
        self.reconciled: list[tuple[str, str]] = []

    async def reconcile(self, record, now=None):
        self.reconciled.append((record.environment.name, record.status.get("phase", "")))
        return Outcome()


@pytest.fixture(autouse=True)
def short_standby(monkeypatch):
    monkeypatch.setattr(reconciler_module, "STANDBY_SECONDS", 0.05)


def standby_context(bodies: dict[str, dict] | None = None, quiet_start: float = 5.0) -> Context:
    return Context(kube=Reading(bodies or {}), backends={}, quiet_start=quiet_start)


@pytest.mark.parametrize(
    "answers, reconciled",
    [
        ((True,), [("lab", "index")]),  # acting: converged at once, from the index
        ((False,), []),  # outranked all along: never converged
        ((False, False, True), [("lab", "Ready")]),  # outranked, then acting: converged from the API server
        ((ConnectionError("the API server went away"), True), [("lab", "Ready")]),  # the role unknown: later
    ],
)
def test_a_timer_due_converges_only_where_the_replica_acts(answers, reconciled):
    ctx = standby_context({"lab": body(ENVIRONMENT, "Ready")})
    reconciler = Counting(ctx, [EnvironmentRecord(ENVIRONMENT, {"phase": "index"})])
    reconciler.acting = Role(*answers)

    async def scenario():
        reconciler.requeue(EnvironmentRecord(ENVIRONMENT, {}), 0.01)
        await asyncio.sleep(0.4)

    asyncio.run(scenario())
    assert reconciler.reconciled == reconciled
    assert ctx.kube.reads == (1 if reconciled and reconciled[0][1] == "Ready" else 0)


def test_many_timers_due_on_a_standby_ask_the_peering_record_once_per_interval_not_once_each():
    environments = [Environment("ns", f"lab-{i}", f"u-{i}", owner="alice", flavor="jupyter") for i in range(50)]
    ctx = standby_context({e.name: body(e, "Pending") for e in environments})
    reconciler = Counting(ctx, [EnvironmentRecord(e, {}) for e in environments])
    reconciler.acting = role = Role(False)

    async def scenario():
        for environment in environments:
            reconciler.requeue(EnvironmentRecord(environment, {}), 0.01)
        await asyncio.sleep(0.3)  # 50 timers due at once, then about five rounds of the standby's look

    asyncio.run(scenario())
    assert reconciler.reconciled == [] and ctx.kube.reads == 0
    assert 50 <= role.asked <= 60, role.asked  # once per due timer, then once per interval for all of them


def test_a_held_first_status_is_dropped_not_written_by_a_replica_that_no_longer_acts():
    """A quiet "starting" held when kopf paused this replica: the one that acts has decided since (Ready,
    perhaps); written from here (at its timer, once this replica acts again, or at shutdown) it would
    overwrite that."""
    ctx = standby_context(quiet_start=0.01)
    reconciler = reconciler_module.Reconciler(ctx, {(ENVIRONMENT.namespace, ENVIRONMENT.name): []}, {})
    reconciler.acting = Role(False, False, True)

    async def scenario():
        held = await reconciler_module.apply(ctx, ENVIRONMENT, Outcome(STARTING, quiet=True))
        reconciler.requeue(EnvironmentRecord(ENVIRONMENT, {}), held, hold=True)
        await asyncio.sleep(0.3)
        await reconciler.flush()

    asyncio.run(scenario())
    assert ctx.kube.patches == [] and ctx.unwritten == {} and reconciler.pending == 0


def test_a_held_first_status_is_written_at_shutdown_where_the_replica_acts():
    ctx = context(quiet_start=30.0)
    reconciler = reconciler_module.Reconciler(ctx, {}, {})
    reconciler.acting = Role(True)

    async def scenario():
        await reconciler_module.apply(ctx, ENVIRONMENT, Outcome(STARTING, quiet=True))
        await reconciler.flush()

    asyncio.run(scenario())
    assert [patch["phase"] for patch in ctx.kube.patches] == ["Provisioning"] and ctx.unwritten == {}


def test_acting_again_converges_what_may_wait_on_a_retry_another_replica_held():
    """Taken over again after another replica acted: the starting and pending environments are converged
    once each, from the API server (a refusal's 30 s retry lived in the other process); the Ready,
    suspended and ended ones are left to their events. Nothing where this process never decided: kopf's
    resume handlers converge everything there."""
    phases = {"pending": "Pending", "starting": "Provisioning", "new": "", "up": "Ready", "paused": "Suspended"}
    environments = {name: Environment("ns", name, f"u-{name}", owner="alice", flavor="j") for name in phases}
    records = [EnvironmentRecord(e, {"phase": phases[n]} if phases[n] else {}) for n, e in environments.items()]
    bodies = {name: body(e, "now") for name, e in environments.items()}

    async def scenario(decided: int) -> Counting:
        reconciler = Counting(standby_context(bodies), records)
        reconciler.acting = Role(True)
        reconciler.decided = decided
        reconciler.acting_again()
        await asyncio.sleep(0.1)
        return reconciler

    again = asyncio.run(scenario(decided=3))
    assert sorted(again.reconciled) == [("new", "now"), ("pending", "now"), ("starting", "now")]
    assert asyncio.run(scenario(decided=0)).reconciled == []
