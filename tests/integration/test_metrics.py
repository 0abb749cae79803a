"""The operator's /metrics as Prometheus scrapes it, after real admission answers and a real start:
a refused create moves the refusal counter by its machine reason and stage and the webhook's
refused count; a dry run moves the webhook's count, never the refusals; a create that turns Ready
moves the allowed count, the webhook latency histogram and the create-to-Ready histogram of its
backend; the gauges say which replica acts (1 on the active one, 0 on a standby, which exports no
object gauges, until it takes over), which backend answers, and environments by phase and flavor.
The chart's dashboard and alerts are held to these names by tests/unit/test_metrics.py."""

from __future__ import annotations

import signal
import urllib.request

import kubernetes
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import GROUP, VERSION, Environments
from tests.integration.test_peering import LIFETIME, operator_pair, split  # noqa: F401  (a fixture)
from tests.waiting import wait_for

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(operator) -> Samples:
    text = urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=5).read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def webhook_calls(operator) -> dict[str, float]:
    """Admission requests each of the operator's webhooks answered so far, whatever the answer, by webhook id."""
    calls: dict[str, float] = {}
    for (name, labels), count in scrape(operator).items():
        if name == "analysis_webhook_requests_total":
            webhook = dict(labels).get("webhook", "")
            calls[webhook] = calls.get(webhook, 0.0) + count
    return calls


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _create(custom, namespace: str, name: str, dry_run: str | None = None, **spec) -> dict:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AnalysisEnvironment",
        "metadata": {"name": name},
        "spec": {"owner": "alice", "flavor": "test-short", **spec},
    }
    extra = {"dry_run": dry_run} if dry_run else {}
    return custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "analysisenvironments", body, **extra)


def _refused(call) -> int:
    with pytest.raises(kubernetes.client.ApiException) as refused:
        call()
    return refused.value.status


def test_refusals_webhooks_and_ready_move_the_metrics(custom, namespace, environments, operator):
    before = scrape(operator)
    refusal = {"reason": "LifetimeTooLong", "stage": "lifetime", "enforcement": "admission"}
    webhook = "environment-admission"

    # Refused (422, the flavor allows 1h), then the same asked as a dry run: one refusal, two answers.
    assert _refused(lambda: _create(custom, namespace, "too-long", lifetime="30d")) == 422
    assert _refused(lambda: _create(custom, namespace, "asked", dry_run="All", lifetime="30d")) == 422
    _create(custom, namespace, "lab")
    environments.wait_phase("lab", "Ready", timeout=60)

    def moved() -> Samples | None:
        after = scrape(operator)
        ready = value(after, "analysis_environment_ready_seconds_count", backend="kubernetes")
        return (
            after if ready > value(before, "analysis_environment_ready_seconds_count", backend="kubernetes") else None
        )

    after = wait_for(moved, timeout=15, what="the create-to-Ready histogram to move")

    assert value(after, "analysis_refusals_total", **refusal) - value(before, "analysis_refusals_total", **refusal) == 1
    for result, at_least in (("refused", 2), ("allowed", 1)):
        delta = value(after, "analysis_webhook_requests_total", webhook=webhook, result=result) - value(
            before, "analysis_webhook_requests_total", webhook=webhook, result=result
        )
        assert delta >= at_least, (result, delta)
    answered = value(after, "analysis_webhook_duration_seconds_count", webhook=webhook) - value(
        before, "analysis_webhook_duration_seconds_count", webhook=webhook
    )
    assert answered >= 3
    assert value(after, "analysis_webhook_requests_total", webhook=webhook, result="error") == value(
        before, "analysis_webhook_requests_total", webhook=webhook, result="error"
    )
    # Ready in seconds after its creation: observed once, from creationTimestamp, not from the scrape.
    seconds = value(after, "analysis_environment_ready_seconds_sum", backend="kubernetes") - value(
        before, "analysis_environment_ready_seconds_sum", backend="kubernetes"
    )
    assert 0 <= seconds < 60
    assert value(after, "analysis_environments", phase="Ready", flavor="test-short") >= 1
    assert value(after, "analysis_active_replica") == 1
    assert value(after, "analysis_backend_reachable", backend="kubernetes") == 1
    assert value(after, "process_resident_memory_bytes") > 0

    # Seen again (a status write, a later reconcile): still observed once.
    environments.patch_spec("lab", lifetime="50m")
    wait_for(
        lambda: (
            environments.get("lab")["metadata"].get("generation")
            == (environments.get("lab")["status"] or {}).get("observedGeneration")
        ),
        timeout=15,
        what="the spec change reconciled",
    )
    again = scrape(operator)
    assert value(again, "analysis_environment_ready_seconds_count", backend="kubernetes") == value(
        after, "analysis_environment_ready_seconds_count", backend="kubernetes"
    )


def test_the_active_replica_says_so_and_a_standby_speaks_for_no_object(operator_pair, custom, namespace):
    """Two peered replicas (as the chart runs them): 1 on the one that acts, 0 on the standby, whose
    paused indexes would count every environment a second time; when the active one dies, the
    standby takes over the gauge too."""
    name, processes = operator_pair()
    active, standby = split(name, processes)
    Environments(custom, namespace).create("lab", flavor="jupyter-basic")
    Environments(custom, namespace).wait_phase("lab", "Ready", timeout=30)

    def replicas() -> tuple[Samples, Samples] | None:
        pair = scrape(active), scrape(standby)
        return (
            pair
            if (value(pair[0], "analysis_active_replica"), value(pair[1], "analysis_active_replica")) == (1, 0)
            else None
        )

    on_active, on_standby = wait_for(replicas, timeout=15, what="1 on the active replica, 0 on the standby")
    assert value(on_active, "analysis_environments", phase="Ready", flavor="jupyter-basic") >= 1
    assert not [key for key in on_standby if key[0].startswith(("analysis_environments", "analysis_budget_"))]
    assert not [key for key in on_standby if key[0] == "analysis_backend_reachable"]
    assert value(on_standby, "process_resident_memory_bytes") > 0  # the process itself is still watched

    active.stop(signal.SIGKILL)
    wait_for(
        lambda: value(scrape(standby), "analysis_active_replica") == 1,
        timeout=LIFETIME + 15,
        what="the standby to say it is active after the takeover",
    )
    # kopf resumes the standby's watches once the peer's keep-alive expired: its indexes are listed again
    # then, a moment after it says it is active
    wait_for(
        lambda: value(scrape(standby), "analysis_environments", phase="Ready", flavor="jupyter-basic") >= 1,
        timeout=15,
        what="the new active replica to count the environment",
    )


def test_the_validating_webhook_is_not_called_for_metadata_only_updates(custom, namespace, operator):
    """kopf registers the webhooks with the chart's matchConditions (operator/analysis_operator/
    match_conditions.yaml): a label changed costs no call; a spec changed is still checked."""

    def calls() -> float:
        samples = scrape(operator)
        return sum(
            count
            for (name, labels), count in samples.items()
            if name == "analysis_webhook_requests_total" and dict(labels).get("webhook") == "environment-admission"
        )

    _create(custom, namespace, "lab")
    before = calls()
    patch = {"metadata": {"labels": {"team": "saxs"}}}
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "analysisenvironments", "lab", patch)
    assert calls() == before
    assert (
        _refused(
            lambda: custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, "analysisenvironments", "lab", {"spec": {"lifetime": "30d"}}
            )
        )
        == 422
    )  # LifetimeTooLong: the webhook was called and said why
    assert calls() == before + 1
