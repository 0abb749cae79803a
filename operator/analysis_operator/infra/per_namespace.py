"""Something the operator sets up once per namespace for the environments there (the JupyterLab
extension's ConfigMap, the gateway's forward-auth Middleware and closed page).

One setup at a time per namespace, awaited by every environment that needs it meanwhile: a burst of 50
starts into a new namespace made 34 applies of the same ConfigMap before (bench/RESULTS.md, stop 45).
What was set up is remembered per namespace for as long as an environment this process set it up for
still exists. Once the last of them is gone (forget, on its DELETED event) the namespace may have gone
with them, and one made again under the same name has nothing: the next environment there sets it up
again. Remembered for the whole run before, such a namespace's pods never started (no ConfigMap to
mount) and its routes never opened (no Middleware).

Deleted under a namespace's live environments (by a person, a cleanup script, a GitOps prune), what was
set up is made again by `restore`, which the operator's repair (Context.repair, with the orphan sweep)
calls with the namespaces whose objects the API server no longer lists."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import structlog

log = structlog.get_logger("analysis_operator.per_namespace")


class PerNamespace:
    def __init__(self, setup: Callable[[str], Awaitable[Any]]) -> None:
        self._setup = setup
        self._done: set[str] = set()  # namespaces set up
        self._under_way: dict[str, asyncio.Future[Any]] = {}  # namespace -> its setup running now
        self._users: dict[str, str] = {}  # environment uid -> the namespace it needed it in
        self._count: collections.Counter[str] = collections.Counter()  # namespace -> its users

    async def ensure(self, namespace: str, uid: str) -> None:
        """Set up in `namespace` (at once if it is already) for the environment `uid`. A failed setup
        fails every caller waiting on it, and the next call sets up again; a caller given up on
        (cancelled) cancels no one else's wait."""
        if uid not in self._users:
            self._users[uid] = namespace
            self._count[namespace] += 1
        if namespace not in self._done:
            await self._set_up(namespace)

    @property
    def done(self) -> frozenset[str]:
        """The namespaces set up for environments that still exist."""
        return frozenset(self._done)

    async def restore(self, gone: Collection[str], what: str) -> None:
        """Set up `what` again in those of these namespaces where it was (it is gone there, their
        environments are not). One that fails (the namespace being deleted meanwhile) is set up again
        by its next environment's `ensure`, or the next restore."""
        again = sorted(self._done.intersection(gone))
        self._done.difference_update(again)
        for namespace in again:
            try:
                await self._set_up(namespace)
            except Exception as error:
                log.warning("namespace.restore_failed", namespace=namespace, what=what, error=repr(error))
                continue
            log.warning("namespace.restored", namespace=namespace, what=what)

    async def _set_up(self, namespace: str) -> None:
        setting_up = self._under_way.get(namespace)
        if setting_up is None:
            setting_up = self._under_way[namespace] = asyncio.ensure_future(self._setup(namespace))

            def finished(done: asyncio.Future[Any]) -> None:
                del self._under_way[namespace]
                if not done.cancelled() and done.exception() is None and self._count[namespace] > 0:
                    self._done.add(namespace)

            setting_up.add_done_callback(finished)
        await asyncio.shield(setting_up)

    def forget(self, uids: Collection[str]) -> None:
        """These environments are gone: a namespace none is left in is set up again when next needed."""
        for uid in uids:
            namespace = self._users.pop(uid, None)
            if namespace is None:
                continue
            self._count[namespace] -= 1
            if self._count[namespace] <= 0:
                del self._count[namespace]
                self._done.discard(namespace)
