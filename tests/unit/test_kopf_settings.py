"""What kopf is told to list and watch (handlers/lifecycle.py configure_watching), and what it keeps per object."""

from __future__ import annotations

import asyncio

import kopf
from kopf._cogs.structs.references import Resource  # kopf's own matching of selectors to resources
from kopf._core.reactor.inventory import ResourceMemories  # where kopf keeps a memo per object

from analysis_operator.backends.kubernetes import build_pod
from analysis_operator.cli import SharedMemo
from analysis_operator.handlers.lifecycle import configure_watching
from analysis_operator.model.domain import GROUP, VERSION
from tests.unit.test_kubernetes_builders import SETTINGS, make_environment, make_flavor

PODS = Resource("", "v1", "pods", kind="Pod", singular="pod", namespaced=True, verbs=["list", "watch"])
POD_METRICS = Resource("metrics.k8s.io", "v1beta1", "pods", kind="PodMetrics", namespaced=True, verbs=["list"])
ENVIRONMENTS = Resource(
    GROUP, VERSION, "analysisenvironments", kind="AnalysisEnvironment", namespaced=True, verbs=["list", "watch"]
)


def configured() -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    configure_watching(settings)
    return settings


def test_the_api_server_sends_only_the_pods_this_operator_makes():
    (selector,) = configured().watching.label_selectors.collect(PODS)
    key, value = selector.split("=")
    labels = build_pod(make_environment(), make_flavor(), SETTINGS)["metadata"]["labels"]
    assert labels[key] == value  # every pod the operator makes is selected: none goes unseen


def test_environments_and_other_kinds_are_not_narrowed():
    settings = configured()
    assert settings.watching.label_selectors.collect(ENVIRONMENTS) == []  # every environment is the operator's
    assert settings.watching.label_selectors.collect(POD_METRICS) == []  # "pods" means the core API's only
    assert settings.watching.field_selectors.collect(PODS) == []


def test_initial_lists_come_in_pages():
    settings = configured()
    assert settings.watching.chunk_size is not None and 0 < settings.watching.chunk_size <= 1000
    assert settings.watching.initial_streaming is False  # pages of a list: what every API server serves


def test_kopf_keeps_no_copy_of_the_memo_per_object():
    memo = SharedMemo(config="settings")
    memories = ResourceMemories()
    first = asyncio.run(memories.recall({"metadata": {"uid": "a"}}, memobase=memo))
    second = asyncio.run(memories.recall({"metadata": {"uid": "b"}}, memobase=memo))
    assert first.memo is memo and second.memo is memo
    memo.active = False  # set later by the sweep loop: every object's handlers read the same value
    assert first.memo.active is False
