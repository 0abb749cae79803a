"""Whom an environment runs as: the owner's FacilityUser and the gids of the groups that grant its data.

The decision (policy/identity.py) is table-driven here, then followed into the
pod's securityContext and the VM's cloud-init (backends), through converge into
the Launch (engine/identity.py over in-memory indexes), and attacked: root and
system uids, unreadable objects, groups that grant nothing mounted, group names
that try to be shell, a directory that lags, an owner removed while running.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import subprocess

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from analysis_operator.backends.base import Launch
from analysis_operator.backends.kubernetes import build_pod
from analysis_operator.backends.openstack import build_user_data
from analysis_operator.engine.converge import Context, converge
from analysis_operator.engine.identity import DirectoryIdentities
from analysis_operator.engine.views import EnvironmentRecord
from analysis_operator.handlers.identity import facility_users, group_gids
from analysis_operator.model.domain import (
    BackendKind,
    Dataset,
    DatasetStorage,
    Environment,
    Flavor,
    Mount,
    Phase,
    Resources,
)
from analysis_operator.model.identity import FacilityUser, PosixIdentity, parse_posix_id
from analysis_operator.policy.identity import StaticDirectory, granting_groups, posix_identity
from analysis_operator.policy.refusal import Refusal
from analysis_operator.settings import HomeSettings, IdentitySettings, Settings
from tests.unit.test_backend_interface import ENVIRONMENT, FLAVOR, NOW, Catalogue, Cluster, MemoryBackend

REQUIRED = IdentitySettings(require_posix_identity=True, min_uid=1000)
OPTIONAL = IdentitySettings(require_posix_identity=False, min_uid=1000)


def user(name: str, uid: int, gid: int, **spec) -> FacilityUser:
    return FacilityUser.from_body(name, {"uid": uid, "gid": gid, **spec})


def mount(name: str, *groups: str) -> Mount:
    dataset = Dataset(
        name=name,
        pid=f"10.5072/{name}",
        storage=DatasetStorage(nfs_server="nfs", nfs_path=f"/{name}"),
        embargoed_until=datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC),
        groups=frozenset(groups),
    )
    return Mount(dataset, f"/data/{name}", "team member")


# alice: in p11 (5001) and p12 (5002) and staff (no gid); bob: in p11 only.
DIRECTORY = StaticDirectory(
    users={
        "alice": user("alice", 20001, 20001),
        "bob": user("bob", 20002, 100),
        "root": FacilityUser.from_body("root", {"uid": 0, "gid": 0}),
        "daemon": user("daemon", 1, 1),
    },
    members={
        "p11": frozenset({"alice", "bob"}),
        "p12": frozenset({"alice"}),
        "staff": frozenset({"alice"}),
        "p13": frozenset({"bob"}),
        "p11-copy": frozenset({"alice"}),
    },
    gids={"p11": 5001, "p12": 5002, "p13": 5003, "p11-copy": 5001},
)


# ---------------------------------------------------------------- reading FacilityUsers


@pytest.mark.parametrize(
    "spec, uid, gid, username, problem",
    [
        ({"uid": 20001, "gid": 20001}, 20001, 20001, "alice", ""),
        ({"uid": 20001, "gid": 100, "username": "al"}, 20001, 100, "al", ""),
        ({"uid": 0, "gid": 20001}, 0, 20001, "alice", "0 would be root"),
        ({"uid": 20001, "gid": 0}, 20001, 0, "alice", "root's group"),
        ({"uid": True, "gid": 1}, 0, 1, "alice", "spec.uid True"),
        ({"uid": "20001", "gid": 1}, 0, 1, "alice", "spec.uid '20001'"),
        ({"uid": 2**31, "gid": 1}, 0, 1, "alice", "from 1 to 2147483647"),
        ({"uid": -5, "gid": 1}, 0, 1, "alice", "spec.uid -5"),
        ({"gid": 1}, 0, 1, "alice", "spec.uid None"),
        ({"uid": 20001, "gid": 1, "username": "Alice; rm -rf /"}, 20001, 1, "", "not valid"),
        ({"uid": 20001, "gid": 1, "username": ["x"]}, 20001, 1, "", "not valid"),
    ],
)
def test_a_facility_user_is_read_without_raising(spec, uid, gid, username, problem):
    read = FacilityUser.from_body("alice", spec)
    assert (read.uid, read.gid, read.username) == (uid, gid, username)
    assert problem in "; ".join(read.problems) if problem else not read.problems


def test_a_name_that_is_no_unix_account_needs_spec_username():
    assert FacilityUser.from_body("12345", {"uid": 20001, "gid": 1}).problems  # starts with a digit
    assert FacilityUser.from_body("a" * 33, {"uid": 20001, "gid": 1}).problems  # too long for useradd
    assert not FacilityUser.from_body("12345", {"uid": 20001, "gid": 1, "username": "u12345"}).problems
    assert not FacilityUser.from_body("x", "not a mapping").uid  # never raises


@given(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(), st.lists(st.integers())))
def test_parse_posix_id_never_raises_and_never_returns_root(value):
    parsed = parse_posix_id(value)
    assert parsed is None or (isinstance(parsed, int) and 1 <= parsed <= 2**31 - 1)


# ---------------------------------------------------------------- the decision


@pytest.mark.parametrize(
    "owner, mounts, expected",
    [
        ("alice", (), PosixIdentity("alice", 20001, 20001)),  # no data: no extra gid
        ("alice", (mount("raw", "p11"),), PosixIdentity("alice", 20001, 20001, (5001,), ("p11",))),
        (
            "alice",
            (mount("raw", "p11"), mount("other", "p12")),
            PosixIdentity("alice", 20001, 20001, (5001, 5002), ("p11", "p12")),
        ),
        ("alice", (mount("raw", "p11", "p12"),), PosixIdentity("alice", 20001, 20001, (5001, 5002), ("p11", "p12"))),
        ("alice", (mount("staffdata", "staff"),), PosixIdentity("alice", 20001, 20001)),  # staff has no gid
        ("alice", (mount("bobs", "p13"),), PosixIdentity("alice", 20001, 20001)),  # p13: not her group
        (
            "alice",
            (mount("raw", "p11", "p11-copy"),),  # one gid, listed once
            PosixIdentity("alice", 20001, 20001, (5001,), ("p11",)),
        ),
        ("bob", (mount("raw", "p11", "p12"),), PosixIdentity("bob", 20002, 100, (5001,), ("p11",))),
        ("bob", (mount("public"),), PosixIdentity("bob", 20002, 100)),  # no group grants it
    ],
)
def test_the_owner_runs_as_their_uid_with_exactly_the_gids_that_grant_their_mounted_data(owner, mounts, expected):
    assert posix_identity(owner, DIRECTORY, mounts, REQUIRED) == expected


def test_groups_that_grant_data_not_mounted_here_are_left_out():
    """alice is in p11, p12 and p13-less staff: an environment mounting p11's data gets 5001 only."""
    identity = posix_identity("alice", DIRECTORY, (mount("raw", "p11"),), REQUIRED)
    assert isinstance(identity, PosixIdentity) and identity.groups == (5001,)
    assert granting_groups("carol", DIRECTORY, (mount("raw", "p11"),)) == ()  # not a member: nothing


def test_an_owner_without_a_facility_user_is_refused_when_required_and_runs_as_the_default_otherwise():
    refusal = posix_identity("carol", DIRECTORY, (), REQUIRED)
    assert isinstance(refusal, Refusal) and refusal.reason == "NoPosixIdentity"
    assert refusal.phase is Phase.REJECTED and refusal.subject == "carol"
    assert refusal.message.startswith(
        "user 'carol' has no FacilityUser: the facility's directory sync has not registered their POSIX identity"
    )
    assert "ask the facility's user office or IT to register 'carol'" in refusal.message
    assert posix_identity("carol", DIRECTORY, (mount("raw", "p11"),), OPTIONAL) is None


@pytest.mark.parametrize(
    "owner, settings, words",
    [
        ("root", REQUIRED, "0 would be root"),
        ("root", OPTIONAL, "0 would be root"),  # not required does not mean "anything goes"
        ("daemon", REQUIRED, "uid 1 is below 1000"),
        ("daemon", OPTIONAL, "system accounts"),
    ],
)
def test_root_and_system_accounts_are_refused_whatever_the_setting(owner, settings, words):
    refusal = posix_identity(owner, DIRECTORY, (), settings)
    assert isinstance(refusal, Refusal) and refusal.reason == "InvalidPosixIdentity" and words in refusal.message


def test_min_uid_one_allows_low_uids_but_never_root():
    assert isinstance(posix_identity("daemon", DIRECTORY, (), IdentitySettings(min_uid=1)), PosixIdentity)
    assert isinstance(posix_identity("root", DIRECTORY, (), IdentitySettings(min_uid=0)), Refusal)


# ---------------------------------------------------------------- the pod

POD_ENVIRONMENT = Environment(namespace="ns", name="lab", uid="u-1", owner="alice", flavor="small")
POD_FLAVOR = Flavor(
    name="small",
    backend=BackendKind.KUBERNETES,
    image="jupyter/scipy-notebook",
    resources=Resources(cpu="1", memory="1Gi"),
)
ALICE = PosixIdentity("alice", 20001, 20001, (5001, 5002), ("p11", "p12"))


def pod_security(identity: PosixIdentity | None, settings: Settings = Settings()) -> tuple[dict, dict]:
    pod = build_pod(POD_ENVIRONMENT, POD_FLAVOR, settings, identity=identity)
    return pod["spec"]["securityContext"], pod["spec"]["containers"][0]["securityContext"]


def test_the_pod_runs_as_the_owner_with_exactly_their_groups_and_no_privileges():
    pod, container = pod_security(ALICE)
    assert pod == {
        "runAsNonRoot": True,
        "runAsUser": 20001,
        "runAsGroup": 20001,
        "supplementalGroups": [5001, 5002],
        "supplementalGroupsPolicy": "Strict",
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": False,
        "capabilities": {"drop": ["ALL"]},
    }


def test_fs_group_only_where_a_home_claim_must_be_made_writable_and_then_the_primary_gid():
    with_claims = dataclasses.replace(Settings(), home=HomeSettings(claims=True))
    pod, _ = pod_security(ALICE, with_claims)
    assert (pod["fsGroup"], pod["fsGroupChangePolicy"]) == (20001, "OnRootMismatch")
    assert pod["supplementalGroups"] == [5001, 5002]  # fsGroup adds no new gid


def test_strict_supplemental_groups_can_be_turned_off_for_older_nodes():
    relaxed = dataclasses.replace(Settings(), identity=IdentitySettings(strict_supplemental_groups=False))
    pod, _ = pod_security(ALICE, relaxed)
    assert "supplementalGroupsPolicy" not in pod and pod["supplementalGroups"] == [5001, 5002]


def test_without_an_identity_the_pod_is_what_it_always_was():
    pod, _ = pod_security(None)
    assert pod == {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 100,
        "fsGroup": 100,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


# ---------------------------------------------------------------- the VM


def desktop_of(identity: PosixIdentity | None) -> dict:
    return yaml.safe_load(build_user_data(POD_ENVIRONMENT, "tok", Settings(), (), identity))


def test_the_vm_desktop_user_is_the_owner_with_their_uid_gid_and_groups():
    cloud_init = desktop_of(ALICE)
    assert cloud_init["users"] == ["default"]  # no shared "analysis" user
    commands = [command[3:] for command in cloud_init["runcmd"] if command[:2] == ["sh", "-c"] and len(command) > 3]
    assert commands == [
        ["aenv-group", "20001", "alice"],
        ["aenv-group", "5001", "p11"],
        ["aenv-group", "5002", "p12"],
        ["aenv-user", "alice", "20001", "20001", "5001,5002"],
    ]
    credentials = next(item for item in cloud_init["write_files"] if item["path"].endswith("desktop-credentials"))
    assert credentials["content"] == "alice:tok"
    runcmd = [command[2] if command[:2] == ["sh", "-c"] else "" for command in cloud_init["runcmd"]]
    assert runcmd.index(next(c for c in runcmd if "useradd" in c)) < runcmd.index(
        next(c for c in runcmd if "chpasswd" in c)
    )


@pytest.mark.parametrize(
    "image_uid, useradd_works, desktop",
    [
        ("", True, True),  # no such account: made with the owner's uid
        ("20001", True, True),  # the account is there with the owner's uid
        ("1000", True, False),  # the image's own account of that name (its default user): never adopted
        ("", False, False),  # the uid is taken in the image: useradd fails
    ],
)
def test_the_vm_uses_an_account_only_with_the_owners_uid(tmp_path, image_uid, useradd_works, desktop):
    """The rendered command, run by a real shell with the image's `id` and `useradd` stood in for:
    an account that exists with another uid (a distribution's default user, a system account of
    the same name) would run the desktop, and read the data, as someone else."""
    command = next(c for c in desktop_of(ALICE)["runcmd"] if c[3:4] == ["aenv-user"])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {
        "id": f'[ -n "{image_uid}" ] && echo {image_uid}',
        "useradd": "exit 0" if useradd_works else "exit 4",
        "tee": 'cat > "$TMPDIR_MARK"',
    }
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    mark = tmp_path / "no-desktop"
    script = command[2].replace(">/dev/console", "")
    ran = subprocess.run(
        [*command[:2], script, *command[3:]],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "TMPDIR_MARK": str(mark)},
        capture_output=True,
        text=True,
    )
    assert (ran.returncode == 0) == desktop, ran
    assert mark.exists() != desktop
    if image_uid == "1000":
        assert "account alice exists in this image with uid 1000, not 20001" in mark.read_text()
    # The desktop password goes to the account only where it was not refused (the image's own account
    # may have sudo); the credentials file goes either way.
    (bin_dir / "chpasswd").write_text(f"#!/bin/sh\ncat > {tmp_path / 'set'}\n")
    (bin_dir / "chpasswd").chmod(0o755)
    credentials = tmp_path / "desktop-credentials"
    credentials.write_text("alice:tok")
    password = next(c for c in desktop_of(ALICE)["runcmd"] if c[:2] == ["sh", "-c"] and "chpasswd" in c[2])
    script = (
        password[2]
        .replace("/etc/analysis-environment/no-desktop", str(mark))
        .replace("/etc/analysis-environment/desktop-credentials", str(credentials))
    )
    subprocess.run(["sh", "-c", script], env={"PATH": f"{bin_dir}:/usr/bin:/bin"}, check=True)
    assert (tmp_path / "set").exists() == desktop and not credentials.exists()


def test_the_desktop_does_not_start_where_the_account_was_refused():
    unit = next(f for f in desktop_of(ALICE)["write_files"] if f["path"].endswith("aenv-desktop@.service"))
    assert "ConditionPathExists=!/etc/analysis-environment/no-desktop" in unit["content"]


def test_without_an_identity_the_vm_keeps_its_shared_desktop_user():
    cloud_init = desktop_of(None)
    assert cloud_init["users"][1]["name"] == "analysis"
    assert not any("useradd" in str(command) for command in cloud_init["runcmd"])


@given(st.text(min_size=1, max_size=60))
def test_a_group_name_is_an_argument_never_shell_text(name):
    """FacilityGroup names come from the catalogue: whatever they hold, they stay one argv element."""
    cloud_init = desktop_of(PosixIdentity("alice", 20001, 20001, (5001,), (name,)))
    group_commands = [command for command in cloud_init["runcmd"] if command[3:4] == ["aenv-group"]]
    assert group_commands[1][4:] == ["5001", name]
    assert group_commands[0][2] == group_commands[1][2]  # the script is constant


# ---------------------------------------------------------------- the indexes


@pytest.mark.parametrize("spec", [{}, {"uid": "x"}, {"uid": None, "gid": []}, {"username": 3}])
def test_the_facility_user_index_never_raises_and_keeps_the_problems_for_the_refusal(spec):
    indexed = facility_users.read(name="eve", spec=spec, body={"metadata": {"name": "eve", "uid": "u"}})
    assert indexed is not None and indexed["eve"].problems


@pytest.mark.parametrize(
    "spec, expected",
    [
        ({"gid": 5001}, {"p11": 5001}),
        ({}, None),
        ({"gid": 0}, None),
        ({"gid": "5001"}, None),
        ({"gid": True}, None),
    ],
)
def test_the_group_gid_index_keeps_only_real_gids(spec, expected):
    assert group_gids.read(name="p11", spec=spec, body={"metadata": {"name": "p11", "uid": "g"}}) == expected


# ---------------------------------------------------------------- the engine


class Kube:
    """What DirectoryIdentities asks the API server: one FacilityUser, every FacilityGroup."""

    def __init__(self, users: dict | None = None, groups: list | None = None) -> None:
        self.users, self.groups, self.calls = users or {}, groups or [], 0

    async def get_cluster_object(self, plural: str, name: str):
        self.calls += 1
        return self.users.get(name)

    async def list_cluster_objects(self, plural: str):
        return self.groups


def identities(
    kube: Kube, users: dict, environments: dict | None = None, settings: IdentitySettings = REQUIRED
) -> DirectoryIdentities:
    indexes = {
        "facility_users": {name: [value] for name, value in users.items()},
        "groups": {name: [members] for name, members in DIRECTORY.members.items()},
        "group_gids": {name: [gid] for name, gid in DIRECTORY.gids.items()},
    }
    return DirectoryIdentities(kube, settings, indexes, environments or {})  # type: ignore[arg-type]


def test_the_engine_decides_from_the_indexes_without_calling_the_api():
    kube = Kube()
    source = identities(kube, {"alice": DIRECTORY.users["alice"]})
    decided = asyncio.run(source.posix(POD_ENVIRONMENT, (mount("raw", "p11"),)))
    assert decided == PosixIdentity("alice", 20001, 20001, (5001,), ("p11",)) and kube.calls == 0


def test_a_refusal_is_confirmed_against_the_api_server_so_a_lagging_index_refuses_nobody():
    kube = Kube(
        users={"alice": {"spec": {"uid": 20001, "gid": 20001}}},
        groups=[{"metadata": {"name": "p11"}, "spec": {"members": ["alice"], "gid": 5001}}],
    )
    source = identities(kube, {})  # the index has no alice yet
    decided = asyncio.run(source.posix(POD_ENVIRONMENT, (mount("raw", "p11"),)))
    assert decided == PosixIdentity("alice", 20001, 20001, (5001,), ("p11",)) and kube.calls == 1
    assert asyncio.run(source.admit("alice")) is None


def test_admission_refuses_an_owner_the_api_server_does_not_know_either():
    refusal = asyncio.run(identities(Kube(), {}).admit("carol"))
    assert isinstance(refusal, Refusal) and refusal.reason == "NoPosixIdentity"
    assert asyncio.run(identities(Kube(), {}, settings=OPTIONAL).admit("carol")) is None


def test_an_owner_removed_from_the_directory_while_running_has_the_environment_stopped_not_rejected():
    environments = {
        ("ns", "lab"): [EnvironmentRecord(POD_ENVIRONMENT, {"phase": "Ready", "startedAt": "2026-11-30T11:00:00Z"})]
    }
    refusal = asyncio.run(identities(Kube(), {}, environments).posix(POD_ENVIRONMENT, ()))
    assert isinstance(refusal, Refusal) and (refusal.reason, refusal.phase) == ("NoPosixIdentity", Phase.STOPPED)
    assert refusal.message.startswith("the environment was stopped: user 'alice' has no FacilityUser")
    namesake = dataclasses.replace(POD_ENVIRONMENT, uid="u-2")  # a new one of the same name
    assert asyncio.run(identities(Kube(), {}, environments).posix(namesake, ())).phase is Phase.REJECTED


# ---------------------------------------------------------------- through converge into the Launch


class RecordingBackend(MemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.identities: list[PosixIdentity | None] = []

    async def ensure(self, launch: Launch):
        self.identities.append(launch.identity)
        return await super().ensure(launch)

    async def resume(self, launch: Launch):
        self.identities.append(launch.identity)
        return await super().resume(launch)


def converge_with(
    users: dict,
    environment: Environment = ENVIRONMENT,
    status: dict | None = None,
    settings: IdentitySettings = REQUIRED,
):
    backend, cluster = RecordingBackend(), Cluster()
    context = Context(
        kube=cluster,
        backends={"memory": backend},
        access=Catalogue(),  # type: ignore[arg-type]
        identities=identities(Kube(), users, settings=settings),
    )
    outcome = asyncio.run(converge(context, environment, status or {}, FLAVOR, NOW))
    return backend, outcome


def test_converge_hands_the_backend_the_owners_identity():
    backend, outcome = converge_with({"alice": DIRECTORY.users["alice"]})
    assert outcome.status["phase"] == "Provisioning" and backend.identities == [PosixIdentity("alice", 20001, 20001)]


def test_converge_rejects_an_owner_without_an_identity_before_anything_starts():
    backend, outcome = converge_with({})
    assert (outcome.status["phase"], outcome.status["reason"]) == ("Rejected", "NoPosixIdentity")
    assert backend.identities == [] and "ensure" not in backend.calls
    backend, outcome = converge_with({}, settings=OPTIONAL)
    assert outcome.status["phase"] == "Provisioning" and backend.identities == [None]  # the backend's default


def test_a_changed_uid_does_not_touch_what_runs_and_applies_at_the_next_start():
    """The pod is adopted as it is (its securityContext is immutable anyway); a resume starts anew."""
    backend, cluster = RecordingBackend(), Cluster()
    users = {"alice": [DIRECTORY.users["alice"]]}
    source = identities(Kube(), {})
    source.directory._users = users  # the live index
    context = Context(
        kube=cluster,
        backends={"memory": backend},
        access=Catalogue(),  # type: ignore[arg-type]
        identities=source,
    )

    async def scenario():
        status = {**(await converge(context, ENVIRONMENT, {}, FLAVOR, NOW)).status}
        backend.running["u-1"] = "ready"
        users["alice"] = [user("alice", 30001, 30001)]  # the directory changes
        status.update((await converge(context, ENVIRONMENT, status, FLAVOR, NOW)).status or {})
        assert status["phase"] == "Ready" and [i.uid for i in backend.identities] == [20001]  # untouched
        suspended = dataclasses.replace(ENVIRONMENT, suspend=True, generation=2)
        status.update((await converge(context, suspended, status, FLAVOR, NOW)).status or {})
        resumed = dataclasses.replace(ENVIRONMENT, generation=3)
        status.update((await converge(context, resumed, status, FLAVOR, NOW)).status or {})
        assert [i.uid for i in backend.identities] == [20001, 30001]  # resume: the directory now

    asyncio.run(scenario())
