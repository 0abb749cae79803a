"""The chart's monitoring, rendered with `helm template`, no server: off by default; on, a
PrometheusRule whose every expression selects this release's scrape and names only metrics the
operator exports, and the Grafana dashboard in a ConfigMap with the label Grafana's sidecar loads
(grafana_dashboard: "1"); values.schema.json refuses mistyped monitoring values."""

from __future__ import annotations

import json

import pytest

from tests.packaging.test_chart_gateway import FULLNAME, NAMESPACE, find, refusal, render
from tests.unit.test_metrics import PROMETHEUS_OWN, exported_names, metric_names

ENABLED = {"metrics": {"prometheusRule": {"enabled": True}, "dashboard": {"enabled": True}}}


def test_off_by_default(tmp_path):
    kinds = {(o["kind"], o["metadata"]["name"]) for o in render(tmp_path)}
    assert not any(kind == "PrometheusRule" for kind, _ in kinds)
    assert ("ConfigMap", f"{FULLNAME}-dashboard") not in kinds


def test_rules_select_this_release_and_name_only_exported_metrics(tmp_path):
    values = {**ENABLED, "metrics": {**ENABLED["metrics"], "prometheusRule": {"enabled": True, "labels": {"a": "b"}}}}
    rule = find(render(tmp_path, values), "PrometheusRule")
    assert rule["metadata"]["labels"]["a"] == "b"
    rules = rule["spec"]["groups"][0]["rules"]
    assert len(rules) == 7
    exported = exported_names() | PROMETHEUS_OWN
    for each in rules:
        assert f'namespace="{NAMESPACE}",job="{FULLNAME}-metrics"' in each["expr"], each["expr"]
        assert metric_names(each["expr"]) <= exported, each["expr"]
        assert "{{ $labels." in each["annotations"]["summary"] or "$labels" not in each["annotations"]["summary"]
    slow = next(each for each in rules if each["alert"] == "AnalysisWebhookSlow")
    assert slow["expr"].endswith("> 1")


def test_thresholds_and_selector_are_values(tmp_path):
    values = {
        "metrics": {
            "prometheusRule": {
                "enabled": True,
                "selector": 'job="operators"',
                "webhookP99Seconds": 2.5,
                "pendingFor": "1h",
            }
        }
    }
    rules = {
        each["alert"]: each for each in find(render(tmp_path, values), "PrometheusRule")["spec"]["groups"][0]["rules"]
    }
    assert rules["AnalysisWebhookSlow"]["expr"].endswith("> 2.5")
    assert "[1h]" in rules["AnalysisEnvironmentsStuckPending"]["expr"]
    assert all('{ job="operators" }' in each["expr"] or 'job="operators",' in each["expr"] for each in rules.values())


def test_dashboard_configmap_for_the_grafana_sidecar(tmp_path):
    values = {
        "metrics": {"dashboard": {"enabled": True, "namespace": "monitoring", "annotations": {"grafana_folder": "x"}}}
    }
    config_map = find(render(tmp_path, values), "ConfigMap", f"{FULLNAME}-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "x"}
    dashboard = json.loads(config_map["data"]["analysis-operator.json"])
    assert dashboard["uid"] == "analysis-operator" and dashboard["panels"]


def test_monitoring_needs_metrics(tmp_path):
    values = {"metrics": {"enabled": False, **ENABLED["metrics"]}}
    assert not [o for o in render(tmp_path, values) if o["kind"] == "PrometheusRule"]


@pytest.mark.parametrize(
    "values",
    [
        {"metrics": {"prometheusRule": {"enabled": "yes"}}},
        {"metrics": {"prometheusRule": {"pendingFor": "30 minutes"}}},
        {"metrics": {"prometheusRule": {"budgetUsedPercent": 150}}},
        {"metrics": {"prometheusRule": {"webhookP99Seconds": 0}}},
        {"metrics": {"dashboard": {"enabld": True}}},
        {"metrics": {"dashboard": {"labels": {"grafana_dashboard": 1}}}},
    ],
)
def test_mistyped_values_are_refused(tmp_path, values):
    message = refusal(tmp_path, values).lower()
    assert "values" in message or "schema" in message
