"""No input the CRDs let through makes parsing raise (issue 12, item 4).

The strategies are built from the CRD schemas themselves (crds/*.yaml): types, patterns,
lengths, enums, bounds and the string rules (`self.matches(...)`), so a schema change is
tested at once. Object-level CEL rules are not modelled: the inputs are a superset of what
the API server accepts, which makes the properties stronger, not weaker.
"""

from __future__ import annotations

import datetime
import pathlib
import re

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from analysis_operator.handlers.budgets import budgets, personal_budgets
from analysis_operator.handlers.datasets import dataset_pids, datasets
from analysis_operator.handlers.indexes import environments, flavors, groups, pods
from analysis_operator.model.domain import (
    EMBARGO_UNREADABLE,
    MAX_DURATION,
    MIN_DURATION,
    Dataset,
    Environment,
    Flavor,
    parse_duration,
)
from analysis_operator.policy.budgets import Budget, spent

CRDS = pathlib.Path(__file__).resolve().parents[2] / "crds"
_MATCHES = re.compile(r"^self\.matches\('([^']*)'\)")
UTC = datetime.UTC


def spec_schema(crd: str) -> dict:
    document = yaml.safe_load((CRDS / f"{crd}.yaml").read_text())
    return document["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def string_rule(schema: dict) -> str | None:
    """The regex of the field's own `self.matches(...)` rule, if it has one (as RE2 reads it)."""
    for rule in schema.get("x-kubernetes-validations") or ():
        match = _MATCHES.match(rule["rule"].removeprefix("self.size() > 0 && "))
        if match:
            return match.group(1).replace("\\\\", "\\")
    return None


def strategy(schema: dict) -> st.SearchStrategy:
    """Values the schema's structural constraints accept."""
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties") or {}
        required = set(schema.get("required") or ())
        return st.fixed_dictionaries(
            {key: strategy(sub) for key, sub in properties.items() if key in required},
            optional={key: strategy(sub) for key, sub in properties.items() if key not in required},
        )
    if kind == "array":
        return st.lists(strategy(schema["items"]), max_size=min(schema.get("maxItems", 4), 4))
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return st.integers(min_value=schema.get("minimum"), max_value=schema.get("maximum", 2**53))
    if kind == "number":
        return st.floats(
            min_value=schema.get("minimum"),
            max_value=schema.get("maximum", 1e15),
            exclude_min=bool(schema.get("exclusiveMinimum")),
            allow_nan=False,
            allow_infinity=False,
        )
    assert kind == "string", schema
    if schema.get("format") == "date-time":
        return st.datetimes(min_value=datetime.datetime(1970, 1, 1), timezones=st.just(UTC)).map(
            lambda moment: moment.strftime("%Y-%m-%dT%H:%M:%SZ")
        )
    longest, shortest = schema.get("maxLength", 64), schema.get("minLength", 0)
    if any(rule["rule"].startswith("self.size() > 0") for rule in schema.get("x-kubernetes-validations") or ()):
        shortest = max(shortest, 1)
    regex = string_rule(schema) or schema.get("pattern")
    if regex is None:
        return st.text(min_size=shortest, max_size=min(longest, 32))
    return st.from_regex(regex, fullmatch=True).filter(lambda text: shortest <= len(text) <= longest)


ENVIRONMENT_SPEC = spec_schema("analysisenvironments")
LIFETIME_RULE = string_rule(ENVIRONMENT_SPEC["properties"]["lifetime"])
LENIENT = settings(
    max_examples=120, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow], deadline=None
)


def test_the_strategies_read_the_crd_rules():
    assert LIFETIME_RULE == "^([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?$"
    assert string_rule(spec_schema("datasets")["properties"]["access"]["properties"]["embargoedUntil"])


@LENIENT
@given(st.from_regex(LIFETIME_RULE, fullmatch=True).filter(bool))  # the rule also wants self.size() > 0
def test_parse_duration_of_anything_the_crd_rule_matches_is_within_the_ceiling(text):
    """Before: '9999d...' style input raised OverflowError ('Python int too large to convert to C int')."""
    assert datetime.timedelta(0) <= parse_duration(text) <= MAX_DURATION


@LENIENT
@given(st.from_regex(r"[0-9]{1,40}d([0-9]{1,40}h)?", fullmatch=True))
def test_parse_duration_never_overflows_whatever_the_digits(text):
    assert parse_duration(text) <= MAX_DURATION


def body(spec, name="x", namespace=None, **metadata) -> dict:
    return {
        "metadata": {"name": name, "uid": f"uid-{name}", **({"namespace": namespace} if namespace else {}), **metadata},
        "spec": spec,
    }


@LENIENT
@given(strategy(ENVIRONMENT_SPEC))
def test_environment_from_any_schema_valid_spec(spec):
    environment = Environment.from_body(body(spec, namespace="team-a"))
    assert environment.lifetime is None or MIN_DURATION <= environment.lifetime <= MAX_DURATION
    if "lifetime" in spec:  # never "no lifetime": before, "0s" ran with the flavor's 8h
        assert environment.lifetime is not None
    assert environments.read(body=body(spec, namespace="team-a")) is not None


@LENIENT
@given(strategy(spec_schema("environmentflavors")))
def test_flavor_from_any_schema_valid_spec(spec):
    flavor = Flavor.from_body("f", spec)
    assert flavor.resources.cpus > 0 and flavor.resources.memory_mib >= 0 and flavor.resources.gpu >= 0
    assert MIN_DURATION <= flavor.max_lifetime <= MAX_DURATION
    assert flavors.read(name="f", spec=spec, body=body(spec, name="f")) is not None


@LENIENT
@given(strategy(spec_schema("datasets")))
def test_dataset_from_any_schema_valid_spec(spec):
    dataset = Dataset.from_body("d", spec)
    if spec["access"]["level"] == "embargoed":  # never public by accident
        assert dataset.embargoed_until is not None
    assert datasets.read(name="d", spec=spec, body=body(spec, name="d")) is not None
    assert dataset_pids.read(name="d", spec=spec, body=body(spec, name="d")) is not None


@LENIENT
@given(strategy(spec_schema("computebudgets")))
def test_budget_from_any_schema_valid_spec(spec):
    budget = Budget.from_body(body(spec, name="b"))
    spent(budget, 1.0, 1, datetime.datetime(2026, 3, 1, tzinfo=UTC))
    assert budgets.read(name="b", body=body(spec, name="b")) is not None
    if spec.get("user"):
        assert personal_budgets.read(name="b", spec=spec, body=body(spec, name="b")) is not None


@LENIENT
@given(strategy(spec_schema("facilitygroups")))
def test_group_from_any_schema_valid_spec(spec):
    assert groups.read(name="g", spec=spec, body=body(spec, name="g")) is not None


# --- objects the schema refuses today may be stored from before: they must not poison an index


def unreadable_lines(logs: list[dict]) -> list[dict]:
    return [line for line in logs if line["event"] == "index.unreadable"]


def test_a_dataset_with_an_impossible_date_stays_out_of_nobody_s_way():
    """Before: the datasets index raised ('day is out of range for month') and revocation stopped."""
    spec = {
        "pid": "10.5072/bad",
        "storage": {"path": "/data/bad"},
        "access": {"level": "embargoed", "embargoedUntil": "2026-02-30", "members": ["alice"]},
    }
    with capture_logs() as logs:
        first = datasets.read(name="bad", spec=spec, body=body(spec, name="bad"))
        datasets.read(name="bad", spec=spec, body=body(spec, name="bad"))  # the next event: not logged again
    dataset = first["bad"]
    assert dataset.embargoed_until == EMBARGO_UNREADABLE and dataset.members == {"alice"}
    lines = unreadable_lines(logs)
    assert len(lines) == 1 and lines[0]["index"] == "datasets" and lines[0]["name"] == "bad"
    assert "spec.access.embargoedUntil '2026-02-30' is not a real date" in lines[0]["problem"]


def test_an_object_an_index_cannot_read_at_all_is_left_out_and_logged_once():
    pod = {
        "metadata": {"name": "aenv-x", "namespace": "ns", "uid": "pod-1", "labels": {}},
        "spec": {"nodeName": "n1", "containers": [{"resources": {"requests": {"cpu": "lots"}}}]},
    }
    with capture_logs() as logs:
        assert pods.read(namespace="ns", labels={}, body=pod) is None
        assert pods.read(namespace="ns", labels={}, body=pod) is None
    lines = unreadable_lines(logs)
    assert len(lines) == 1 and lines[0]["indexed"] is False and "invalid quantity 'lots'" in lines[0]["problem"]


def test_a_legacy_environment_with_a_huge_lifetime_is_indexed_and_named():
    """Before: OverflowError in the index and at every reconcile (a stale record kept charging it)."""
    legacy = body({"owner": "alice", "flavor": "basic", "lifetime": "9999999999d"}, name="old", namespace="team-a")
    with capture_logs() as logs:
        record = environments.read(body=legacy)[("team-a", "old")]
    assert record.environment.lifetime == MAX_DURATION
    assert "longer than 366 days" in unreadable_lines(logs)[0]["problem"]


def test_a_budget_whose_end_cannot_be_read_refuses_with_the_reason():
    legacy = body({"user": "alice", "limits": {"cpuHours": 10}, "period": {"validUntil": "next spring"}}, name="b")
    budget = budgets.read(name="b", body=legacy)["b"]
    refusal = spent(budget, 1.0, 0, datetime.datetime(2026, 3, 1, tzinfo=UTC))
    assert refusal is not None and refusal.reason == "BudgetUnreadable"
    assert "spec.period.validUntil 'next spring' is not a time such as 2027-03-01T12:00:00Z" in refusal.message
