"""Jobs run as the scientist (issue 12, cases 6, 7 and 9), against the real daemons.

The local stack (hack/slurm.sh) has the Unix users alice, bob and carol, each with a private
working directory; the operator mints a JWT per user from the cluster's key.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import pathlib
import pwd
import subprocess
import time

import pytest

from analysis_operator.backends.base import Launch, State
from analysis_operator.backends.slurm import SlurmBackend, base_path
from analysis_operator.backends.slurm_api import SlurmJob
from analysis_operator.backends.slurm_auth import build_jupyter_port, build_working_directory, job_nonce
from analysis_operator.backends.slurm_rest import SlurmRequestRefused
from analysis_operator.model.identity import PosixIdentity
from tests.faults import lose_the_next_read
from tests.integration.slurm.conftest import slurm_commands_path
from tests.integration.slurm.test_slurm_backend import TOKEN, jobs_of, make_flavor, wait_for, wait_for_state

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("operator_leaves_slurm_alone")]

ALICE_TOKEN = "alice-token-0123456789abcdef"
COMMANDS = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}  # the stack's Slurm commands first (fixture slurm_env)
BOB_TOKEN = "bob-token-fedcba9876543210"


def run_as(user: str, *command: str) -> subprocess.CompletedProcess:
    """A command as a facility user, with the stack's Slurm configuration (srun, scontrol)."""
    environment = {
        "PATH": COMMANDS["PATH"],
        "SLURM_CONF": os.environ.get("SLURM_CONF", ""),
        "HOME": pwd.getpwnam(user).pw_dir,
    }
    return subprocess.run(
        ["/usr/sbin/runuser", "-u", user, "--", *command], capture_output=True, text=True, env=environment, timeout=60
    )


def in_job(user: str, job_id: str, *command: str) -> subprocess.CompletedProcess:
    """A command inside a running job, as bob would type it from his JupyterLab's terminal."""
    return run_as(user, "srun", f"--jobid={job_id}", "--overlap", "--ntasks=1", *command)


def server_pid(port: int) -> int:
    """The JupyterLab process started for that port (jupyter-lab ... --port=PORT): the real one."""
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            words = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"--port={port}".encode() in words and any(word.endswith(b"/jupyter-lab") for word in words):
            return int(proc.name)
    raise AssertionError(f"no JupyterLab process for port {port}")


def port_of(backend: SlurmBackend, environment, job: SlurmJob) -> int:
    return build_jupyter_port(environment, backend.settings, backend._key(), job_nonce(job))


def start(backend: SlurmBackend, environment, token: str):
    asyncio.run(backend.ensure(Launch(environment, make_flavor(partition="debug"), token)))
    return wait_for_state(backend, environment, {State.READY}, timeout=60)


@pytest.fixture
def slurm_env(slurm_environ):
    os.environ.setdefault("SLURM_CONF", slurm_environ["SLURM_CONF"])
    COMMANDS["PATH"] = slurm_commands_path(slurm_environ)
    return slurm_environ


def test_alices_job_runs_as_alice(backend, make_environment, slurm_env):
    environment = make_environment(owner="alice")
    ready = start(backend, environment, ALICE_TOKEN)

    job = asyncio.run(backend.client.job(ready.reference["id"]))
    alice = pwd.getpwnam("alice")
    assert (job.user_name, job.user_id) == ("alice", alice.pw_uid)
    pid = server_pid(port_of(backend, environment, job))
    assert os.stat(f"/proc/{pid}").st_uid == alice.pw_uid
    # the output file is in alice's own directory, hers alone
    output = pathlib.Path(job.standard_output.replace("%j", ready.reference["id"]))
    assert output.parent == pathlib.Path(build_working_directory(backend.settings, "alice"))
    assert output.stat().st_uid == alice.pw_uid and output.parent.stat().st_mode & 0o077 == 0
    assert ready.url == f"http://localhost:{port_of(backend, environment, job)}{base_path(environment)}"
    assert ready.upstream.port == port_of(backend, environment, job)
    # JupyterLab's own files in her working directory (HOME), hers alone
    runtime = pathlib.Path(build_working_directory(backend.settings, "alice"), ".local/share/jupyter/runtime")
    assert runtime.stat().st_uid == alice.pw_uid and runtime.stat().st_mode & 0o077 == 0


def test_bob_cannot_read_alices_token_output_or_data(backend, make_environment, slurm_env, tmp_path):
    from analysis_operator.model.domain import Dataset, DatasetStorage, Mount

    shared = tmp_path / "beamtime"
    shared.mkdir()
    os.chmod(tmp_path, 0o755)
    mount = Mount(
        Dataset(name="raw", pid="10.5072/raw", storage=DatasetStorage(path=str(shared))), "/data/raw", "member"
    )
    alice_env, bob_env = make_environment(owner="alice"), make_environment(owner="bob")
    asyncio.run(backend.ensure(Launch(alice_env, make_flavor(partition="debug"), ALICE_TOKEN, (mount,))))
    alice_ready = wait_for_state(backend, alice_env, {State.READY}, timeout=60)
    bob_ready = start(backend, bob_env, BOB_TOKEN)
    alice_job = asyncio.run(backend.client.job(alice_ready.reference["id"]))
    alice_pid = server_pid(port_of(backend, alice_env, alice_job))
    alice_dir = build_working_directory(backend.settings, "alice")
    alice_data = f"{alice_dir}/{alice_env.namespace}.{alice_env.child_name}.data"
    alice_output = alice_job.standard_output.replace("%j", alice_ready.reference["id"])
    assert pathlib.Path(alice_data, "raw").is_symlink()  # her job made her data directory

    # Control: alice herself, from inside her job, reads her token: the probe below can see it.
    own = in_job("alice", alice_ready.reference["id"], "cat", f"/proc/{alice_pid}/environ")
    assert own.returncode == 0 and f"JUPYTER_TOKEN={ALICE_TOKEN}" in own.stdout

    # Control: bob's own job runs his commands, as bob.
    bob_id = in_job("bob", bob_ready.reference["id"], "id", "-u")
    assert bob_id.returncode == 0 and bob_id.stdout.strip() == str(pwd.getpwnam("bob").pw_uid)

    for attempt in (
        ["cat", f"/proc/{alice_pid}/environ"],
        ["ls", alice_dir],
        ["ls", alice_data],
        ["cat", alice_output],
    ):
        seen = in_job("bob", bob_ready.reference["id"], *attempt)
        assert seen.returncode != 0 and "Permission denied" in seen.stderr, f"bob ran {attempt}: {seen}"
        assert ALICE_TOKEN not in seen.stdout + seen.stderr
    # and squeue shows nothing secret: the comment holds identity and signature, never a token
    listing = run_as("bob", "squeue", "-h", "-o", "%i %u %k")
    assert listing.returncode == 0 and alice_ready.reference["id"] in listing.stdout
    assert ALICE_TOKEN not in listing.stdout and str(alice_pid) not in listing.stdout


def test_a_comment_changed_inside_the_job_creates_no_duplicate(backend, make_environment, slurm_env, slurm_settings):
    environment = make_environment(owner="alice")
    ready = start(backend, environment, ALICE_TOKEN)
    job_id = ready.reference["id"]

    for change in ("Comment=x", "JobName=stolen"):
        changed = in_job("alice", job_id, "scontrol", "update", f"JobId={job_id}", change)
        assert changed.returncode == 0, changed.stderr
    assert asyncio.run(backend.client.job(job_id)).comment == "x"

    # the running operator keeps the job by its id
    assert asyncio.run(backend.observe(environment)).reference["id"] == job_id
    assert (
        asyncio.run(backend.ensure(Launch(environment, make_flavor(partition="debug"), ALICE_TOKEN))).reference["id"]
        == job_id
    )
    # a restarted one finds it by the output path Slurm froze when the job started
    restarted = SlurmBackend(slurm_settings)
    adopted = asyncio.run(restarted.ensure(Launch(environment, make_flavor(partition="debug"), ALICE_TOKEN)))
    assert adopted.reference["id"] == job_id and adopted.state == State.READY
    assert [
        item.backend_id
        for item in asyncio.run(SlurmBackend(slurm_settings).list_managed())
        if item.uid == environment.uid
    ] == [job_id]
    active = [
        job
        for job in asyncio.run(backend.client.jobs())
        if job.user_name == "alice" and job.state in ("PENDING", "RUNNING") and environment.uid in job.standard_output
    ]
    assert [job.job_id for job in active] == [job_id]


def test_a_forged_identity_is_not_the_operators(backend, make_environment, slurm_env, slurm_settings):
    """alice writes the identity of an environment that does not exist onto her own job: the orphan
    sweep must not take it for the operator's (it would cancel it), nor adopt it."""
    victim = make_environment(owner="alice")
    ready = start(backend, victim, ALICE_TOKEN)
    job_id = ready.reference["id"]
    ghost = make_environment(owner="alice")
    forged = f"analysis-operator/v1 namespace={ghost.namespace} name={ghost.name} uid={ghost.uid}"
    assert in_job("alice", job_id, "scontrol", "update", f"JobId={job_id}", f"Comment={forged}").returncode == 0

    fresh = SlurmBackend(slurm_settings)
    assert ghost.uid not in {item.uid for item in asyncio.run(fresh.list_managed())}
    assert asyncio.run(fresh.observe(ghost)).state == State.GONE


def test_another_users_job_whose_output_path_names_an_environment_is_not_taken_for_it(
    backend, make_environment, slurm_env, slurm_settings
):
    """bob submits a job of his own whose output path, under his own directory, names alice's environment:
    its namespace, name, uid, nonce and the operator's signature, all of which he can read in the queue.
    A restarted operator must neither cancel alice's job for it (the newest active job of an environment
    is the one kept) nor adopt it: before the output path was signed for the job's user, it did both."""
    environment = make_environment(owner="alice")
    job_id = start(backend, environment, ALICE_TOKEN).reference["id"]
    alices = asyncio.run(backend.client.job(job_id)).standard_output
    output = build_working_directory(slurm_settings, "bob") + "/" + alices.rsplit("/", 1)[1]
    submitted = run_as("bob", "sbatch", "--hold", "--parsable", f"--output={output}", "--wrap", "sleep 600")
    assert submitted.returncode == 0, submitted.stderr
    bobs = submitted.stdout.strip().split(";")[0]
    try:
        assert asyncio.run(backend.client.job(bobs)).standard_output == output  # what the operator reads
        restarted = SlurmBackend(slurm_settings)
        assert asyncio.run(restarted.observe(environment)).reference["id"] == job_id
        assert bobs not in {item.backend_id for item in asyncio.run(SlurmBackend(slurm_settings).list_managed())}
        launch = Launch(environment, make_flavor(partition="debug"), ALICE_TOKEN)
        assert asyncio.run(SlurmBackend(slurm_settings).ensure(launch)).reference["id"] == job_id
        states = {job.job_id: job.state for job in asyncio.run(backend.client.jobs())}
        assert (states[job_id], states[bobs]) == ("RUNNING", "PENDING")
    finally:
        asyncio.run(backend.client.cancel(bobs))


def test_an_approved_extension_raises_the_time_limit(backend, make_environment, slurm_env):
    environment = make_environment(owner="alice", lifetime=datetime.timedelta(minutes=1))
    submitted = asyncio.run(backend.ensure(Launch(environment, make_flavor(partition="debug"), TOKEN)))
    job_id = submitted.reference["id"]
    running = wait_for_state(backend, environment, {State.PROVISIONING, State.READY}, timeout=60)
    started = datetime.datetime.strptime(running.reference["startedAt"], "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=datetime.UTC
    )
    assert asyncio.run(backend.client.job(job_id)).time_limit == 1

    # alice cannot raise her own limit, through slurmrestd or scontrol
    with pytest.raises(SlurmRequestRefused):
        asyncio.run(backend.client.update_time_limit(job_id, 5, user="alice"))
    assert run_as("alice", "scontrol", "update", f"JobId={job_id}", "TimeLimit=5").returncode != 0

    assert asyncio.run(backend.extend(environment, started + datetime.timedelta(minutes=3))) is True
    assert asyncio.run(backend.client.job(job_id)).time_limit == 3
    assert asyncio.run(backend.extend(environment, started + datetime.timedelta(minutes=3))) is False

    # past the old limit (1 min, checked by slurmctld about every 30 s) it still runs
    wait_for(lambda: time.time() > started.timestamp() + 100, timeout=120, what="100 s after the start", interval=2)
    assert asyncio.run(backend.observe(environment)).state == State.READY
    assert len(jobs_of(backend, environment.uid)) == 1


def test_an_unknown_account_fails_clearly(backend, make_environment, slurm_env):
    environment = make_environment(owner="mallory-not-on-this-cluster")
    observation = asyncio.run(backend.ensure(Launch(environment, make_flavor(partition="debug"), TOKEN)))
    assert (observation.state, observation.reason) == (State.FAILED, "UnknownUnixAccount")
    assert "mallory-not-on-this-cluster" in observation.message
    if "id" not in observation.reference:
        return  # refused at submission (Slurm 25.05: "Invalid user ID"): nothing ran
    # accepted and run as nobody (Slurm 22.05): cancelled at once
    wait_for(
        lambda: asyncio.run(backend.client.job(observation.reference["id"])).state == "CANCELLED",
        timeout=30,
        what="the job run as nobody cancelled",
    )


def test_a_job_whose_read_back_was_lost_is_still_checked_for_its_account(backend, make_environment, slurm_env):
    """The read after the submit is lost (slurmrestd restarted, say; injected around the real client)
    and the cluster's alice has another uid than the directory's: the first read that succeeds makes
    the check the submit could not, cancels the job and fails the environment; nothing is resubmitted."""
    alice = pwd.getpwnam("alice")
    directory = PosixIdentity("alice", alice.pw_uid + 1000, alice.pw_gid)
    environment = make_environment(owner="alice")
    lose_the_next_read(backend.client)
    launch = Launch(environment, make_flavor(partition="debug"), ALICE_TOKEN, identity=directory)
    submitted = asyncio.run(backend.ensure(launch))
    assert submitted.state == State.PENDING, submitted  # not checked yet
    job_id = submitted.reference["id"]
    assert asyncio.run(backend.client.job(job_id)).user_id == alice.pw_uid  # the job runs with the cluster's uid

    observation = asyncio.run(backend.observe(environment))
    assert (observation.state, observation.reason) == (State.FAILED, "UnixAccountMismatch"), observation
    assert f"directory says {directory.uid}" in observation.message
    assert observation.message.endswith(f"; Slurm job {job_id} was cancelled")
    wait_for(
        lambda: asyncio.run(backend.client.job(job_id)).state == "CANCELLED",
        timeout=30,
        what="the job run with another uid cancelled",
    )
    # never taken for gone (which would submit another job and lose this one)
    assert asyncio.run(backend.observe(environment)).reason == "UnixAccountMismatch"
    assert [job.job_id for job in jobs_of(backend, environment.uid)] == [job_id]
