"""Prometheus metrics: what a Grafana dashboard and alerts need (README "Metrics" has the table).

Gauges about objects (budgets, environments by phase and flavor, which backend answers) are
computed from kopf's indexes when Prometheus scrapes, so they cost nothing between scrapes, cannot
drift from what the operator sees, and a scrape at 10,000 environments is one pass over the index;
only the active replica exports them (a standby's indexes are paused). Counters and histograms are
updated where things happen: every admission answer passes through `metered` (infra/webhooks.py:
latency, result, and each refusal with its machine reason, read from the answer's causes), the
reconcile checks count theirs (engine/converge.py, engine/budget_gate.py), and the environments
index sees each environment become Ready.

Every name carries its unit (`_seconds`, `_hours`, `_environments`, `_gpus`) or is a count
(`_total`) or one of the flags in UNITLESS; tests/unit/test_metrics.py holds the chart's
dashboard and alerts to the names exported here.
"""

from __future__ import annotations

import collections
import datetime
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

log = structlog.get_logger("analysis_operator.infra.metrics")

disable_created_metrics()  # no `_created` series per label set: half the series, nothing a dashboard uses
REGISTRY = CollectorRegistry(auto_describe=True)
# The standard process_* and python_* families (CPU, memory, open files, GC), in our own registry.
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

# Flags without a unit: 1 or 0 (documented, and allowed by tests/unit/test_metrics.py).
UNITLESS = {
    "analysis_active_replica": "1 on the replica that acts (kopf peering), 0 on standbys",
    "analysis_backend_reachable": "1 while the backend answers, 0 since a call found it unreachable",
}

REFUSALS = Counter(
    "analysis_refusals",
    "Refusals by machine reason, stage (the field's concern: identity, flavor, datasets, lifetime, image, "
    "sharing, budget, decision) and enforcement (admission webhook, or reconcile check); dry runs not counted",
    ["reason", "stage", "enforcement"],
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "analysis_reconcile_seconds",
    "Time to converge one environment",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
WEBHOOK_SECONDS = Histogram(
    "analysis_webhook_duration_seconds",
    "Time to answer one admission request, per webhook",
    ["webhook"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
WEBHOOK_REQUESTS = Counter(
    "analysis_webhook_requests",
    "Admission requests answered, per webhook and result (allowed, refused, error: a 5xx or no answer)",
    ["webhook", "result"],
    registry=REGISTRY,
)
READY_SECONDS = Histogram(
    "analysis_environment_ready_seconds",
    "From an environment's creation to its first Ready, per backend",
    ["backend"],
    buckets=(2.5, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600, 900, 1800, 3600, 7200, 14400),
    registry=REGISTRY,
)

# --- refusals and webhooks --------------------------------------------------------------------------

# The stage of a refusal: what its field (the answer's details.causes[].field) is about.
STAGES = {
    "spec.owner": "identity",
    "spec.flavor": "flavor",
    "spec.datasets": "datasets",
    "spec.lifetime": "lifetime",
    "spec.image": "image",
    "spec.sharing": "sharing",
    "spec.budget": "budget",
    "status.decision": "decision",
}
_FIELD_HEAD = re.compile(r"^[A-Za-z]+\.[A-Za-z]+")
OTHER_WEBHOOK = "other"  # a path no handler serves: one label for all of them, so junk cannot add series


def refusal_stage(field: str) -> str:
    """The stage a refusal's field belongs to, "other" for a field no stage names (pure)."""
    head = _FIELD_HEAD.match(field or "")
    return STAGES.get(head.group(0) if head else "", "other")


def webhook_result(response: Mapping[str, Any]) -> str:
    """allowed, refused (a 4xx: the request was judged) or error (a 5xx: a handler failed) (pure)."""
    payload = response.get("response") or {}
    if payload.get("allowed"):
        return "allowed"
    code = int((payload.get("status") or {}).get("code") or 500)
    return "error" if code >= 500 else "refused"


def refusal_labels(response: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(reason, stage) of each cause of a refusal, one ("Refused", "other") without causes (pure)."""
    status = (response.get("response") or {}).get("status") or {}
    causes = (status.get("details") or {}).get("causes") or ()
    labels = [(str(cause.get("reason") or "Refused"), refusal_stage(str(cause.get("field") or ""))) for cause in causes]
    return labels or [(str(status.get("reason") or "Refused"), "other")]


def count_refusal(reason: str, stage: str, enforcement: str) -> None:
    REFUSALS.labels(reason=reason, stage=stage, enforcement=enforcement).inc()


# At reconcile there is no answer with fields: the stage of the request-terms reasons, by name.
REASON_STAGES = {
    "LifetimeTooLong": "lifetime",
    "CustomImageNotAllowed": "image",
    "ImageMissing": "image",
    "FlavorNotAllowed": "flavor",
}


def reconcile_refusal(reason: str, stage: str) -> None:
    """A reconcile check ended an environment (engine/converge.py): admission was bypassed or off,
    or what was allowed is no longer (access revoked). `stage`: the check's, unless the reason says more."""
    count_refusal(reason, REASON_STAGES.get(reason, stage), "reconcile")


def metered(fn: Any, known: Callable[[], frozenset[str]]) -> Any:
    """kopf's WebhookFn, timed and counted: latency and result per webhook, each refusal by reason."""

    names: list[frozenset[str]] = []  # read at the first request, when every handler is registered

    async def serve(request: Mapping[str, Any], *, webhook: str | None = None, **kwargs: Any) -> Any:
        if not names:
            names.append(known())
        name = webhook if webhook in names[0] else OTHER_WEBHOOK
        started = time.perf_counter()
        try:
            response = await fn(request, webhook=webhook, **kwargs)
        except Exception:  # kopf answers the API server with a 4xx of its own: no decision was made
            WEBHOOK_REQUESTS.labels(webhook=name, result="error").inc()
            raise
        finally:
            WEBHOOK_SECONDS.labels(webhook=name).observe(time.perf_counter() - started)
        result = webhook_result(response)
        WEBHOOK_REQUESTS.labels(webhook=name, result=result).inc()
        if result == "refused" and not (request.get("request") or {}).get("dryRun"):
            for reason, stage in refusal_labels(response):
                count_refusal(reason, stage, "admission")
        return response

    return serve


# --- environments becoming Ready ---------------------------------------------------------------------

READY_WINDOW_SECONDS = 120.0  # a Ready transition older than this when first seen is history (a restart)
_ready_seen: set[str] = set()  # uids seen Ready by this process; pruned to the live ones at each scrape


def _time(text: Any) -> datetime.datetime | None:
    try:
        moment = datetime.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)


def ready_seconds(body: Mapping[str, Any], now: datetime.datetime) -> float | None:
    """Seconds from creation to Ready if the body says it turned Ready within READY_WINDOW_SECONDS
    of `now` (by its Ready condition), else None (pure)."""
    status = body.get("status") or {}
    if status.get("phase") != "Ready":
        return None
    ready = {c.get("type"): c for c in status.get("conditions") or () if isinstance(c, Mapping)}.get("Ready") or {}
    ready_at = _time(ready.get("lastTransitionTime")) if ready.get("status") == "True" else None
    created = _time((body.get("metadata") or {}).get("creationTimestamp"))
    if ready_at is None or created is None or (now - ready_at).total_seconds() > READY_WINDOW_SECONDS:
        return None
    return max(0.0, (ready_at - created).total_seconds())


def observe_ready(body: Mapping[str, Any], now: datetime.datetime | None = None) -> None:
    """Called by the environments index on every change: the first Ready of each environment this
    process sees is observed once (a resume in the same process is not; see README "Metrics")."""
    uid = str((body.get("metadata") or {}).get("uid") or "")
    if not uid or uid in _ready_seen or (body.get("status") or {}).get("phase") != "Ready":
        return
    _ready_seen.add(uid)
    seconds = ready_seconds(body, now or datetime.datetime.now(datetime.UTC))
    if seconds is not None:
        backend = str(((body.get("status") or {}).get("backend") or {}).get("kind") or "unknown")
        READY_SECONDS.labels(backend=backend).observe(seconds)


# --- backends ---------------------------------------------------------------------------------------

_reachable: dict[str, bool] = {}  # backend kind -> did its last call get through (unknown until one did)


def backend_reached(kind: str, reachable: bool) -> None:
    """What the last call to a backend found (engine/converge.py: BackendUnavailable or an answer)."""
    if kind:
        _reachable[kind] = reachable


# --- gauges at scrape ---------------------------------------------------------------------------------


def _values(index: Any) -> Iterator[Any]:
    for key in list(index):
        yield from index.get(key, ())


# ComputeBudget limits (spec.limits keys) -> (metric suffix, resource label or None).
BUDGET_RESOURCES = {
    "cpuHours": ("hours", "cpu"),
    "gpuHours": ("hours", "gpu"),
    "maxEnvironments": ("environments", None),
    "maxGpus": ("gpus", None),
}


class IndexCollector(Collector):
    """The active replica; from the active replica only: budgets, environments by phase and flavor,
    backend reachability."""

    def __init__(
        self,
        budgets: Any,
        environments: Any,
        active: Callable[[], bool] = lambda: True,
        backends: Iterable[str] = (),
    ) -> None:
        self.budgets, self.environments, self.active = budgets, environments, active
        self.backends = tuple(backends)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        active = self.active()
        yield GaugeMetricFamily("analysis_active_replica", UNITLESS["analysis_active_replica"], value=int(active))
        if not active:  # a standby's indexes are paused (stale): only the active replica speaks for the
            return  # objects, so sum() over the replicas counts each environment once
        yield from self._budgets()
        yield from self._environments()
        reachable = GaugeMetricFamily(
            "analysis_backend_reachable", UNITLESS["analysis_backend_reachable"], labels=["backend"]
        )
        for kind in self.backends:
            known = True if kind == "kubernetes" else _reachable.get(kind)  # Kubernetes: the operator's own API
            if known is not None:
                reachable.add_metric([kind], int(known))
        yield reachable

    def _budgets(self) -> Iterator[GaugeMetricFamily]:
        used = {
            "hours": GaugeMetricFamily(
                "analysis_budget_used_hours", "CPU- or GPU-hours used per ComputeBudget", labels=["budget", "resource"]
            ),
            "environments": GaugeMetricFamily(
                "analysis_budget_used_environments", "Environments holding a slot per ComputeBudget", labels=["budget"]
            ),
            "gpus": GaugeMetricFamily(
                "analysis_budget_used_gpus", "GPUs held now per ComputeBudget", labels=["budget"]
            ),
        }
        limit = {
            "hours": GaugeMetricFamily(
                "analysis_budget_limit_hours",
                "CPU- or GPU-hours limit per ComputeBudget (spec + grants)",
                labels=["budget", "resource"],
            ),
            "environments": GaugeMetricFamily(
                "analysis_budget_limit_environments",
                "Concurrent environments allowed per ComputeBudget",
                labels=["budget"],
            ),
            "gpus": GaugeMetricFamily(
                "analysis_budget_limit_gpus", "Concurrent GPUs allowed per ComputeBudget", labels=["budget"]
            ),
        }
        for budget in _values(self.budgets):
            running = budget.status.get("running") or {}
            held = {"maxEnvironments": running.get("environments", 0), "maxGpus": running.get("gpus", 0)}
            for key, (unit, resource) in BUDGET_RESOURCES.items():
                labels = [budget.name] if resource is None else [budget.name, resource]
                used[unit].add_metric(labels, float(held[key] if key in held else budget.used(key)))
                if (value := budget.limit(key)) is not None:
                    limit[unit].add_metric(labels, float(value))
        yield from used.values()
        yield from limit.values()

    def _environments(self) -> Iterator[GaugeMetricFamily]:
        counts: collections.Counter[tuple[str, str]] = collections.Counter()
        live = set()
        for record in _values(self.environments):
            counts[(record.status.get("phase") or "New", record.environment.flavor)] += 1
            live.add(record.environment.uid)
        _ready_seen.intersection_update(live)  # forget the deleted: the set stays as large as the index
        phases = GaugeMetricFamily(
            "analysis_environments", "AnalysisEnvironments by phase and flavor", labels=["phase", "flavor"]
        )
        for (phase, flavor), count in sorted(counts.items()):
            phases.add_metric([phase, flavor], count)
        yield phases


def start_metrics(
    port: int,
    budgets: Any,
    environments: Any,
    address: str = "0.0.0.0",
    active: Callable[[], bool] = lambda: True,
    backends: Iterable[str] = (),
) -> None:
    """Serve /metrics; a port already taken is logged, not fatal (metrics must never stop the operator)."""
    if not port:
        return
    REGISTRY.register(IndexCollector(budgets, environments, active, backends))
    try:
        start_http_server(port, addr=address, registry=REGISTRY)
    except OSError as error:
        log.error("metrics.not_served", port=port, error=repr(error))
        return
    log.info("metrics.serving", port=port)
