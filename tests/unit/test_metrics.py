"""infra/metrics.py: every exported name carries its unit or is a documented count or flag; the
chart's Grafana dashboard and alerts name only metrics the operator exports; refusals are counted
by reason and stage from the admission answer (dry runs not); the webhook label cannot be chosen by
a caller; an environment's first Ready is observed once; a standby speaks for no object."""

from __future__ import annotations

import asyncio
import datetime
import json
import pathlib
import re
from collections.abc import Iterable
from typing import Any

import pytest
import yaml

from analysis_operator.engine.views import EnvironmentRecord
from analysis_operator.infra import metrics
from analysis_operator.model.domain import Environment
from analysis_operator.policy.budgets import Budget

CHART = pathlib.Path(__file__).resolve().parents[2] / "charts/analysis-operator"
NOW = datetime.datetime(2026, 11, 30, 12, 0, tzinfo=datetime.UTC)
UNITS = ("_seconds", "_hours", "_environments", "_gpus", "_bytes")
STANDARD = ("process_", "python_")  # prometheus_client's own collectors, named by its conventions
PROMETHEUS_OWN = {"up"}  # recorded by Prometheus for every scrape, not by the operator


def _index(values: Iterable[Any]) -> dict[Any, list[Any]]:
    return {index: [value] for index, value in enumerate(values)}


def _collector(active: bool = True) -> metrics.IndexCollector:
    budget = Budget(
        name="proposal-1",
        limits={"cpuHours": 140, "gpuHours": 20, "maxEnvironments": 3, "maxGpus": 1},
        status={"settled": {"cpuHours": 72, "gpuHours": 15}, "running": {"environments": 2, "gpus": 1}},
    )
    records = [
        EnvironmentRecord(Environment("ns", f"e{n}", f"uid-{n}", "alice", flavor), {"phase": phase})
        for n, (flavor, phase) in enumerate(
            [("jupyter-basic", "Ready"), ("jupyter-basic", "Ready"), ("jupyter-gpu", "Pending"), ("vm", "")]
        )
    ]
    backends = ["kubernetes", "slurm", "never-called"]
    return metrics.IndexCollector(_index([budget]), _index(records), lambda: active, backends)


def _families(active: bool = True) -> list[Any]:
    return [*metrics.REGISTRY.collect(), *_collector(active).collect()]


def _samples(families: Iterable[Any]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families
        for sample in family.samples
    }


def exported_names() -> set[str]:
    """Every series name the operator can export, observed yet or not."""
    names = set()
    for family in _families():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.update({family.name, *(sample.name for sample in family.samples)})
    return names


def unit_problem(family_type: str, name: str) -> str | None:
    """Why a name is not acceptable (None: it is): a unit suffix, a count (_total), or a documented flag."""
    if name.startswith(STANDARD) or name in metrics.UNITLESS:
        return None
    if family_type == "counter":
        return None  # exposed as <name>_total: a count of what the name says
    if not name.endswith(UNITS):
        return f"{name}: no unit suffix ({', '.join(UNITS)}), not a count, not in metrics.UNITLESS"
    return None


def test_every_name_has_a_unit_or_is_a_documented_count_or_flag():
    families = _families()
    assert {family.name for family in families} >= {
        "analysis_budget_used_hours",
        "analysis_budget_limit_environments",
        "analysis_environments",
        "analysis_refusals",
        "analysis_webhook_duration_seconds",
        "analysis_environment_ready_seconds",
        "analysis_active_replica",
        "analysis_backend_reachable",
        "process_resident_memory_bytes",
    }
    assert [problem for family in families if (problem := unit_problem(family.type, family.name))] == []
    assert all(family.documentation for family in families if family.name.startswith("analysis_"))


@pytest.mark.parametrize(
    ("family_type", "name"),
    [("gauge", "analysis_budget_used"), ("gauge", "analysis_queue"), ("histogram", "analysis_webhook_latency")],
)
def test_a_name_without_a_unit_is_caught(family_type, name):
    assert unit_problem(family_type, name)


# --- the chart's dashboard and alerts ------------------------------------------------------------------

KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right"}


def metric_names(expression: str) -> set[str]:
    """The metric names a PromQL expression reads: its identifiers without strings, label matchers,
    ranges, grouping clauses, functions (followed by '(') and keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression)
    text = re.sub(r"\{[^{}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    tokens = re.findall(r"(?<![\w.$])([A-Za-z_:][\w:]*)\b(?!\s*\()", text)
    return {token for token in tokens if token.lower() not in KEYWORDS and token.lower() not in ("inf", "nan")}


def dashboard_expressions() -> list[str]:
    """Every panel's expr, and each templating query's series (label_values(<series>, <label>))."""
    dashboard = json.loads((CHART / "files/dashboard.json").read_text())
    found = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            found.extend([node["expr"]] if isinstance(node.get("expr"), str) else [])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found.append(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", variable["query"]["query"]))
    return found


def alert_rules() -> list[dict]:
    """files/alerts.yaml with its template fields filled as the chart fills them."""
    rules = yaml.safe_load((CHART / "files/alerts.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())["metrics"]["prometheusRule"]
    for rule in rules:
        expression = rule["expr"].replace("{{ .selector }}", 'namespace="ops",job="aop-analysis-operator-metrics"')
        rule["expr"] = re.sub(r"\{\{ \.rules\.(\w+) \}\}", lambda match: str(values[match.group(1)]), expression)
        assert "{{" not in rule["expr"], rule["expr"]
    return rules


def test_dashboard_and_alerts_name_only_exported_metrics():
    exported = exported_names() | PROMETHEUS_OWN
    expressions = dashboard_expressions() + [rule["expr"] for rule in alert_rules()]
    assert len(expressions) > 20
    unknown = {(name, expression) for expression in expressions for name in metric_names(expression) - exported}
    assert unknown == set()
    read = set().union(*(metric_names(expression) for expression in expressions))
    # What a dashboard is for: each of these is shown or alerted on.
    assert read >= {
        "analysis_refusals_total",
        "analysis_webhook_duration_seconds_bucket",
        "analysis_webhook_requests_total",
        "analysis_environment_ready_seconds_bucket",
        "analysis_backend_reachable",
        "analysis_active_replica",
        "analysis_environments",
        "analysis_budget_used_hours",
        "analysis_budget_limit_hours",
        "process_resident_memory_bytes",
    }


def test_the_alerts_are_the_ones_operators_need():
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert set(rules) == {
        "AnalysisOperatorDown",
        "AnalysisOperatorNoActiveReplica",
        "AnalysisWebhookErrors",
        "AnalysisWebhookSlow",
        "AnalysisBackendUnreachable",
        "AnalysisBudgetNearlyExhausted",
        "AnalysisEnvironmentsStuckPending",
    }
    for rule in rules.values():
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


@pytest.mark.parametrize(
    ("expression", "names"),
    [
        (
            'sum by (webhook, le) (rate(analysis_x_bucket{job=~"$job",le="0.5"}[$__rate_interval]))',
            {"analysis_x_bucket"},
        ),
        ("(sum(analysis_a{}) or vector(0)) < 1e3 unless on () analysis_b > 0.99", {"analysis_a", "analysis_b"}),
        ("histogram_quantile(0.99, sum without (pod) (analysis_nope_total))", {"analysis_nope_total"}),
    ],
)
def test_names_are_read_out_of_promql(expression, names):
    assert metric_names(expression) == names


def test_a_misspelt_metric_in_an_expression_is_caught():
    assert metric_names("rate(analysis_refusal_total[5m])") - exported_names() == {"analysis_refusal_total"}


# --- refusals and webhooks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "stage"),
    [
        ("spec.owner", "identity"),
        ("spec.flavor", "flavor"),
        ("spec.datasets[1].pid", "datasets"),
        ("spec.datasets[0].mountPath", "datasets"),
        ("spec.lifetime", "lifetime"),
        ("spec.image", "image"),
        ("spec.sharing.users[0]", "sharing"),
        ("spec.budget", "budget"),
        ("status.decision", "decision"),
        ("spec.somethingNew", "other"),
        ("", "other"),
    ],
)
def test_refusal_stage_follows_the_field(field, stage):
    assert metrics.refusal_stage(field) == stage


def _answer(allowed: bool, code: int | None = None, causes: list[dict] | None = None) -> dict:
    response: dict[str, Any] = {"uid": "u", "allowed": allowed}
    if code is not None:
        response["status"] = {"code": code, "message": "no", "reason": "Forbidden"}
        if causes is not None:
            response["status"]["details"] = {"causes": causes}
    return {"response": response}


@pytest.mark.parametrize(
    ("answer", "result"),
    [
        (_answer(True), "allowed"),
        (_answer(False, 403), "refused"),
        (_answer(False, 422), "refused"),
        (_answer(False, 500), "error"),
        (_answer(False), "error"),  # refused without a status: a handler failed
    ],
)
def test_webhook_result(answer, result):
    assert metrics.webhook_result(answer) == result


def test_refusal_labels_one_per_cause():
    causes = [
        {"reason": "DatasetEmbargoed", "field": "spec.datasets[0].name"},
        {"reason": "DatasetNotFound", "field": "spec.datasets[1].pid"},
    ]
    assert metrics.refusal_labels(_answer(False, 403, causes)) == [
        ("DatasetEmbargoed", "datasets"),
        ("DatasetNotFound", "datasets"),
    ]
    assert metrics.refusal_labels(_answer(False, 403)) == [("Forbidden", "other")]


def _value(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def _serve(answer: Any, webhook: str, dry_run: bool = False) -> Any:
    async def fn(request: Any, **_: Any) -> Any:
        if isinstance(answer, Exception):
            raise answer
        return answer

    served = metrics.metered(fn, lambda: frozenset({"environment-admission"}))
    return asyncio.run(served({"request": {"uid": "u", "dryRun": dry_run}}, webhook=webhook, headers={}))


def test_a_refusal_is_counted_once_by_reason_and_stage_and_a_dry_run_not():
    refusal = {"reason": "NotOwner", "stage": "identity", "enforcement": "admission"}
    answers = {"webhook": "environment-admission", "result": "refused"}
    before, requests = (
        _value("analysis_refusals_total", **refusal),
        _value("analysis_webhook_requests_total", **answers),
    )
    timed = _value("analysis_webhook_duration_seconds_count", webhook="environment-admission")
    answer = _answer(False, 403, [{"reason": "NotOwner", "field": "spec.owner"}])
    _serve(answer, "environment-admission")
    _serve(answer, "environment-admission", dry_run=True)  # the portal asking: answered, nothing refused
    assert _value("analysis_refusals_total", **refusal) - before == 1
    assert _value("analysis_webhook_requests_total", **answers) - requests == 2
    assert _value("analysis_webhook_duration_seconds_count", webhook="environment-admission") - timed == 2


def test_a_caller_cannot_choose_the_webhook_label():
    before = _value("analysis_webhook_requests_total", webhook="other", result="allowed")
    for junk in ("../../x", "environment-admission-2", "a" * 200):
        _serve(_answer(True), junk)
    assert _value("analysis_webhook_requests_total", webhook="other", result="allowed") - before == 3
    assert _value("analysis_webhook_requests_total", webhook="../../x", result="allowed") == 0


def test_a_failing_request_is_an_error_and_is_timed():
    errors = _value("analysis_webhook_requests_total", webhook="environment-admission", result="error")
    with pytest.raises(ValueError):
        _serve(ValueError("unreadable"), "environment-admission")
    _serve(_answer(False, 500), "environment-admission")
    assert _value("analysis_webhook_requests_total", webhook="environment-admission", result="error") - errors == 2


# --- Ready ---------------------------------------------------------------------------------------------


def _body(uid: str, phase: str, ready_at: datetime.datetime, created: datetime.datetime, kind: str = "kubernetes"):
    ready = {"type": "Ready", "status": "True" if phase == "Ready" else "False"}
    ready["lastTransitionTime"] = ready_at.isoformat().replace("+00:00", "Z")
    return {
        "metadata": {"uid": uid, "creationTimestamp": created.isoformat().replace("+00:00", "Z")},
        "status": {"phase": phase, "conditions": [ready], "backend": {"kind": kind}},
    }


def test_ready_seconds_from_creation_to_the_ready_condition():
    created, ready_at = NOW - datetime.timedelta(seconds=50), NOW - datetime.timedelta(seconds=8)
    assert metrics.ready_seconds(_body("a", "Ready", ready_at, created), NOW) == 42
    assert metrics.ready_seconds(_body("a", "Provisioning", ready_at, created), NOW) is None
    # Ready long ago (seen again after a restart or a takeover): history, not a new observation.
    long_ago = NOW - datetime.timedelta(hours=3)
    assert metrics.ready_seconds(_body("a", "Ready", long_ago, long_ago - datetime.timedelta(minutes=1)), NOW) is None
    assert metrics.ready_seconds({"metadata": {"uid": "a"}, "status": {"phase": "Ready"}}, NOW) is None


def test_each_environment_is_observed_once():
    count = _value("analysis_environment_ready_seconds_count", backend="slurm")
    body = _body(
        "uid-once", "Ready", NOW - datetime.timedelta(seconds=1), NOW - datetime.timedelta(seconds=30), "slurm"
    )
    for _ in range(3):  # every later change of the environment passes the index again
        metrics.observe_ready(body, NOW)
    assert _value("analysis_environment_ready_seconds_count", backend="slurm") - count == 1
    assert _value("analysis_environment_ready_seconds_sum", backend="slurm") >= 29


# --- gauges at scrape ----------------------------------------------------------------------------------


def test_budgets_are_split_by_unit_and_environments_by_phase_and_flavor():
    metrics.backend_reached("slurm", False)
    samples = _samples(_collector().collect())
    assert samples[("analysis_budget_used_hours", (("budget", "proposal-1"), ("resource", "cpu")))] == 72
    assert samples[("analysis_budget_limit_hours", (("budget", "proposal-1"), ("resource", "gpu")))] == 20
    assert samples[("analysis_budget_used_environments", (("budget", "proposal-1"),))] == 2
    assert samples[("analysis_budget_limit_environments", (("budget", "proposal-1"),))] == 3
    assert samples[("analysis_budget_used_gpus", (("budget", "proposal-1"),))] == 1
    assert samples[("analysis_environments", (("flavor", "jupyter-basic"), ("phase", "Ready")))] == 2
    assert samples[("analysis_environments", (("flavor", "vm"), ("phase", "New")))] == 1
    assert samples[("analysis_active_replica", ())] == 1
    assert samples[("analysis_backend_reachable", (("backend", "kubernetes"),))] == 1
    assert samples[("analysis_backend_reachable", (("backend", "slurm"),))] == 0
    assert ("analysis_backend_reachable", (("backend", "never-called"),)) not in samples  # unknown: no series
    metrics.backend_reached("slurm", True)
    assert _samples(_collector().collect())[("analysis_backend_reachable", (("backend", "slurm"),))] == 1


def test_a_standby_speaks_for_no_object():
    samples = _samples(_collector(active=False).collect())
    assert samples == {("analysis_active_replica", ()): 0}


@pytest.mark.parametrize(
    ("reason", "check", "stage"),
    [
        ("LifetimeTooLong", "request", "lifetime"),
        ("CustomImageNotAllowed", "request", "image"),
        ("SlurmPartitionMissing", "request", "request"),
        ("FlavorNotAllowed", "datasets", "flavor"),
        ("DatasetEmbargoed", "datasets", "datasets"),
        ("NoPosixIdentity", "identity", "identity"),
    ],
)
def test_a_reconcile_refusal_is_counted_with_its_stage(reason, check, stage):
    labels = {"reason": reason, "stage": stage, "enforcement": "reconcile"}
    before = _value("analysis_refusals_total", **labels)
    metrics.reconcile_refusal(reason, check)
    assert _value("analysis_refusals_total", **labels) - before == 1


def test_backend_reachability_follows_what_converge_finds():
    """engine/converge.py: a BackendUnavailable marks the backend 0, the next answer 1 again."""
    from analysis_operator.backends.base import BackendUnavailable
    from tests.unit.test_backend_interface import ENVIRONMENT, run, setup

    backend, _, context = setup()
    collector = metrics.IndexCollector({}, {}, lambda: True, ["memory"])
    reachable = ("analysis_backend_reachable", (("backend", "memory"),))

    async def scenario() -> list[float]:
        seen = []
        backend.fail_next = BackendUnavailable("the memory is down")
        status, outcome = await run(context, ENVIRONMENT, {})
        assert outcome.retry_after is not None
        seen.append(_samples(collector.collect())[reachable])
        await run(context, ENVIRONMENT, status)
        seen.append(_samples(collector.collect())[reachable])
        return seen

    assert asyncio.run(scenario()) == [0, 1]
