#!/usr/bin/env python3
"""GET /api/v1/offer at facility scale: 10,000 users x 100 datasets in the operator's indexes.

The indexes are built in-process from synthetic objects through the operator's own index
functions (handlers/indexes.py, handlers/datasets.py, handlers/budgets.py, handlers/identity.py,
handlers/offer.py), exactly what kopf keeps from its watch streams, instead of creating 10,000
FacilityUsers, 10,000 ComputeBudgets and 10,000 environments in the API server (minutes of
creates, and the answer reads none of it from there anyway). The catalogue:
  - --users facility users, each with a FacilityUser, a personal ComputeBudget (a ledger of 0-3
    running environments), and their environments in the environments index;
  - --datasets Datasets: 20 % public, the rest embargoed (a quarter of those ended), each readable
    by its proposal's FacilityGroup (--members per group, so each user is in ~2 groups) and a
    group budget per proposal;
  - the example catalogue's flavors plus a staff-only one (9 cards, 3 backends enabled);
  - --at-limit of the users at their maxEnvironments: the answer then confirms their ledger with
    the API server before saying "no room", as admission does (a stub API server answers each
    read after --api-latency seconds; the confirmation is shared and rate-limited per budget).

Measured: (1) the decision alone, OfferService.offer + the JSON document + json.dumps, for random
users; (2) whole HTTP requests to the aiohttp server with the route the operator registers
(add_offer_routes), keep-alive, sequential for latency and --concurrency at a time for
throughput, as the portal (a ServiceAccount token: TokenReview cached) and as people (OIDC ID
tokens signed by a local key, verified per request).

    .venv/bin/python bench/offer.py --out /tmp/offer.md          # defaults: 10,000 x 100
    .venv/bin/python bench/offer.py --users 500 --requests 200   # trial
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import resource
import statistics
import sys
import time

import aiohttp
import jwt
import structlog
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from analysis_operator.engine.budget_gate import BudgetGate
from analysis_operator.engine.data_access import IndexCatalogue
from analysis_operator.engine.identity import DirectoryIdentities
from analysis_operator.engine.ledger import Ledger, Views
from analysis_operator.handlers import budgets as budget_handlers
from analysis_operator.handlers import datasets as dataset_handlers
from analysis_operator.handlers import identity as identity_handlers
from analysis_operator.handlers import indexes as index_handlers
from analysis_operator.handlers import offer as offer_handlers
from analysis_operator.infra.oidc import TokenVerifier
from analysis_operator.policy.offer import offer_document
from analysis_operator.settings import AdmissionSettings, GatewaySettings, IdentitySettings, Settings

ISSUER, AUDIENCE = "https://sso.bench", "analysis"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PORTAL_TOKEN = "portal-service-account-token"
GROUP = "analysis.panosc.eu"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def add(index: dict, entries: dict | None) -> None:
    """What kopf does with an index function's result: key -> a store of values."""
    for key, value in (entries or {}).items():
        index.setdefault(key, []).append(value)


def body(kind: str, name: str, spec: dict, status: dict | None = None, uid: str = "", namespace: str = "") -> dict:
    metadata = {"name": name, "uid": uid or f"uid-{kind}-{name}", "resourceVersion": "1"}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": f"{GROUP}/v1alpha1", "kind": kind, "metadata": metadata, "spec": spec, "status": status or {}}


FLAVORS = {
    "jupyter-basic": {"backend": "kubernetes", "image": "i", "resources": {"cpu": 1, "memory": "16Gi"}},
    "jupyter-gpu": {"backend": "kubernetes", "image": "i", "resources": {"cpu": 1, "memory": "16Gi", "gpu": 1}},
    "jupyter-custom": {"backend": "kubernetes", "image": "i", "allowCustomImage": True, "resources": {"cpu": 1}},
    "jupyter-cluster": {"backend": "slurm", "resources": {"cpu": 4, "memory": "32Gi"}},
    "vm-desktop": {"backend": "openstack", "resources": {"cpu": 2}, "openstack": {"flavor": "f", "image": "i"}},
    "vm-desktop-gpu": {
        "backend": "openstack",
        "resources": {"cpu": 4, "gpu": 1},
        "openstack": {"flavor": "f", "image": "i"},
    },
    "test-short": {"backend": "kubernetes", "image": "i", "resources": {"cpu": 1}, "maxLifetime": "1h"},
    "jupyter-big": {"backend": "kubernetes", "image": "i", "resources": {"cpu": 16, "memory": "128Gi"}},
    "staff-desktop": {"backend": "kubernetes", "image": "i", "resources": {"cpu": 2}, "access": {"groups": ["staff"]}},
}


class Catalogue:
    """Every index the offer reads, filled through the operator's own index functions."""

    def __init__(self, users: int, datasets: int, members: int, at_limit: float, seed: int = 14) -> None:
        rng = random.Random(seed)
        self.users = [f"user{i:05d}" for i in range(users)]
        self.at_limit = set(rng.sample(self.users, round(users * at_limit)))
        self.flavors: dict = {}
        self.datasets: dict = {}
        self.dataset_pids: dict = {}
        self.groups: dict = {}
        self.group_gids: dict = {}
        self.facility_users: dict = {}
        self.budgets: dict = {}
        self.personal_budgets: dict = {}
        self.group_budgets: dict = {}
        self.environments: dict = {}
        self.bodies: dict = {}  # (namespace, name) -> environment body, for the stub API server
        for name, spec in FLAVORS.items():
            add(self.flavors, index_handlers.flavors(name=name, spec=spec, body=body("EnvironmentFlavor", name, spec)))
        proposals = [f"proposal-{i:04d}" for i in range(datasets)]
        for i, proposal in enumerate(proposals):
            team = sorted(rng.sample(self.users, min(members, users)))
            spec = {"members": team, "gid": 50000 + i}
            add(self.groups, index_handlers.groups(name=proposal, spec=spec))
            add(
                self.group_gids,
                identity_handlers.group_gids(name=proposal, spec=spec, body=body("FacilityGroup", proposal, spec)),
            )
            if i < datasets // 5:
                access = {"level": "public"}
            else:
                ends = "2020-06-01" if i % 4 == 0 else f"{2027 + i % 4}-0{1 + i % 9}-01"
                access = {"level": "embargoed", "embargoedUntil": ends, "groups": [proposal], "members": team[:3]}
            storage = {"nfs": {"server": "nas", "path": f"/data/{proposal}"}, "path": f"/gpfs/{proposal}"}
            dataset_spec = {
                "pid": f"10.5072/{proposal}",
                "title": f"Raw data of {proposal}",
                "storage": storage,
                "access": access,
            }
            dataset_body = body("Dataset", f"{proposal}-raw", dataset_spec)
            add(
                self.datasets,
                dataset_handlers.datasets.read(name=f"{proposal}-raw", spec=dataset_spec, body=dataset_body),
            )
            add(self.dataset_pids, dataset_handlers.dataset_pids.read(name=f"{proposal}-raw", spec=dataset_spec))
            group_budget = {"group": proposal, "limits": {"cpuHours": 5000, "gpuHours": 200, "maxGpus": 4}}
            budget_body = body("ComputeBudget", f"{proposal}-budget", group_budget)
            add(self.budgets, budget_handlers.budgets.read(name=f"{proposal}-budget", body=budget_body))
            add(self.group_budgets, offer_handlers.group_budgets(name=f"{proposal}-budget", spec=group_budget))
        staff = {"members": rng.sample(self.users, 50)}
        add(self.groups, index_handlers.groups(name="staff", spec=staff))
        for n, user in enumerate(self.users):
            user_spec = {"uid": 100000 + n, "gid": 100000 + n}
            add(
                self.facility_users,
                identity_handlers.facility_users(name=user, spec=user_spec, body=body("FacilityUser", user, user_spec)),
            )
            running = 5 if user in self.at_limit else rng.randint(0, 3)
            entries = {}
            for k in range(running):
                uid = f"env-{user}-{k}"
                namespace, name = f"ns-{n % 200}", f"{user}-{k}"
                environment_spec = {"owner": user, "flavor": "jupyter-basic", "lifetime": "8h"}
                environment_body = body(
                    "AnalysisEnvironment", name, environment_spec, {"phase": "Ready"}, uid, namespace
                )
                add(self.environments, index_handlers.environments(body=environment_body))
                self.bodies[(namespace, name)] = environment_body
                entries[uid] = {
                    "namespace": namespace,
                    "name": name,
                    "cpus": 1.0,
                    "gpus": 0,
                    "since": "2026-11-30T08:00:00Z",
                    "chargedUntil": "2026-11-30T12:00:00Z",
                    "cpuHours": 4.0,
                    "gpuHours": 0.0,
                }
            budget_spec = {
                "user": user,
                "limits": {"cpuHours": 500, "gpuHours": 20, "maxEnvironments": 5, "maxGpus": 1},
            }
            budget_body = body("ComputeBudget", f"{user}-budget", budget_spec, {"environments": entries})
            add(self.budgets, budget_handlers.budgets.read(name=f"{user}-budget", body=budget_body))
            add(self.personal_budgets, budget_handlers.personal_budgets.read(name=f"{user}-budget", spec=budget_spec))

    def sizes(self) -> dict[str, int]:
        return {
            name: len(getattr(self, name))
            for name in ("flavors", "datasets", "groups", "facility_users", "budgets", "group_budgets", "environments")
        }


class StubApi:
    """The API server's GET of an environment, for the budget confirmation (a slot refusal)."""

    def __init__(self, bodies: dict, latency: float) -> None:
        self.bodies, self.latency, self.reads = bodies, latency, 0

    async def get_environment(self, namespace: str, name: str) -> dict | None:
        self.reads += 1
        await asyncio.sleep(self.latency)
        return self.bodies.get((namespace, name))


async def reviews(token: str) -> dict:
    await asyncio.sleep(0.005)  # a TokenReview round trip; cached by the service
    if token == PORTAL_TOKEN:
        return {
            "authenticated": True,
            "user": {"username": "system:serviceaccount:portal:portal", "groups": ["analysis-portal"]},
        }
    return {"authenticated": False}


def person_token(user: str) -> str:
    claims = {"preferred_username": user, "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 3600}
    return jwt.encode(claims, KEY, algorithm="RS256", headers={"kid": "k1"})


def build_service(catalogue: Catalogue, jwks_path: str, api: StubApi) -> offer_handlers.OfferService:
    gateway = GatewaySettings(enabled=True, oidc_jwks_file=jwks_path, oidc_issuer=ISSUER, oidc_audience=AUDIENCE)
    settings = Settings(gateway=gateway, admission=AdmissionSettings(), identity=IdentitySettings())
    views = Views(catalogue.budgets, catalogue.personal_budgets, catalogue.groups)
    ledger = Ledger(api, views)  # type: ignore[arg-type]  # the stub answers the one read the gate makes
    gate = BudgetGate(settings.budgets, ledger)
    indexes = {
        "facility_users": catalogue.facility_users,
        "groups": catalogue.groups,
        "group_gids": catalogue.group_gids,
    }
    identities = DirectoryIdentities(api, settings.identity, indexes, catalogue.environments)  # type: ignore[arg-type]
    reach = {
        "kubernetes": lambda dataset: None if dataset.storage.nfs_share or dataset.storage.claim_name else "no share",
        "slurm": lambda dataset: None if dataset.storage.path else "no path",
        "openstack": lambda dataset: None if dataset.storage.nfs_share else "no share",
    }
    return offer_handlers.OfferService(
        settings,
        reviews,
        TokenVerifier(gateway),
        catalogue.flavors,
        catalogue.environments,
        catalogue.datasets,
        catalogue.group_budgets,
        IndexCatalogue(catalogue.datasets, catalogue.dataset_pids, catalogue.groups),
        gate,
        identities,
        reach,
    )


def stats(samples: list[float]) -> str:
    ms = [s * 1000 for s in samples]
    return (
        f"p50 {percentile(ms, 50):.2f} ms, p99 {percentile(ms, 99):.2f} ms, max {max(ms):.2f} ms, "
        f"mean {statistics.fmean(ms):.2f} ms (n={len(ms)})"
    )


async def decide(
    service, catalogue: Catalogue, users: list[str], named: list[str] | None = None, cpu: list[float] | None = None
) -> tuple[list[float], int]:
    """Wall time per answer (and, into `cpu`, this process's CPU time: robust on a busy machine)."""
    samples, size = [], 0
    for i, user in enumerate(users):
        started, started_cpu = time.perf_counter(), time.process_time()
        document = offer_document(await service.offer(user, service.clock(), [named[i]] if named else ()))
        text = json.dumps(document)
        samples.append(time.perf_counter() - started)
        if cpu is not None:
            cpu.append(time.process_time() - started_cpu)
        size = max(size, len(text))
    return samples, size


async def http_requests(
    url: str, jobs: list[tuple[str, dict, dict]], concurrency: int
) -> tuple[list[float], float, dict]:
    samples: list[float] = []
    statuses: dict[int, int] = {}
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while not queue.empty():
                _, headers, query = queue.get_nowait()
                started = time.perf_counter()
                async with session.get(url, headers=headers, params=query) as response:
                    await response.read()
                    statuses[response.status] = statuses.get(response.status, 0) + 1
                samples.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return samples, wall, statuses


async def run(arguments: argparse.Namespace) -> str:
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())  # the per-request log line costs nothing here
    started = time.perf_counter()
    catalogue = Catalogue(arguments.users, arguments.datasets, arguments.members, arguments.at_limit)
    built = time.perf_counter() - started
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    log(f"indexes built in {built:.1f} s: {catalogue.sizes()}, max RSS {rss_mib:.0f} MiB")
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(KEY.public_key()))
    jwks_path = f"/tmp/bench-offer-jwks-{os.getpid()}.json"
    with open(jwks_path, "w") as file:
        json.dump({"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}, file)
    api = StubApi(catalogue.bodies, arguments.api_latency)
    service = build_service(catalogue, jwks_path, api)
    rng = random.Random(1)
    ordinary = [user for user in catalogue.users if user not in catalogue.at_limit]
    sample = [rng.choice(ordinary) for _ in range(arguments.requests)]
    await decide(service, catalogue, sample[:50])  # warm up
    cpu_all: list[float] = []
    cpu_named: list[float] = []
    decision, size = await decide(service, catalogue, sample, cpu=cpu_all)
    dataset_names = sorted(catalogue.datasets)
    one_dataset = [rng.choice(dataset_names) for _ in sample]
    decision_named, _ = await decide(service, catalogue, sample, one_dataset, cpu=cpu_named)
    example = offer_document(await service.offer(sample[0], service.clock()))
    readable = sum(entry["readable"] for entry in example["datasets"])
    limited = sorted(catalogue.at_limit)[: min(200, len(catalogue.at_limit))]
    reads_before = api.reads
    at_limit, _ = await decide(service, catalogue, limited)
    reads_per_limited = (api.reads - reads_before) / max(1, len(limited))
    log(f"decision: {stats(decision)}; at limit: {stats(at_limit)}")

    app = web.Application()
    offer_handlers.add_offer_routes(app)
    app[offer_handlers.OFFER_SLOT].service = service
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}{offer_handlers.OFFER_PATH}"
    tokens = {user: person_token(user) for user in set(sample[:500])}
    portal_jobs = [(user, {"Authorization": f"Bearer {PORTAL_TOKEN}"}, {"user": user}) for user in sample]
    person_jobs = [
        (user, {"Authorization": f"Bearer {tokens[user]}"}, {}) for user in sample[:500] * (len(sample) // 500 or 1)
    ]
    await http_requests(url, portal_jobs[:50], 1)  # warm up (and the one TokenReview)
    portal_seq, _, portal_status = await http_requests(url, portal_jobs, 1)
    person_seq, _, person_status = await http_requests(url, person_jobs, 1)
    names = sorted(catalogue.datasets)
    named_jobs = [(user, headers, {**query, "dataset": rng.choice(names)}) for user, headers, query in portal_jobs]
    named_seq, _, named_status = await http_requests(url, named_jobs, 1)
    portal_par, wall, parallel_status = await http_requests(url, portal_jobs, arguments.concurrency)
    await runner.cleanup()
    os.unlink(jwks_path)
    log(f"http portal sequential: {stats(portal_seq)}")

    lines = [
        f"- machine: {os.cpu_count()} cores (shared), {platform.platform()}, Python {platform.python_version()}, "
        f"aiohttp {aiohttp.__version__}; load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"- indexes (built in-process through the operator's index functions in {built:.1f} s): "
        + ", ".join(f"{key} {value:,}" for key, value in catalogue.sizes().items())
        + f"; process max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB",
        f"- one answer: {len(example['flavors'])} cards, {len(example['datasets'])} datasets ({readable} readable for "
        f"{example['user']}), {len(example['budgets'])} budgets; {size:,} bytes of JSON at most",
        "",
        "| what | requests | p50 | p99 | max | throughput |",
        "| --- | --- | --- | --- | --- | --- |",
    ]

    def row(what: str, samples: list[float], throughput: str = "") -> str:
        ms = [s * 1000 for s in samples]
        return (
            f"| {what} | {len(ms):,} | {percentile(ms, 50):.2f} ms | {percentile(ms, 99):.2f} ms | "
            f"{max(ms):.2f} ms | {throughput} |"
        )

    lines += [
        row(
            "decision only (OfferService.offer + document + json.dumps)",
            decision,
            f"{len(decision) / sum(decision):,.0f}/s",
        ),
        row(
            "decision only, one named dataset (?dataset=)",
            decision_named,
            f"{len(decision_named) / sum(decision_named):,.0f}/s",
        ),
        row(
            f"decision, users at their maxEnvironments (confirmed with the API: {reads_per_limited:.1f} reads "
            f"of {arguments.api_latency * 1000:.0f} ms each)",
            at_limit,
        ),
        row(
            "HTTP, the portal for ?user= (TokenReview cached), sequential",
            portal_seq,
            f"{len(portal_seq) / sum(portal_seq):,.0f}/s",
        ),
        row(
            "HTTP, a person with an OIDC ID token (verified per request), sequential",
            person_seq,
            f"{len(person_seq) / sum(person_seq):,.0f}/s",
        ),
        row(
            "HTTP, the portal, one named dataset (?dataset=, a dataset's page), sequential",
            named_seq,
            f"{len(named_seq) / sum(named_seq):,.0f}/s",
        ),
        row(f"HTTP, the portal, {arguments.concurrency} at a time", portal_par, f"{len(portal_par) / wall:,.0f}/s"),
        "",
        f"- CPU time per answer (process_time, insensitive to other load): all datasets mean "
        f"{statistics.fmean(cpu_all) * 1000:.2f} ms, one named dataset mean {statistics.fmean(cpu_named) * 1000:.2f} ms",
        f"- statuses: portal {portal_status}, person {person_status}, named {named_status}, parallel {parallel_status}",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--datasets", type=int, default=100)
    parser.add_argument("--members", type=int, default=200, help="members of each proposal's FacilityGroup")
    parser.add_argument("--at-limit", type=float, default=0.01, help="share of users at their maxEnvironments")
    parser.add_argument("--api-latency", type=float, default=0.005)
    parser.add_argument("--requests", type=int, default=2_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", help="also write the results (markdown) here")
    arguments = parser.parse_args()
    report = asyncio.run(run(arguments))
    print(report)
    if arguments.out:
        with open(arguments.out, "w") as file:
            file.write(report + "\n")


if __name__ == "__main__":
    main()
