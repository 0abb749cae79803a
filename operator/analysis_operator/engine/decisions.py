"""The status each environment was last given by this process, until the API server shows it back.

converge decides from the status it is handed: kopf's body for the environment's own handlers, the
index for pod events, the sweep and idle culling. A decision's write reaches those copies a moment
later (the index and kopf's bodies follow the watch), so a second converge in that moment would
decide the same step again from the older status and write it a second time (Ready twice: a new
lastTransitionTime, a second Event). Every decision is written in the order it was taken
(engine/reconciler.Reconciler.decide, the handlers' path too), so a status in the chain below is
one the API server has not yet moved past. converge therefore asks
here first: while the status it was handed is one this process has already decided past, it gets
the decided one instead. Holding the environment's converge lock, so decisions are taken in turn.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from analysis_operator.model.conditions import apply_merge_patch

STALE_AFTER_SECONDS = 30.0  # a decision not seen back by then is forgotten (its write was lost)
BOUND = 100_000  # environments remembered; forgotten all at once beyond (they are then re-decided)
CHAIN = 8  # statuses a run of quick decisions may still be shown as, oldest first


class Decisions:
    def __init__(self, clock: Callable[[], float] = time.monotonic, stale_after: float = STALE_AFTER_SECONDS) -> None:
        self._clock, self._stale_after = clock, stale_after
        # uid -> (statuses not yet seen back, the status decided last, when)
        self._entries: dict[str, tuple[list[dict[str, Any]], dict[str, Any], float]] = {}

    def latest(self, uid: str, seen: Mapping[str, Any]) -> Mapping[str, Any]:
        """The status to decide from: `seen`, or what this process decided after it."""
        entry = self._entries.get(uid)
        if entry is None:
            return seen
        behind, decided, at = entry
        if self._clock() - at < self._stale_after and dict(seen) in behind:
            return decided
        del self._entries[uid]  # seen back (or something else wrote since): `seen` is current
        return seen

    def remember(
        self, uid: str, seen: Mapping[str, Any], used: Mapping[str, Any], patch: Mapping[str, Any] | None
    ) -> None:
        """A decision made from `used` (latest(uid, seen)) that writes `patch` (a merge patch)."""
        if not patch:
            return
        entry = self._entries.get(uid)
        behind = [*entry[0], entry[1]][-CHAIN:] if entry is not None and used is entry[1] else [dict(seen)]
        if len(self._entries) >= BOUND and uid not in self._entries:
            self._entries.clear()
        self._entries[uid] = (behind, apply_merge_patch(used, patch), self._clock())

    def forget(self, uid: str) -> None:
        """Its write failed, or it is gone: decide from what the API server shows."""
        self._entries.pop(uid, None)

    def prune(self) -> int:
        """Forget the decisions `latest` would no longer use (older than stale_after): an environment
        that converged is rarely asked about again, and its entry held two or three whole statuses."""
        cutoff = self._clock() - self._stale_after
        stale = [uid for uid, (_, _, at) in self._entries.items() if at <= cutoff]
        for uid in stale:
            del self._entries[uid]
        return len(stale)

    def uids(self) -> list[str]:
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
