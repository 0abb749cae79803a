#!/usr/bin/env python3
"""Idle culling at 10,000 environments: API writes per environment per hour, server requests per second.

The issue: "Activity is checked in bounded batches and written to status at most once per interval
per environment, so 10,000 idle-checked environments do not flood the API server or the JupyterLab
servers". This runs the operator's own IdleChecker (engine/idle.py) in-process, unchanged:

- the environments index: a plain dict shaped like kopf's ((namespace, name) -> [EnvironmentRecord]),
  every environment Ready, of one flavor with idleTimeout 1h, idleWarnBefore 15m, idleAction Suspend;
- a kube stand-in that counts every call the checker makes (status PATCH, spec PATCH, Event POST,
  Secret GET), sleeps --kube-latency-ms in each (an API server's answer), and applies the patches
  to the index at once (as the watch would, a few ms later): a culled environment leaves the round;
- ONE HTTP server on 127.0.0.1 (plain asyncio, in its own process, so that its CPU is not the
  checker's) playing every JupyterLab server: each environment's status.backend.endpoint is that
  address, the checker's URL path names the environment (/env/<ns>/<name>/api/status, api/kernels).
  Each answer takes 2 ms. It answers "Connection: close" after api/kernels, so every environment
  costs a TCP connection of its own per round, as 10,000 real servers would (one server behind
  keep-alive would make it cheaper than it is). It refuses requests without a token or without
  no_track_activity=1. Its clock is the simulated one, frozen for the round, and so is the
  checker's (IdleChecker's clock). What each plays:
    active   last_activity a few seconds before now
    idle     last_activity 1..45 minutes before the first round, never again: warned at the round
             where it has been idle 45 min, culled (spec.suspend) where it has been idle 1 h
    busy     last_activity 3 h old, a kernel executing_state busy (a long cell: active)
    slow     beyond the per-request timeout: api/status never answers; or api/status answers and
             api/kernels never does; or api/status answers after 80 % of the timeout and api/kernels
             never (both requests go at once, within one timeout for the server)
    garbage  HTTP 500; an HTML page; JSON without last_activity; last_activity "yesterday"
    flaky    (1 %, taken from the active share) active, but HTTP 503 every other round: what a
             flapping server costs in Idle condition writes (Active <-> ActivityUnknown)
- a simulated clock: --rounds rounds (60: one hour), the checker's `now` advanced by the check
  interval (60 s) each round, the rounds run back to back; wall time, CPU and the server's view
  (requests, requests in flight at once) are measured per round.

    # concurrency 20 for 60 rounds, 50 for 10, then 20 for 5 rounds without slow servers (about 2 h)
    PYTHONPATH=operator:. .venv/bin/python bench/idle.py --out /tmp/idle.md
    PYTHONPATH=operator:. .venv/bin/python bench/idle.py --environments 200 --concurrency 20:12 --baseline ''
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import dataclasses
import datetime
import json
import logging
import math
import multiprocessing
import os
import pathlib
import platform
import random
import sys
import time
from typing import Any

import aiohttp
import structlog

from analysis_operator.engine.converge import Context
from analysis_operator.engine.idle import GatewayActivity, IdleChecker
from analysis_operator.engine.views import EnvironmentRecord
from analysis_operator.model.domain import Environment, Flavor, Phase, format_time
from analysis_operator.settings import Settings

NAMESPACE = "bench-idle"
FLAVOR = Flavor.from_body(
    "jupyter-gpu",
    {
        "backend": "slurm",
        "idleTimeout": "1h",
        "idleWarnBefore": "15m",
        "idleAction": "Suspend",
        "resources": {"gpu": 1},
    },
)
IDLE_MINUTES = 45  # idle environments went quiet 1..45 minutes before the first round
SLOW = ("hang-status", "hang-kernels", "slow-status-hang-kernels")
GARBAGE = ("http-500", "html", "no-last-activity", "not-a-time")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


# --------------------------------------------------------------------------- who plays what


@dataclasses.dataclass(frozen=True)
class Play:
    kind: str  # active, idle, busy, slow, garbage
    variant: str = ""  # for slow and garbage
    idle_minutes: int = 0  # idle: quiet since this many minutes before the first round
    jitter: int = 0  # active: last_activity this many seconds before now


def casting(n: int, slow_share: float, garbage_share: float, flaky_share: float, seed: int = 7) -> list[Play]:
    """Exact shares (30 % idle, 5 % busy, slow, garbage, flaky, the rest active), shuffled."""
    slow, garbage, flaky = round(n * slow_share), round(n * garbage_share), round(n * flaky_share)
    idle, busy = round(n * 0.30), round(n * 0.05)
    active = n - slow - garbage - flaky - idle - busy
    plays = (
        [Play("active", jitter=i % 50) for i in range(active)]
        + [Play("flaky", jitter=i % 50) for i in range(flaky)]
        + [Play("idle", idle_minutes=1 + i % IDLE_MINUTES) for i in range(idle)]
        + [Play("busy") for _ in range(busy)]
        + [Play("slow", SLOW[i % len(SLOW)]) for i in range(slow)]
        + [Play("garbage", GARBAGE[i % len(GARBAGE)]) for i in range(garbage)]
    )
    random.Random(seed).shuffle(plays)
    return plays


def env_name(i: int) -> str:
    return f"lab-{i:05d}"


def env_index(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


# --------------------------------------------------------------------------- the JupyterLab servers


def serve(plays: list[Play], t0: float, timeout: float, clock: Any, pipe: Any) -> None:
    """The one process that plays every JupyterLab server (runs in a child process).

    Plain HTTP/1.1 on asyncio (no web framework: it should cost little CPU beside the checker's),
    keep-alive until api/kernels, which is answered with "Connection: close"."""
    stats: dict[str, Any] = {}

    def reset() -> None:
        in_flight = stats.get("in_flight", 0)
        stats.update(requests=0, paths=collections.Counter(), in_flight=in_flight, peak=in_flight)
        stats.update(cancelled=0, connections=0)

    reset()
    hang = 30.0  # far beyond any request timeout: the checker gives up first
    service = 0.002  # a JupyterLab answers in a few ms (and requests overlap here)
    reasons = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error", 503: "Unavailable"}

    def iso(seconds: float) -> str:
        return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat()

    def answer(status: int, body: Any, close: bool, content_type: str = "application/json") -> bytes:
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        head = (
            f"HTTP/1.1 {status} {reasons[status]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(data)}\r\n{'Connection: close' if close else 'Connection: keep-alive'}\r\n\r\n"
        )
        return head.encode() + data

    async def jupyter(name: str, path: str, query: str, headers: str) -> tuple[int, Any, str]:
        await asyncio.sleep(service)
        play = plays[env_index(name)]
        now = clock.value
        if "no_track_activity=1" not in query or "authorization: token " not in headers.lower():
            return 400, {"message": "the checker must not count as activity, and must authenticate"}, ""
        if play.kind == "slow":
            if path == "api/status" and play.variant == "hang-status":
                await asyncio.sleep(hang)
            if path == "api/status" and play.variant == "slow-status-hang-kernels":
                await asyncio.sleep(0.8 * timeout)
            if path == "api/kernels":
                await asyncio.sleep(hang)
            if path == "api/status":
                return 200, {"last_activity": iso(now - 60)}, ""
        if play.kind == "flaky" and path == "api/status" and round((now - t0) / 60) % 2:
            return 503, "Service Unavailable", "text/plain"
        if play.kind == "garbage" and path == "api/status":
            if play.variant == "http-500":
                return 500, "Internal Server Error", "text/plain"
            if play.variant == "html":
                return 200, "<html><body>Service Unavailable</body></html>", "text/html"
            if play.variant == "no-last-activity":
                return 200, {"started": iso(t0)}, ""
            return 200, {"last_activity": "yesterday"}, ""
        if path == "api/status":
            last = {
                "active": now - play.jitter,
                "flaky": now - play.jitter,
                "idle": t0 - 60 * play.idle_minutes,
                "busy": t0 - 3 * 3600,
            }[play.kind]
            return 200, {"last_activity": iso(last), "started": iso(t0 - 7200), "kernels": 1, "connections": 0}, ""
        state = "busy" if play.kind == "busy" else "idle"
        return 200, [{"id": "k", "name": "python3", "execution_state": state, "last_activity": iso(now - 60)}], ""

    class Connection(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport, self.buffer, self.task = transport, b"", None
            stats["connections"] += 1

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            if self.task is None and b"\r\n\r\n" in self.buffer:  # GETs only, one at a time (no pipelining)
                head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
                self.task = asyncio.get_running_loop().create_task(self.handle(head.decode("latin-1")))

        def connection_lost(self, exc: Exception | None) -> None:
            if self.task is not None:
                self.task.cancel()

        async def handle(self, head: str) -> None:
            line, _, headers = head.partition("\r\n")
            target = line.split(" ")[1]
            path, _, query = target.partition("?")
            if path == "/bench/stats":
                body = dict(stats, paths=dict(stats["paths"]), cpu_seconds=time.process_time())
                if "reset=1" in query:
                    reset()
                self.transport.write(answer(200, body, close=False))
                self.task = None
                return
            parts = path.split("/")  # /env/<ns>/<name>/api/<what>
            if len(parts) != 6 or parts[1] != "env" or parts[4] != "api" or parts[5] not in ("status", "kernels"):
                self.transport.write(answer(404, {"message": "no such path"}, close=True))
                self.transport.close()
                return
            what = f"api/{parts[5]}"
            stats["requests"] += 1
            stats["paths"][what] += 1
            stats["in_flight"] += 1
            stats["peak"] = max(stats["peak"], stats["in_flight"])
            try:
                status, body, content_type = await jupyter(parts[3], what, query, headers)
            except asyncio.CancelledError:  # the checker gave up and closed the connection
                stats["cancelled"] += 1
                return
            finally:
                stats["in_flight"] -= 1
            close = what == "api/kernels" or status != 200
            self.transport.write(answer(status, body, close, content_type or "application/json"))
            self.task = None
            if close:
                self.transport.close()
            elif b"\r\n\r\n" in self.buffer:
                self.data_received(b"")

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Connection, "127.0.0.1", 0, backlog=1024)
        pipe.send(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(main())


# --------------------------------------------------------------------------- the Kubernetes API


class Kube:
    """What IdleChecker calls on the KubeClient, counted; patches applied to the index at once."""

    def __init__(self, index: dict[Any, list[EnvironmentRecord]], plays: list[Play], latency: float) -> None:
        self.index, self.plays, self.latency = index, plays, latency
        self.calls: collections.Counter[str] = collections.Counter()  # per kind of call, all rounds
        self.fields: collections.Counter[str] = collections.Counter()  # status fields written
        self.per_env: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.round = 0
        self.culled_at: dict[str, int] = {}
        self.warned_at: dict[str, list[int]] = collections.defaultdict(list)
        self.events: collections.Counter[str] = collections.Counter()
        self.events_per_env: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)

    async def _answer(self) -> None:
        if self.latency:
            await asyncio.sleep(self.latency)

    async def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls["GET secret"] += 1
        await self._answer()
        record = self.index[(namespace, name.removeprefix("aenv-"))][0]
        token = f"token-{record.environment.name}"
        return {
            "metadata": {"name": name, "namespace": namespace, "labels": record.environment.identity_labels},
            "data": {"token": base64.b64encode(token.encode()).decode()},
        }

    async def patch_environment_status(self, namespace: str, name: str, status: dict[str, Any]) -> bool:
        self.calls["PATCH status"] += 1
        self.per_env[name]["PATCH status"] += 1
        for field in status:
            self.fields[field] += 1
            self.per_env[name][f"status.{field}"] += 1
        await self._answer()
        record = self.index[(namespace, name)][0]
        self.index[(namespace, name)] = [EnvironmentRecord(record.environment, {**record.status, **status})]
        return True

    async def patch_environment_spec(self, namespace: str, name: str, spec: dict[str, Any]) -> bool:
        self.calls["PATCH spec"] += 1
        self.per_env[name]["PATCH spec"] += 1
        await self._answer()
        record = self.index[(namespace, name)][0]
        if spec.get("suspend"):
            self.culled_at[name] = self.round
            environment = dataclasses.replace(
                record.environment, suspend=True, generation=record.environment.generation + 1
            )
            self.index[(namespace, name)] = [EnvironmentRecord(environment, record.status)]
        return True

    async def post_event(self, involved: dict[str, Any], type_: str, reason: str, message: str) -> None:
        name = involved["metadata"]["name"]
        self.calls["POST event"] += 1
        self.events[reason] += 1
        self.events_per_env[name][reason] += 1
        if reason == "IdleSoon":
            self.warned_at[name].append(self.round)
        await self._answer()


# --------------------------------------------------------------------------- the checker, timed


class TimedChecker(IdleChecker):
    """The operator's IdleChecker, unchanged; each environment's check (the time it holds one of
    the `concurrency` slots) timed per kind of server."""

    plays: list[Play]
    held: dict[str, list[float]]
    failures: int = 0

    async def _check_one(self, record: EnvironmentRecord, flavor: Flavor) -> None:
        began = time.perf_counter()
        try:
            await super()._check_one(record, flavor)
        except Exception:
            self.failures += 1
            raise
        finally:
            play = self.plays[env_index(record.environment.name)]
            self.held[play.variant or play.kind].append(time.perf_counter() - began)


def build_index(n: int, port: int, t0: datetime.datetime) -> dict[Any, list[EnvironmentRecord]]:
    index: dict[Any, list[EnvironmentRecord]] = {}
    for i in range(n):
        environment = Environment(
            namespace=NAMESPACE, name=env_name(i), uid=f"uid-{i:05d}", owner="alice", flavor=FLAVOR.name, generation=1
        )
        status = {
            "phase": Phase.READY.value,
            "startedAt": format_time(t0 - datetime.timedelta(hours=2)),
            "expiresAt": format_time(t0 + datetime.timedelta(hours=10)),
            "backend": {"endpoint": f"127.0.0.1:{port}", "allocatedGpus": 1},
        }
        index[(NAMESPACE, environment.name)] = [EnvironmentRecord(environment, status)]
    return index


def process_cpu(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass
class RoundRow:
    round: int
    checked: int
    wall: float
    requests: int  # as the server counted them
    peak: int  # requests in flight at the server at once
    cancelled: int  # requests the checker gave up on (timeouts)
    writes: int  # kube writes this round (status + spec PATCH, Event POST)
    secret_reads: int
    checker_cpu: float
    server_cpu: float

    @property
    def rate(self) -> float:
        return self.requests / self.wall if self.wall else 0.0


def start_server(plays: list[Play], t0: datetime.datetime, timeout: float) -> tuple[Any, int, Any]:
    """The servers' process, started before any event loop runs here (fork)."""
    context = multiprocessing.get_context("fork")
    clock = context.Value("d", t0.timestamp(), lock=False)
    receive, send = context.Pipe(duplex=False)
    server = context.Process(target=serve, args=(plays, t0.timestamp(), timeout, clock, send), daemon=True)
    server.start()
    return server, receive.recv(), clock


async def run(
    args: argparse.Namespace,
    concurrency: int,
    slow_share: float,
    rounds: int,
    plays: list[Play],
    now0: datetime.datetime,
    server: Any,
    port: int,
    clock: Any,
) -> dict[str, Any]:
    settings = Settings()
    settings = dataclasses.replace(settings, idle=dataclasses.replace(settings.idle, concurrency=concurrency))
    idle = settings.idle
    log(f"concurrency {concurrency}: {args.environments} environments, server pid {server.pid} on 127.0.0.1:{port}")

    index = build_index(args.environments, port, now0)
    flavors = {FLAVOR.name: [FLAVOR]}
    kube = Kube(index, plays, args.kube_latency_ms / 1000)
    simulated = [now0]  # the round's time: the checker's clock and the servers' (clock.value)
    checker = TimedChecker(
        Context(kube=kube, backends={}),  # type: ignore[arg-type]
        settings,
        index,
        flavors,
        GatewayActivity(),
        clock=lambda: simulated[0],
    )
    checker.plays, checker.held = plays, collections.defaultdict(list)
    held_max: dict[str, float] = collections.defaultdict(float)
    rows: list[RoundRow] = []
    stats_url = f"http://127.0.0.1:{port}/bench/stats?reset=1"
    try:
        async with aiohttp.ClientSession() as bench:
            await (await bench.get(stats_url)).json()
            for r in range(rounds):
                now = now0 + datetime.timedelta(seconds=r * idle.check_interval_seconds)
                clock.value, simulated[0] = now.timestamp(), now
                kube.round = r
                calls0 = collections.Counter(kube.calls)
                cpu0, server_cpu0 = time.process_time(), process_cpu(server.pid)  # type: ignore[arg-type]
                began = time.perf_counter()
                checked = await checker.check()
                wall = time.perf_counter() - began
                cpu, server_cpu = time.process_time() - cpu0, process_cpu(server.pid) - server_cpu0  # type: ignore[arg-type]
                stats = await (await bench.get(stats_url)).json()
                calls = kube.calls - calls0
                row = RoundRow(
                    r,
                    checked,
                    wall,
                    stats["requests"],
                    stats["peak"],
                    stats["cancelled"],
                    calls["PATCH status"] + calls["PATCH spec"] + calls["POST event"],
                    calls["GET secret"],
                    cpu,
                    server_cpu,
                )
                rows.append(row)
                for kind, held in checker.held.items():
                    held_max[kind] = max(held_max[kind], max(held))
                checker.held.clear()
                log(
                    f"  round {r:2d}: {checked} checked, {row.wall:6.2f} s, {row.requests} requests "
                    f"({row.rate:.0f}/s), peak in flight {row.peak}, {row.cancelled} given up, "
                    f"{row.writes} writes, {row.secret_reads} Secret reads, CPU checker {cpu:.1f} s / server {server_cpu:.1f} s"
                )
    finally:
        await checker.close()
        server.kill()
        server.join()
    return {
        "concurrency": concurrency,
        "slow_share": slow_share,
        "rounds": rounds,
        "rows": rows,
        "kube": kube,
        "plays": plays,
        "held_max": dict(held_max),
        "failures": checker.failures,
        "checker_requests": checker.requests,
        "settings": idle,
    }


# --------------------------------------------------------------------------- the report


def report(result: dict[str, Any], n: int) -> list[str]:
    rows: list[RoundRow] = result["rows"]
    kube: Kube = result["kube"]
    plays: list[Play] = result["plays"]
    idle = result["settings"]
    hours = result["rounds"] * idle.check_interval_seconds / 3600
    c = result["concurrency"]
    lines = [
        f"### concurrency {c}, {n:,} environments, {result['rounds']} rounds "
        f"({hours * 60:g} simulated minutes), slow share {result['slow_share']:.1%}",
        "",
    ]
    walls = [row.wall for row in rows]
    steady = rows[1:] or rows
    lines += [
        "| round | checked | wall | server requests | requests/s | peak in flight | given up | writes | Secret reads | CPU checker / server |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    show = {0, 1, 2, 5, len(rows) // 2, len(rows) - 1}
    for row in rows:
        if row.round in show:
            lines.append(
                f"| {row.round} | {row.checked:,} | {row.wall:.2f} s | {row.requests:,} | {row.rate:,.0f} | {row.peak} | "
                f"{row.cancelled} | {row.writes:,} | {row.secret_reads:,} | {row.checker_cpu:.1f} s / {row.server_cpu:.1f} s |"
            )
    lines += [
        "",
        f"- round wall time: p50 {percentile(walls, 50):.2f} s, max {max(walls):.2f} s; rounds 1..: "
        f"p50 {percentile([r.wall for r in steady], 50):.2f} s (check interval {idle.check_interval_seconds:g} s)",
        f"- server requests per round: p50 {percentile([r.requests for r in rows], 50):,.0f}, "
        f"achieved requests/s per round: p50 {percentile([r.rate for r in rows], 50):,.0f}, max {max(r.rate for r in rows):,.0f}",
        f"- peak requests in flight at the server (any round): **{max(r.peak for r in rows)}** (concurrency {c})",
        f"- requests the checker gave up on per round (timeouts, {idle.request_timeout_seconds:g} s): "
        f"p50 {percentile([r.cancelled for r in rows], 50)}",
        "- longest time one environment held a slot, by what its server plays: "
        + ", ".join(f"{kind} {seconds:.2f} s" for kind, seconds in sorted(result["held_max"].items())),
        f"- checks that raised: {result['failures']}; checker CPU p50 {percentile([r.checker_cpu for r in steady], 50):.1f} s "
        f"per round, server CPU p50 {percentile([r.server_cpu for r in steady], 50):.1f} s",
        f"- IdleChecker.requests counter {result['checker_requests']:,} vs {sum(r.requests for r in rows):,} "
        "requests the server saw",
    ]
    # writes
    per_hour = 1 / (n * hours) if hours == 1 else 1 / n
    unit = "per environment per hour" if hours == 1 else f"per environment in {hours * 60:g} simulated minutes"
    calls = kube.calls
    total_writes = calls["PATCH status"] + calls["PATCH spec"] + calls["POST event"]
    lines += [
        "",
        f"API calls over the run, {unit} (all {n:,}):",
        "",
        f"| call | total | {unit} |",
        "| --- | --- | --- |",
        f"| **writes** (status PATCH + spec PATCH + Event POST) | {total_writes:,} | **{total_writes * per_hour:.2f}** |",
        f"| PATCH status | {calls['PATCH status']:,} | {calls['PATCH status'] * per_hour:.2f} |",
    ]
    for field in sorted(kube.fields):
        lines.append(f"| &nbsp;&nbsp;with {field} | {kube.fields[field]:,} | {kube.fields[field] * per_hour:.2f} |")
    lines += [
        f"| PATCH spec (suspend: culls) | {calls['PATCH spec']:,} | {calls['PATCH spec'] * per_hour:.2f} |",
        f"| POST event | {calls['POST event']:,} | {calls['POST event'] * per_hour:.2f} |",
    ]
    for reason in sorted(kube.events):
        lines.append(f"| &nbsp;&nbsp;{reason} | {kube.events[reason]:,} | {kube.events[reason] * per_hour:.2f} |")
    lines += [
        f"| GET secret (token, read once, then cached) | {calls['GET secret']:,} | {calls['GET secret'] * per_hour:.2f} |",
        "",
        "Per environment by what its server plays (writes in the run: min / max over the environments of that kind):",
        "",
        "| kind | environments | status PATCH | with lastActivity | with conditions | spec PATCH | Events |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    by_kind: dict[str, list[str]] = collections.defaultdict(list)
    for i, play in enumerate(plays):
        by_kind[play.kind].append(env_name(i))

    def spread(names: list[str], key: str) -> str:
        counts = [kube.per_env[name][key] for name in names]
        return f"{min(counts)}" if min(counts) == max(counts) else f"{min(counts)} / {max(counts)}"

    for kind in ("active", "busy", "idle", "slow", "garbage", "flaky"):
        names = by_kind.get(kind, [])
        if not names:
            continue
        events = [sum(kube.events_per_env[name].values()) for name in names]
        lines.append(
            f"| {kind} | {len(names):,} | {spread(names, 'PATCH status')} | {spread(names, 'status.lastActivity')} | "
            f"{spread(names, 'status.conditions')} | {spread(names, 'PATCH spec')} | "
            f"{min(events) if min(events) == max(events) else f'{min(events)} / {max(events)}'} |"
        )
    # culls at the expected round
    interval_minutes = idle.check_interval_seconds / 60
    timeout_minutes = FLAVOR.idle_timeout.total_seconds() / 60  # type: ignore[union-attr]
    warn_minutes = timeout_minutes - FLAVOR.idle_warn_before.total_seconds() / 60  # type: ignore[union-attr]
    expected_cull = expected_warn = on_time_cull = on_time_warn = 0
    wrong: list[str] = []
    for i, play in enumerate(plays):
        name = env_name(i)
        if play.kind != "idle":
            if name in kube.culled_at:
                wrong.append(f"{name} ({play.kind}) culled at round {kube.culled_at[name]}")
            continue
        cull_round = max(0, math.ceil((timeout_minutes - play.idle_minutes) / interval_minutes))
        warn_round = max(0, math.ceil((warn_minutes - play.idle_minutes) / interval_minutes))
        if cull_round < result["rounds"]:
            expected_cull += 1
            on_time_cull += kube.culled_at.get(name) == cull_round
        elif name in kube.culled_at:
            wrong.append(f"{name} culled early at {kube.culled_at[name]}")
        if warn_round < result["rounds"]:
            expected_warn += 1
            on_time_warn += kube.warned_at.get(name) == [warn_round]
    lines += [
        "",
        f"- culls: {len(kube.culled_at):,}; idle environments due within the run: {expected_cull:,}, "
        f"culled exactly at their round: **{on_time_cull:,}**; warned (IdleSoon, once) exactly at their round: "
        f"{on_time_warn:,} of {expected_warn:,}; wrong culls: {len(wrong)}"
        + (f" ({'; '.join(wrong[:5])})" if wrong else ""),
    ]
    return lines


def machine() -> list[str]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    memory_kib = next(
        int(line.split()[1])
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    return [
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} cores {model}, "
        f"{memory_kib / 1024**2:.1f} GiB, kernel {platform.release()}, Python {platform.python_version()}, "
        f"aiohttp {aiohttp.__version__}; load average at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--environments", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=60, help="rounds of the check interval (60: one hour)")
    parser.add_argument(
        "--concurrency",
        nargs="+",
        default=["20", "50:10"],
        help="concurrency[:rounds] per run (rounds: --rounds unless given)",
    )
    parser.add_argument("--slow-share", type=float, default=0.025, help="servers answering beyond the timeout")
    parser.add_argument("--garbage-share", type=float, default=0.025, help="servers answering garbage at once")
    parser.add_argument("--flaky-share", type=float, default=0.01, help="servers failing every other round")
    parser.add_argument(
        "--baseline",
        default="20:5",
        help="concurrency:rounds of a last run with no slow servers ('' for none)",
    )
    parser.add_argument("--kube-latency-ms", type=float, default=10.0, help="each API call's answer time")
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    lines = ["## Idle culling at 10,000 environments (`bench/idle.py`)", ""] + machine() + [""]
    print("\n".join(lines), flush=True)
    runs = []
    for spec in args.concurrency:
        concurrency, _, rounds = spec.partition(":")
        runs.append((int(concurrency), args.slow_share, int(rounds or args.rounds)))
    if args.baseline:
        concurrency, _, rounds = args.baseline.partition(":")
        runs.append((int(concurrency), 0.0, int(rounds or args.rounds)))
    timeout = Settings().idle.request_timeout_seconds
    for concurrency, slow_share, rounds in runs:
        plays = casting(args.environments, slow_share, args.garbage_share, args.flaky_share)
        now0 = datetime.datetime.now(datetime.UTC).replace(second=0, microsecond=0)
        server, port, clock = start_server(plays, now0, timeout)
        result = asyncio.run(run(args, concurrency, slow_share, rounds, plays, now0, server, port, clock))
        section = report(result, args.environments) + [""]
        print("\n".join(section), flush=True)
        lines += section
    text = "\n".join(lines)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
