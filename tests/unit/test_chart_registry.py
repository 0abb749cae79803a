"""The Helm chart against the code: every kopf admission handler has its webhook in
charts/analysis-operator/files/webhooks.yaml (same id, kind, resource, subresource and
operations) and nothing else is there; every resource kopf watches, indexes or patches
is granted in files/rbac.yaml. A handler added without its chart entry fails here."""

from __future__ import annotations

import pathlib

import kopf
import yaml

from analysis_operator import handlers  # noqa: F401  (registers the handlers)

CHART = pathlib.Path(__file__).resolve().parents[2] / "charts/analysis-operator"
REGISTRY = kopf._core.intents.registries.get_default_registry()


def _chart_webhooks() -> dict[str, dict]:
    return {hook["id"]: hook for hook in yaml.safe_load((CHART / "files/webhooks.yaml").read_text())}


def _code_webhooks() -> dict[str, dict]:
    return {
        handler.id: {
            "id": handler.id,
            "type": handler.reason.value,
            "resource": handler.selector.plural or handler.selector.any_name,
            "subresource": handler.subresource,
            "operations": sorted(handler.operations or ["*"]),
            "failurePolicy": "Ignore" if handler.ignore_failures else "Fail",
            "sideEffects": "NoneOnDryRun" if handler.side_effects else "None",
        }
        for handler in REGISTRY._webhooks.get_all_handlers()
    }


def test_chart_webhooks_match_kopf_handlers():
    chart = {
        hook_id: {
            "id": hook_id,
            "type": hook["type"],
            "resource": hook["resource"],
            "subresource": hook.get("subresource"),
            "operations": sorted(hook["operations"]),
            "failurePolicy": hook["failurePolicy"],
            "sideEffects": hook.get("sideEffects", "None"),
        }
        for hook_id, hook in _chart_webhooks().items()
    }
    code = _code_webhooks()
    assert code, "no admission handlers registered: is analysis_operator.handlers importing them?"
    missing, extra = code.keys() - chart.keys(), chart.keys() - code.keys()
    assert not missing, f"add these webhooks to {CHART}/files/webhooks.yaml: {[code[i] for i in missing]}"
    assert not extra, f"webhooks in the chart with no kopf handler: {sorted(extra)}"
    assert chart == code


def test_the_chart_and_the_operator_register_the_same_match_conditions():
    """One file for both: the chart's is a link to the operator's, for webhooks that exist."""
    from analysis_operator.handlers.admission import MATCH_CONDITIONS

    chart = CHART / "files/match-conditions.yaml"
    assert chart.is_symlink() and chart.resolve() == MATCH_CONDITIONS.resolve()
    assert set(yaml.safe_load(MATCH_CONDITIONS.read_text())) <= set(_code_webhooks())
    assert not [hook for hook in _chart_webhooks().values() if "matchConditions" in hook]  # not in two places


def test_every_chart_webhook_says_what_happens_when_the_operator_is_down():
    for hook in _chart_webhooks().values():
        assert hook["failurePolicy"] in {"Fail", "Ignore"}, hook
    assert _chart_webhooks()["environment-admission"]["failurePolicy"] == "Fail"


def _granted() -> set[tuple[str, str, str]]:
    """Every rule of files/rbac.yaml, whichever values switch it on (gateway: gateway.enabled)."""
    rules = yaml.safe_load((CHART / "files/rbac.yaml").read_text())
    return {
        (group, resource, verb)
        for rule in rules["cluster"] + rules["namespaced"] + rules["gateway"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def _watched() -> dict[tuple[str, str], set[str]]:
    """(group, plural) -> verbs kopf needs: list/watch for anything it watches or indexes,
    patch for change handlers (finalizers, progress annotations)."""
    needs: dict[tuple[str, str], set[str]] = {}
    for registry, verbs in (
        (REGISTRY._indexing, {"list", "watch"}),
        (REGISTRY._watching, {"list", "watch"}),
        (REGISTRY._changing, {"list", "watch", "patch"}),
        (REGISTRY._spawning, {"list", "watch", "patch"}),
    ):
        for handler in registry.get_all_handlers():
            selector = handler.selector
            key = (selector.group or "", selector.plural or selector.any_name)
            needs.setdefault(key, set()).update(verbs)
    return needs


def test_chart_rbac_grants_what_kopf_handlers_need():
    granted = _granted()
    missing = [
        (group, plural, verb)
        for (group, plural), verbs in _watched().items()
        for verb in verbs
        if (group, plural, verb) not in granted
    ]
    assert not missing, f"add to {CHART}/files/rbac.yaml: {missing}"


def test_chart_rbac_grants_peering_and_discovery():
    granted = _granted()
    assert {("kopf.dev", "clusterkopfpeerings", verb) for verb in ("list", "watch", "patch")} <= granted
    assert {("apiextensions.k8s.io", "customresourcedefinitions", verb) for verb in ("list", "watch")} <= granted
    # Nothing broader than needed: no wildcards, no deletecollection, update only of a status.
    assert not [
        rule
        for rule in granted
        if "*" in rule
        or rule[2] in {"deletecollection", "escalate", "bind"}
        or (rule[2] == "update" and not rule[1].endswith("/status"))
    ]
