"""slurmrestd's REST API (v0.0.38 paths from settings.api_version), as the operator or as a job's owner.

A session per request; the credentials (backends/slurm_auth.py) are read on every request,
so a site can rotate the key or token without a restart.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

import aiohttp

from analysis_operator.backends.base import BackendUnavailable
from analysis_operator.backends.slurm_auth import SlurmCredentials
from analysis_operator.settings import SlurmSettings

REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=15)
PROBE_TIMEOUT = aiohttp.ClientTimeout(total=3)
# ESLURM_INVALID_JOB_ID: the job is unknown (never existed, or purged after MinJobAge).
INVALID_JOB_ID = 2017


class SlurmRequestRefused(Exception):
    """slurmrestd answered and said no (bad partition, invalid job, ...)."""

    def __init__(self, errors: list[dict[str, Any]]):
        self.codes = {int(error.get("error_number", error.get("error_code", -1))) for error in errors}
        super().__init__("; ".join(str(error.get("description") or error.get("error")) for error in errors))


def _is_refusal(code: int) -> bool:
    # ESLURM_* codes from 2000 up are answers about the request; lower ones and
    # the auth range (6000+) mean the controller or the token could not be used.
    return 2000 <= code < 6000


@dataclass
class SlurmRestClient:
    """slurmrestd as the operator (`user`), or as a job's owner where a method takes `user`."""

    settings: SlurmSettings

    @property
    def credentials(self) -> SlurmCredentials:
        return SlurmCredentials(self.settings)

    def _url(self, path: str) -> str:
        return f"{self.settings.url.rstrip('/')}/slurm/{self.settings.api_version}/{path}"

    async def request(self, method: str, path: str, payload: Any = None, user: str = "") -> dict[str, Any]:
        headers = self.credentials.headers(user)
        try:
            async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
                async with session.request(method, self._url(path), json=payload, headers=headers) as response:
                    body = await response.json(content_type=None)
                    status = response.status
        except (aiohttp.ClientError, TimeoutError) as error:
            raise BackendUnavailable(
                f"slurmrestd at {self.settings.url} is unreachable ({type(error).__name__}); "
                "will retry: check that slurmrestd runs and the URL is right"
            ) from None
        except ValueError:
            raise BackendUnavailable(
                f"{self.settings.url} answered {method} {path} with something that is not JSON: "
                "is it slurmrestd, and is api_version right?"
            ) from None
        errors = [error for error in (body or {}).get("errors") or () if error]
        if status < 400 and not errors:
            answer: dict[str, Any] = body
            return answer
        refusal = SlurmRequestRefused(errors or [{"error": f"HTTP {status}"}])
        if any(_is_refusal(code) for code in refusal.codes):
            raise refusal
        where = self.settings.jwt_key_file or self.settings.token_file
        raise BackendUnavailable(
            f"slurmrestd at {self.settings.url} could not serve {method} {path} for user "
            f"{headers['X-SLURM-USER-NAME']} ({refusal}); check slurmctld and the key or token in {where}"
        )

    async def ping(self) -> None:
        await self.request("GET", "ping")

    async def jobs(self) -> list[dict[str, Any]]:
        return list((await self.request("GET", "jobs")).get("jobs") or ())

    async def job(self, job_id: str) -> dict[str, Any] | None:
        try:
            found = (await self.request("GET", f"job/{job_id}")).get("jobs") or ()
        except SlurmRequestRefused as refusal:
            if INVALID_JOB_ID in refusal.codes:
                return None
            raise
        return found[0] if found else None

    async def node(self, name: str) -> dict[str, Any] | None:
        """A node as Slurm describes it (name, address, hostname, state, ...), None if unknown."""
        try:
            found = (await self.request("GET", f"node/{name}")).get("nodes") or ()
        except SlurmRequestRefused:
            return None
        return found[0] if found else None

    async def submit(self, job: dict[str, Any], script: str, user: str = "") -> str:
        answer = await self.request("POST", "job/submit", {"job": job, "script": script}, user=user)
        return str(answer["job_id"])

    async def update(self, job_id: str, changes: dict[str, Any]) -> None:
        """Change a job as the operator (a raised time limit: its owner may only lower it)."""
        await self.request("POST", f"job/{job_id}", changes)

    async def cancel(self, job_id: str) -> None:
        try:
            await self.request("DELETE", f"job/{job_id}")
        except SlurmRequestRefused as refusal:
            if INVALID_JOB_ID not in refusal.codes:
                raise


async def endpoint_answers(url: str) -> bool:
    """Whether anything answers HTTP there (any status: without the token JupyterLab answers 403
    or redirects to its login page)."""
    try:
        async with aiohttp.ClientSession(timeout=PROBE_TIMEOUT) as session:
            async with session.get(url, allow_redirects=False):
                return True
    except (aiohttp.ClientError, TimeoutError):
        return False


def http_url(address: str, port: int, path: str = "/") -> str:
    """http://address:port/path, with an IPv6 address in brackets (pure)."""
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}{path}"


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
