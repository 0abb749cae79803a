"""Typed views of the custom resources and their small pure helpers."""
from __future__ import annotations

import datetime

import pytest

from analysis_operator.model.domain import (
    LABEL_ENVIRONMENT, LABEL_ENVIRONMENT_UID, LABEL_MANAGED_BY, MANAGER, BackendKind, DatasetRef,
    Environment, Flavor, Resources, format_time, parse_duration, parse_quantity, parse_time)

MINUTE = datetime.timedelta(minutes=1)
HOUR = datetime.timedelta(hours=1)
DAY = datetime.timedelta(days=1)
UTC = datetime.timezone.utc


@pytest.mark.parametrize("text, expected", [
    ("8h", 8 * HOUR),
    ("1d12h", 36 * HOUR),
    ("90m", 90 * MINUTE),
    ("30s", datetime.timedelta(seconds=30)),
    ("1d2h3m4s", DAY + 2 * HOUR + 3 * MINUTE + datetime.timedelta(seconds=4)),
    ("2d", 2 * DAY),
    ("0h", datetime.timedelta(0)),
])
def test_parse_duration_accepts_the_crd_pattern(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", [
    "", None, "8 hours", "h", "-1h", "8", "1h1d",  # units out of order
    "1.5h", "8H", " 8h",
    "8h\n",  # the CRD pattern (RE2: '$' is end of text) rejects a trailing newline
])
def test_parse_duration_rejects_anything_else(text):
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize("text, expected", [
    ("500m", 0.5),
    ("16Gi", 16 * 2**30),
    (2, 2.0),
    ("1.5", 1.5),
    ("512Mi", 512 * 2**20),
    ("2k", 2000.0),
    ("1G", 1e9),
    (0.25, 0.25),
])
def test_parse_quantity(text, expected):
    assert parse_quantity(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "bad", "16GB", "-1", "1e3", "Gi", "1 Gi", "16gi", "1\n"])
def test_parse_quantity_rejects_bad_input(text):
    with pytest.raises(ValueError, match="invalid quantity"):
        parse_quantity(text)


@pytest.mark.parametrize("text", ["1.2.3", "."])
def test_parse_quantity_rejects_malformed_numbers(text):
    with pytest.raises(ValueError):
        parse_quantity(text)


@pytest.mark.parametrize("moment", [
    datetime.datetime(2024, 3, 1, 12, 30, 5, tzinfo=UTC),
    datetime.datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC),
    datetime.datetime(2024, 3, 1, 14, 30, 5, tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
    datetime.datetime(2024, 3, 1, 0, 15, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=-5))),
])
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
    flavor = Flavor.from_body("gpu-large", {
        "backend": "slurm",
        "displayName": "GPU, large",
        "resources": {"cpu": 8, "memory": "64Gi", "gpu": "2"},
        "image": "jupyter/scipy:2024",
        "allowCustomImage": True,
        "maxLifetime": "1d12h",
        "idleTimeout": "30m",
        "slurm": {"partition": "gpu", "account": "p-1", "timeLimitMinutes": 120, "qos": "short",
                  "modules": ["cuda/12", "python/3.11"]},
        "openstack": {"flavor": "g1", "image": "ubuntu", "network": "net", "keyName": "ops"},
    })
    assert flavor.backend == BackendKind.SLURM
    assert flavor.display_name == "GPU, large"
    assert flavor.resources == Resources(cpu="8", memory="64Gi", gpu=2)  # numbers normalised
    assert flavor.resources.cpus == 8.0 and flavor.resources.memory_mib == 64 * 1024
    assert flavor.image == "jupyter/scipy:2024"
    assert flavor.allow_custom_image is True
    assert flavor.max_lifetime == 36 * HOUR
    assert flavor.idle_timeout == 30 * MINUTE
    assert (flavor.slurm.partition, flavor.slurm.account, flavor.slurm.time_limit_minutes, flavor.slurm.qos) == (
        "gpu", "p-1", 120, "short")
    assert flavor.slurm.modules == ("cuda/12", "python/3.11")
    assert (flavor.openstack.flavor, flavor.openstack.image, flavor.openstack.network,
            flavor.openstack.key_name) == ("g1", "ubuntu", "net", "ops")


@pytest.mark.parametrize("spec, error", [
    ({}, KeyError),
    ({"backend": "kubernetes", "maxLifetime": "8 hours"}, ValueError),
])
def test_flavor_rejects_bad_specs(spec, error):
    with pytest.raises(error):
        Flavor.from_body("broken", spec)


def make_body(**spec) -> dict:
    return {
        "metadata": {"namespace": "team-a", "name": "lab", "uid": "uid-1", "generation": 3},
        "spec": {"owner": "alice", "flavor": "small", **spec},
    }


@pytest.mark.parametrize("spec, expected", [
    ({}, dict(image="", datasets=(), lifetime=None, suspend=False)),
    ({"image": "custom:1"}, dict(image="custom:1")),
    ({"datasets": [{"name": "ds-1"}, {"name": "ds-2", "mountPath": "/data/raw"}]},
     dict(datasets=(DatasetRef("ds-1", ""), DatasetRef("ds-2", "/data/raw")))),
    ({"datasets": None}, dict(datasets=())),
    ({"lifetime": "2h30m"}, dict(lifetime=150 * MINUTE)),
    ({"lifetime": ""}, dict(lifetime=None)),
    ({"suspend": True}, dict(suspend=True)),
])
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
