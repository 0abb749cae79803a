"""The sweep loop (handlers/lifecycle.py sweep_forever): what follows a step that failed still runs."""

from __future__ import annotations

import asyncio
import contextlib
import types

import pytest

from analysis_operator.handlers import lifecycle
from analysis_operator.settings import Settings


class Reconciler:
    def __init__(self) -> None:
        self.forgotten = 0
        self.environments = {
            ("ns", "lab"): [types.SimpleNamespace(environment=types.SimpleNamespace(uid="u-1"), status={})]
        }
        self.retained: list[set[str]] = []

    def retain(self, live: set[str]) -> None:
        self.retained.append(set(live))


@pytest.mark.parametrize("failing", ["sweep_orphans", "warn_expiring"])
def test_the_orphan_rounds_retain_and_repair_run_whatever_the_sweep_met(monkeypatch, failing):
    """An error out of the orphan sweep (or out of the expiry warnings before it) skipped the records'
    retain and the repairs of that round, and the orphan sweep itself: its turn came again only ten
    rounds later, to fail the same way as long as the cause lasted."""
    ran: list[str] = []

    def step(name: str):
        async def run(*arguments, **keywords) -> int:
            ran.append(name)
            if name == failing:
                raise RuntimeError(f"{name} met something")
            return 0

        return run

    async def is_active(memo) -> bool:
        return True

    for name in ("sweep", "remove_held_ones", "warn_expiring", "sweep_orphans"):
        monkeypatch.setattr(lifecycle, name, step(name))
    monkeypatch.setattr(lifecycle, "is_active", is_active)

    async def scenario() -> Reconciler:
        repaired = asyncio.Event()

        async def repair(live) -> None:
            ran.append("repair")
            repaired.set()

        reconciler = Reconciler()
        memo = types.SimpleNamespace(
            config=Settings(),
            reconciler=reconciler,
            active=True,
            budget_gate=types.SimpleNamespace(unheld=None),
            diffbase=types.SimpleNamespace(retain=lambda live: ran.append("diffbase")),
            context=types.SimpleNamespace(decisions=types.SimpleNamespace(prune=lambda: None), repair=repair),
        )
        loop = asyncio.create_task(lifecycle.sweep_forever(memo, 0, orphan_every=1))
        try:
            await asyncio.wait_for(repaired.wait(), timeout=2)
        finally:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        return reconciler

    reconciler = asyncio.run(scenario())
    assert ran[:6] == ["sweep", "remove_held_ones", "warn_expiring", "sweep_orphans", "diffbase", "repair"]
    assert reconciler.retained[0] == {"u-1"}
