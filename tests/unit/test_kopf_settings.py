"""What kopf is told to list and watch (handlers/lifecycle.py configure_watching), and what it keeps per object.
kopf watches no pods: the operator's own watch does (infra/watch.py)."""

from __future__ import annotations

import asyncio

import kopf
from kopf._cogs.structs.references import Resource  # kopf's own matching of selectors to resources
from kopf._core.reactor.inventory import ResourceMemories  # where kopf keeps a memo per object

from analysis_operator import handlers  # noqa: F401  (registers the operator's kopf handlers)
from analysis_operator.backends.kubernetes import build_pod
from analysis_operator.cli import SharedMemo
from analysis_operator.handlers.lifecycle import configure_watching
from analysis_operator.model.domain import GROUP, MANAGED_SELECTOR, VERSION
from tests.unit.test_kubernetes_builders import SETTINGS, make_environment, make_flavor

PODS = Resource("", "v1", "pods", kind="Pod", singular="pod", namespaced=True, verbs=["list", "watch"])
ENVIRONMENTS = Resource(
    GROUP, VERSION, "analysisenvironments", kind="AnalysisEnvironment", namespaced=True, verbs=["list", "watch"]
)


def configured() -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    configure_watching(settings)
    return settings


def test_kopf_watches_no_pods_the_operator_s_own_watch_does():
    registry = kopf.get_default_registry()
    selectors = [
        selector
        for handlers in (registry._indexing, registry._watching, registry._changing, registry._spawning)
        for selector in handlers.get_all_selectors()
    ]
    assert any(selector.check(ENVIRONMENTS) for selector in selectors)  # the registry is the operator's
    assert not any(selector.check(PODS) for selector in selectors)  # handlers/lifecycle.py: its own Watch


def test_the_api_server_sends_only_the_pods_this_operator_makes():
    key, value = MANAGED_SELECTOR.split("=")  # what the operator's pod watch asks for
    labels = build_pod(make_environment(), make_flavor(), SETTINGS)["metadata"]["labels"]
    assert labels[key] == value  # every pod the operator makes is selected: none goes unseen


def test_kopf_narrows_no_kind():
    settings = configured()
    assert settings.watching.label_selectors.collect(ENVIRONMENTS) == []  # every environment is the operator's
    assert settings.watching.field_selectors.collect(ENVIRONMENTS) == []


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
