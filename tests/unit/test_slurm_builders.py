"""The Slurm backend's pure parts: submission, batch script, state mapping (in no API version's words:
the versions' requests and answers are tests/unit/test_slurm_api.py's)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import os
import shlex
import signal
import subprocess
import time

import pytest

from analysis_operator.backends import slurm
from analysis_operator.backends.base import BackendUnavailable, Launch, State, Upstream
from analysis_operator.backends.slurm import (
    JUPYTER_FLAGS,
    TLS_CERT_ENV,
    TLS_KEY_ENV,
    TOKEN_ENV_NAME,
    SlurmBackend,
    base_path,
    build_account_mismatch,
    build_batch_script,
    build_endpoint,
    build_job_request,
    build_job_submission,
    build_jupyter_command,
    build_node_host,
    build_observation,
    build_submission_problem,
    build_time_limit_extension,
    build_time_limit_minutes,
    choose_job,
    serves_tls,
)
from analysis_operator.backends.slurm_api import Ping, SlurmError, SlurmJob, SlurmNode, Submitted
from analysis_operator.backends.slurm_auth import (
    build_account,
    build_identity_comment,
    build_jupyter_port,
    build_jwt,
    build_output_path,
    derive_key,
    job_identity,
    job_nonce,
    output_signature,
    parse_identity,
)
from analysis_operator.backends.slurm_rest import SlurmRequestRefused, http_url, resolve_address
from analysis_operator.infra.server_tls import ServerCertificate, certificate_id, issue, server_name
from analysis_operator.model.domain import BackendKind, Environment, Flavor, Resources, SlurmSpec
from analysis_operator.model.identity import PosixIdentity
from analysis_operator.settings import SlurmSettings
from tests.faults import lose_the_next_read

HOURS = datetime.timedelta(hours=1)
SETTINGS = SlurmSettings(working_directory="/scratch/aenv", jupyter_command="jupyter lab")
UID = "0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9"
KEY = derive_key(b"k" * 32, "jobs")
PER_USER = SlurmSettings(
    working_directory="/scratch/{user}/aenv",
    jupyter_command="jupyter lab",
    jwt_key_file="/etc/slurm/jwt.key",
    user="slurm",
)


def make_environment(**overrides) -> Environment:
    values = dict(namespace="team-a", name="lab", uid=UID, owner="alice", flavor="cluster")
    values.update(overrides)
    return Environment(**values)


def make_flavor(cpu="2", memory="8Gi", gpu=0, max_lifetime=8 * HOURS, **slurm) -> Flavor:
    return Flavor(
        name="cluster",
        backend=BackendKind.SLURM,
        max_lifetime=max_lifetime,
        resources=Resources(cpu=cpu, memory=memory, gpu=gpu),
        slurm=SlurmSpec(**slurm),
    )


@pytest.mark.parametrize(
    "flavor_limit, lifetime, max_lifetime, remaining, expected",
    [
        (None, None, 8 * HOURS, None, 480),
        (60, None, 8 * HOURS, None, 60),
        (None, 2 * HOURS, 8 * HOURS, None, 120),
        (None, 12 * HOURS, 8 * HOURS, None, 480),  # the flavor caps what is asked
        (600, None, 8 * HOURS, datetime.timedelta(minutes=90, seconds=1), 91),  # rounds up
        (None, None, 8 * HOURS, datetime.timedelta(seconds=5), 1),  # never 0: 0 means no limit
    ],
)
def test_time_limit_is_the_shortest_limit(flavor_limit, lifetime, max_lifetime, remaining, expected):
    environment = make_environment(lifetime=lifetime)
    flavor = make_flavor(max_lifetime=max_lifetime, time_limit_minutes=flavor_limit)
    assert build_time_limit_minutes(environment, flavor, remaining) == expected


@pytest.mark.parametrize(
    "flavor, expected",
    [
        (make_flavor(cpu="2", memory="8Gi"), {"cpus_per_task": 2, "memory_mib": 8192, "gpus": 0}),
        (make_flavor(cpu="500m", memory="512Mi"), {"cpus_per_task": 1, "memory_mib": 512}),
        (make_flavor(cpu="2.5", memory="16Gi", gpu=2), {"cpus_per_task": 3, "gpus": 2}),
        (
            make_flavor(partition="gpu", account="p-123", qos="short"),
            {"partition": "gpu", "account": "p-123", "qos": "short"},
        ),
        (make_flavor(), {"partition": "", "account": "", "qos": ""}),
    ],
)
def test_submission_carries_the_flavor(flavor, expected):
    request = build_job_request(make_environment(), flavor, SETTINGS)
    assert {key: getattr(request, key) for key in expected} == expected


def test_submission_is_in_the_pinned_version_else_the_newest():
    environment, flavor = make_environment(), make_flavor(gpu=1)
    newest = build_job_submission(environment, flavor, SETTINGS)
    assert newest["tres_per_node"] == "gres/gpu:1" and "gres" not in newest
    assert newest["time_limit"] == {"set": True, "infinite": False, "number": 480}
    old = build_job_submission(environment, flavor, dataclasses.replace(SETTINGS, api_version="v0.0.38"))
    assert old["gres"] == "gpu:1" and old["time_limit"] == 480 and "tres_per_node" not in old


def test_submission_carries_identity_and_no_token():
    environment = make_environment()
    job = build_job_request(environment, make_flavor(), SETTINGS)
    assert job.name == "aenv-lab.team-a"
    assert parse_identity(job.comment) == {"namespace": "team-a", "name": "lab", "uid": UID}
    assert TOKEN_ENV_NAME not in job.environment
    assert job.environment["JUPYTER_PORT"] == str(build_jupyter_port(environment, SETTINGS))
    assert job.working_directory == "/scratch/aenv"
    assert job.standard_output == f"/scratch/aenv/team-a.aenv-lab.{UID}.%j.out"


def test_the_jobs_path_is_the_sites():
    settings = dataclasses.replace(SETTINGS, job_path="/opt/slurm/bin:/usr/bin:/bin")
    assert build_job_request(make_environment(), make_flavor(), settings).environment["PATH"] == (
        "/opt/slurm/bin:/usr/bin:/bin"
    )
    assert build_job_request(make_environment(), make_flavor(), SETTINGS).environment["PATH"] == (
        "/usr/local/bin:/usr/bin:/bin"
    )


def test_base_path_is_namespace_and_name_under_env():
    assert base_path(make_environment()) == "/env/team-a/lab/"
    assert base_path(make_environment(namespace="beamtime-42", name="x")) == "/env/beamtime-42/x/"


def test_submission_passes_the_base_url_and_the_users_home():
    job = build_job_request(make_environment(), make_flavor(), PER_USER, user="alice", key=KEY)
    assert job.environment["JUPYTER_BASE_URL"] == "/env/team-a/lab/"
    assert job.environment["HOME"] == "/scratch/alice/aenv" == job.working_directory


def as_submitted(request, user="alice", job_id="1", **fields) -> SlurmJob:
    """The job Slurm shows for a request it accepted (as `user`)."""
    return SlurmJob(
        job_id=job_id,
        user_name=user,
        comment=request.comment,
        standard_output=request.standard_output,
        time_limit=request.time_limit_minutes,
        gpus_requested=request.gpus,
        tres_per_node=f"gres/gpu:{request.gpus}" if request.gpus else "",
        **fields,
    )


def test_per_user_submission_is_signed_and_lives_in_the_users_directory():
    environment = make_environment()
    job = build_job_request(environment, make_flavor(), PER_USER, user="alice", key=KEY)
    assert job.working_directory == "/scratch/alice/aenv"
    signature = output_signature(KEY, "team-a", "lab", UID, "alice", "")
    assert job.standard_output == f"/scratch/alice/aenv/team-a.aenv-lab.{UID}.s{signature}.%j.out"
    assert parse_identity(job.comment)["user"] == "alice"
    assert job.environment["JUPYTER_PORT"] == str(build_jupyter_port(environment, PER_USER, KEY))
    assert job_identity(as_submitted(job), PER_USER, KEY)["uid"] == UID


@pytest.mark.parametrize(
    "comment, identity",
    [
        (build_identity_comment(make_environment()), {"namespace": "team-a", "name": "lab", "uid": UID}),
        ("someone else's job", None),
        ("", None),
    ],
)
def test_comment_parsing(comment, identity):
    assert parse_identity(comment) == identity


SIGNED = build_identity_comment(make_environment(), "alice", KEY)
NONCED = build_output_path(make_environment(), PER_USER, "alice", "0a1b2c3d", KEY)
BOBS = build_output_path(make_environment(), PER_USER, "bob", "0a1b2c3d")
# bob's path with alice's signature (the output paths of her jobs are his to read in the queue)
BOBS_WITH_ALICES_SIGNATURE = BOBS.removesuffix(".%j.out") + "." + NONCED.split(".")[-3] + ".%j.out"
OUTPUT = build_output_path(make_environment(), PER_USER, "alice", key=KEY)


def slurm_job(**fields) -> SlurmJob:
    return SlurmJob(**{"job_id": "7", **fields})


@pytest.mark.parametrize(
    "job, expected_uid",
    [
        ({"user_name": "alice", "comment": SIGNED}, UID),
        # bob copies alice's signed identity onto his own job: bound to alice, so not his
        ({"user_name": "bob", "comment": SIGNED}, None),
        # a forged signature, or an unsigned identity, in per-user mode
        ({"user_name": "alice", "comment": SIGNED[:-4] + "0000"}, None),
        ({"user_name": "alice", "comment": build_identity_comment(make_environment())}, None),
        (
            {
                "user_name": "bob",
                "comment": build_identity_comment(make_environment(), "bob", derive_key(b"x", "jobs")),
            },
            None,
        ),
        # the comment changed from inside the job: the output path the operator chose still says whose it is
        ({"user_name": "alice", "comment": "x", "standard_output": OUTPUT}, UID),
        # ... but only under the job's own user's directory
        ({"user_name": "bob", "comment": "x", "standard_output": OUTPUT}, None),
        ({"user_name": "alice", "comment": "x", "standard_output": "/tmp" + OUTPUT}, None),
        ({"user_name": "alice", "comment": "", "standard_output": ""}, None),
        ({"user_name": "alice", "comment": "x", "standard_output": NONCED}, UID),  # a nonce
        # bob's own job, its output under his own directory naming alice's environment: any user may
        # write any path for a job of theirs; the operator's signature is bound to the job's user
        (
            {
                "user_name": "bob",
                "comment": "x",
                "standard_output": build_output_path(make_environment(), PER_USER, "bob"),
            },
            None,
        ),
        ({"user_name": "bob", "comment": "x", "standard_output": BOBS_WITH_ALICES_SIGNATURE}, None),
        # ... nor alice's path with another nonce (its port) than the one signed
        ({"user_name": "alice", "comment": "x", "standard_output": NONCED.replace(".0a1b2c3d.", ".0a1b2c3e.")}, None),
        # the version before's unsigned path: not enough any more (its signed comment still is)
        (
            {
                "user_name": "alice",
                "comment": "x",
                "standard_output": build_output_path(make_environment(), PER_USER, "alice"),
            },
            None,
        ),
    ],
)
def test_job_identity_needs_the_operators_own_marks(job, expected_uid):
    assert (job_identity(slurm_job(**job), PER_USER, KEY) or {}).get("uid") == expected_uid


def test_an_output_path_in_a_shared_directory_names_no_environment():
    """Without {user} in the working directory, bob could point his job's output at alice's name."""
    shared = SlurmSettings(working_directory="/scratch/aenv", jwt_key_file="k")
    job = slurm_job(user_name="bob", standard_output=build_output_path(make_environment(), shared, "bob"))
    assert job_identity(job, shared, KEY) is None


@pytest.mark.parametrize(
    "owner, identity, settings, expected",
    [
        ("alice", None, PER_USER, "alice"),
        ("alice", PosixIdentity("a.smith", 3001, 3001), PER_USER, "a.smith"),  # the directory's word wins
        (
            "oidc:alice@facility.eu",
            None,
            SlurmSettings(jwt_key_file="k", owner_prefix="oidc:", owner_suffix="@facility.eu"),
            "alice",
        ),
        ("alice", None, SlurmSettings(user="aenv"), "aenv"),  # single-token mode: one account
    ],
)
def test_account_of_the_job(owner, identity, settings, expected):
    assert build_account(make_environment(owner=owner), identity, settings) == expected


@pytest.mark.parametrize("owner", ["root", "slurm", "-rf", "a b", "x" * 40, "", "alice;id", "../etc"])
def test_privileged_or_malformed_accounts_are_refused(owner):
    with pytest.raises(ValueError):
        build_account(make_environment(owner=owner), None, PER_USER)


def test_port_is_stable_in_range_and_keyed():
    environment = make_environment()
    ports = {
        build_jupyter_port(make_environment(uid=f"{index:08d}-0000-4000-8000-000000000000"), PER_USER, KEY)
        for index in range(200)
    }
    assert all(PER_USER.port_min <= port <= PER_USER.port_max for port in ports) and len(ports) > 150
    assert build_jupyter_port(environment, PER_USER, KEY) == build_jupyter_port(environment, PER_USER, KEY)
    assert build_jupyter_port(environment, PER_USER, KEY) != build_jupyter_port(
        environment, PER_USER, derive_key(b"other", "jobs")
    )
    # each job its own nonce, so its own port: a port seen in use says nothing about the next job
    by_nonce = {build_jupyter_port(environment, PER_USER, KEY, f"{nonce:08x}") for nonce in range(50)}
    assert len(by_nonce) > 45


def test_the_port_comes_back_from_the_frozen_output_path():
    environment = make_environment()
    request = build_job_request(environment, make_flavor(), PER_USER, user="alice", key=KEY, nonce="0a1b2c3d")
    assert f".{UID}.0a1b2c3d.s" in request.standard_output and request.standard_output.endswith(".%j.out")
    job = as_submitted(request)
    assert job_nonce(job) == "0a1b2c3d"
    assert request.environment["JUPYTER_PORT"] == str(build_jupyter_port(environment, PER_USER, KEY, job_nonce(job)))


@pytest.mark.parametrize(
    "job, domain, expected",
    [
        ({"state": "RUNNING", "batch_host": "n7"}, "", "n7:20001"),
        ({"state": "RUNNING", "batch_host": "n7"}, "hpc.facility.eu", "n7.hpc.facility.eu:20001"),
        ({"state": "PENDING", "batch_host": ""}, "", ""),
        ({"state": "RUNNING", "batch_host": "", "comment": "endpoint=evil:1"}, "", ""),
    ],
)
def test_endpoint_is_slurms_node_and_the_operators_port(job, domain, expected):
    assert build_endpoint(slurm_job(**job), 20001, SlurmSettings(node_domain=domain)) == expected


NOW = datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.UTC)
STARTED = int((NOW - datetime.timedelta(minutes=30)).timestamp())


@pytest.mark.parametrize(
    "job, until, expected",
    [
        # running for 30 min with a 60 min limit: to run until now + 2 h it needs 150 min
        (slurm_job(state="RUNNING", start_time=STARTED, time_limit=60), NOW + 2 * HOURS, 150),
        (slurm_job(state="RUNNING", start_time=STARTED, time_limit=60), NOW + datetime.timedelta(minutes=20), None),
        (slurm_job(state="RUNNING", start_time=STARTED, time_limit=60), NOW + datetime.timedelta(minutes=30), None),
        (slurm_job(state="PENDING", start_time=0, time_limit=60), NOW + 2 * HOURS, 120),
        (slurm_job(state="PENDING", start_time=STARTED + 9999, time_limit=60), NOW + 2 * HOURS, 120),
        (slurm_job(state="CANCELLED", start_time=STARTED, time_limit=60), NOW + 2 * HOURS, None),
        (slurm_job(state="RUNNING", start_time=STARTED, time_limit=0), NOW + 2 * HOURS, None),  # 0: no limit
    ],
)
def test_time_limit_extension(job, until, expected):
    assert build_time_limit_extension(job, until, NOW) == expected


def test_minted_token_is_what_slurms_auth_jwt_checks():
    import base64
    import hashlib
    import hmac
    import json

    token = build_jwt(b"secret", "alice", 1_000, 300)
    header, payload, signature = token.split(".")
    decode = lambda part: base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))  # noqa: E731
    assert json.loads(decode(header)) == {"alg": "HS256", "typ": "JWT"}
    assert json.loads(decode(payload)) == {"iat": 1_000, "exp": 1_300, "sun": "alice"}
    assert decode(signature) == hmac.new(b"secret", f"{header}.{payload}".encode(), hashlib.sha256).digest()


@pytest.mark.parametrize(
    "command, expected_suffix",
    [
        ("jupyter lab", JUPYTER_FLAGS),
        ("/opt/jupyterlab/bin/jupyter-lab", JUPYTER_FLAGS),
        ('python3 -m http.server --bind "$JUPYTER_HOST" "$JUPYTER_PORT"', '"$JUPYTER_PORT"'),
    ],
)
def test_jupyter_command_places_itself(command, expected_suffix):
    assert build_jupyter_command(SlurmSettings(jupyter_command=command)).endswith(expected_suffix)


def test_jupyter_flags_serve_behind_a_gateway_and_keep_the_checks():
    flags = shlex.split(JUPYTER_FLAGS)
    assert {
        "--no-browser",
        "--ServerApp.port_retries=0",
        "--ServerApp.base_url=$JUPYTER_BASE_URL",
        "--ServerApp.allow_remote_access=True",
        "--ServerApp.trust_xheaders=True",
    } <= set(flags)
    # never: the XSRF check off, root, or the token where ps shows it
    assert not [flag for flag in flags if "xsrf" in flag.lower() or "root" in flag or "token" in flag.lower()]


def test_batch_script_starts_jupyter_on_every_address_under_its_base_url(tmp_path):
    """The real script with bash; the command prints its arguments instead of serving."""
    settings = SlurmSettings(working_directory=str(tmp_path), jupyter_command="printf '%s\\n'")
    environment = make_environment()
    job = build_job_request(environment, make_flavor(), settings)
    script = build_batch_script(environment, make_flavor(), TOKEN_ENV_NAME, settings)
    variables = {**job.environment, TOKEN_ENV_NAME: "t0ken", "SLURM_JOB_ID": "7"}
    result = subprocess.run(["bash", "-c", script], env=variables, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    arguments = result.stdout.splitlines()
    assert "--ip=0.0.0.0" in arguments and "--ServerApp.base_url=/env/team-a/lab/" in arguments
    assert f"--port={job.environment['JUPYTER_PORT']}" in arguments
    assert "t0ken" not in result.stdout


HOSTILE = ["$(touch /tmp/pwned)", "a'b", "x; rm -rf /", "`id`", "two words", "new\nline"]


@pytest.mark.parametrize("module", HOSTILE)
def test_module_names_stay_one_argument(module):
    script = build_batch_script(make_environment(), make_flavor(modules=(module,)), TOKEN_ENV_NAME, SETTINGS)
    line = script[script.index("module load ") :]
    # shlex parses like the shell: the whole hostile name must come back as one word.
    assert shlex.split(line, comments=True)[:3] == ["module", "load", module]


@pytest.mark.parametrize("modules", [(), ("python/3.11", "cuda/12")])
def test_batch_script_is_valid_bash_without_user_text(modules):
    environment = make_environment(name="name-only-in-env", namespace="ns-only-in-env")
    script = build_batch_script(environment, make_flavor(modules=modules), TOKEN_ENV_NAME, SETTINGS)
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert "name-only-in-env" not in script and "ns-only-in-env" not in script
    assert script.startswith("#!/bin/bash\n")
    assert "\n  exec jupyter lab --no-browser" in script


@pytest.mark.parametrize("name", ["", "1TOKEN", "A-B", "X;Y", "$(id)"])
def test_token_variable_must_be_a_shell_name(name):
    with pytest.raises(ValueError):
        build_batch_script(make_environment(), make_flavor(), name, SETTINGS)


RUNNING_WITH_ENDPOINT = SlurmJob(
    job_id="7", state="RUNNING", reason="None", nodes="n1", batch_host="n1", cpus=4.0, gpus=1, gpus_requested=1
)


@pytest.mark.parametrize(
    "job, answers, state, reason",
    [
        (slurm_job(state="PENDING", reason="Resources"), False, State.PENDING, "Resources"),
        (slurm_job(state="PENDING", reason="None"), False, State.PENDING, "Queued"),
        (slurm_job(state="RUNNING", comment="x"), False, State.PROVISIONING, "JupyterStarting"),
        (RUNNING_WITH_ENDPOINT, False, State.PROVISIONING, "JupyterStarting"),
        (RUNNING_WITH_ENDPOINT, True, State.READY, "JupyterAnswering"),
        (slurm_job(state="CONFIGURING"), False, State.PROVISIONING, "JupyterStarting"),
        (slurm_job(state="TIMEOUT", reason="TimeLimit"), False, State.EXPIRED, "TimeLimit"),
        (slurm_job(state="FAILED", reason="NonZeroExitCode"), False, State.FAILED, "JobFailed"),
        (slurm_job(state="FAILED", reason="NonZeroExitCode", exit_status=1), False, State.FAILED, "JobFailed"),
        (
            slurm_job(state="FAILED", reason="NonZeroExitCode", exit_status=slurm.HOME_NOT_PRIVATE_EXIT),
            False,
            State.FAILED,
            "WorkingDirectoryNotPrivate",
        ),
        (slurm_job(state="CANCELLED"), False, State.FAILED, "JobCancelled"),
        (slurm_job(state="NODE_FAIL"), False, State.FAILED, "JobNodeFail"),
        (slurm_job(state="OUT_OF_MEMORY"), False, State.FAILED, "JobOutOfMemory"),
        (slurm_job(state="COMPLETED"), False, State.FAILED, "JobCompleted"),
    ],
)
def test_observation_maps_slurm_states(job, answers, state, reason):
    observation = build_observation(job, answers, build_endpoint(job, 4000, SETTINGS))
    assert (observation.state, observation.reason) == (state, reason)
    assert observation.reference["id"] == "7"


def test_ready_observation_holds_url_and_resources():
    observation = build_observation(RUNNING_WITH_ENDPOINT, True, "n1:4000")
    assert (observation.url, observation.cpus, observation.gpus) == ("http://n1:4000/", 4.0, 1)
    assert observation.upstream is None


def test_ready_observation_holds_the_upstream_and_the_base_path():
    upstream = Upstream(address="10.250.0.2", port=4000, landing="lab")
    observation = build_observation(RUNNING_WITH_ENDPOINT, True, "n1:4000", upstream=upstream, path="/env/a/b/")
    assert (observation.state, observation.url, observation.upstream) == (
        State.READY,
        "http://n1:4000/env/a/b/",
        upstream,
    )
    assert observation.reference["addresses"] == ["10.250.0.2"]
    starting = build_observation(RUNNING_WITH_ENDPOINT, False, "n1:4000", upstream=upstream, path="/env/a/b/")
    assert (starting.state, starting.upstream) == (State.PROVISIONING, upstream)
    completing = dataclasses.replace(RUNNING_WITH_ENDPOINT, state="COMPLETING")
    ended = build_observation(completing, False, "", upstream=upstream)
    assert ended.upstream is None and "addresses" not in ended.reference


@pytest.mark.parametrize(
    "node, expected",
    [
        (SlurmNode("n7", hostname="n7h", address="10.1.2.3"), "10.1.2.3"),
        (SlurmNode("n7", hostname="n7h", address=""), "n7h"),
        (SlurmNode("n7"), "n7"),
        (SlurmNode(""), ""),
    ],
)
def test_node_host_is_slurms_node_address(node, expected):
    assert build_node_host(node) == expected


@pytest.mark.parametrize(
    "host, domain, expected",
    [
        ("10.250.0.2", "", "10.250.0.2"),
        ("10.250.0.2", "hpc.example.org", "10.250.0.2"),
        ("fd00:0::2", "", "fd00::2"),
        ("localhost", "", "127.0.0.1"),
        ("no-such-node.invalid", "", ""),
        ("", "", ""),
    ],
)
def test_a_node_address_resolves_to_an_ip_address(host, domain, expected):
    assert asyncio.run(resolve_address(host, domain)) == expected


@pytest.mark.parametrize(
    "address, expected",
    [("10.250.0.2", "http://10.250.0.2:4000/env/a/b/"), ("fd00::2", "http://[fd00::2]:4000/env/a/b/")],
)
def test_http_url_brackets_ipv6(address, expected):
    assert http_url(address, 4000, "/env/a/b/") == expected


def test_pending_observation_says_slurms_reason():
    observation = build_observation(SlurmJob(job_id="9", state="PENDING", reason="Priority"), False)
    assert "Priority" in observation.message and observation.cpus == 0


@pytest.mark.parametrize(
    "states, include_cancelled, expected_id",
    [
        ([], True, None),
        ([("CANCELLED", 1), ("RUNNING", 2)], True, 2),
        ([("RUNNING", 3), ("PENDING", 5)], True, 5),
        ([("RUNNING", 3), ("COMPLETED", 9)], True, 3),  # active beats newer ended
        ([("CANCELLED", 4)], False, None),  # a suspend's cancel is not adopted
        ([("CANCELLED", 4), ("TIMEOUT", 2)], False, 2),
        ([("CANCELLED", 4), ("TIMEOUT", 2)], True, 4),
    ],
)
def test_choose_job(states, include_cancelled, expected_id):
    jobs = [SlurmJob(job_id=str(job_id), state=state) for state, job_id in states]
    chosen = choose_job(jobs, include_cancelled)
    assert (chosen.job_id if chosen else None) == (str(expected_id) if expected_id else None)


class RecordingClient:
    """Stands in for slurmrestd: records submissions, cancels and updates; serves its queue."""

    def __init__(self, jobs, user_of_submitted="alice"):
        self.queue: list[SlurmJob] = list(jobs)
        self.submitted, self.cancelled, self.updates = [], [], []
        self.user_of_submitted = user_of_submitted
        self.nodes_asked: list[str] = []
        self.node_address = "10.250.0.2"
        self.ignored: tuple[str, ...] = ()  # what the submit answer says Slurm ignored
        self.gpus_taken: int | None = None  # GPUs the accepted job asks for (None: as requested)
        self.responding = True

    def update_job(self, index: int, **fields) -> None:
        self.queue[index] = dataclasses.replace(self.queue[index], **fields)

    async def jobs(self):
        return list(self.queue)

    async def job(self, job_id):
        return next((job for job in self.queue if job.job_id == str(job_id)), None)

    async def submit(self, request, script, user=""):
        self.submitted.append((request, script, user))
        job_id = str(101 + len(self.submitted) - 1)
        gpus = request.gpus if self.gpus_taken is None else self.gpus_taken
        self.queue.append(
            SlurmJob(
                job_id=job_id,
                state="PENDING",
                user_name=self.user_of_submitted,
                comment=request.comment,
                standard_output=request.standard_output,
                time_limit=request.time_limit_minutes,
                gpus_requested=gpus,
                tres_per_node=f"gres/gpu:{gpus}" if gpus else "",
            )
        )
        return Submitted(job_id, self.ignored, tuple(f'Ignoring unknown field "{name}"' for name in self.ignored))

    async def cancel(self, job_id):
        self.cancelled.append(str(job_id))
        self.queue = [
            dataclasses.replace(job, state="CANCELLED") if job.job_id == str(job_id) else job for job in self.queue
        ]

    async def update_time_limit(self, job_id, minutes, user=""):
        self.updates.append((str(job_id), minutes))

    async def node(self, name):
        self.nodes_asked.append(name)
        return SlurmNode(name, hostname=name, address=self.node_address)

    async def ping(self):
        return Ping(self.responding, "localhost: UP" if self.responding else "localhost: not responding")


def per_user_backend(queue, tmp_path, user_of_submitted="alice") -> SlurmBackend:
    key_file = tmp_path / "jwt.key"
    key_file.write_bytes(b"k" * 32)  # derive_key(b"k" * 32, "jobs") == KEY
    backend = SlurmBackend(SlurmSettings(**{**PER_USER.__dict__, "jwt_key_file": str(key_file)}))
    backend.client = RecordingClient(queue, user_of_submitted)
    return backend


MINE = {"user_name": "alice", "comment": SIGNED}


def queued(job_id: int, state: str, **fields) -> SlurmJob:
    return SlurmJob(job_id=str(job_id), state=state, **fields)


@pytest.mark.parametrize(
    "queue, expect_submission",
    [
        ([], True),
        ([queued(5, "CANCELLED", **MINE)], True),
        ([queued(5, "PENDING", **MINE)], False),
        ([queued(5, "TIMEOUT", **MINE)], False),
        (
            [
                queued(
                    5,
                    "PENDING",
                    user_name="alice",
                    comment=build_identity_comment(make_environment(uid="other"), "alice", KEY),
                )
            ],
            True,
        ),
        # bob's job claiming alice's environment is not hers
        ([queued(5, "PENDING", user_name="bob", comment=SIGNED)], True),
    ],
)
def test_ensure_adopts_or_submits_once(queue, expect_submission, tmp_path):
    backend = per_user_backend(queue, tmp_path)
    observation = asyncio.run(backend.ensure(Launch(make_environment(), make_flavor(), "s3cret-token")))
    assert bool(backend.client.submitted) == expect_submission
    if expect_submission:
        job, script, user = backend.client.submitted[0]
        assert user == "alice"
        assert job.environment[TOKEN_ENV_NAME] == "s3cret-token"
        assert "s3cret-token" not in script and "s3cret-token" not in job.comment
        assert observation.reference == {"id": "101"} and observation.state == State.PENDING
    else:
        assert observation.reference["id"] == "5"


def test_a_comment_changed_inside_the_job_loses_nothing(tmp_path):
    """Case 7: the job's owner rewrites its comment; the operator keeps it by id, submits no second one,
    and still lists it as its own (for the sweep and the invariant)."""
    backend = per_user_backend([], tmp_path)
    environment = make_environment()
    asyncio.run(backend.ensure(Launch(environment, make_flavor(), "t")))
    backend.client.update_job(0, comment="x", state="RUNNING")

    assert asyncio.run(backend.observe(environment)).reference["id"] == "101"
    asyncio.run(backend.ensure(Launch(environment, make_flavor(), "t")))
    assert len(backend.client.submitted) == 1
    assert [(item.uid, item.backend_id) for item in asyncio.run(backend.list_managed())] == [(UID, "101")]
    assert asyncio.run(backend.delete(environment)) and backend.client.cancelled == ["101"]


def test_a_forged_identity_is_neither_adopted_nor_swept(tmp_path):
    forged = queued(9, "RUNNING", user_name="alice", comment=build_identity_comment(make_environment(uid="gone")))
    # unsigned
    backend = per_user_backend([forged], tmp_path)
    assert asyncio.run(backend.list_managed()) == []
    assert asyncio.run(backend.observe(make_environment(uid="gone"))).state == State.GONE


def test_an_account_slurm_does_not_know_fails_the_environment(tmp_path):
    backend = per_user_backend([], tmp_path, user_of_submitted="nobody")
    observation = asyncio.run(backend.ensure(Launch(make_environment(), make_flavor(), "t")))
    assert (observation.state, observation.reason) == (State.FAILED, "UnknownUnixAccount")
    assert backend.client.cancelled == ["101"]


@pytest.mark.parametrize(
    "job, uid, reason",
    [
        ({"user_name": "alice", "user_id": 1001}, None, None),
        ({"user_name": "alice", "user_id": 1001}, 1001, None),
        ({"user_name": "alice", "user_id": 1001}, 3001, "UnixAccountMismatch"),
        ({"user_name": "nobody", "user_id": 65534}, None, "UnknownUnixAccount"),
    ],
)
def test_the_job_must_run_as_the_account_and_uid_decided(job, uid, reason):
    assert (build_account_mismatch(slurm_job(**job), "alice", uid) or (None,))[0] == reason


@pytest.mark.parametrize(
    "user_name, user_id, reason",
    [("nobody", 65534, "UnknownUnixAccount"), ("alice", 3001, "UnixAccountMismatch"), ("alice", 1001, None)],
)
@pytest.mark.parametrize("first_read", ["observe", "list_managed"])
@pytest.mark.parametrize("lost", [None, BackendUnavailable("slurmrestd at http://x is unreachable")])
def test_a_job_whose_read_back_was_lost_is_checked_on_its_first_read(
    user_name, user_id, reason, first_read, lost, tmp_path
):
    backend = per_user_backend([], tmp_path, user_of_submitted=user_name)
    environment = make_environment()
    launch = Launch(environment, make_flavor(), "t", identity=PosixIdentity("alice", 1001, 1001))
    lose_the_next_read(backend.client, lost)
    assert asyncio.run(backend.ensure(launch)).state == State.PENDING  # not checked yet
    backend.client.update_job(0, user_id=user_id)
    if first_read == "list_managed":
        assert [item.backend_id for item in asyncio.run(backend.list_managed())] == ["101"]  # ours, by its id

    for _ in range(2):  # and again: a job that ran as someone else is never taken for gone (and replaced)
        observation = asyncio.run(backend.observe(environment))
        if reason is None:
            assert (observation.state, observation.reference["id"]) == (State.PENDING, "101")
        else:
            assert (observation.state, observation.reason) == (State.FAILED, reason)
            assert observation.message.endswith("; Slurm job 101 was cancelled")
    assert set(backend.client.cancelled) == (set() if reason is None else {"101"})
    assert len(backend.client.submitted) == 1


def test_a_job_id_slurm_gave_again_to_another_users_job_is_not_taken_for_the_unchecked_one(tmp_path):
    """The read-back was lost because slurmctld crashed before saving its state; back, it gave the id
    to bob's job. Without the operator's mark for this environment and account, it is not ours: not
    cancelled, not checked; the environment's job is gone."""
    backend = per_user_backend([], tmp_path, user_of_submitted="alice")
    environment = make_environment()
    launch = Launch(environment, make_flavor(), "t", identity=PosixIdentity("alice", 1001, 1001))
    lose_the_next_read(backend.client)
    assert asyncio.run(backend.ensure(launch)).state == State.PENDING
    backend.client.update_job(0, user_name="bob", user_id=2002, comment="bob's own", standard_output="/home/bob/x")
    assert asyncio.run(backend.list_managed()) == []
    assert asyncio.run(backend.observe(environment)).state == State.GONE
    assert backend.client.cancelled == []


def test_a_privileged_owner_is_never_submitted(tmp_path):
    backend = per_user_backend([], tmp_path)
    observation = asyncio.run(backend.ensure(Launch(make_environment(owner="root"), make_flavor(), "t")))
    assert (observation.state, observation.reason) == (State.FAILED, "NoUnixAccount")
    assert backend.client.submitted == []


def test_suspend_shows_suspended_and_resume_submits_a_new_job(tmp_path):
    backend = per_user_backend([], tmp_path)
    environment = make_environment()
    asyncio.run(backend.ensure(Launch(environment, make_flavor(), "t")))
    suspended = asyncio.run(backend.suspend(environment))
    assert (suspended.state, suspended.reference["state"]) == (State.SUSPENDED, "CANCELLED")
    resumed = asyncio.run(backend.resume(Launch(environment, make_flavor(), "t")))
    assert resumed.reference["id"] == "102" and len(backend.client.submitted) == 2
    assert asyncio.run(backend.resume(Launch(environment, make_flavor(), "t"))).reference["id"] == "102"


def test_a_resume_right_after_the_suspend_submits_anew_and_never_adopts_the_job_still_completing(tmp_path):
    """The suspend's cancelled job shows COMPLETING for a moment: a resume that adopted it ended the
    environment Failed (JobCancelled) once it was gone (tests/integration/slurm/test_open_slurm.py)."""
    backend = per_user_backend([], tmp_path)
    environment = make_environment()
    asyncio.run(backend.ensure(Launch(environment, make_flavor(), "t")))
    asyncio.run(backend.suspend(environment))
    backend.client.update_job(0, state="COMPLETING")
    resumed = asyncio.run(backend.resume(Launch(environment, make_flavor(), "t")))
    assert resumed.reference["id"] == "102" and len(backend.client.submitted) == 2


@pytest.mark.parametrize("server_tls", [True, False])
def test_a_job_gets_its_certificate_and_key_and_a_nonce_that_says_so(tmp_path, server_tls):
    """With a certificate (the engine's, behind the gateway): the job's environment holds it and its key,
    its output path the certificate's id as its nonce (what a restarted operator reads TLS, and which
    certificate, from), and its upstream the name to check and that id; slurm.server_tls false: none of it,
    and no certificate is made."""
    backend = per_user_backend([], tmp_path)
    backend.settings = dataclasses.replace(backend.settings, server_tls=server_tls)
    environment = make_environment()
    made: list[ServerCertificate] = []

    async def certificate() -> ServerCertificate:
        made.append(issue(environment, datetime.datetime.now(datetime.UTC)))
        return made[-1]

    asyncio.run(backend.ensure(Launch(environment, make_flavor(), "t", certificate=certificate)))
    (request, script, _), job = backend.client.submitted[0], backend.client.queue[0]
    nonce = job_nonce(job)
    if server_tls:
        assert len(made) == 1 and serves_tls(nonce) and nonce.startswith(certificate_id(made[0].certificate))
        assert request.environment[TLS_KEY_ENV] == made[0].key and made[0].key not in script
        assert request.environment[TLS_CERT_ENV] == made[0].certificate
    else:
        assert made == [] and not serves_tls(nonce) and TLS_KEY_ENV not in request.environment
    backend.client.update_job(0, state="RUNNING", batch_host="n1", nodes="n1")
    observed = asyncio.run(backend.observe(environment))
    assert observed.upstream is not None
    assert observed.upstream.server_name == (server_name(environment) if server_tls else "")
    assert observed.upstream.certificate_id == (certificate_id(made[0].certificate) if server_tls else "")


def test_a_job_holding_a_certificate_that_is_not_the_stored_one_is_replaced_new_job_first(tmp_path, monkeypatch):
    """The engine's ensure with stale_certificate (engine/converge.py, the lost-submission race): a new job is
    submitted, then the one holding that certificate cancelled; if the submission fails (slurmrestd
    restarting) nothing is cancelled, so the environment never stands without a job of its own; a job
    holding another certificate than the stale one is adopted as before."""
    monkeypatch.setattr(slurm, "endpoint_answers", lambda http, url: asyncio.sleep(0, True))
    backend = per_user_backend([], tmp_path)
    environment = make_environment()

    async def certificate() -> ServerCertificate:
        return issue(environment, datetime.datetime.now(datetime.UTC))

    def launch(stale: str = "") -> Launch:
        return Launch(environment, make_flavor(), "t", certificate=certificate, stale_certificate=stale)

    asyncio.run(backend.ensure(launch()))
    backend.client.update_job(0, state="RUNNING", batch_host="n1", nodes="n1")
    held = asyncio.run(backend.observe(environment)).upstream.certificate_id
    assert held and asyncio.run(backend.ensure(launch("0" * 32))).reference["id"] == "101"  # not that one: adopted

    async def restarting(request, script, user=""):
        raise BackendUnavailable("slurmrestd restarting")

    submit, backend.client.submit = backend.client.submit, restarting
    with pytest.raises(BackendUnavailable):
        asyncio.run(backend.ensure(launch(held)))
    assert backend.client.cancelled == [] and asyncio.run(backend.observe(environment)).state is State.READY

    backend.client.submit = submit
    replaced = asyncio.run(backend.ensure(launch(held)))
    assert replaced.reference["id"] == "102" and backend.client.cancelled == ["101"]
    backend.client.update_job(1, state="RUNNING", batch_host="n1", nodes="n1")
    observed = asyncio.run(backend.observe(environment))
    assert observed.reference["id"] == "102" and observed.upstream.certificate_id not in ("", held)


def test_where_slurm_refuses_a_second_job_the_replacement_cancels_first_and_a_failed_submission_is_retried(
    tmp_path, monkeypatch
):
    """A limit on the jobs a user may submit refuses the new job while the stale one runs: the stale one is
    cancelled first, as for a suspend, and submitted again; a submission that then fails (slurmrestd
    restarting) leaves the environment suspended (the next pass resumes it), not Failed, JobCancelled."""
    monkeypatch.setattr(slurm, "endpoint_answers", lambda http, url: asyncio.sleep(0, True))
    backend = per_user_backend([], tmp_path)
    environment = make_environment()

    async def certificate() -> ServerCertificate:
        return issue(environment, datetime.datetime.now(datetime.UTC))

    asyncio.run(backend.ensure(Launch(environment, make_flavor(), "t", certificate=certificate)))
    backend.client.update_job(0, state="RUNNING", batch_host="n1", nodes="n1")
    held = asyncio.run(backend.observe(environment)).upstream.certificate_id
    submit, calls = backend.client.submit, []

    async def limited(request, script, user=""):
        calls.append(len(calls))
        if len(calls) == 1:  # while the stale job is active: QOSMaxSubmitJobPerUserLimit
            raise SlurmRequestRefused([SlurmError(2050, "Job violates accounting/QOS policy (MaxSubmitJobsPerUser)")])
        raise BackendUnavailable("slurmrestd restarting")

    backend.client.submit = limited
    stale = Launch(environment, make_flavor(), "t", certificate=certificate, stale_certificate=held)
    with pytest.raises(BackendUnavailable):
        asyncio.run(backend.ensure(stale))
    assert backend.client.cancelled == ["101"] and len(calls) == 2
    assert asyncio.run(backend.observe(environment)).state is State.SUSPENDED  # resumed at the next pass
    backend.client.submit = submit
    resumed = asyncio.run(backend.resume(Launch(environment, make_flavor(), "t", certificate=certificate)))
    assert resumed.reference["id"] == "102" and resumed.state is State.PENDING


def test_a_job_submitted_at_a_resume_is_limited_to_what_is_left_of_the_lifetime(tmp_path):
    """Launch.expires_at (the engine's expiresAt) bounds the TimeLimit: a job submitted 90 minutes into a
    two-hour lifetime asked for two hours, and ran 90 minutes past expiresAt whenever the operator was
    not there to end it."""
    backend = per_user_backend([], tmp_path)
    environment = make_environment(lifetime=2 * HOURS)
    left = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=30)
    asyncio.run(backend.resume(Launch(environment, make_flavor(), "t", expires_at=left)))
    asyncio.run(backend.suspend(environment))
    asyncio.run(backend.resume(Launch(environment, make_flavor(), "t")))  # no expiry known: the lifetime
    assert [request.time_limit_minutes for request, _, _ in backend.client.submitted] == [30, 120]


def test_extend_raises_the_time_limit_as_the_operator_once(tmp_path):
    backend = per_user_backend([], tmp_path)
    environment = make_environment(lifetime=HOURS)
    asyncio.run(backend.ensure(Launch(environment, make_flavor(), "t")))
    backend.client.update_job(0, state="RUNNING", start_time=STARTED)
    asyncio.run(backend.observe(environment))

    assert asyncio.run(backend.extend(environment, NOW + 2 * HOURS, NOW)) is True
    assert asyncio.run(backend.extend(environment, NOW + 2 * HOURS, NOW)) is False  # already long enough
    assert backend.client.updates == [("101", 150)]


@pytest.mark.parametrize("node_address, expected", [("10.250.0.2", "10.250.0.2"), ("localhost", "127.0.0.1")])
def test_a_running_job_reports_its_nodes_ip_address_and_port_as_upstream(tmp_path, monkeypatch, node_address, expected):
    probed: list[str] = []

    async def answers(http, url: str) -> bool:  # no traffic: the probe's URL is what is checked
        probed.append(url)
        return True

    monkeypatch.setattr(slurm, "endpoint_answers", answers)
    backend = per_user_backend([], tmp_path)
    backend.client.node_address = node_address
    environment = make_environment()
    asyncio.run(backend.ensure(Launch(environment, make_flavor(), "t")))
    backend.client.update_job(0, state="RUNNING", start_time=STARTED, batch_host="n1", nodes="n1")
    port = build_jupyter_port(environment, backend.settings, KEY, job_nonce(backend.client.queue[0]))

    ready = asyncio.run(backend.observe(environment))
    again = asyncio.run(backend.observe(environment))

    assert (ready.state, ready.upstream) == (State.READY, Upstream(address=expected, port=port, landing="lab"))
    assert ready.url == f"http://n1:{port}/env/team-a/lab/"  # the node's name, as Slurm says
    assert probed == [f"http://{expected}:{port}/env/team-a/lab/"] * 2  # where a gateway connects
    assert again.upstream == ready.upstream and backend.client.nodes_asked == ["n1"]  # asked once


class Listings:
    """Counts the queue listings a RecordingClient serves."""

    def __init__(self, client: RecordingClient) -> None:
        self.count, jobs = 0, client.jobs

        async def counted():
            self.count += 1
            return await jobs()

        client.jobs = counted


def test_a_restarted_operator_observing_two_jobs_of_one_environment_cancels_one(tmp_path, monkeypatch):
    """Never two: the listing observe does when it tracks no job (after a restart) shows both; the
    newest stands for the environment, the other is cancelled (before, only ensure and resume did so,
    and those run only for an environment whose job is gone)."""
    monkeypatch.setattr(slurm, "endpoint_answers", lambda http, url: asyncio.sleep(0, True))
    running = {"state": "RUNNING", "start_time": STARTED, "batch_host": "n1", **MINE}
    backend = per_user_backend([queued(5, **running), queued(7, **running)], tmp_path)
    observation = asyncio.run(backend.observe(make_environment()))
    assert (observation.state, observation.reference["id"]) == (State.READY, "7")
    assert backend.client.cancelled == ["5"]


def test_a_duplicate_seen_by_the_orphan_sweeps_listing_is_cancelled_at_the_next_look(tmp_path, monkeypatch):
    """A submit whose answer was lost, registered by slurmctld only after the retry looked at the queue:
    the retry's job is tracked and observed by id, without a listing, so the first one ran on uncharged
    until the environment ended. The orphan sweep's listing sees it; the next observe (under the
    environment's converge lock) cancels it and keeps the tracked job. No listing is added to observe."""
    monkeypatch.setattr(slurm, "endpoint_answers", lambda http, url: asyncio.sleep(0, True))
    backend = per_user_backend([], tmp_path)
    environment = make_environment()
    asyncio.run(backend.ensure(Launch(environment, make_flavor(), "t")))  # job 101, tracked
    backend.client.update_job(0, state="RUNNING", start_time=STARTED, batch_host="n1")
    backend.client.queue.append(queued(99, "RUNNING", start_time=STARTED, batch_host="n1", **MINE))
    listings = Listings(backend.client)

    assert asyncio.run(backend.observe(environment)).reference["id"] == "101"
    assert backend.client.cancelled == [] and listings.count == 0  # by id: the duplicate is not seen
    assert {item.backend_id for item in asyncio.run(backend.list_managed())} == {"101", "99"}
    observation = asyncio.run(backend.observe(environment))
    assert (observation.state, observation.reference["id"]) == (State.READY, "101")
    assert backend.client.cancelled == ["99"] and listings.count == 1  # the sweep's listing only
    asyncio.run(backend.observe(environment))
    assert backend.client.cancelled == ["99"]  # once


def test_a_node_whose_address_does_not_resolve_has_no_upstream(tmp_path, monkeypatch):
    async def answers(http, url: str) -> bool:
        return False

    monkeypatch.setattr(slurm, "endpoint_answers", answers)
    backend = per_user_backend([], tmp_path)
    backend.client.node_address = "no-such-node.invalid"
    environment = make_environment()
    asyncio.run(backend.ensure(Launch(environment, make_flavor(), "t")))
    backend.client.update_job(0, state="RUNNING", start_time=STARTED, batch_host="n1")
    observation = asyncio.run(backend.observe(environment))
    assert (observation.state, observation.upstream) == (State.PROVISIONING, None)


# ---------------------------------------------------------------- datasets


def dataset_mount(name: str, path: str, cluster_path: str):
    from analysis_operator.model.domain import Dataset, DatasetStorage, Mount

    return Mount(Dataset(name=name, pid=f"10.5072/{name}", storage=DatasetStorage(path=cluster_path)), path, "public")


def test_submission_without_datasets_names_only_the_directory_to_clear():
    job = build_job_request(make_environment(), make_flavor(), SETTINGS)
    variables = {name: value for name, value in job.environment.items() if name.startswith("AENV_DATA")}
    assert variables == {"AENV_DATA_DIR": "/scratch/aenv/team-a.aenv-lab.data", "AENV_DATASET_COUNT": "0"}


def test_submission_carries_exactly_the_granted_datasets():
    mounts = (
        dataset_mount("raw", "/data/raw", "/gpfs/p11/raw"),
        dataset_mount("ref", "/data/refs/lysozyme", "/gpfs/public/lysozyme"),
    )
    job = build_job_request(make_environment(), make_flavor(), SETTINGS, mounts=mounts)
    variables = {name: value for name, value in job.environment.items() if name.startswith("AENV_DATA")}
    assert variables == {
        "AENV_DATA_DIR": "/scratch/aenv/team-a.aenv-lab.data",
        "AENV_DATASET_COUNT": "2",
        "AENV_DATASET_0_PATH": "/gpfs/p11/raw",
        "AENV_DATASET_0_LINK": "raw",
        "AENV_DATASET_0_PID": "10.5072/raw",
        "AENV_DATASET_1_PATH": "/gpfs/public/lysozyme",
        "AENV_DATASET_1_LINK": "refs/lysozyme",
        "AENV_DATASET_1_PID": "10.5072/ref",
    }


def test_batch_script_links_the_granted_datasets_into_the_data_directory(tmp_path):
    """Run the real script with bash: stand-ins for scontrol and JupyterLab, real links."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "scontrol").chmod(0o755)
    settings = SlurmSettings(
        working_directory=str(tmp_path), jupyter_command='test -n "$JUPYTER_PORT" -a -d "$AENV_DATA_DIR"'
    )
    for name in ("raw", "lysozyme"):
        (tmp_path / "gpfs" / name).mkdir(parents=True)
        (tmp_path / "gpfs" / name / "frame.h5").write_text(name)
    mounts = (
        dataset_mount("raw", "/data/raw", str(tmp_path / "gpfs/raw")),
        dataset_mount("ref", "/data/refs/lysozyme", str(tmp_path / "gpfs/lysozyme")),
    )
    # what an earlier environment of the same name left: its links (one where this one links too),
    # and a file of the user's
    data = tmp_path / "team-a.aenv-lab.data"
    (data / "beamtime").mkdir(parents=True)
    (data / "beamtime" / "embargoed").symlink_to(tmp_path / "gpfs" / "raw")
    (data / "raw").symlink_to(tmp_path / "gpfs" / "lysozyme")
    (data / "notes.txt").write_text("mine")
    job = build_job_request(make_environment(), make_flavor(), settings, mounts=mounts)
    script = build_batch_script(make_environment(), make_flavor(), TOKEN_ENV_NAME, settings)
    environment = {**job.environment, "PATH": f"{fake_bin}:/usr/bin:/bin", TOKEN_ENV_NAME: "t", "SLURM_JOB_ID": "7"}
    result = subprocess.run(["bash", "-c", script], env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert links_in(data) == {"raw": "raw", "refs/lysozyme": "lysozyme"}
    assert (data / "raw" / "frame.h5").read_text() == "raw"
    assert (data / "refs" / "lysozyme" / "frame.h5").read_text() == "lysozyme"
    assert (data / "notes.txt").read_text() == "mine"

    # the same name again, without datasets: nothing of the earlier ones is left to open
    job = build_job_request(make_environment(), make_flavor(), settings)
    settings_without = SlurmSettings(
        working_directory=str(tmp_path), jupyter_command='test -z "${AENV_DATA_DIR:-}" # $JUPYTER_PORT'
    )
    script = build_batch_script(make_environment(), make_flavor(), TOKEN_ENV_NAME, settings_without)
    environment = {**job.environment, "PATH": f"{fake_bin}:/usr/bin:/bin", TOKEN_ENV_NAME: "t", "SLURM_JOB_ID": "8"}
    result = subprocess.run(["bash", "-c", script], env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr  # and JupyterLab is told of no data directory
    assert links_in(data) == {} and (data / "notes.txt").read_text() == "mine"


def links_in(directory) -> dict[str, str]:
    """The symbolic links below `directory`: relative path -> the name of what each points to."""
    return {
        str(path.relative_to(directory)): os.readlink(path).rsplit("/", 1)[-1]
        for path in directory.rglob("*")
        if path.is_symlink()
    }


# ---------------------------------------------------------------- a job exactly as asked, or none


@pytest.mark.parametrize(
    "ignored, gpus_taken, reason",
    [
        (("gres",), None, "SubmissionIgnored"),  # Slurm says it ignored a field: the job goes
        (("time_limit",), None, "SubmissionIgnored"),
        ((), 0, "GpuRequestIgnored"),  # accepted silently, but the job asks for no GPU
        ((), 1, "GpuRequestIgnored"),  # ... or fewer than the flavor's
    ],
)
def test_a_gpu_job_slurm_took_otherwise_is_cancelled_and_fails(tmp_path, ignored, gpus_taken, reason):
    backend = per_user_backend([], tmp_path)
    backend.client.ignored, backend.client.gpus_taken = ignored, gpus_taken
    observation = asyncio.run(backend.ensure(Launch(make_environment(), make_flavor(gpu=2), "t")))
    assert (observation.state, observation.reason) == (State.FAILED, reason)
    assert backend.client.cancelled == ["101"] and "was cancelled" in observation.message
    assert all(name in observation.message for name in ignored)


def test_a_gpu_job_slurm_took_as_asked_runs(tmp_path):
    backend = per_user_backend([], tmp_path)
    observation = asyncio.run(backend.ensure(Launch(make_environment(), make_flavor(gpu=2), "t")))
    assert (observation.state, observation.reason) == (State.PENDING, "Submitted")
    assert backend.client.submitted[0][0].gpus == 2 and backend.client.cancelled == []


@pytest.mark.parametrize(
    "job, ignored, expected",
    [
        (SlurmJob("1", gpus_requested=2), (), None),
        (SlurmJob("1", gpus_requested=0), (), "GpuRequestIgnored"),
        (None, (), "GpuRequestIgnored"),  # Slurm shows no job: nothing proves the GPUs were asked for
        (SlurmJob("1", gpus_requested=2), ("qos",), "SubmissionIgnored"),
    ],
)
def test_submission_problem(job, ignored, expected):
    assert (build_submission_problem(job, make_flavor(gpu=2), ignored) or (None,))[0] == expected


def test_a_cpu_job_needs_no_gpu_check():
    assert build_submission_problem(SlurmJob("1"), make_flavor(), ()) is None
    assert build_submission_problem(None, make_flavor(), ()) is None


def test_ping_is_judged_by_what_it_says(tmp_path):
    from analysis_operator.backends.base import BackendUnavailable

    backend = per_user_backend([], tmp_path)
    asyncio.run(backend.ping())
    backend.client.responding = False
    with pytest.raises(BackendUnavailable, match="no slurmctld responded"):
        asyncio.run(backend.ping())


def test_a_submission_refused_for_an_unknown_user_says_so(tmp_path):
    """Slurm 25.05 refuses a token for a user it cannot resolve ("Invalid user ID", 2165)."""
    backend = per_user_backend([], tmp_path)

    async def refuse(request, script, user=""):
        raise SlurmRequestRefused([SlurmError(2165, "Batch job submission failed: Invalid user ID")])

    backend.client.submit = refuse
    observation = asyncio.run(backend.ensure(Launch(make_environment(), make_flavor(), "t")))
    assert (observation.state, observation.reason) == (State.FAILED, "UnknownUnixAccount")
    assert "'alice'" in observation.message and "Invalid user ID" in observation.message


def test_an_adopted_gpu_job_without_its_gpus_is_cancelled(tmp_path):
    """A job found again (e.g. the submit answer was lost) is checked as a fresh one is."""
    queue = [queued(5, "PENDING", **MINE, gpus_requested=0)]
    backend = per_user_backend(queue, tmp_path)
    observation = asyncio.run(backend.ensure(Launch(make_environment(), make_flavor(gpu=1), "t")))
    assert (observation.state, observation.reason) == (State.FAILED, "GpuRequestIgnored")
    assert backend.client.cancelled == ["5"] and backend.client.submitted == []
    queue = [queued(5, "PENDING", **MINE, gpus_requested=1)]
    backend = per_user_backend(queue, tmp_path)
    assert asyncio.run(backend.ensure(Launch(make_environment(), make_flavor(gpu=1), "t"))).state == State.PENDING


def run_batch_script(tmp_path, command: str, **popen: object) -> subprocess.Popen:
    """The real script with bash, its job environment and TMPDIR under tmp_path; `command` (it
    places itself: $JUPYTER_PORT) stands in for JupyterLab."""
    settings = SlurmSettings(working_directory=str(tmp_path), jupyter_command=command)
    environment = make_environment()
    job = build_job_request(environment, make_flavor(), settings)
    script = build_batch_script(environment, make_flavor(), TOKEN_ENV_NAME, settings)
    variables = {**job.environment, TOKEN_ENV_NAME: "t0ken", "TMPDIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    return subprocess.Popen(["bash", "-c", script], env=variables, text=True, **popen)


def aenv_dirs(tmp_path) -> list[str]:
    return sorted(path.name for path in tmp_path.glob("aenv-jupyter.*"))


def test_the_batch_script_writes_and_turns_on_the_operators_jupyter_extension(tmp_path):
    """OPEN: the job's JupyterLab loads aenv_viewers (closes an unshared viewer's websockets), whatever
    the site's command line: the module and a jupyter_server config file in a private directory,
    which goes when the server ends (a node runs many jobs: none leaves its directory behind)."""

    from analysis_operator import jupyter

    source = jupyter.extension_source()
    script = build_batch_script(make_environment(), make_flavor(), TOKEN_ENV_NAME, SETTINGS)
    assert "AENV_EXTENSION_END" not in source  # the heredoc's end cannot come early
    assert f"<<'AENV_EXTENSION_END'\n{source}AENV_EXTENSION_END\n" in script  # quoted: written as it is
    # the stand-in server copies what it finds where jupyter_server looks, then ends ($JUPYTER_PORT in
    # a comment: the command is taken as it is, and a comment at its end is harmless)
    seen = tmp_path / "seen"
    command = (
        f'sh -c \'cp "${{PYTHONPATH%%:*}}/aenv_viewers.py" {seen}.py; '
        f'cp "${{JUPYTER_CONFIG_PATH%%:*}}/{jupyter.CONFIG_FILE}" {seen}.json; exit 3\' # $JUPYTER_PORT'
    )
    process = run_batch_script(tmp_path, command, stderr=subprocess.PIPE)
    assert process.wait(timeout=10) == 3, process.stderr.read()  # the server's status is the job's
    assert (tmp_path / "seen.py").read_text() == source
    written = json.loads((tmp_path / "seen.json").read_text())
    assert written == {"ServerApp": {"jpserver_extensions": {"aenv_viewers": True}}}
    assert aenv_dirs(tmp_path) == []


@pytest.mark.parametrize("whole_job", [True, False], ids=["slurm-signals-the-job", "script-only"])
def test_a_cancelled_batch_job_stops_its_server_and_removes_its_directory(tmp_path, whole_job):
    """scancel and the time limit send SIGTERM to every process of the job; a signal to the script
    alone reaches the server too. Either way the server ends first, then the directory goes.
    With the whole job signalled, bash sometimes reaped the server while the trap interrupted `wait`
    and then answered -1 for its status: the job ended with 255 (about one run in six under load;
    CI 2026-12-03), now 0 (the script says why). The stand-in ignores a second SIGTERM, as a server does."""
    started, ended = tmp_path / "started", tmp_path / "ended"
    server = (
        "import pathlib, signal, sys, time\n"
        "def stop(*_):\n"
        "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"    pathlib.Path({str(ended)!r}).write_text('term\\n')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        f"pathlib.Path({str(started)!r}).touch()\n"
        "while True:\n"
        "    time.sleep(0.1)\n"
    )
    (tmp_path / "server.py").write_text(server)
    command = f"python3 {tmp_path / 'server.py'} # $JUPYTER_PORT"
    process = run_batch_script(tmp_path, command, start_new_session=True)
    deadline = time.monotonic() + 10
    while not started.exists() and time.monotonic() < deadline:  # the stand-in runs, its trap set
        time.sleep(0.05)
    assert started.exists() and len(aenv_dirs(tmp_path)) == 1
    if whole_job:
        os.killpg(process.pid, signal.SIGTERM)
    else:
        process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0
    assert ended.read_text() == "term\n"
    assert aenv_dirs(tmp_path) == []


# ---------------------------------------------------------------- a job's HOME is its owner's alone


@pytest.mark.parametrize(
    "settings, problem",
    [
        (PER_USER, None),
        (SlurmSettings(jwt_key_file="/etc/slurm/jwt.key"), None),  # the default has {user}
        (dataclasses.replace(PER_USER, working_directory="/tmp"), "has no {user}"),
        (dataclasses.replace(PER_USER, working_directory="/scratch/shared/aenv"), "has no {user}"),
        (dataclasses.replace(PER_USER, working_directory="scratch/{user}"), "not an absolute path"),
        (SETTINGS, None),  # single-token mode: every job is the one account's
        (SlurmSettings(), None),
        (SlurmSettings(working_directory="/tmp"), None),  # submitted; the batch script refuses it
    ],
)
def test_per_user_jobs_need_a_working_directory_of_their_own(settings, problem):
    found = settings.working_directory_problem()
    assert (found is None) if problem is None else (problem in found and "slurm.working_directory" in found)


@pytest.mark.parametrize(
    "settings, user, home",
    [
        # Per user: each user's own (which must exist on the nodes).
        (SlurmSettings(jwt_key_file="/etc/slurm/jwt.key"), "alice", "/home/alice/analysis-environments"),
        # Single token: every job is `user`'s, whose /home/slurm/... nodes seldom have; /tmp they all
        # do, but it is everyone's: the account's own directory below it.
        (SlurmSettings(), "", "/tmp/analysis-environments-slurm"),
        (SlurmSettings(working_directory="/scratch/{user}/aenv"), "", "/scratch/slurm/aenv"),
    ],
    ids=["per-user", "single-token", "single-token-set"],
)
def test_the_default_working_directory_is_the_modes_own(settings, user, home):
    job = build_job_request(make_environment(), make_flavor(), settings, user=user)
    assert job.working_directory == job.environment["HOME"] == home
    assert job.standard_output.startswith(home + "/") and job.environment["AENV_DATA_DIR"].startswith(home + "/")


def test_the_default_per_user_directory_still_names_the_jobs_owner():
    """A job whose comment lost its signature is still the environment's by its output path, which
    only the operator chose, below its owner's own directory (the default has {user})."""
    settings = SlurmSettings(jwt_key_file="/etc/slurm/jwt.key")
    output = build_output_path(make_environment(), settings, "alice", "ab12", KEY)
    job = slurm_job(user_name="alice", comment="", standard_output=output)
    assert job_identity(job, settings, KEY) == {"namespace": "team-a", "name": "lab", "uid": UID, "user": "alice"}


def test_a_working_directory_shared_by_users_submits_nothing_and_says_which_setting(tmp_path):
    backend = per_user_backend([], tmp_path)
    backend.settings = dataclasses.replace(backend.settings, working_directory="/tmp")
    with pytest.raises(BackendUnavailable, match=r"slurm\.working_directory '/tmp' has no \{user\}"):
        asyncio.run(backend.ensure(Launch(make_environment(), make_flavor(), "t")))
    with pytest.raises(BackendUnavailable, match=r"slurm\.working_directory"):
        asyncio.run(backend.ping())
    assert backend.client.submitted == []


NOBODY = 65534  # a uid neither root's nor the job's (the tests run as root: they give files away)
STORAGE_ADMIN = 4242  # another account, one the facility's storage is run by


def make_home(tmp_path, layout: str) -> str:
    """A job's HOME (tmp_path/above/parent/alice) laid out as `layout` says."""
    above = tmp_path / "above"
    above.mkdir(mode=0o755)
    parent = above / "parent"
    parent.mkdir(mode=0o755)
    home = parent / "alice"
    if layout == "link to a private directory":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        home.symlink_to(tmp_path / "elsewhere")
    elif layout != "missing":
        home.mkdir(mode=0o700)
    changes = {
        "world-writable": (home, 0o777, None),
        "group-writable": (home, 0o770, None),
        "someone else's": (home, 0o700, NOBODY),
        "parent world-writable": (parent, 0o777, None),
        "grandparent world-writable": (above, 0o777, None),
        "parent world-writable, sticky": (parent, 0o1777, None),
        "parent nobody's (root-squashed NFS)": (parent, 0o755, NOBODY),
        "parent a storage administrator's": (parent, 0o755, STORAGE_ADMIN),
        "parent a project's (setgid, group-writable)": (parent, 0o2775, STORAGE_ADMIN),
    }
    if layout in changes:
        path, mode, owner = changes[layout]
        if owner is not None:
            os.chown(path, owner, -1)
        os.chmod(path, mode)  # after chown, which clears setgid
    return str(home)


def finish_batch_script(tmp_path, settings: SlurmSettings) -> tuple[subprocess.CompletedProcess, bool]:
    """The real script with bash, in the job's environment, JupyterLab replaced by a `touch`: how it
    ended, and whether it started JupyterLab."""
    started = tmp_path / "started"
    started.unlink(missing_ok=True)
    settings = dataclasses.replace(settings, jupyter_command=f"touch {started} # $JUPYTER_PORT")
    job = build_job_request(make_environment(), make_flavor(), settings)
    script = build_batch_script(make_environment(), make_flavor(), TOKEN_ENV_NAME, settings)
    variables = {**job.environment, TOKEN_ENV_NAME: "t0ken", "TMPDIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(["bash", "-c", script], env=variables, capture_output=True, text=True, timeout=30)
    return result, started.exists()


@pytest.mark.parametrize(
    "layout, starts",
    [
        ("private", True),
        ("parent world-writable, sticky", True),  # as /tmp: no one else can move it away
        # Parents the facility chose the writers of: whoever can write there could move HOME away
        # after the check (README: node requirements).
        ("parent nobody's (root-squashed NFS)", True),
        ("parent a storage administrator's", True),
        ("parent a project's (setgid, group-writable)", True),
        ("world-writable", False),
        ("group-writable", False),
        ("someone else's", False),
        ("link to a private directory", False),  # its owner could point it elsewhere later
        ("missing", False),  # Slurm fails the job before, opening its output there
        ("parent world-writable", False),  # anyone could move it away and put theirs there
        ("grandparent world-writable", False),  # anyone could move the parent away
    ],
)
def test_the_batch_script_starts_jupyterlab_only_in_a_home_of_the_jobs_own(tmp_path, layout, starts):
    """Per user: Python and JupyterLab run what a HOME holds (usercustomize.py, Jupyter and IPython
    startup files), so a HOME someone else can write to, or put in place, starts nothing; the script
    ends with its own status (the environment's reason), saying why."""
    home = make_home(tmp_path, layout)
    result, started = finish_batch_script(tmp_path, dataclasses.replace(PER_USER, working_directory=home))
    if starts:
        assert result.returncode == 0 and started, result.stderr
        assert os.stat(home).st_uid == os.geteuid() and os.stat(home).st_mode & 0o077 == 0
    else:
        assert result.returncode == slurm.HOME_NOT_PRIVATE_EXIT and not started, result.stderr
        assert f"refusing to start JupyterLab: the working directory {home} (HOME) must be" in result.stderr


def test_a_single_token_job_starts_in_its_accounts_own_directory_not_in_one_everyone_shares(tmp_path):
    """Single token: in /tmp anyone on the node could plant startup files (.ipython/profile_default/
    startup, .jupyter, user site-packages) that would run in every later environment as the one
    account all jobs share, beside each one's token and data: the script refuses it (its own status,
    the environment's reason), as per user. The account's own directory below it, the default, starts;
    the same directory made first by someone else is refused, their code not run."""
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)  # root's, as /tmp
    for settings in (SlurmSettings(), PER_USER):
        result, started = finish_batch_script(tmp_path, dataclasses.replace(settings, working_directory=str(shared)))
        assert result.returncode == slurm.HOME_NOT_PRIVATE_EXIT and not started, result.stderr
    default = SlurmSettings().job_working_directory
    assert default == "/tmp/analysis-environments-{user}"
    own = shared / "analysis-environments-slurm"
    own.mkdir(mode=0o755)  # as Slurm makes it, as the job's account, on first use
    settings = SlurmSettings(working_directory=str(shared) + default.removeprefix("/tmp"))
    result, started = finish_batch_script(tmp_path, settings)
    assert result.returncode == 0 and started, result.stderr
    os.chown(own, NOBODY, -1)  # someone else's, made before the account's first job
    result, started = finish_batch_script(tmp_path, settings)
    assert result.returncode == slurm.HOME_NOT_PRIVATE_EXIT and not started, result.stderr


def test_a_job_that_refused_its_home_says_whose_and_where():
    job = slurm_job(
        state="FAILED",
        user_name="alice",
        standard_output="/tmp/aenv-alice/team-a.aenv-lab.x.%j.out",
        exit_status=slurm.HOME_NOT_PRIVATE_EXIT,
    )
    observation = build_observation(job, False)
    assert observation.reason == "WorkingDirectoryNotPrivate"
    assert "did not start JupyterLab: /tmp/aenv-alice (its HOME) is not alice's alone" in observation.message
