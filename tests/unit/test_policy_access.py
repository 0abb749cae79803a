"""Data permissions and flavor restrictions: the pure decisions admission and reconcile share."""

from __future__ import annotations

import datetime
import posixpath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from analysis_operator.model.domain import (
    BackendKind,
    Dataset,
    DatasetRef,
    DatasetStorage,
    Environment,
    Flavor,
    FlavorAccess,
    parse_embargo,
)
from analysis_operator.policy.access import (
    DATA_ROOT,
    StaticCatalogue,
    collisions,
    may_read,
    may_use_flavor,
    mount_path_problem,
    pid_key,
    pid_problem,
    plan_access,
)

NOW = datetime.datetime(2026, 6, 1, 12, tzinfo=datetime.UTC)
LATER = NOW + datetime.timedelta(days=365)
EARLIER = NOW - datetime.timedelta(days=1)
NFS = DatasetStorage(nfs_server="nfs.facility.eu", nfs_path="/exports/raw")
EVERYWHERE = DatasetStorage(
    claim_name="facility-data",
    sub_path="raw/x",
    nfs_server="nfs.facility.eu",
    nfs_path="/exports/raw/x",
    path="/gpfs/raw/x",
)


def dataset(name="raw-2023", pid="10.5072/p11-2023", until=None, members=(), groups=(), storage=EVERYWHERE):
    return Dataset(
        name=name, pid=pid, storage=storage, embargoed_until=until, members=frozenset(members), groups=frozenset(groups)
    )


def environment(*references: DatasetRef, owner="alice") -> Environment:
    return Environment(namespace="team", name="lab", uid="u-1", owner=owner, flavor="basic", datasets=tuple(references))


def flavor(backend=BackendKind.KUBERNETES, users=(), groups=()) -> Flavor:
    return Flavor(
        name="basic",
        backend=backend,
        image="jupyter",
        access=FlavorAccess(users=frozenset(users), groups=frozenset(groups)),
    )


CATALOGUE = StaticCatalogue(
    datasets=(
        dataset("open", "10.5072/open", None),
        dataset("raw-2023", "10.5072/P11-2023", LATER, members=("alice",), groups=("p11-team",)),
        dataset("old", "esrf:ES-1", EARLIER, members=("alice",)),
        dataset("vm-less", "esrf:ES-2", None, storage=DatasetStorage(claim_name="c")),
        dataset("twin-a", "10.5072/twin"),
        dataset("twin-b", "10.5072/twin"),
    ),
    groups={"p11-team": frozenset({"bob"}), "staff": frozenset({"carol"})},
)


@pytest.mark.parametrize(
    "case, until, members, groups, user, user_groups, allowed, grounds",
    [
        ("public", None, (), (), "anyone", (), True, "public"),
        ("embargoed, member", LATER, ("alice",), (), "alice", (), True, "team member"),
        ("embargoed, group member", LATER, (), ("p11", "xfel"), "bob", ("xfel",), True, "member of group xfel"),
        ("embargoed, outsider", LATER, ("alice",), ("p11",), "eve", ("staff",), False, "DatasetEmbargoed"),
        ("embargo ended", EARLIER, ("alice",), (), "eve", (), True, "embargo ended 2026-05-31T12:00:00Z"),
        ("embargo ends exactly now", NOW, (), (), "eve", (), True, "embargo ended 2026-06-01T12:00:00Z"),
        (
            "one second before the end",
            NOW + datetime.timedelta(seconds=1),
            (),
            (),
            "eve",
            (),
            False,
            "DatasetEmbargoed",
        ),
    ],
)
def test_may_read(case, until, members, groups, user, user_groups, allowed, grounds):
    verdict = may_read(dataset(until=until, members=members, groups=groups), user, frozenset(user_groups), NOW)
    assert (isinstance(verdict, str), verdict if isinstance(verdict, str) else verdict.reason) == (allowed, grounds), (
        case
    )


def test_embargo_refusal_names_dataset_pid_end_and_what_to_do():
    verdict = may_read(dataset(until=LATER, groups=("p11",)), "eve", frozenset(), NOW)
    assert "'raw-2023' (10.5072/p11-2023) is embargoed until 2027-06-01T12:00:00Z" in verdict.message
    assert "'eve' is not among its members nor in its groups (p11)" in verdict.message
    assert "principal investigator" in verdict.message


@pytest.mark.parametrize(
    "users, groups, user, user_groups, allowed",
    [
        ((), (), "anyone", (), True),
        (("alice",), (), "alice", (), True),
        ((), ("staff", "gpu-proposals"), "bob", ("gpu-proposals",), True),
        ((), ("staff",), "bob", ("p11",), False),
        (("alice",), ("staff",), "bob", (), False),
    ],
)
def test_may_use_flavor(users, groups, user, user_groups, allowed):
    assert isinstance(may_use_flavor(flavor(users=users, groups=groups), user, frozenset(user_groups)), str) is allowed


def test_flavor_refusal_names_flavor_and_rule():
    verdict = may_use_flavor(flavor(users=("dave",), groups=("staff",)), "bob", frozenset())
    assert verdict.reason == "FlavorNotAllowed"
    assert "flavor 'basic' is restricted (spec.access) to group staff, user dave: user 'bob'" in verdict.message


@pytest.mark.parametrize(
    "pid, ok",
    [
        ("10.5072/p11-20231234", True),
        ("10.15151/ESRF-ES-513835960", True),
        ("20.500.12345/abc.def", True),
        ("esrf:ES-1234-raw", True),
        ("desy:p11/2023/raw", True),
        ("https://doi.org/10.5072/x", False),
        ("doi:10.5072/x", False),
        ("10/abc", False),
        ("10.5072/", False),
        ("just-a-name", False),
        ("10.5072/with space", False),
        ("", False),
    ],
)
def test_pid_validation(pid, ok):
    assert (pid_problem(pid) is None) is ok


def test_dois_compare_case_insensitively_facility_pids_do_not():
    assert pid_key("10.5072/ABC") == pid_key("10.5072/abc")
    assert pid_key("esrf:ABC") != pid_key("esrf:abc")


@pytest.mark.parametrize(
    "path, ok",
    [
        ("/data/raw", True),
        ("/data/p11/2023/raw-1.h5", True),
        ("/data", False),
        ("/data/", False),
        ("/data/../etc", False),
        ("/data/a/../../etc", False),
        ("/data/./a", False),
        ("/data//a", False),
        ("/data/a/", False),
        ("/datab/a", False),
        ("/etc/passwd", False),
        ("data/a", False),
        ("/data/a b", False),
        ("/data/" + "a" * 260, False),
    ],
)
def test_mount_path_problem(path, ok):
    assert (mount_path_problem(path) is None) is ok


@given(st.text(alphabet="/.ab-", max_size=20))
def test_an_accepted_mount_path_never_leaves_the_data_root(suffix):
    path = DATA_ROOT + suffix
    if mount_path_problem(path) is None:
        assert posixpath.normpath(path) == path
        assert posixpath.commonpath([DATA_ROOT, posixpath.normpath(path)]) == DATA_ROOT
        assert path != DATA_ROOT


@pytest.mark.parametrize(
    "paths, problems",
    [
        (["/data/a", "/data/b"], 0),
        (["/data/a", "/data/a"], 1),
        (["/data/a", "/data/a/b"], 1),
        (["/data/a/b", "/data/a"], 1),
        (["/data/ab", "/data/a"], 0),  # a prefix of the name is not nesting
        (["/data/a", "/data/b", "/data/a"], 1),
    ],
)
def test_collisions(paths, problems):
    assert len(collisions(paths)) == problems


def reach(backend: str):
    """Each backend's own view of where data lives (backends/*.py dataset_problem)."""
    from analysis_operator.backends.kubernetes import KubernetesBackend
    from analysis_operator.backends.openstack import OpenStackBackend
    from analysis_operator.backends.slurm import SlurmBackend
    from analysis_operator.settings import Settings, SlurmSettings

    backends = {
        BackendKind.KUBERNETES: lambda: KubernetesBackend(None, Settings(), {}),
        BackendKind.SLURM: lambda: SlurmBackend(SlurmSettings()),
        BackendKind.OPENSTACK: lambda: OpenStackBackend(Settings()),
    }
    return backends[backend]().dataset_problem


def plan(*references, owner="alice", backend=BackendKind.KUBERNETES, flavor_groups=()):
    return plan_access(
        environment(*references, owner=owner), flavor(backend, groups=flavor_groups), CATALOGUE, NOW, reach(backend)
    )


def test_multi_dataset_plan_mounts_exactly_the_listed_datasets():
    result = plan(
        DatasetRef("open"),
        DatasetRef(pid="10.5072/p11-2023", mount_path="/data/beamtime"),
        DatasetRef("old", "/data/archive/old"),
    )
    assert result.allowed
    assert [(mount.dataset.name, mount.path, mount.grounds) for mount in result.mounts] == [
        ("open", "/data/open", "public"),
        ("raw-2023", "/data/beamtime", "team member"),
        ("old", "/data/archive/old", "embargo ended 2026-05-31T12:00:00Z"),
    ]


@pytest.mark.parametrize(
    "references, owner, reason",
    [
        ((DatasetRef("raw-2023"),), "eve", "DatasetEmbargoed"),
        ((DatasetRef("nope"),), "alice", "DatasetNotFound"),
        ((DatasetRef(pid="10.5072/none"),), "alice", "DatasetNotFound"),
        ((DatasetRef(pid="10.5072/twin"),), "alice", "DatasetAmbiguous"),
        ((DatasetRef("open", "/data/../etc"),), "alice", "InvalidMountPath"),
        ((DatasetRef("open", "/data/x"), DatasetRef("old", "/data/x")), "alice", "MountPathCollision"),
        ((DatasetRef("open", "/data/x"), DatasetRef("old", "/data/x/y")), "alice", "MountPathCollision"),
        ((DatasetRef("open"), DatasetRef(pid="10.5072/open", mount_path="/data/again")), "alice", "DatasetListedTwice"),
    ],
)
def test_plan_refusals(references, owner, reason):
    result = plan(*references, owner=owner)
    assert not result.allowed and result.mounts == ()
    assert [refusal.reason for refusal in result.refusals] == [reason]


def test_group_membership_comes_from_the_catalogue():
    assert plan(DatasetRef("raw-2023"), owner="bob").mounts[0].grounds == "member of group p11-team"


def test_one_refusal_refuses_the_whole_environment_and_names_each_dataset():
    result = plan(DatasetRef("open"), DatasetRef("raw-2023"), DatasetRef("nope"), owner="eve")
    assert [refusal.subject for refusal in result.refusals] == ["raw-2023", "nope"]
    assert "'raw-2023'" in result.message() and "'nope' does not exist" in result.message()


@pytest.mark.parametrize(
    "backend, allowed", [(BackendKind.KUBERNETES, True), (BackendKind.OPENSTACK, False), (BackendKind.SLURM, False)]
)
def test_a_dataset_must_be_reachable_from_the_backend(backend, allowed):
    result = plan(DatasetRef("vm-less"), backend=backend)
    assert result.allowed is allowed
    if not allowed:
        assert result.refusals[0].reason == "DatasetNotAvailable"


def test_flavor_restriction_is_part_of_the_plan():
    assert plan(owner="carol", flavor_groups=("staff",)).allowed
    refused = plan(owner="alice", flavor_groups=("staff",))
    assert [refusal.reason for refusal in refused.refusals] == ["FlavorNotAllowed"]


@pytest.mark.parametrize(
    "text, expected",
    [
        (None, None),
        ("2027-03-01", datetime.datetime(2027, 3, 1, tzinfo=datetime.UTC)),
        ("2027-03-01T08:30:00Z", datetime.datetime(2027, 3, 1, 8, 30, tzinfo=datetime.UTC)),
    ],
)
def test_parse_embargo(text, expected):
    assert parse_embargo(text) == expected


def test_dataset_from_body():
    body = {
        "pid": "10.5072/x",
        "title": "Raw",
        "size": "2Ti",
        "storage": {
            "persistentVolumeClaim": {"claimName": "facility-data", "subPath": "p11/x"},
            "nfs": {"server": "nfs", "path": "/exports/x"},
            "path": "/gpfs/x",
        },
        "access": {"level": "embargoed", "embargoedUntil": "2027-01-01", "members": ["alice"], "groups": ["p11"]},
    }
    parsed = Dataset.from_body("x", body)
    assert parsed.storage == DatasetStorage("facility-data", "p11/x", "nfs", "/exports/x", "/gpfs/x")
    assert parsed.storage.nfs_share == "nfs:/exports/x"
    assert parsed.embargoed_until == datetime.datetime(2027, 1, 1, tzinfo=datetime.UTC)
    assert (parsed.members, parsed.groups) == (frozenset({"alice"}), frozenset({"p11"}))
    public = Dataset.from_body("y", {"pid": "10.5072/y", "access": {"level": "public", "embargoedUntil": "2027-01-01"}})
    assert public.embargoed_until is None
