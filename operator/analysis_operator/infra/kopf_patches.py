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
tests/unit/test_kopf_patches.py checks both.

The patch replaces a private class, so it is tied to the kopf releases it was
checked against (CHECKED_VERSIONS, and the same pin in pyproject.toml). On any
other version the operator refuses to start rather than run without it (a
restart would silently turn quadratic again) or with it unchecked. To move to
a new kopf: read its kopf/_cogs/aiokits/aiotoggles.py and where ToggleSet is
made (kopf/_core/reactor/), run tests/unit/test_kopf_patches.py and
bench/restart.py against it, then add the version here and to the pin.
ANALYSIS_OPERATOR_KOPF_PATCHES=off runs without the patch on any version.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable, Mapping

import kopf
import structlog
from kopf._cogs.aiokits import aiotoggles

log = structlog.get_logger("analysis_operator.infra.kopf_patches")
# aiotoggles.py and the code that makes ToggleSets are identical across these releases.
CHECKED_VERSIONS = ("1.45.0", "1.45.1", "1.45.2")
SWITCH = "ANALYSIS_OPERATOR_KOPF_PATCHES"


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
    """Patch kopf (True), or not when switched off (False); RuntimeError on an unchecked kopf."""
    if environ.get(SWITCH, "on") == "off":  # the escape hatch (and for measuring)
        log.warning("kopf_patches.off")
        return False
    version = version or getattr(kopf, "__version__", "") or _installed_version()
    if version not in CHECKED_VERSIONS:
        raise RuntimeError(
            f"kopf {version} is installed, but analysis_operator/infra/kopf_patches.py was checked only "
            f"against kopf {', '.join(CHECKED_VERSIONS)}: it replaces kopf's private ToggleSet, and "
            f"without it a restart with many objects takes quadratic time. Install a checked kopf "
            f"(pip install -e . follows the pin in pyproject.toml), or re-check the patch against "
            f"kopf {version} and add it to CHECKED_VERSIONS and the pin (how: the module's docstring), "
            f"or set {SWITCH}=off to run without the patch, accepting slow restarts with many objects."
        )
    aiotoggles.ToggleSet = EdgeToggleSet  # type: ignore[misc]  # kopf looks it up at operator start
    return True


def _installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kopf")
    except PackageNotFoundError:
        return "(version unknown)"
