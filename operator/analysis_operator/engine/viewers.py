"""OPEN, sharing: close the open connections of people who may no longer open an environment.

The gateway checks each new request and each new websocket with the forward-auth
(handlers/gateway.py), but a websocket it already proxies stays open (a JupyterLab kernel channel,
a terminal) however the sharing changes. Every JupyterLab the operator starts runs its extension
(analysis_operator/jupyter/aenv_viewers.py), which knows whose each open websocket is. When who may
open an environment may have changed (spec.sharing; a FacilityGroup or Dataset changed), `recheck`
asks the server, where the gateway reaches it and with the environment's token, who has websockets
open; decides each person with the forward-auth's own rules (policy/opening.may_open); asks the
server to close those of the people now refused, and posts an Event naming them. JupyterLab then
tries to reconnect, and the gateway refuses. Servers are asked at most `concurrency` at a time,
each within `timeout` seconds, and a server that does not answer is asked again a few times.

A desktop VM's websockify does the same through its auth plugin (templates/cloud-init.yaml.j2): each
desktop websocket is one process there, remembered with its person, and closed by killing it.
"""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import aiohttp
import structlog

from analysis_operator import jupyter
from analysis_operator.engine import server_certificates
from analysis_operator.engine.events import environment_reference, post_event
from analysis_operator.engine.idle import server_url
from analysis_operator.engine.reconciler import utcnow
from analysis_operator.engine.server_certificates import not_stored, tls_options
from analysis_operator.engine.tokens import read_token
from analysis_operator.engine.views import EnvironmentRecord, Index, first
from analysis_operator.infra.kube import KubeClient
from analysis_operator.model.domain import Environment, Phase
from analysis_operator.policy.access import Catalogue
from analysis_operator.policy.opening import Viewer, may_open, sharing_digest
from analysis_operator.settings import Settings

log = structlog.get_logger("analysis_operator.viewers")

JUPYTER_BACKENDS = frozenset({"kubernetes", "slurm"})  # JupyterLab, with the operator's extension
DESKTOP_BACKENDS = frozenset({"openstack"})  # a desktop VM: websockify with the operator's auth plugin
DESKTOP_HEADER = "X-Aenv-Viewers"
RETRY_SECONDS = (2.0, 5.0, 10.0)  # a server that does not answer is asked again after these


class Unanswered(Exception):
    """The server did not answer (down, slow), or not as the extension does."""


def refused_viewers(
    environment: Environment,
    viewers: Iterable[str],
    admins: frozenset[str],
    catalogue: Catalogue,
    now: datetime.datetime,
) -> dict[str, str]:
    """Who of the people with connections open may no longer open it, and why (pure)."""
    refused = {}
    for user in sorted(set(viewers)):
        verdict = may_open(
            environment, Phase.READY.value, Viewer(user, catalogue.groups_of(user)), admins, catalogue, now
        )
        if not verdict.allowed:
            refused[user] = verdict.reason
    return refused


def affected_by_catalogue(record: EnvironmentRecord) -> bool:
    """A Ready environment shared with someone: a group's members or a dataset's rules may have
    changed who of them may open it (pure)."""
    environment = record.environment
    return record.status.get("phase") == Phase.READY.value and bool(
        (environment.shared_users - {environment.owner}) or environment.shared_groups
    )


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


class Disconnector:
    def __init__(
        self,
        kube: KubeClient,
        settings: Settings,
        environments: Index,
        catalogue: Catalogue,
        timeout: float = 5.0,
        concurrency: int = 20,
        clock: Callable[[], datetime.datetime] = utcnow,
        retry_seconds: tuple[float, ...] = RETRY_SECONDS,
    ) -> None:
        self._kube, self._settings, self._environments, self._catalogue = kube, settings, environments, catalogue
        self._admins = frozenset(settings.gateway.admins)
        self._timeout, self._clock, self._retry_seconds = timeout, clock, retry_seconds
        self._slots = asyncio.Semaphore(concurrency)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._again: set[tuple[str, str]] = set()  # asked again while a recheck ran: one more after it

    def soon(self, namespace: str, name: str) -> None:
        """Recheck this environment in the background (one at a time per environment)."""
        key = (namespace, name)
        if key in self._tasks:
            self._again.add(key)
            return
        self._tasks[key] = asyncio.get_running_loop().create_task(self._run(key))

    async def _run(self, key: tuple[str, str]) -> None:
        try:
            while True:
                self._again.discard(key)
                for delay in (*self._retry_seconds, None):
                    try:
                        await self.recheck(*key)
                        break
                    except Unanswered as error:
                        if delay is None:
                            log.warning("viewers.unanswered", environment="/".join(key), error=str(error))
                            break
                        await asyncio.sleep(delay)
                if key not in self._again:
                    return
        except Exception as error:  # an API error, a bug: logged; the next change asks again
            log.warning("viewers.failed", environment="/".join(key), error=repr(error))
        finally:
            self._tasks.pop(key, None)

    async def recheck(self, namespace: str, name: str) -> dict[str, int]:
        """Close the connections of everyone who may no longer open it; returns {user: closed}."""
        record: EnvironmentRecord | None = first(self._environments, (namespace, name))
        if record is None or record.status.get("phase") != Phase.READY.value:
            return {}  # not running: its route is closed, and its server gone or going
        backend = record.status.get("backend") or {}
        endpoint, kind = str(backend.get("endpoint") or ""), str(backend.get("kind") or "")
        if kind not in JUPYTER_BACKENDS | DESKTOP_BACKENDS or not endpoint:
            return {}
        environment = record.environment
        token = await read_token(self._kube, environment)
        if token is None:
            return {}
        desktop = kind in DESKTOP_BACKENDS
        tls = await tls_options(self._kube, environment, backend)
        if tls is None:
            raise Unanswered(not_stored(environment))
        url = server_url(environment, endpoint, self._settings, desktop=desktop, tls=bool(tls))
        async with self._slots:
            try:
                open_ = await self._viewers(url, token, desktop, (), tls)
            except Unanswered:
                if tls:  # another server, or a newer certificate stored (a resume by another replica)
                    server_certificates.forget([environment.uid])  # read it again next time
                raise
            if open_ is None:
                await self._not_running_extension(environment, desktop)
                return {}
            refused = refused_viewers(environment, open_, self._admins, self._catalogue, self._clock())
            if not refused:
                await self._checked(record)
                return {}
            await self._viewers(url, token, desktop, sorted(refused), tls)
        await self._checked(record)
        closed = {user: open_.get(user, 0) for user in refused}
        people = ", ".join(f"{user} ({closed[user]}, {reason})" for user, reason in refused.items())
        message = (
            f"closed the open connections of {people}: they may no longer open it; "
            f"the gateway refuses their next request"
        )
        log.info("viewers.disconnected", environment=f"{namespace}/{name}", users=sorted(refused))
        await post_event(self._kube, environment_reference(environment), "Normal", "ViewersDisconnected", message)
        return closed

    async def _checked(self, record: EnvironmentRecord) -> None:
        """Mark the sharing whose open connections were checked (status.viewersCheckedFor), where it is not
        marked yet: a restarted operator checks again only where it changed meanwhile."""
        digest = sharing_digest(record.environment)
        if str(record.status.get("viewersCheckedFor") or "") != digest:
            environment = record.environment
            await self._kube.patch_environment_status(
                environment.namespace, environment.name, {"viewersCheckedFor": digest or None}
            )

    async def _viewers(
        self, url: str, token: str, desktop: bool, close: Iterable[str], tls: Mapping[str, Any]
    ) -> dict[str, int] | None:
        """Who has connections open ({user: count}), after closing those of `close`; None when the server
        does not run the operator's code for it. JupyterLab: its extension's endpoint (JSON). A desktop:
        websockify's auth plugin, asked by a header (cloud-init.yaml.j2), answering in one."""
        headers = {"Authorization": f"token {token}"}
        users = list(close)
        if desktop:
            headers[DESKTOP_HEADER] = ",".join(users)
            status, answered, _ = await self._call("GET", url, headers, tls=tls)
            if status != 200:
                raise Unanswered(f"{url}: HTTP {status}")
            if DESKTOP_HEADER not in answered:
                return None  # an older VM's plugin: it served the page instead
            found: Any = _json(answered[DESKTOP_HEADER])
        else:
            endpoint = url + jupyter.ENDPOINT
            body = {"close": users} if users else None
            status, _, text = await self._call("POST" if users else "GET", endpoint, headers, body, tls)
            if status == 404:
                return None
            if status != 200:
                raise Unanswered(f"{endpoint}: HTTP {status}")
            answer = _json(text) if not users else {"viewers": {}}
            found = answer.get("viewers") if isinstance(answer, Mapping) else None
        if not isinstance(found, Mapping):
            raise Unanswered(f"{url}: no list of viewers in its answer")
        return {str(user): int(count) for user, count in found.items() if isinstance(count, int)}

    async def _not_running_extension(self, environment: Environment, desktop: bool) -> None:
        what = "desktop's access plugin" if desktop else f"JupyterLab extension ({jupyter.MODULE})"
        message = (
            "could not close the open connections of people it is no longer shared with: its server does not run "
            f"the operator's {what}; they stay open until they close"
        )
        log.warning("viewers.no_extension", environment=f"{environment.namespace}/{environment.name}")
        await post_event(self._kube, environment_reference(environment), "Warning", "ViewersNotDisconnected", message)

    async def _call(
        self, method: str, url: str, headers: Mapping[str, str], body: Any = None, tls: Mapping[str, Any] | None = None
    ) -> tuple[int, Mapping[str, str], str]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))
        try:
            async with self._session.request(method, url, json=body, headers=dict(headers), **(tls or {})) as response:
                return response.status, response.headers, await response.text()
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            # Its type only (as engine/idle.py): the repr of a ClientResponseError (TooManyRedirects, say)
            # holds the request's headers, the server's token among them, and this message is logged.
            raise Unanswered(f"{method} {url}: {type(error).__name__}") from None

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        if self._session is not None:
            await self._session.close()
