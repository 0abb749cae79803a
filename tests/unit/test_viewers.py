"""engine/viewers.py against a real local HTTP server: what it says of a server that does not answer
as the extension does never carries the server's token."""

from __future__ import annotations

import asyncio

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


def test_a_server_answering_with_a_redirect_loop_is_told_of_without_its_token():
    """aiohttp's TooManyRedirects (a ClientResponseError) holds the request's headers in its repr, the
    server's `Authorization: token ...` with them: the message and the log give its type and status only."""

    async def scenario() -> tuple[str, list[dict]]:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", redirect_loop)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        status = {"phase": "Ready", "backend": {"kind": "kubernetes", "endpoint": f"127.0.0.1:{port}"}}
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
            await runner.cleanup()
        return str(raised.value), logs

    message, logs = asyncio.run(scenario())
    assert message.endswith("/env/team-a/lab/aenv/viewers: TooManyRedirects")
    assert TOKEN not in message and "Authorization" not in message
    (unanswered,) = [entry for entry in logs if entry["event"] == "viewers.unanswered"]
    assert TOKEN not in repr(unanswered) and unanswered["error"] == message
