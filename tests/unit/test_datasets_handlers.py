"""The glue's in-memory parts: the catalogue over kopf's indexes, and who a change affects."""

from __future__ import annotations

import datetime

from analysis_operator.engine.data_access import IndexCatalogue, affected, describe_mounts
from analysis_operator.engine.views import EnvironmentRecord
from analysis_operator.model.domain import (
    BackendKind,
    Dataset,
    DatasetRef,
    DatasetStorage,
    Environment,
    Flavor,
    FlavorAccess,
    Mount,
)
from analysis_operator.policy.access import pid_key, plan_access

NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)
RAW = Dataset(
    name="raw",
    pid="10.5072/RAW",
    embargoed_until=NOW + datetime.timedelta(days=1),
    groups=frozenset({"team"}),
    storage=DatasetStorage(nfs_server="nfs", nfs_path="/exports/raw"),
)
# kopf indexes are mappings of key -> a store of values; lists behave the same here.
DATASETS = {"raw": [RAW]}
PIDS = {pid_key(RAW.pid): ["raw"]}
FLAVORS = {
    "basic": [Flavor(name="basic", backend=BackendKind.KUBERNETES, image="jupyter")],
    "gpu": [
        Flavor(
            name="gpu",
            backend=BackendKind.KUBERNETES,
            image="jupyter",
            access=FlavorAccess(groups=frozenset({"staff"})),
        )
    ],
}


def catalogue(team=("alice",), staff=()) -> IndexCatalogue:
    return IndexCatalogue(DATASETS, PIDS, {"team": [frozenset(team)], "staff": [frozenset(staff)]})


def record(phase="Ready", flavor="basic", datasets=(DatasetRef("raw"),)) -> EnvironmentRecord:
    environment = Environment(namespace="n", name="e", uid="u", owner="alice", flavor=flavor, datasets=datasets)
    return EnvironmentRecord(environment, {"phase": phase} if phase else {})


def test_index_catalogue_finds_by_name_and_pid_and_groups():
    found = catalogue()
    assert found.dataset("raw") is RAW and found.dataset("other") is None
    assert found.with_pid("10.5072/raw") == (RAW,) and found.with_pid("10.5072/none") == ()
    assert found.groups_of("alice") == frozenset({"team"}) and found.groups_of("eve") == frozenset()


def test_the_plan_reads_group_membership_from_the_groups_index():
    assert plan_access(record().environment, FLAVORS["basic"][0], catalogue(team=("alice",)), NOW).allowed
    refused = plan_access(record().environment, FLAVORS["basic"][0], catalogue(team=("bob",)), NOW)
    assert [refusal.reason for refusal in refused.refusals] == ["DatasetEmbargoed"]


def test_affected_are_live_environments_that_lost_access():
    granted, removed = catalogue(team=("alice",)), catalogue(team=("bob",))
    assert not affected(record(), FLAVORS, granted, NOW)
    assert affected(record(), FLAVORS, removed, NOW)
    assert affected(record(phase="Suspended"), FLAVORS, removed, NOW)  # it would mount again on resume
    assert not affected(record(datasets=()), FLAVORS, removed, NOW)
    assert not affected(record(phase="Stopped"), FLAVORS, removed, NOW)
    assert not affected(record(phase=""), FLAVORS, removed, NOW)  # its own handler decides first
    assert affected(record(flavor="gpu", datasets=()), FLAVORS, catalogue(staff=()), NOW)
    assert not affected(record(flavor="gpu", datasets=()), FLAVORS, catalogue(staff=("alice",)), NOW)


def test_describe_mounts_names_dataset_pid_path_and_grounds():
    assert describe_mounts((Mount(RAW, "/data/raw", "team member"),)) == "raw (10.5072/RAW) at /data/raw, team member"
