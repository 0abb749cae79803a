"""Prometheus metrics: budgets used and their limits, environments by phase,
admission refusals by reason, reconcile latency.

Gauges about objects are read from kopf's indexes when Prometheus scrapes, so
they cost nothing between scrapes and can never drift from what the operator
sees. Counters and the histogram are updated where things happen.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = structlog.get_logger("analysis_operator.infra.metrics")

REGISTRY = CollectorRegistry(auto_describe=True)
ADMISSION_REFUSALS = Counter(
    "analysis_admission_refusals",
    "Environments refused, by reason and where (admission webhook or reconcile check)",
    ["reason", "stage"],
    registry=REGISTRY,
)
RECONCILE_SECONDS = Histogram(
    "analysis_reconcile_seconds",
    "Time to converge one environment",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)


def _values(index: Any) -> Iterator[Any]:
    for key in list(index):
        yield from index.get(key, ())


class IndexCollector(Collector):
    """Budget used/limit per budget and resource, environments per phase, from the indexes."""

    def __init__(self, budgets: Any, environments: Any) -> None:
        self.budgets, self.environments = budgets, environments

    def collect(self) -> Iterator[GaugeMetricFamily]:
        used = GaugeMetricFamily(
            "analysis_budget_used",
            "Used per ComputeBudget (hours; environments and GPUs held now)",
            labels=["budget", "resource"],
        )
        limit = GaugeMetricFamily(
            "analysis_budget_limit", "Effective limit per ComputeBudget (spec + grants)", labels=["budget", "resource"]
        )
        for budget in _values(self.budgets):
            running = budget.status.get("running") or {}
            for resource, value in (
                ("cpuHours", budget.used("cpuHours")),
                ("gpuHours", budget.used("gpuHours")),
                ("maxEnvironments", running.get("environments", 0)),
                ("maxGpus", running.get("gpus", 0)),
            ):
                used.add_metric([budget.name, resource], float(value))
                if budget.limit(resource) is not None:
                    limit.add_metric([budget.name, resource], budget.limit(resource))
        phases = GaugeMetricFamily("analysis_environments", "AnalysisEnvironments by phase", labels=["phase"])
        counts = collections.Counter(record.status.get("phase") or "New" for record in _values(self.environments))
        for phase, count in sorted(counts.items()):
            phases.add_metric([phase], count)
        yield from (used, limit, phases)


def start_metrics(port: int, budgets: Any, environments: Any, address: str = "0.0.0.0") -> None:
    """Serve /metrics; a port already taken is logged, not fatal (metrics must never stop the operator)."""
    if not port:
        return
    REGISTRY.register(IndexCollector(budgets, environments))
    try:
        start_http_server(port, addr=address, registry=REGISTRY)
    except OSError as error:
        log.error("metrics.not_served", port=port, error=repr(error))
        return
    log.info("metrics.serving", port=port)
