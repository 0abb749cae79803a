"""engine/viewers.py against a real local HTTP server: what it says of a server that does not answer
as the extension does never carries the server's token."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from analysis_operator.engine import tokens
from analysis_operator.engine.viewers import Disconnector, Unanswered
from analysis_operator.engine.views import EnvironmentRecord
from analysis_operator.model.domain import Environment
from analysis_operator.settings import Settings

TOKEN = "server-token-that-must-stay-secret"
LAB = Environment(namespace="team-a", name="lab", uid="u-viewers", owner="alice", flavor="jl")


@pytest.fixture(autouse=True)
def _token_known():
    tokens.remember(LAB.uid, TOKEN)
    yield
    tokens.forget([LAB.uid])


async def redirect_loop(request: web.Request) -> web.Response:
    raise web.HTTPFound(request.path)  # aiohttp follows it until TooManyRedirects


@contextlib.asynccontextmanager
async def serving(handler) -> AsyncIterator[str]:
    """A local HTTP server answering every path with `handler`; yields its `address:port` endpoint."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    finally:
        await runner.cleanup()


def test_a_server_answering_with_a_redirect_loop_is_told_of_without_its_token():
    """aiohttp's TooManyRedirects (a ClientResponseError) holds the request's headers in its repr, the
    server's `Authorization: token ...` with them: the message and the log give its type and status only."""

    async def scenario() -> tuple[str, list[dict]]:
        async with serving(redirect_loop) as endpoint:
            status = {"phase": "Ready", "backend": {"kind": "kubernetes", "endpoint": endpoint}}
            environments = {("team-a", "lab"): [EnvironmentRecord(LAB, status)]}
            disconnector = Disconnector(None, Settings(), environments, None, timeout=5, retry_seconds=())
            try:
                with pytest.raises(Unanswered) as raised:
                    await disconnector.recheck("team-a", "lab")
                with capture_logs() as logs:
                    disconnector.soon("team-a", "lab")
                    await asyncio.wait_for(asyncio.gather(*disconnector._tasks.values()), 10)
            finally:
                await disconnector.close()
        return str(raised.value), logs

    message, logs = asyncio.run(scenario())
    assert message.endswith("/env/team-a/lab/aenv/viewers: TooManyRedirects")
    assert TOKEN not in message and "Authorization" not in message
    (unanswered,) = [entry for entry in logs if entry["event"] == "viewers.unanswered"]
    assert TOKEN not in repr(unanswered) and unanswered["error"] == message


class Statuses:
    """The status patches the Disconnector sends."""

    def __init__(self) -> None:
        self.patches: list[dict] = []

    async def patch_environment_status(self, namespace, name, patch):
        self.patches.append(patch)


def test_a_check_marks_the_sharing_it_checked_and_a_restart_checks_only_a_sharing_changed_meanwhile():
    """After a check (nobody left to close, or closed), status.viewersCheckedFor names the sharing
    checked; a restarted operator's resume asks again only where spec.sharing is not that one (changed
    while no operator ran: its spec handler sees no change then). Never shared: no mark, no check."""
    import dataclasses

    from analysis_operator.policy.opening import sharing_digest, viewers_unchecked

    shared = dataclasses.replace(LAB, shared_users=frozenset({"bob"}))

    async def viewers(request: web.Request) -> web.Response:
        return web.json_response({"viewers": {"alice": 1}})

    async def scenario(kube: Statuses, status: dict) -> None:
        async with serving(viewers) as endpoint:
            ready = {**status, "phase": "Ready", "backend": {"kind": "kubernetes", "endpoint": endpoint}}
            environments = {("team-a", "lab"): [EnvironmentRecord(shared, ready)]}
            disconnector = Disconnector(kube, Settings(), environments, None, timeout=5, retry_seconds=())
            disconnector._catalogue = type("Catalogue", (), {"groups_of": lambda self, user: frozenset()})()
            try:
                assert await disconnector.recheck("team-a", "lab") == {}  # alice is the owner: nobody to close
            finally:
                await disconnector.close()

    kube = Statuses()
    asyncio.run(scenario(kube, {}))
    assert kube.patches == [{"viewersCheckedFor": sharing_digest(shared)}]
    marked = Statuses()
    asyncio.run(scenario(marked, {"viewersCheckedFor": sharing_digest(shared)}))
    assert marked.patches == []  # marked already: nothing written
    assert sharing_digest(LAB) == ""
    assert not viewers_unchecked(LAB, {"phase": "Ready"})  # never shared
    assert viewers_unchecked(shared, {"phase": "Ready"})  # shared, never checked (or unshared, see below)
    assert not viewers_unchecked(shared, {"phase": "Ready", "viewersCheckedFor": sharing_digest(shared)})
    assert viewers_unchecked(LAB, {"phase": "Ready", "viewersCheckedFor": sharing_digest(shared)})  # unshared
    assert not viewers_unchecked(shared, {"phase": "Suspended"})  # not running: nothing open
