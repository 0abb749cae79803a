"""handlers/lifecycle.label_role_forever: a peered replica labels its pod active or standby when that
changes (the chart's offer Service selects the active one), once per change, and tries again after a
failed write. The real API server and two real replicas: tests/integration/test_peering.py."""

from __future__ import annotations

import asyncio
import datetime
import types

import pytest

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
