"""Ledger group commit: concurrent updates of one budget are decided in turn and written together.
(The real API server's side, 409s included, is in tests/integration/test_budgets.py.)"""

from __future__ import annotations

import asyncio

from kubernetes.client.rest import ApiException

from analysis_operator.engine.ledger import Ledger


class Store:
    """An in-memory stand-in for the budget's status subresource with resourceVersion checks."""

    def __init__(self, conflicts: int = 0) -> None:
        self.body = {
            "metadata": {"name": "b", "resourceVersion": "1"},
            "spec": {"user": "u", "limits": {}},
            "status": {"n": 0},
        }
        self.writes, self.conflicts = 0, conflicts

    async def get_cluster_object(self, plural, name):
        return self.body

    async def replace_cluster_status(self, plural, body):
        await asyncio.sleep(0.001)
        if self.conflicts:
            self.conflicts -= 1
            self.body = {
                **self.body,
                "metadata": {**self.body["metadata"], "resourceVersion": "changed"},
                "status": {"n": self.body["status"]["n"] + 100},
            }  # someone else wrote meanwhile
            raise ApiException(status=409)
        assert body["metadata"]["resourceVersion"] == self.body["metadata"]["resourceVersion"]
        self.writes += 1
        self.body = {**body, "metadata": {**body["metadata"], "resourceVersion": str(self.writes + 1)}}
        return self.body


class Views:
    budgets: dict = {}


def increment(budget):
    return {**budget.status, "n": budget.status["n"] + 1}


def test_fifty_concurrent_updates_each_count_once_in_a_few_writes():
    store = Store()
    ledger = Ledger(store, Views())

    async def run():
        return await asyncio.gather(*(ledger.update("b", increment) for _ in range(50)))

    results = asyncio.run(run())
    assert store.body["status"]["n"] == 50
    assert sorted(result["n"] for result in results) == list(range(1, 51))  # each saw the one before
    assert store.writes <= 3


def test_a_conflict_decides_the_whole_batch_again_on_the_new_status():
    store = Store(conflicts=1)
    ledger = Ledger(store, Views())

    async def run():
        return await asyncio.gather(*(ledger.update("b", increment) for _ in range(5)))

    asyncio.run(run())
    assert store.body["status"]["n"] == 100 + 5


def test_a_batch_has_its_answers_when_its_write_does_not_one_caller_per_turn():
    """Fifty callers written in one PUT all have their answer a few turns of the event loop after the
    write: not one per turn, as when each took a lock in turn to find it (stop 44)."""
    store = Store()
    written = asyncio.Event()
    write = store.replace_cluster_status

    async def replace_then_tell(plural, body):
        try:
            return await write(plural, body)
        finally:
            written.set()

    store.replace_cluster_status = replace_then_tell
    ledger = Ledger(store, Views())

    async def run() -> tuple[int, int]:
        callers = [asyncio.create_task(ledger.update("b", increment)) for _ in range(50)]
        await written.wait()
        for _ in range(5):
            await asyncio.sleep(0)
        answered = sum(caller.done() for caller in callers)
        await asyncio.gather(*callers)
        return answered, store.writes

    answered, writes = asyncio.run(run())
    assert writes == 1 and answered == 50, f"{answered} of 50 answered five turns after their write"


def test_a_caller_cancelled_before_its_batch_is_left_out_and_the_rest_are_written():
    store = Store()
    ledger = Ledger(store, Views())

    async def run() -> list[dict]:
        first = asyncio.create_task(ledger.update("b", increment))
        await asyncio.sleep(0)  # the first batch (one caller) is on its way
        later = [asyncio.create_task(ledger.update("b", increment)) for _ in range(3)]
        await asyncio.sleep(0)
        later[0].cancel()
        return await asyncio.gather(first, *later[1:])

    results = asyncio.run(run())
    assert store.body["status"]["n"] == 3 and sorted(result["n"] for result in results) == [1, 2, 3]
