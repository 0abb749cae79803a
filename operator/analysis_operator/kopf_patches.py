"""One fix to kopf's internals, applied at start (cli.py), until kopf has it.

kopf holds every handler back at startup until all indexes are filled: each
object of an indexed resource adds a toggle to one ToggleSet, drops it once
indexed, and then waits on the set's asyncio.Condition until all are gone.
Every drop wakes every waiter, and each re-checks the whole set: with the
20,000 pods and environments of 10,000 environments that is hundreds of
millions of wake-ups, and a restart spent over 15 minutes on it
(bench/RESULTS.md). Here the waiters sleep on an Event per aggregate state
instead, set only when the set's state actually flips: one check per change.

Semantics are kopf's (same toggles, same `all`/`any` aggregate, same
condition shared with the member toggles); only who is woken changes.
tests/unit/test_kopf_patches.py checks both, and the patch is skipped, with
a warning, on a kopf version it was not checked against.
"""
from __future__ import annotations

import asyncio
import os
from typing import Callable, Iterable, Mapping

import kopf
import structlog
from kopf._cogs.aiokits import aiotoggles

log = structlog.get_logger("analysis_operator.kopf_patches")
CHECKED_VERSIONS = ("1.45.",)


class _NotifyingCondition(asyncio.Condition):
    """The set's condition (shared with its toggles): every notify_all also re-evaluates the set."""

    def __init__(self, changed: Callable[[], None]) -> None:
        super().__init__()
        self._changed = changed

    def notify_all(self) -> None:
        super().notify_all()
        self._changed()


class EdgeToggleSet(aiotoggles.ToggleSet):
    """kopf's ToggleSet, but waiters are woken only when the aggregate state flips."""

    def __init__(self, fn: Callable[[Iterable[bool]], bool]) -> None:
        super().__init__(fn)
        self._on, self._off = asyncio.Event(), asyncio.Event()
        self._condition = _NotifyingCondition(self._update)
        self._update()

    def _update(self) -> None:
        on = self.is_on()
        (self._on if on else self._off).set()
        (self._off if on else self._on).clear()

    async def wait_for(self, __state: bool) -> None:
        wanted = bool(__state)
        while self.is_on() != wanted:
            await (self._on if wanted else self._off).wait()


def apply(version: str | None = None, environ: Mapping[str, str] = os.environ) -> bool:
    if environ.get("ANALYSIS_OPERATOR_KOPF_PATCHES", "on") == "off":   # the escape hatch (and for measuring)
        log.warning("kopf_patches.off")
        return False
    version = version or getattr(kopf, "__version__", "") or _installed_version()
    if not version.startswith(CHECKED_VERSIONS):
        log.warning("kopf_patches.skipped", kopf=version, checked=CHECKED_VERSIONS)
        return False
    aiotoggles.ToggleSet = EdgeToggleSet  # type: ignore[misc]  (kopf looks it up at operator start)
    return True


def _installed_version() -> str:
    from importlib.metadata import version
    return version("kopf")
