"""Typed views of the custom resources and their small pure helpers."""

from __future__ import annotations

import datetime

import pytest

from analysis_operator.model.domain import (
    EMBARGO_UNREADABLE,
    LABEL_ENVIRONMENT,
    LABEL_ENVIRONMENT_UID,
    LABEL_MANAGED_BY,
    MANAGER,
    MAX_DURATION,
    BackendKind,
    Dataset,
    DatasetRef,
    Environment,
    Flavor,
    Resources,
    duration_problem,
    format_time,
    parse_duration,
    parse_embargo,
    parse_quantity,
    parse_time,
    parse_timestamp,
)

MINUTE = datetime.timedelta(minutes=1)
HOUR = datetime.timedelta(hours=1)
DAY = datetime.timedelta(days=1)
UTC = datetime.UTC


@pytest.mark.parametrize(
    "text, expected",
    [
        ("8h", 8 * HOUR),
        ("1d12h", 36 * HOUR),
        ("90m", 90 * MINUTE),
        ("30s", datetime.timedelta(seconds=30)),
        ("1d2h3m4s", DAY + 2 * HOUR + 3 * MINUTE + datetime.timedelta(seconds=4)),
        ("2d", 2 * DAY),
        ("0h", datetime.timedelta(0)),
    ],
)
def test_parse_duration_accepts_the_crd_pattern(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        None,
        "8 hours",
        "h",
        "-1h",
        "8",
        "1h1d",  # units out of order
        "1.5h",
        "8H",
        " 8h",
        "8h\n",  # the CRD pattern (RE2: '$' is end of text) rejects a trailing newline
    ],
)
def test_parse_duration_rejects_anything_else(text):
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("500m", 0.5),
        ("16Gi", 16 * 2**30),
        (2, 2.0),
        ("1.5", 1.5),
        ("512Mi", 512 * 2**20),
        ("2k", 2000.0),
        ("1G", 1e9),
        (0.25, 0.25),
        ("1e3", 1000.0),  # a decimal exponent, as Kubernetes writes some quantities back
        ("1.5Gi", 1.5 * 2**30),
        ("2E", 2e18),
        ("5e-3", 0.005),
    ],
)
def test_parse_quantity(text, expected):
    assert parse_quantity(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "bad", "16GB", "-1", "Gi", "1 Gi", "16gi", "1\n", "1e400", "9" * 400])
def test_parse_quantity_rejects_bad_input(text):
    with pytest.raises(ValueError, match="invalid quantity"):
        parse_quantity(text)


@pytest.mark.parametrize("text", ["1.2.3", "."])
def test_parse_quantity_rejects_malformed_numbers(text):
    with pytest.raises(ValueError):
        parse_quantity(text)


@pytest.mark.parametrize(
    "moment",
    [
        datetime.datetime(2024, 3, 1, 12, 30, 5, tzinfo=UTC),
        datetime.datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC),
        datetime.datetime(2024, 3, 1, 14, 30, 5, tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
        datetime.datetime(2024, 3, 1, 0, 15, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=-5))),
    ],
)
def test_time_round_trips_through_utc_text(moment):
    text = format_time(moment)
    assert text.endswith("Z")
    assert parse_time(text) == moment  # aware datetimes compare by instant
    assert parse_time(text).utcoffset() == datetime.timedelta(0)


def test_format_time_converts_to_utc_and_drops_microseconds():
    moment = datetime.datetime(2024, 3, 1, 14, 30, 5, 999_999, tzinfo=datetime.timezone(datetime.timedelta(hours=2)))
    assert format_time(moment) == "2024-03-01T12:30:05Z"
    assert parse_time(format_time(moment)) == moment.replace(microsecond=0)


@pytest.mark.parametrize("text", [None, ""])
def test_parse_time_of_nothing_is_none(text):
    assert parse_time(text) is None


def test_flavor_defaults():
    flavor = Flavor.from_body("small", {"backend": "kubernetes"})
    assert flavor.name == "small"
    assert flavor.backend == BackendKind.KUBERNETES
    assert flavor.display_name == ""
    assert flavor.resources == Resources(cpu="1", memory="16Gi", gpu=0)
    assert flavor.image == ""
    assert flavor.allow_custom_image is False
    assert flavor.max_lifetime == 8 * HOUR
    assert flavor.idle_timeout is None
    assert flavor.slurm.modules == () and flavor.slurm.time_limit_minutes is None
    assert flavor.openstack.key_name == ""


def test_flavor_fields():
    flavor = Flavor.from_body(
        "gpu-large",
        {
            "backend": "slurm",
            "displayName": "GPU, large",
            "resources": {"cpu": 8, "memory": "64Gi", "gpu": "2"},
            "image": "jupyter/scipy:2024",
            "allowCustomImage": True,
            "maxLifetime": "1d12h",
            "idleTimeout": "30m",
            "slurm": {
                "partition": "gpu",
                "account": "p-1",
                "timeLimitMinutes": 120,
                "qos": "short",
                "modules": ["cuda/12", "python/3.11"],
            },
            "openstack": {"flavor": "g1", "image": "ubuntu", "network": "net", "keyName": "ops"},
        },
    )
    assert flavor.backend == BackendKind.SLURM
    assert flavor.display_name == "GPU, large"
    assert flavor.resources == Resources(cpu="8", memory="64Gi", gpu=2)  # numbers normalised
    assert flavor.resources.cpus == 8.0 and flavor.resources.memory_mib == 64 * 1024
    assert flavor.image == "jupyter/scipy:2024"
    assert flavor.allow_custom_image is True
    assert flavor.max_lifetime == 36 * HOUR
    assert flavor.idle_timeout == 30 * MINUTE
    assert (flavor.slurm.partition, flavor.slurm.account, flavor.slurm.time_limit_minutes, flavor.slurm.qos) == (
        "gpu",
        "p-1",
        120,
        "short",
    )
    assert flavor.slurm.modules == ("cuda/12", "python/3.11")
    assert (flavor.openstack.flavor, flavor.openstack.image, flavor.openstack.network, flavor.openstack.key_name) == (
        "g1",
        "ubuntu",
        "net",
        "ops",
    )


@pytest.mark.parametrize(
    "spec, read, problem",
    [
        ({}, {"backend": ""}, "spec.backend is missing"),
        (
            {"backend": "kubernetes", "maxLifetime": "8 hours"},
            {"max_lifetime": datetime.timedelta(seconds=1)},
            "spec.maxLifetime '8 hours' is not a duration: use a duration such as 8h",
        ),
        (
            {"backend": "kubernetes", "maxLifetime": "9999999999d"},
            {"max_lifetime": MAX_DURATION},
            "spec.maxLifetime '9999999999d' is longer than 366 days",
        ),
        ({"backend": "kubernetes", "maxLifetime": "0s"}, {"max_lifetime": datetime.timedelta(seconds=1)}, "is zero"),
        (
            {"backend": "kubernetes", "resources": {"gpu": "two"}},
            {"resources": Resources(gpu=0)},
            "spec.resources.gpu 'two' is not a whole number",
        ),
        (
            {"backend": "kubernetes", "resources": {"memory": "lots"}},
            {"resources": Resources(memory="16Gi")},
            "spec.resources.memory 'lots' is not a positive Kubernetes quantity",
        ),
        ({"backend": "kubernetes", "resources": {"cpu": 0}}, {"resources": Resources(cpu="1")}, "spec.resources.cpu 0"),
        ({"backend": "slurm", "slurm": {"timeLimitMinutes": -5}}, {}, "spec.slurm.timeLimitMinutes -5"),
    ],
)
def test_flavor_never_raises_and_names_what_it_could_not_read(spec, read, problem):
    """Before: KeyError, ValueError, and OverflowError ('Python int too large to convert to C int')."""
    flavor = Flavor.from_body("broken", spec)
    assert {key: getattr(flavor, key) for key in read} == read
    assert any(problem in text for text in flavor.problems), flavor.problems


@pytest.mark.parametrize(
    "cpu, text, cpus",
    [
        (1e-05, "0.00001", 1e-05),  # str() would give '1e-05', which parse_quantity refused
        (1000.0, "1000", 1000.0),  # a JSON 1e3
        (0.5, "0.5", 0.5),
        (2, "2", 2.0),
        ("1e3", "1e3", 1000.0),
    ],
)
def test_flavor_cpu_of_any_number_the_schema_allows_is_readable(cpu, text, cpus):
    flavor = Flavor.from_body("odd", {"backend": "kubernetes", "resources": {"cpu": cpu, "memory": "1.5Gi"}})
    assert flavor.resources.cpu == text and flavor.resources.cpus == pytest.approx(cpus)
    assert flavor.resources.memory_mib == 1536 and flavor.problems == ()


def make_body(**spec) -> dict:
    return {
        "metadata": {"namespace": "team-a", "name": "lab", "uid": "uid-1", "generation": 3},
        "spec": {"owner": "alice", "flavor": "small", **spec},
    }


@pytest.mark.parametrize(
    "spec, expected",
    [
        ({}, dict(image="", datasets=(), lifetime=None, suspend=False)),
        ({"image": "custom:1"}, dict(image="custom:1")),
        (
            {"datasets": [{"name": "ds-1"}, {"name": "ds-2", "mountPath": "/data/raw"}]},
            dict(datasets=(DatasetRef("ds-1", ""), DatasetRef("ds-2", "/data/raw"))),
        ),
        ({"datasets": None}, dict(datasets=())),
        ({"lifetime": "2h30m"}, dict(lifetime=150 * MINUTE)),
        ({"lifetime": ""}, dict(lifetime=None)),
        ({"suspend": True}, dict(suspend=True)),
        ({"lifetime": "366d"}, dict(lifetime=MAX_DURATION, problems=())),
        ({"lifetime": "1s"}, dict(lifetime=datetime.timedelta(seconds=1), problems=())),
    ],
)
def test_environment_from_body(spec, expected):
    environment = Environment.from_body(make_body(**spec))
    assert (environment.namespace, environment.name, environment.uid) == ("team-a", "lab", "uid-1")
    assert (environment.owner, environment.flavor, environment.generation) == ("alice", "small", 3)
    assert {key: getattr(environment, key) for key in expected} == expected


def test_environment_generation_defaults_to_zero():
    body = make_body()
    del body["metadata"]["generation"]
    assert Environment.from_body(body).generation == 0


@pytest.mark.parametrize("name", ["lab", "my-lab.2", "x"])
def test_child_name_and_identity_labels(name):
    environment = Environment(namespace="team-a", name=name, uid=f"uid-of-{name}", owner="alice", flavor="small")
    assert environment.child_name == f"aenv-{name}"
    assert environment.identity_labels == {
        LABEL_MANAGED_BY: MANAGER,
        LABEL_ENVIRONMENT: name,
        LABEL_ENVIRONMENT_UID: f"uid-of-{name}",
    }
    assert LABEL_MANAGED_BY == "app.kubernetes.io/managed-by" and MANAGER == "analysis-operator"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("9999999999d", MAX_DURATION),  # before: OverflowError, Python int too large to convert to C int
        ("1" * 400 + "s", MAX_DURATION),
        ("367d", MAX_DURATION),
        ("366d", MAX_DURATION),
        ("8784h", MAX_DURATION),
    ],
)
def test_parse_duration_never_overflows_it_stops_at_the_ceiling(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text, words",
    [
        ("8h", None),
        ("1s", None),
        ("366d", None),
        ("0s", "spec.lifetime '0s' is zero: a duration is at least 1s"),
        ("0d0h", "is zero"),
        ("9999999999d", "spec.lifetime '9999999999d' is longer than 366 days, the most the operator accepts"),
        ("366d1s", "longer than 366 days"),
        ("8 hours", "spec.lifetime '8 hours' is not a duration: use a duration such as 8h, 90m or 1d12h"),
    ],
)
def test_duration_problem_says_in_words_what_is_wrong(text, words):
    assert duration_problem(text, "spec.lifetime") == words or words in duration_problem(text, "spec.lifetime")


@pytest.mark.parametrize(
    "text, lifetime, problem",
    [
        ("0s", datetime.timedelta(seconds=1), "is zero"),  # before: 0s read as "no lifetime", ran with the flavor's 8h
        ("0h0m", datetime.timedelta(seconds=1), "is zero"),
        ("9999999999d", MAX_DURATION, "longer than 366 days"),  # before: OverflowError at every reconcile
        ("8 hours", datetime.timedelta(seconds=1), "not a duration"),
    ],
)
def test_a_zero_or_huge_lifetime_is_never_absent_and_never_raises(text, lifetime, problem):
    environment = Environment.from_body(make_body(lifetime=text))
    assert environment.lifetime == lifetime
    assert len(environment.problems) == 1 and problem in environment.problems[0]


def test_environment_from_a_body_missing_everything_does_not_raise():
    environment = Environment.from_body({})
    assert (environment.name, environment.owner, environment.lifetime, environment.datasets) == ("", "", None, ())


@pytest.mark.parametrize(
    "text, words",
    [
        ("2026-02-30", "'2026-02-30' is not a real date"),  # before: "day is out of range for month"
        ("2026-13-01", "is not a real date"),
        ("2026-04-31T00:00:00Z", "is not a real time"),
        ("2026-01-01T24:00:00Z", "is not a real time"),
        ("tomorrow", "is not a date such as 2027-03-01 nor a UTC time such as 2027-03-01T12:00:00Z"),
        ("2026-1-1", "is not a date such as"),
    ],
)
def test_parse_embargo_says_in_words_what_is_wrong(text, words):
    with pytest.raises(ValueError, match=words):
        parse_embargo(text)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2024-02-29", datetime.datetime(2024, 2, 29, tzinfo=UTC)),
        ("2027-03-01T12:00:00Z", datetime.datetime(2027, 3, 1, 12, tzinfo=UTC)),
    ],
)
def test_parse_embargo_reads_dates_and_utc_times(text, expected):
    assert parse_embargo(text) == expected


def embargoed(until=None, **access) -> dict:
    return {
        "pid": "10.5072/x",
        "storage": {"path": "/data/x"},
        "access": {
            "level": "embargoed",
            "members": ["alice"],
            **({"embargoedUntil": until} if until else {}),
            **access,
        },
    }


@pytest.mark.parametrize(
    "spec, problem",
    [
        (embargoed("2026-02-30"), "spec.access.embargoedUntil '2026-02-30' is not a real date"),
        (embargoed(None), "spec.access.embargoedUntil is missing"),
        (embargoed("2026-02-28", level="secret"), ""),  # an unknown level is closed, with its date
    ],
)
def test_an_unreadable_embargo_is_closed_never_public_and_never_raises(spec, problem):
    dataset = Dataset.from_body("d", spec)
    assert dataset.problem.startswith(problem) and bool(dataset.problem) == bool(problem)
    assert dataset.embargoed_until is not None and dataset.members == {"alice"}
    if problem:
        assert dataset.embargoed_until == EMBARGO_UNREADABLE


def test_a_public_dataset_has_no_embargo_whatever_its_date_says():
    dataset = Dataset.from_body(
        "d", {"pid": "10.5072/x", "access": {"level": "public", "embargoedUntil": "2026-02-30"}}
    )
    assert dataset.embargoed_until is None and dataset.problem == ""


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2027-03-01T12:00:00Z", datetime.datetime(2027, 3, 1, 12, tzinfo=UTC)),
        ("2027-03-01T12:00:00.250Z", datetime.datetime(2027, 3, 1, 12, 0, 0, 250000, tzinfo=UTC)),
        ("2027-03-01T14:00:00+02:00", datetime.datetime(2027, 3, 1, 12, tzinfo=UTC)),
    ],
)
def test_parse_timestamp_reads_rfc3339(text, expected):
    assert parse_timestamp(text) == expected


@pytest.mark.parametrize(
    "text, words",
    [
        ("2027-02-30T00:00:00Z", "is not a time such as"),
        ("2027-03-01T12:00:00", "has no time zone"),
        ("", "is not a time"),
    ],
)
def test_parse_timestamp_says_in_words_what_is_wrong(text, words):
    with pytest.raises(ValueError, match=words):
        parse_timestamp(text)


def test_parse_time_reads_the_operators_own_format_only():
    from analysis_operator.model.domain import format_time, parse_time

    moment = datetime.datetime(2026, 11, 30, 21, 5, 7, tzinfo=datetime.UTC)
    assert parse_time(format_time(moment)) == moment and parse_time(format_time(moment)).tzinfo is datetime.UTC
    assert parse_time(None) is None and parse_time("") is None
    for bad in (
        "2026-11-30 21:05:07Z",
        "2026-11-30T21:05:07",
        "2026-11-30T21:05:07+00:00",
        "tomorrow",
        "2026-13-30T21:05:07Z",
    ):
        with pytest.raises(ValueError):
            parse_time(bad)
