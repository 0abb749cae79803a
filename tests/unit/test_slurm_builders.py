"""The Slurm backend's pure parts: submission, batch script, state mapping."""
from __future__ import annotations

import asyncio
import datetime
import shlex
import subprocess

import pytest

from analysis_operator.backends.base import Launch
from analysis_operator.backends.base import State
from analysis_operator.backends.slurm import (
    TOKEN_ENV_NAME, SlurmBackend, allocated_gpus, build_batch_script, build_identity_comment,
    build_job_submission, build_jupyter_command, build_observation, build_time_limit_minutes,
    choose_job, parse_endpoint, parse_identity)
from analysis_operator.model.domain import BackendKind, Environment, Flavor, Resources, SlurmSpec
from analysis_operator.settings import SlurmSettings

HOURS = datetime.timedelta(hours=1)
SETTINGS = SlurmSettings(working_directory="/scratch/aenv", jupyter_command="jupyter lab")


def make_environment(**overrides) -> Environment:
    values = dict(namespace="team-a", name="lab", uid="0b1c-uid", owner="alice", flavor="cluster")
    values.update(overrides)
    return Environment(**values)


def make_flavor(cpu="2", memory="8Gi", gpu=0, max_lifetime=8 * HOURS, **slurm) -> Flavor:
    return Flavor(name="cluster", backend=BackendKind.SLURM, max_lifetime=max_lifetime,
                  resources=Resources(cpu=cpu, memory=memory, gpu=gpu), slurm=SlurmSpec(**slurm))


@pytest.mark.parametrize("flavor_limit, lifetime, max_lifetime, remaining, expected", [
    (None, None, 8 * HOURS, None, 480),
    (60, None, 8 * HOURS, None, 60),
    (None, 2 * HOURS, 8 * HOURS, None, 120),
    (None, 12 * HOURS, 8 * HOURS, None, 480),          # the flavor caps what is asked
    (600, None, 8 * HOURS, datetime.timedelta(minutes=90, seconds=1), 91),  # rounds up
    (None, None, 8 * HOURS, datetime.timedelta(seconds=5), 1),  # never 0: 0 means no limit
])
def test_time_limit_is_the_shortest_limit(flavor_limit, lifetime, max_lifetime, remaining, expected):
    environment = make_environment(lifetime=lifetime)
    flavor = make_flavor(max_lifetime=max_lifetime, time_limit_minutes=flavor_limit)
    assert build_time_limit_minutes(environment, flavor, remaining) == expected


@pytest.mark.parametrize("flavor, expected", [
    (make_flavor(cpu="2", memory="8Gi"), {"cpus_per_task": 2, "memory_per_node": 8192}),
    (make_flavor(cpu="500m", memory="512Mi"), {"cpus_per_task": 1, "memory_per_node": 512}),
    (make_flavor(cpu="2.5", memory="16Gi", gpu=2), {"cpus_per_task": 3, "gres": "gpu:2"}),
    (make_flavor(partition="gpu", account="p-123", qos="short"),
     {"partition": "gpu", "account": "p-123", "qos": "short"}),
])
def test_submission_carries_the_flavor(flavor, expected):
    job = build_job_submission(make_environment(), flavor, SETTINGS)
    assert {key: job.get(key) for key in expected} == expected


@pytest.mark.parametrize("absent", ["gres", "partition", "account", "qos"])
def test_submission_omits_what_the_flavor_leaves_empty(absent):
    assert absent not in build_job_submission(make_environment(), make_flavor(), SETTINGS)


def test_submission_carries_identity_and_no_token():
    environment = make_environment()
    job = build_job_submission(environment, make_flavor(), SETTINGS)
    assert job["name"] == "aenv-lab.team-a"
    assert parse_identity(job["comment"]) == {"namespace": "team-a", "name": "lab", "uid": "0b1c-uid"}
    assert job["environment"]["AENV_IDENTITY"] == job["comment"]
    assert TOKEN_ENV_NAME not in job["environment"]
    assert job["current_working_directory"] == "/scratch/aenv"
    assert job["standard_output"].startswith("/scratch/aenv/team-a.aenv-lab.")


@pytest.mark.parametrize("comment, identity, endpoint", [
    (build_identity_comment(make_environment()), {"namespace": "team-a", "name": "lab", "uid": "0b1c-uid"}, ""),
    (build_identity_comment(make_environment()) + " endpoint=node7.cluster:40123",
     {"namespace": "team-a", "name": "lab", "uid": "0b1c-uid"}, "node7.cluster:40123"),
    ("someone else's job", None, ""),
    ("", None, ""),
    ("endpoint=evil host:1", None, ""),
])
def test_comment_parsing(comment, identity, endpoint):
    assert parse_identity(comment) == identity
    assert parse_endpoint(comment) == endpoint


@pytest.mark.parametrize("command, expected_suffix", [
    ("jupyter lab", ' --no-browser --ip="$JUPYTER_HOST" --port="$JUPYTER_PORT"'),
    ('python3 -m http.server --bind "$JUPYTER_HOST" "$JUPYTER_PORT"', '"$JUPYTER_PORT"'),
])
def test_jupyter_command_places_itself(command, expected_suffix):
    assert build_jupyter_command(SlurmSettings(jupyter_command=command)).endswith(expected_suffix)


HOSTILE = ["$(touch /tmp/pwned)", "a'b", "x; rm -rf /", "`id`", "two words", "new\nline"]


@pytest.mark.parametrize("module", HOSTILE)
def test_module_names_stay_one_argument(module):
    script = build_batch_script(make_environment(), make_flavor(modules=(module,)), TOKEN_ENV_NAME, SETTINGS)
    line = script[script.index("module load "):]
    # shlex parses like the shell: the whole hostile name must come back as one word.
    assert shlex.split(line, comments=True)[:3] == ["module", "load", module]


@pytest.mark.parametrize("modules", [(), ("python/3.11", "cuda/12")])
def test_batch_script_is_valid_bash_without_user_text(modules):
    environment = make_environment(name="name-only-in-env", namespace="ns-only-in-env")
    script = build_batch_script(environment, make_flavor(modules=modules), TOKEN_ENV_NAME, SETTINGS)
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert "name-only-in-env" not in script and "ns-only-in-env" not in script
    assert script.startswith("#!/bin/bash\n")
    assert "exec jupyter lab --no-browser" in script


@pytest.mark.parametrize("name", ["", "1TOKEN", "A-B", "X;Y", "$(id)"])
def test_token_variable_must_be_a_shell_name(name):
    with pytest.raises(ValueError):
        build_batch_script(make_environment(), make_flavor(), name, SETTINGS)


@pytest.mark.parametrize("details, expected", [
    ([], 0), (["gpu:2(IDX:0-1)"], 2), (["gpu:a100:3(IDX:0-2)"], 3), (["gpu:1(IDX:0)", "gpu:1(IDX:3)"], 2),
    (["mps:100"], 0), (None, 0),
])
def test_allocated_gpus(details, expected):
    assert allocated_gpus({"gres_detail": details}) == expected


RUNNING_WITH_ENDPOINT = {"job_id": 7, "job_state": "RUNNING", "state_reason": "None", "nodes": "n1",
                         "cpus": 4, "gres_detail": ["gpu:1(IDX:0)"],
                         "comment": build_identity_comment(make_environment()) + " endpoint=n1:4000"}


@pytest.mark.parametrize("job, answers, state, reason", [
    ({"job_id": 7, "job_state": "PENDING", "state_reason": "Resources"}, False, State.PENDING, "Resources"),
    ({"job_id": 7, "job_state": "PENDING", "state_reason": "None"}, False, State.PENDING, "Queued"),
    ({"job_id": 7, "job_state": "RUNNING", "comment": "x"}, False, State.PROVISIONING, "JupyterStarting"),
    (RUNNING_WITH_ENDPOINT, False, State.PROVISIONING, "JupyterStarting"),
    (RUNNING_WITH_ENDPOINT, True, State.READY, "JupyterAnswering"),
    ({"job_id": 7, "job_state": "CONFIGURING"}, False, State.PROVISIONING, "JupyterStarting"),
    ({"job_id": 7, "job_state": "TIMEOUT", "state_reason": "TimeLimit"}, False, State.EXPIRED, "TimeLimit"),
    ({"job_id": 7, "job_state": "FAILED", "state_reason": "NonZeroExitCode"}, False, State.FAILED, "JobFailed"),
    ({"job_id": 7, "job_state": "CANCELLED"}, False, State.FAILED, "JobCancelled"),
    ({"job_id": 7, "job_state": "NODE_FAIL"}, False, State.FAILED, "JobNodeFail"),
    ({"job_id": 7, "job_state": "OUT_OF_MEMORY"}, False, State.FAILED, "JobOutOfMemory"),
    ({"job_id": 7, "job_state": "COMPLETED"}, False, State.FAILED, "JobCompleted"),
])
def test_observation_maps_slurm_states(job, answers, state, reason):
    observation = build_observation(job, answers)
    assert (observation.state, observation.reason) == (state, reason)
    assert observation.reference["id"] == "7"


def test_ready_observation_holds_url_and_resources():
    observation = build_observation(RUNNING_WITH_ENDPOINT, True)
    assert (observation.url, observation.cpus, observation.gpus) == ("http://n1:4000/", 4.0, 1)


def test_pending_observation_says_slurms_reason():
    observation = build_observation({"job_id": 9, "job_state": "PENDING", "state_reason": "Priority"}, False)
    assert "Priority" in observation.message and observation.cpus == 0


@pytest.mark.parametrize("states, include_cancelled, expected_id", [
    ([], True, None),
    ([("CANCELLED", 1), ("RUNNING", 2)], True, 2),
    ([("RUNNING", 3), ("PENDING", 5)], True, 5),
    ([("RUNNING", 3), ("COMPLETED", 9)], True, 3),       # active beats newer ended
    ([("CANCELLED", 4)], False, None),                   # a suspend's cancel is not adopted
    ([("CANCELLED", 4), ("TIMEOUT", 2)], False, 2),
    ([("CANCELLED", 4), ("TIMEOUT", 2)], True, 4),
])
def test_choose_job(states, include_cancelled, expected_id):
    jobs = [{"job_id": job_id, "job_state": state} for state, job_id in states]
    chosen = choose_job(jobs, include_cancelled)
    assert (chosen or {}).get("job_id") == expected_id


class RecordingClient:
    """Stands in for slurmrestd: records submissions, serves a fixed queue."""

    def __init__(self, jobs):
        self.queue = jobs
        self.submitted = []

    async def jobs(self):
        return self.queue

    async def submit(self, job, script):
        self.submitted.append((job, script))
        return "101"


@pytest.mark.parametrize("queue, expect_submission", [
    ([], True),
    ([{"job_id": 5, "job_state": "CANCELLED", "comment": build_identity_comment(make_environment())}], True),
    ([{"job_id": 5, "job_state": "PENDING", "comment": build_identity_comment(make_environment())}], False),
    ([{"job_id": 5, "job_state": "TIMEOUT", "comment": build_identity_comment(make_environment())}], False),
    ([{"job_id": 5, "job_state": "PENDING", "comment": build_identity_comment(make_environment(uid="other"))}],
     True),
])
def test_ensure_adopts_or_submits_once(queue, expect_submission):
    backend = SlurmBackend(SETTINGS)
    backend.client = RecordingClient(queue)
    observation = asyncio.run(backend.ensure(Launch(make_environment(), make_flavor(), "s3cret-token")))
    assert bool(backend.client.submitted) == expect_submission
    if expect_submission:
        job, script = backend.client.submitted[0]
        assert job["environment"][TOKEN_ENV_NAME] == "s3cret-token"
        assert "s3cret-token" not in script and "s3cret-token" not in job["comment"]
        assert observation.reference == {"id": "101"}
    else:
        assert observation.reference["id"] == "5"


# ---------------------------------------------------------------- datasets

def dataset_mount(name: str, path: str, cluster_path: str):
    from analysis_operator.model.domain import Dataset, DatasetStorage, Mount
    return Mount(Dataset(name=name, pid=f"10.5072/{name}", storage=DatasetStorage(path=cluster_path)), path, "public")


def test_submission_without_datasets_has_no_dataset_variables():
    job = build_job_submission(make_environment(), make_flavor(), SETTINGS)
    assert not [name for name in job["environment"] if name.startswith(("AENV_DATA", "AENV_DATASET"))]


def test_submission_carries_exactly_the_granted_datasets():
    mounts = (dataset_mount("raw", "/data/raw", "/gpfs/p11/raw"),
              dataset_mount("ref", "/data/refs/lysozyme", "/gpfs/public/lysozyme"))
    job = build_job_submission(make_environment(), make_flavor(), SETTINGS, mounts=mounts)
    variables = {name: value for name, value in job["environment"].items() if name.startswith("AENV_DATA")}
    assert variables == {
        "AENV_DATA_DIR": "/scratch/aenv/team-a.aenv-lab.data", "AENV_DATASET_COUNT": "2",
        "AENV_DATASET_0_PATH": "/gpfs/p11/raw", "AENV_DATASET_0_LINK": "raw", "AENV_DATASET_0_PID": "10.5072/raw",
        "AENV_DATASET_1_PATH": "/gpfs/public/lysozyme", "AENV_DATASET_1_LINK": "refs/lysozyme",
        "AENV_DATASET_1_PID": "10.5072/ref"}


def test_batch_script_links_the_granted_datasets_into_the_data_directory(tmp_path):
    """Run the real script with bash: stand-ins for scontrol and JupyterLab, real links."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "scontrol").chmod(0o755)
    settings = SlurmSettings(working_directory=str(tmp_path),
                             jupyter_command='test -n "$JUPYTER_PORT" -a -d "$AENV_DATA_DIR"')
    for name in ("raw", "lysozyme"):
        (tmp_path / "gpfs" / name).mkdir(parents=True)
        (tmp_path / "gpfs" / name / "frame.h5").write_text(name)
    mounts = (dataset_mount("raw", "/data/raw", str(tmp_path / "gpfs/raw")),
              dataset_mount("ref", "/data/refs/lysozyme", str(tmp_path / "gpfs/lysozyme")))
    job = build_job_submission(make_environment(), make_flavor(), settings, mounts=mounts)
    script = build_batch_script(make_environment(), make_flavor(), TOKEN_ENV_NAME, settings)
    environment = {**job["environment"], "PATH": f"{fake_bin}:/usr/bin:/bin", TOKEN_ENV_NAME: "t",
                   "SLURM_JOB_ID": "7"}
    result = subprocess.run(["bash", "-c", script], env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    data = tmp_path / "team-a.aenv-lab.data"
    assert sorted(str(path.relative_to(data)) for path in data.rglob("*") if path.is_symlink()) == [
        "raw", "refs/lysozyme"]
    assert (data / "raw" / "frame.h5").read_text() == "raw"
    assert (data / "refs" / "lysozyme" / "frame.h5").read_text() == "lysozyme"
