"""slurmrestd's REST API, as the operator or as a job's owner, in the version it serves.

The version is the one settings.api_version pins, or ("auto") the newest slurmrestd serves of
those the operator speaks, asked once (GET /openapi/v3) and asked again when slurmrestd stops
serving it (an upgrade). Requests and answers go through that version's Dialect
(backends/slurm_api.py); this module only moves them and judges answers by their content:
slurmrestd 25.05 answers 200 to a ping no controller answered, 404 to an unknown job and 200
(errors inside) to a cancel of an ended job.

Connections are kept alive between requests (KeptAlive), to slurmrestd and to the nodes'
JupyterLab; the credentials (backends/slurm_auth.py) are read on every request, so a site can
rotate the key or token without a restart.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp

from analysis_operator.backends.base import BackendUnavailable
from analysis_operator.backends.slurm_api import (
    ALREADY_DONE,
    AUTO,
    INVALID_JOB_ID,
    Dialect,
    JobRequest,
    Ping,
    SlurmAnswerInvalid,
    SlurmError,
    SlurmJob,
    SlurmNode,
    Submitted,
    UnsupportedApi,
    choose_version,
    dialect,
    served_versions,
)
from analysis_operator.backends.slurm_auth import SlurmCredentials
from analysis_operator.settings import SlurmSettings

REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=15)
PROBE_TIMEOUT = aiohttp.ClientTimeout(total=3)
# An idle connection is closed after this long: before a proxy in front of slurmrestd would close
# it under a request (slurmrestd 25.05 itself never times an idle connection out, by its source).
KEEPALIVE_SECONDS = 10.0
# Slurm's authentication errors: SLURM_PROTOCOL_AUTHENTICATION_ERROR, ESLURM_AUTH_* (6000-6099).
_AUTH_CODES = frozenset({1007, *range(6000, 6100)})
T = TypeVar("T")


class SlurmRequestRefused(Exception):
    """slurmrestd answered and said no (bad partition, invalid job, ...)."""

    def __init__(self, errors: Sequence[SlurmError]):
        self.errors = tuple(errors)
        self.codes = {error.code for error in errors}
        super().__init__("; ".join(error.text for error in errors))


def _is_refusal(code: int) -> bool:
    # ESLURM_* codes from 2000 up are answers about the request (and 9000-9399 about its form);
    # lower ones and the auth range (6000+) mean the controller or the token could not be used.
    return 2000 <= code < 6000 or 9000 <= code < 9400


class KeptAlive:
    """One aiohttp session for the event loop, its connections kept alive between requests: a
    request on a kept connection costs the operator about a third of one on a session of its own
    (bench/slurm_session.py), and slurmrestd accepts one connection instead of one per request.
    No limit on connections at once (as with a session per request): environments stuck on a
    stalled slurmrestd do not hold the others up behind a pool."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: asyncio.Task[None] | None = None  # held: the loop keeps only weak references

    def session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            self._discard()  # of a loop that ended (asyncio.run, in tests)
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_SECONDS)
            self._session, self._loop = aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT), loop
        return self._session

    def close(self) -> None:
        """Close the kept connections, on the loop that opened them (at the operator's shutdown)."""
        if self._session is not None and self._loop is not None and not self._loop.is_closed():
            self._closing = self._loop.create_task(self._session.close())
            self._session = None
        self._discard()

    def _discard(self) -> None:
        """Close a session whose loop has ended: aiohttp has nothing left to do on a closed loop, so
        its close runs to the end at once (the sockets go with the loop's transports)."""
        session, self._session = self._session, None
        if session is None or session.closed or not (self._loop is None or self._loop.is_closed()):
            return
        closing = session.close()
        try:
            closing.send(None)
        except StopIteration:
            return
        closing.close()

    def __del__(self) -> None:
        self._discard()


@dataclass
class SlurmRestClient:
    """slurmrestd as the operator (`user`), or as a job's owner where a method takes `user`."""

    settings: SlurmSettings
    http: KeptAlive = field(default_factory=KeptAlive, repr=False)
    _dialect: Dialect | None = field(default=None, init=False, repr=False)

    @property
    def credentials(self) -> SlurmCredentials:
        return SlurmCredentials(self.settings)

    @property
    def _base(self) -> str:
        return self.settings.url.rstrip("/")

    # ---------------------------------------------------------------- the version

    async def api(self) -> Dialect:
        """The dialect of the version spoken with this slurmrestd (asked once, when not pinned)."""
        if self._dialect is None:
            self._dialect = await self._discover()
        return self._dialect

    async def _discover(self) -> Dialect:
        setting = self.settings.api_version or AUTO
        try:
            if setting != AUTO:
                return dialect(choose_version((), setting))
            status, body = await self._send("GET", f"{self._base}/openapi/v3", None, self.credentials.headers())
            if status in (401, 403):
                raise self._auth_failure("GET /openapi/v3", status, [], "")
            if status >= 400 or not isinstance(body, Mapping):
                raise BackendUnavailable(
                    f"{self.settings.url} answered GET /openapi/v3 with HTTP {status} and no OpenAPI document: "
                    "is it slurmrestd (25.05: started with -s openapi/slurmctld)?"
                )
            return dialect(choose_version(served_versions(body)))
        except (UnsupportedApi, SlurmAnswerInvalid) as error:
            raise BackendUnavailable(f"slurmrestd at {self.settings.url}: {error}") from None

    # ---------------------------------------------------------------- the exchange

    async def _send(
        self, method: str, url: str, payload: Any, headers: Mapping[str, str]
    ) -> tuple[int, Mapping[str, Any] | None]:
        """(HTTP status, the JSON object answered or None)."""
        try:
            async with self.http.session().request(method, url, json=payload, headers=dict(headers)) as response:
                text = await response.text()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as error:
            raise BackendUnavailable(
                f"slurmrestd at {self.settings.url} is unreachable ({type(error).__name__}); "
                "will retry: check that slurmrestd runs and the URL is right"
            ) from None
        try:
            body = json.loads(text) if text.strip() else None
        except ValueError:
            body = None
        return status, body if isinstance(body, Mapping) else None

    async def request(self, method: str, path: str, payload: Any = None, user: str = "") -> dict[str, Any]:
        """An answer without errors, as its version's JSON; SlurmRequestRefused when slurmctld said no,
        BackendUnavailable when slurmrestd or slurmctld cannot serve it."""
        api = await self.api()
        headers = self.credentials.headers(user)
        what = f"{method} {path}"
        status, body = await self._send(method, f"{self._base}/slurm/{api.version}/{path}", payload, headers)
        if body is None:
            if status in (401, 403):
                raise self._auth_failure(what, status, [], headers["X-SLURM-USER-NAME"])
            if status == 404:
                self._forget(api)
                raise BackendUnavailable(
                    f"slurmrestd at {self.settings.url} does not serve {what} in {api.version} (HTTP 404): "
                    f"{self._after_404()}"
                )
            raise BackendUnavailable(
                f"{self.settings.url} answered {what} with HTTP {status} and something that is not JSON: "
                "is it slurmrestd?"
            )
        errors = api.errors(body)
        if status < 400 and not errors:
            return dict(body)
        codes = {error.code for error in errors}
        if status in (401, 403) or codes & _AUTH_CODES:
            raise self._auth_failure(what, status, errors, headers["X-SLURM-USER-NAME"])
        refusal = SlurmRequestRefused(errors or [SlurmError(-1, f"HTTP {status}")])
        if any(_is_refusal(code) for code in codes):
            raise refusal
        # 22.05 answers a token slurmctld refuses with "slurmctld config is unable to load" (-1).
        raise BackendUnavailable(
            f"slurmrestd at {self.settings.url} could not serve {what} for user "
            f"{headers['X-SLURM-USER-NAME']} ({refusal}): slurmctld is down or unreachable from slurmrestd, "
            f"or it refused the credentials; {self.credentials.diagnose()}"
        )

    def _forget(self, api: Dialect) -> None:
        """A discovered version slurmrestd stopped serving (upgraded): ask again next time."""
        if (self.settings.api_version or AUTO) == AUTO and self._dialect is api:
            self._dialect = None

    def _after_404(self) -> str:
        if (self.settings.api_version or AUTO) == AUTO:
            return "it was upgraded or restarted with other plugins; the operator asks it again on the next try"
        return f"check api_version ({self.settings.api_version}) against what it serves, or set it to auto"

    def _auth_failure(self, what: str, status: int, errors: Sequence[SlurmError], user: str) -> BackendUnavailable:
        said = "; ".join(error.text for error in errors) or f"HTTP {status}"
        return BackendUnavailable(
            f"slurmrestd at {self.settings.url} refused the credentials for {what}"
            f"{f' as {user}' if user else ''} ({said}): {self.credentials.diagnose()}"
        )

    def _read(self, parse: Callable[[Mapping[str, Any]], T], answer: Mapping[str, Any], what: str) -> T:
        try:
            return parse(answer)
        except SlurmAnswerInvalid as error:
            raise BackendUnavailable(
                f"slurmrestd at {self.settings.url} answered {what} in a form the operator cannot read: {error}"
            ) from None

    # ---------------------------------------------------------------- the calls

    async def ping(self) -> Ping:
        api = await self.api()
        return self._read(api.parse_ping, await self.request("GET", "ping"), "GET ping")

    async def jobs(self) -> list[SlurmJob]:
        api = await self.api()
        return self._read(api.parse_jobs, await self.request("GET", "jobs"), "GET jobs")

    async def job(self, job_id: str) -> SlurmJob | None:
        """The job, None if Slurm does not know it (never did, or purged after MinJobAge)."""
        api = await self.api()
        try:
            answer = await self.request("GET", f"job/{job_id}")
        except SlurmRequestRefused as refusal:
            if INVALID_JOB_ID in refusal.codes:
                return None
            raise
        found = self._read(api.parse_jobs, answer, f"GET job/{job_id}")
        return found[0] if found else None

    async def node(self, name: str) -> SlurmNode | None:
        """A node as Slurm describes it (name, address, hostname), None if unknown."""
        api = await self.api()
        try:
            answer = await self.request("GET", f"node/{name}")
        except SlurmRequestRefused:
            return None
        found = self._read(api.parse_nodes, answer, f"GET node/{name}")
        return found[0] if found else None

    async def submit(self, job: JobRequest, script: str, user: str = "") -> Submitted:
        api = await self.api()
        answer = await self.request("POST", "job/submit", api.submit_body(job, script), user=user)
        return self._read(api.parse_submitted, answer, "POST job/submit")

    async def update_time_limit(self, job_id: str, minutes: int, user: str = "") -> None:
        """Set a job's time limit, as the operator (default: a job's owner may only lower it)."""
        api = await self.api()
        answer = await self.request("POST", f"job/{job_id}", api.time_limit_body(minutes), user=user)
        errors = api.update_errors(answer)
        if errors:
            raise SlurmRequestRefused(errors)

    async def cancel(self, job_id: str) -> None:
        """Cancel a job; one that is unknown or already ended counts as gone."""
        api = await self.api()
        gone = {INVALID_JOB_ID, ALREADY_DONE}
        try:
            answer = await self.request("DELETE", f"job/{job_id}")
        except SlurmRequestRefused as refusal:
            if refusal.codes <= gone:
                return
            raise
        errors = [error for error in api.cancel_errors(answer) if error.code not in gone]
        if errors:
            raise SlurmRequestRefused(errors)


async def endpoint_answers(http: KeptAlive, url: str) -> bool:
    """Whether anything answers HTTP there (any status: without the token JupyterLab answers 403
    or redirects to its login page)."""
    try:  # https: any TLS server answers (no certificate is checked: nothing is sent but the path)
        async with http.session().get(url, allow_redirects=False, timeout=PROBE_TIMEOUT, ssl=False):
            return True
    except (aiohttp.ClientError, TimeoutError):
        return False


def http_url(address: str, port: int, path: str = "/", scheme: str = "http") -> str:
    """http://address:port/path (or https), with an IPv6 address in brackets (pure)."""
    host = f"[{address}]" if ":" in address else address
    return f"{scheme}://{host}:{port}{path}"


async def resolve_address(host: str, domain: str = "") -> str:
    """The IP address of a node's address or name ("" if it does not resolve): an IP address
    as it is; a name as the operator's resolver knows it, first with `domain` appended to a
    short one; IPv4 before IPv6 (JupyterLab listens on the node's IPv4 addresses)."""
    if not host:
        return ""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    names = [f"{host}.{domain}", host] if domain and "." not in host else [host]
    loop = asyncio.get_running_loop()
    for name in names:
        try:
            found = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            continue
        addresses = sorted({str(info[4][0]) for info in found}, key=lambda text: (":" in text, text))
        if addresses:
            return addresses[0]
    return ""
