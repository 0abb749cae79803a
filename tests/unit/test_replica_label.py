"""Peered replicas (handlers/lifecycle.py). label_role_forever: a replica labels its pod active or
standby when that changes (the chart's offer Service selects the active one), once per change, and
tries again after a failed write. on_pod: a pod of an environment this replica is starting asks again
whether it may act when the last answer said standby (a takeover a moment ago). The real API server
and two real replicas: tests/integration/test_peering.py."""

from __future__ import annotations

import asyncio
import datetime
import types

import pytest

from analysis_operator.handlers import lifecycle
from analysis_operator.handlers.lifecycle import REPLICA_LABEL, label_role_forever
from analysis_operator.settings import Settings


class Kube:
    def __init__(self) -> None:
        self.ahead = False  # a live peer with a higher priority
        self.labels: list[str] = []
        self.failures = 0

    async def peers(self, peering: str, namespace: str = "") -> dict:
        now = datetime.datetime.now(datetime.UTC).isoformat()
        return {"other": {"priority": 10, "lifetime": 60, "lastseen": now}} if self.ahead else {}

    async def label_pod(self, namespace: str, name: str, labels: dict[str, str]) -> bool:
        assert (namespace, name) == ("ops", "operator-0")
        if self.failures:
            self.failures -= 1
            raise ConnectionError("API server away")
        self.labels.append(labels[REPLICA_LABEL])
        return True


def test_the_pod_is_labelled_once_per_change_of_role_and_again_after_a_failed_write():
    kube = Kube()
    memo = types.SimpleNamespace(
        config=Settings(standalone=False), context=types.SimpleNamespace(kube=kube), peering_priority=5
    )

    async def scenario() -> None:
        task = asyncio.create_task(label_role_forever(memo, "ops", "operator-0", interval=0.01))
        await asyncio.sleep(0.05)
        assert kube.labels == ["active"] and memo.active is True  # alone: active, labelled once
        kube.ahead = True
        await asyncio.sleep(0.05)
        assert kube.labels == ["active", "standby"] and memo.active is False
        kube.ahead, kube.failures = False, 2
        await asyncio.sleep(0.08)
        assert kube.labels == ["active", "standby", "active"]  # written once the API server answered
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())


class Reconciler:
    def __init__(self, starting: set[str]) -> None:
        self.starting = starting
        self.environments = {
            ("ns", name): [types.SimpleNamespace(environment=types.SimpleNamespace(uid=f"uid-{name}"))]
            for name in ("mine", "theirs")
        }

    def started(self, uid: str) -> bool:
        return uid in self.starting

    def acting_again(self) -> None:
        self.taken_over = True


def test_a_pod_of_a_start_of_its_own_asks_again_after_a_takeover_others_wait(monkeypatch):
    acted, asked = [], []

    async def pod_changed(memo, key) -> None:
        acted.append(key[1])

    async def is_active(memo) -> bool:
        asked.append(True)
        return True  # the takeover happened a moment ago

    monkeypatch.setattr(lifecycle, "pod_changed", pod_changed)
    monkeypatch.setattr(lifecycle, "is_active", is_active)

    async def scenario() -> None:
        memo = types.SimpleNamespace(
            config=Settings(standalone=False),
            reconciler=Reconciler({"uid-mine"}),
            active=False,  # the answer of a moment ago: standby
            active_at=asyncio.get_running_loop().time(),
        )
        await lifecycle.on_pod(memo, ("ns", "theirs"))  # not one it started: the last answer stands
        assert (acted, asked) == ([], [])
        await lifecycle.on_pod(memo, ("ns", "mine"))  # its own start: asked again, and acted on
        assert (acted, asked) == (["mine"], [True]) and memo.active is True
        assert memo.reconciler.taken_over  # the retries another replica held: converged here (acting_again)
        await lifecycle.on_pod(memo, ("ns", "theirs"))  # the fresh answer now serves the others too
        assert acted == ["mine", "theirs"] and len(asked) == 1

    asyncio.run(scenario())
