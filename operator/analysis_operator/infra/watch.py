"""A list-then-watch of one core kind carrying the operator's label, kept as a small summary per
object and a key to find it by: what client-go's informers do, for the operator's pods.

kopf watched the pods before. Each pod event went through its per-object machinery (a worker, a
record per pod for as long as it lived, the diff of the whole body, its startup gate holding every
pod's body until every index was filled) only to update a summary and start a reconcile: for the
pods that was half of the objects kopf held at 10,000 environments (bench/RESULTS.md). Here an
event costs its JSON and one summary.

Changes of a summary are told to `changed(key)` in a task of their own, once for events of the same key that
arrive together. The first list is read by `start` (the operator's handlers read the summaries from
their first run) and told to no one; `follow` then watches from that list's version on. A list read
again after the watch lost its place (410 Gone) tells every key that changed meanwhile. A watch that
fails (the API server restarting) is tried again from where it was, after a growing pause; one refused
(403, 404: no RBAC for it, its CRD not installed) only every minute.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable, Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

import structlog

from analysis_operator.infra.kube import Expired, KubeClient, KubeError

log = structlog.get_logger("analysis_operator.watch")

Key = TypeVar("Key", bound=Hashable)
Summary = TypeVar("Summary")
Found = tuple[str, tuple[Key, Summary] | None]  # an object's uid, and its (key, summary) or None: what is kept of it
FIRST_PAUSE, LAST_PAUSE = 0.5, 5.0  # seconds between failed watches, doubling (a failed one costs a connection)
REFUSED_PAUSE = 60.0  # after a 403 or 404 (no RBAC for it, its CRD not installed): a fix takes a person


class Summaries(Mapping[Key, tuple[Summary, ...]], Generic[Key, Summary]):
    """key -> the summaries of the objects with that key (usually one), by object uid.
    `read(object)` gives (key, summary), or None for an object to leave out."""

    def __init__(self, read: Callable[[Mapping[str, Any]], tuple[Key, Summary] | None]) -> None:
        self._read = read
        self._by_key: dict[Key, dict[str, Summary]] = {}
        self._key_of: dict[str, Key] = {}  # object uid -> its key now (a label may change)

    def __getitem__(self, key: Key) -> tuple[Summary, ...]:
        return tuple(self._by_key[key].values())

    def __iter__(self) -> Iterator[Key]:
        return iter(list(self._by_key))

    def __len__(self) -> int:
        return len(self._by_key)

    def read(self, body: Mapping[str, Any]) -> Found[Key, Summary]:
        """An object's uid and its (key, summary), or None to leave it out: what is kept of it."""
        return str((body.get("metadata") or {}).get("uid") or ""), self._read(body)

    def put(self, body: Mapping[str, Any]) -> set[Key]:
        """An object as it is now; the keys whose summaries changed (its old one too, if it moved): none
        when what is kept of it is the same (a change the summary does not show: a pod's IP, an annotation)."""
        uid, found = self.read(body)
        if found is not None and self._key_of.get(uid) == found[0] and self._by_key[found[0]].get(uid) == found[1]:
            return set()
        return self._put(uid, found)

    def _put(self, uid: str, found: tuple[Key, Summary] | None) -> set[Key]:
        changed = self.remove(uid)
        if found is not None:
            key, summary = found
            self._by_key.setdefault(key, {})[uid] = summary
            self._key_of[uid] = key
            changed.add(key)
        return changed

    def remove(self, uid: str) -> set[Key]:
        key = self._key_of.pop(uid, None)
        if key is None:
            return set()
        summaries = self._by_key[key]
        del summaries[uid]
        if not summaries:
            del self._by_key[key]
        return {key}

    def replace(self, objects: Iterable[Found[Key, Summary]]) -> set[Key]:
        """Exactly these objects (as `read` gives them) from now on, a list read again; the keys
        whose summaries changed."""
        before = {key: dict(summaries) for key, summaries in self._by_key.items()}
        self._by_key.clear()
        self._key_of.clear()
        for uid, found in objects:
            self._put(uid, found)
        return {key for key in before.keys() | self._by_key.keys() if before.get(key) != self._by_key.get(key)}


class Watch(Generic[Key, Summary]):
    """Keeps `summaries` current with the objects of `kind` selected by `selector`."""

    def __init__(
        self,
        kube: KubeClient,
        kind: str,
        selector: str,
        summaries: Summaries[Key, Summary],
        changed: Callable[[Key], Awaitable[None]],
    ) -> None:
        self.kube, self.kind, self.selector, self.summaries = kube, kind, selector, summaries
        self._changed = changed
        self._version = ""
        self._task: asyncio.Task[None] | None = None
        self._told: set[Key] = set()  # keys whose task has not started yet: one task for events together
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Read the first list (told to no one); `follow` then follows the changes since."""
        await self._list(tell=False)

    def follow(self) -> None:
        self._task = asyncio.create_task(self._follow(), name=f"watch {self.kind}")

    async def stop(self) -> None:
        for task in (self._task, *self._tasks):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.kube.close()

    async def _list(self, tell: bool = True) -> None:
        """The list read page by page, each page's objects read into summaries and let go before the
        next page is asked for; the summaries replaced once the whole list is in."""
        objects: list[Found[Key, Summary]] = []
        version = ""
        async for page, snapshot in self.kube.labelled(self.kind, self.selector):
            objects.extend(map(self.summaries.read, page))
            version = snapshot
        changed = self.summaries.replace(objects)
        self._version = version
        log.info("watch.listed", kind=self.kind, objects=len(objects), changed=len(changed) if tell else None)
        if tell:
            self._tell(changed)

    async def _follow(self) -> None:
        pause = FIRST_PAUSE
        while True:
            try:
                if not self._version:  # the watch lost its place: list again, and tell what changed
                    await self._list()
                async for event in self.kube.watch(self.kind, self.selector, self._version):
                    self._apply(event)
                    pause = FIRST_PAUSE
            except Expired:
                log.info("watch.expired", kind=self.kind)
                self._version = ""
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the API server restarting, a connection dropped: from where it was
                wait = REFUSED_PAUSE if isinstance(error, KubeError) and error.status in (403, 404) else pause
                log.warning("watch.failed", kind=self.kind, error=repr(error), retry_in=wait)
                await asyncio.sleep(wait)
                pause = min(LAST_PAUSE, pause * 2)

    def _apply(self, event: dict[str, Any]) -> None:
        body = event.get("object") or {}
        version = (body.get("metadata") or {}).get("resourceVersion")
        if version:
            self._version = str(version)
        kind = event.get("type")
        if kind == "DELETED":
            self._tell(self.summaries.remove(str(body["metadata"].get("uid") or "")))
        elif kind in ("ADDED", "MODIFIED"):
            self._tell(self.summaries.put(body))

    def _tell(self, keys: set[Key]) -> None:
        for key in keys - self._told:
            self._told.add(key)
            task = asyncio.create_task(self._deliver(key))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _deliver(self, key: Key) -> None:
        self._told.discard(key)  # what arrives from now on is told again
        try:
            await self._changed(key)
        except Exception:  # one failed reaction must not end the watch; the sweep looks again
            log.exception("watch.reaction_failed", kind=self.kind, key=repr(key))
