#!/usr/bin/env python3
"""What a request to slurmrestd costs the operator: a kept connection against a session of its own.

The Slurm backend asks slurmrestd on every sweep for every running environment (GET job/<id>), and
probes the environment's JupyterLab; until stop 40 each request opened an aiohttp session and a new
connection. This sends the same requests through SlurmRestClient both ways, in alternating rounds
against the real slurmrestd (hack/slurm.sh), and reports per request: the operator's CPU (this
process: the client's whole path, parsing included), the latency, and the connections slurmrestd
had to accept (counted where aiohttp opens them).

    hack/slurm.sh up && eval "$(hack/slurm.sh env)"
    .venv/bin/python bench/slurm_session.py --requests 300 --rounds 7 --out bench/logs/slurm-session.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Mapping
from typing import Any

import aiohttp

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "operator"))
from analysis_operator.backends.slurm_rest import REQUEST_TIMEOUT, SlurmRestClient  # noqa: E402
from analysis_operator.settings import load_settings  # noqa: E402


class SessionPerRequest(SlurmRestClient):
    """The client as it was before stop 40: a session (and a connection) for every request."""

    async def _send(
        self, method: str, url: str, payload: Any, headers: Mapping[str, str]
    ) -> tuple[int, Mapping[str, Any] | None]:
        async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
            async with session.request(method, url, json=payload, headers=dict(headers)) as response:
                text = await response.text()
                body = json.loads(text) if text.strip() else None
                return response.status, body if isinstance(body, Mapping) else None


OPENED = [0]  # connections opened by this process's aiohttp clients
_create_connection = aiohttp.TCPConnector._create_connection


async def counted(self, *arguments: Any, **options: Any) -> Any:
    OPENED[0] += 1
    return await _create_connection(self, *arguments, **options)


aiohttp.TCPConnector._create_connection = counted  # type: ignore[method-assign]


async def measure(client: SlurmRestClient, requests: int) -> dict[str, float]:
    await client.jobs()  # the version asked, the connection (if kept) open
    opened_before, cpu_before, latencies = OPENED[0], time.process_time(), []
    for _ in range(requests):
        started = time.perf_counter()
        await client.jobs()
        latencies.append(time.perf_counter() - started)
    cpu = time.process_time() - cpu_before
    return {
        "cpu_ms": 1000 * cpu / requests,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * sorted(latencies)[int(0.99 * len(latencies)) - 1],
        "connections": (OPENED[0] - opened_before) / requests,
    }


async def main_async(requests: int, rounds: int) -> str:
    settings = load_settings(dict(os.environ)).slurm
    kept = SlurmRestClient(settings)
    results: dict[str, list[dict[str, float]]] = {"session per request (before)": [], "kept connection (now)": []}
    for _ in range(rounds):
        results["session per request (before)"].append(await measure(SessionPerRequest(settings), requests))
        results["kept connection (now)"].append(await measure(kept, requests))
    kept.http.close()
    lines = [
        f"machine: {os.cpu_count()} cores, {platform.platform()}, python {platform.python_version()}, "
        f"aiohttp {aiohttp.__version__}; {rounds} rounds of {requests} GET jobs each way (an empty queue), alternating, "
        f"against slurmrestd at {settings.url}",
        "",
        "| client | operator CPU per request (median of rounds) | rounds | latency p50 / p99 (median of rounds) "
        "| new connections per request |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, runs in results.items():
        median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        each = ", ".join(f"{run['cpu_ms']:.3f}" for run in runs)
        lines.append(
            f"| {name} | {median['cpu_ms']:.3f} ms | {each} "
            f"| {median['p50_ms']:.2f} / {median['p99_ms']:.2f} ms | {median['connections']:.2f} |"
        )
    before, now = (statistics.median(run["cpu_ms"] for run in runs) for runs in results.values())
    lines.append(f"\nCPU per request, now / before: {now / before:.2f}x")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=pathlib.Path)
    arguments = parser.parse_args()
    report = asyncio.run(main_async(arguments.requests, arguments.rounds))
    print(report)
    if arguments.out:
        arguments.out.write_text(report)


if __name__ == "__main__":
    main()
