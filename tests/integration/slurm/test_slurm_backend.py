"""SlurmBackend against real slurmctld, slurmd and slurmrestd."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import http.cookiejar
import ipaddress
import json
import os
import pathlib
import pwd
import re
import shutil
import signal
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator

import pytest

from analysis_operator.backends.base import BackendUnavailable, Launch, Observation, State, Upstream
from analysis_operator.backends.slurm import ACTIVE_STATES, SlurmBackend, base_path
from analysis_operator.backends.slurm_api import SlurmJob
from analysis_operator.backends.slurm_auth import parse_identity
from analysis_operator.model.domain import BackendKind, Environment, Flavor, Resources, SlurmSpec
from tests.integration.sockets import own_connections

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("operator_leaves_slurm_alone")]

TOKEN = "test-token-not-for-logs"


def make_flavor(**slurm) -> Flavor:
    resources = slurm.pop("resources", Resources(cpu="1", memory="1Gi"))
    return Flavor(name="cluster-test", backend=BackendKind.SLURM, resources=resources, slurm=SlurmSpec(**slurm))


def wait_for(probe: Callable[[], object], timeout: float, what: str, interval: float = 0.5):
    """Call probe until it returns something truthy; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last seen: {last!r}")


def wait_for_state(backend: SlurmBackend, environment: Environment, states, timeout: float) -> Observation:
    last: list[Observation] = []

    def probe():
        observation = asyncio.run(backend.observe(environment))
        last[:] = [observation]
        return observation if observation.state in states else None

    try:
        return wait_for(probe, timeout, f"{environment.name} in {[state.value for state in states]}")
    except AssertionError as error:
        raise AssertionError(f"{error}; last observation {last}") from None


def jobs_of(backend: SlurmBackend, uid: str) -> list[SlurmJob]:
    return [job for job in asyncio.run(backend.client.jobs()) if (parse_identity(job.comment) or {}).get("uid") == uid]


# The job's JupyterLab speaks TLS where the operator gave it a certificate (status.backend.serverName):
# these helpers only ask whether and what it answers, so they take any certificate (test_open_slurm.py
# checks that the gateway accepts only the job's own).
ANY_CERTIFICATE = ssl._create_unverified_context()


def http_status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=5, context=ANY_CERTIFICATE) as response:
        return response.status


def answers(url: str) -> bool:
    """Does anything answer HTTP there (any status)?"""
    try:
        http_status(url)
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def jupyter_url(upstream: Upstream, environment: Environment, path: str = "") -> str:
    """A URL of the environment's JupyterLab on its compute node: address, port, base path."""
    scheme = "https" if upstream.server_name else "http"
    return f"{scheme}://{upstream.address}:{upstream.port}{base_path(environment)}{path}"


def jupyter_status(upstream: Upstream, environment: Environment, token: str = "") -> tuple[int, dict]:
    """(HTTP status, JSON body) of GET <base>/api/status on the node, with the token if given."""
    headers = {"Authorization": f"token {token}"} if token else {}
    request = urllib.request.Request(jupyter_url(upstream, environment, "api/status"), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5, context=ANY_CERTIFICATE) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, {}


def upstream_of(backend: SlurmBackend, body: dict) -> tuple[Environment, Upstream]:
    """The environment of an AnalysisEnvironment object and where its JupyterLab is, as the backend sees it."""
    environment = Environment.from_body(body)
    observation = asyncio.run(backend.observe(environment))
    assert observation.upstream is not None, observation
    return environment, observation.upstream


def test_submit_runs_and_becomes_ready_with_a_url_that_answers(backend, make_environment):
    environment = make_environment()
    submitted = asyncio.run(backend.ensure(Launch(environment, make_flavor(partition="debug"), TOKEN)))
    assert submitted.state == State.PENDING and submitted.reference["id"]

    ready = wait_for_state(backend, environment, {State.READY}, timeout=60)

    assert ready.reference["id"] == submitted.reference["id"]
    assert ready.reference["node"] == "localhost"
    # the URL: Slurm's node name, the port, the base path; never the token
    assert ready.url == f"http://localhost:{ready.upstream.port}{base_path(environment)}" and TOKEN not in ready.url
    # the upstream: the node's own address as Slurm has it (NodeAddr), an IP address, not loopback
    node = asyncio.run(backend.client.node("localhost"))
    assert ready.upstream.address == node.address and ready.reference["addresses"] == [node.address]
    assert not ipaddress.ip_address(ready.upstream.address).is_loopback
    assert http_status(jupyter_url(ready.upstream, environment)) == 200  # the login page, after a redirect
    assert ready.cpus == 1.0 and ready.gpus == 0


def test_jupyterlab_answers_at_the_nodes_address_under_the_base_url_only_with_the_token(backend, make_environment):
    """The real JupyterLab, as a gateway reaches it: <node address>:<port><base path>, the token in the
    Authorization header (as the gateway passes the browser's request on); nothing without it."""
    environment = make_environment()
    asyncio.run(backend.ensure(Launch(environment, make_flavor(partition="debug"), TOKEN)))
    upstream = wait_for_state(backend, environment, {State.READY}, timeout=60).upstream

    status, body = jupyter_status(upstream, environment, TOKEN)
    assert status == 200 and body["last_activity"] and "started" in body
    assert jupyter_status(upstream, environment)[0] in (401, 403)
    assert jupyter_status(upstream, environment, "not-the-token-0123456789")[0] in (401, 403)
    # through a proxy: another Host, forwarded headers; the token still required, the XSRF check still on
    proxied = urllib.request.Request(
        jupyter_url(upstream, environment, "api/status"),
        headers={
            "Host": "gateway.example.org",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-For": "192.0.2.10",
            "Authorization": f"token {TOKEN}",
        },
    )
    with urllib.request.urlopen(proxied, timeout=5) as response:
        assert response.status == 200 and "last_activity" in json.loads(response.read())
    # no login by cookie (aenv_viewers.py): a browser signed in once with the token holds no cookie that
    # signs it in again; every request needs the token (the gateway adds it to each one)
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    assert browser.open(jupyter_url(upstream, environment, f"api/status?token={TOKEN}"), timeout=5).status == 200
    with pytest.raises(urllib.error.HTTPError) as refused:
        browser.open(jupyter_url(upstream, environment, "api/status"), timeout=5)
    assert refused.value.code == 403
    # outside the base path there is nothing
    with pytest.raises(urllib.error.HTTPError) as elsewhere:
        urllib.request.urlopen(f"http://{upstream.address}:{upstream.port}/api/status", timeout=5)
    assert elsewhere.value.code == 404


@pytest.fixture
def homes_below(slurm_settings) -> Iterator[pathlib.Path]:
    """A directory of root's (0755) next to the stack's working directories, for HOMEs a test lays out;
    removed afterwards with whatever the jobs left."""
    root = pathlib.Path(slurm_settings.working_directory).parent / f"homes-{os.urandom(4).hex()}"
    root.mkdir(mode=0o755)
    yield root
    shutil.rmtree(root)


NOBODY = 65534  # the owner of what root makes on a root-squashed NFS mount


@pytest.mark.parametrize(
    "owner, mode, parent, starts",
    [
        ("alice", 0o700, (0, 0o755), True),
        ("bob", 0o777, (0, 0o755), False),
        ("alice", 0o777, (0, 0o755), False),
        # a project's directory: nobody's (made by root on a root-squashed NFS), setgid, group-writable;
        # its writers are the facility's choice
        ("alice", 0o700, (NOBODY, 0o2775), True),
        ("alice", 0o700, (0, 0o777), False),  # anyone could move alice's away and put theirs there
    ],
    ids=[
        "alices-own",
        "bobs-open-to-all",
        "alices-open-to-all",
        "alices-own-in-a-project",
        "alices-own-in-an-open-one",
    ],
)
def test_jupyterlab_starts_only_in_a_home_of_the_users_own(
    slurm_settings, make_environment, homes_below, owner, mode, parent, starts
):
    """alice's job on a node where her working directory (the job's HOME) is not hers alone: bob has
    put a jupyter_server config there that would run as alice when her JupyterLab starts. The job
    starts nothing and the environment fails with the reason; in a HOME of her own it goes Ready,
    below a directory anyone's, or a group's, but not one everyone can write to."""
    parent_owner, parent_mode = parent
    os.chown(homes_below, parent_owner, -1)
    os.chmod(homes_below, parent_mode)
    home = homes_below / "alice"
    home.mkdir()
    planted = home / ".jupyter" / "jupyter_server_config.py"
    planted.parent.mkdir(mode=0o777)
    ran = home / "planted-code-ran"
    planted.write_text(f"open({str(ran)!r}, 'w').write('as alice')\n")
    user = pwd.getpwnam(owner)
    for path in (home, planted.parent, planted):
        os.chown(path, user.pw_uid, user.pw_gid)
    os.chmod(home, mode)
    backend = SlurmBackend(dataclasses.replace(slurm_settings, working_directory=f"{homes_below}/{{user}}"))
    environment = make_environment(owner="alice")

    assert (
        asyncio.run(backend.ensure(Launch(environment, make_flavor(partition="debug"), TOKEN))).state == State.PENDING
    )
    if starts:
        wait_for_state(backend, environment, {State.READY}, timeout=60)
        return
    failed = wait_for_state(backend, environment, {State.FAILED, State.READY}, timeout=60)
    assert (failed.state, failed.reason) == (State.FAILED, "WorkingDirectoryNotPrivate"), failed
    assert f"{home} (its HOME) is not alice's alone" in failed.message
    assert not ran.exists()  # JupyterLab never started there
    (output,) = home.glob("*.out")
    assert f"refusing to start JupyterLab: the working directory {home} (HOME) must be" in output.read_text()


def test_single_token_jobs_start_only_in_their_accounts_own_home(slurm_settings, make_environment, homes_below):
    """Single-token mode: every job runs as the operator's account (`slurm`). In a HOME everyone may
    write to, as /tmp (sticky, root's), alice has put a jupyter_server config that would run in every
    later JupyterLab, as that account, beside each environment's token and data: the job starts
    nothing and the environment fails with the reason. In a directory of the account's own below it
    (the default's layout, /tmp/analysis-environments-{user}), which Slurm makes on first use, it
    goes Ready."""
    shared = homes_below / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    planted = shared / ".jupyter" / "jupyter_server_config.py"
    planted.parent.mkdir(mode=0o777)
    ran = shared / "planted-code-ran"
    planted.write_text(f"open({str(ran)!r}, 'w').write('as slurm')\n")
    alice = pwd.getpwnam("alice")
    for path in (planted.parent, planted):
        os.chown(path, alice.pw_uid, alice.pw_gid)
    account = pwd.getpwnam(slurm_settings.user).pw_uid
    single_token = dataclasses.replace(slurm_settings, jwt_key_file="")

    backend = SlurmBackend(dataclasses.replace(single_token, working_directory=str(shared)))
    environment = make_environment(owner="alice")
    asyncio.run(backend.ensure(Launch(environment, make_flavor(partition="debug"), TOKEN)))
    failed = wait_for_state(backend, environment, {State.FAILED, State.READY}, timeout=60)
    assert (failed.state, failed.reason) == (State.FAILED, "WorkingDirectoryNotPrivate"), failed
    assert not ran.exists()  # JupyterLab never started there

    own = shared / f"analysis-environments-{slurm_settings.user}"
    backend = SlurmBackend(
        dataclasses.replace(single_token, working_directory=f"{shared}/analysis-environments-{{user}}")
    )
    environment = make_environment(owner="alice")
    try:
        asyncio.run(backend.ensure(Launch(environment, make_flavor(partition="debug"), TOKEN)))
        wait_for_state(backend, environment, {State.READY}, timeout=60)
        assert own.stat().st_uid == account and own.stat().st_mode & 0o022 == 0  # made by Slurm, as the account
        (output,) = own.glob("*.out")
        assert output.stat().st_uid == account
    finally:
        asyncio.run(backend.delete(environment))


@pytest.mark.parametrize("parent_owner, made", [("root", False), ("alice", True)], ids=["roots", "alices"])
def test_a_missing_working_directory_is_made_by_slurm_or_fails_the_job_before_the_script(
    slurm_settings, make_environment, homes_below, parent_owner, made
):
    """The job starts in its working directory, its output file there, which Slurm opens before the script
    runs (the script makes none). A missing one Slurm makes as the user where they may (25.05), and the
    script's checks then pass; where they may not, the job fails before the script and nothing is made."""
    os.chown(homes_below, pwd.getpwnam(parent_owner).pw_uid, -1)
    backend = SlurmBackend(dataclasses.replace(slurm_settings, working_directory=f"{homes_below}/{{user}}"))
    environment = make_environment(owner="alice")
    home = homes_below / "alice"

    asyncio.run(backend.ensure(Launch(environment, make_flavor(partition="debug"), TOKEN)))
    observation = wait_for_state(backend, environment, {State.FAILED, State.READY}, timeout=60)
    if made:
        assert observation.state == State.READY, observation
        assert home.stat().st_uid == pwd.getpwnam("alice").pw_uid and home.stat().st_mode & 0o022 == 0
    else:
        assert (observation.state, observation.reason) == (State.FAILED, "JobFailed"), observation
        assert not home.exists()


def test_pending_job_reports_slurms_reason(backend, make_environment):
    # The tiny partition allows one minute; the flavor's 8 hours keep the job
    # waiting. Slurm first says PartitionConfig, and PartitionTimeLimit once
    # its scheduler has looked at the job.
    environment = make_environment()
    asyncio.run(backend.ensure(Launch(environment, make_flavor(partition="tiny"), TOKEN)))
    seen = []

    def pending_for_time_limit():
        observation = asyncio.run(backend.observe(environment))
        seen.append(observation)
        return observation.reason == "PartitionTimeLimit"

    wait_for(pending_for_time_limit, timeout=30, what="reason PartitionTimeLimit")

    assert {observation.state for observation in seen} == {State.PENDING}
    assert "PartitionTimeLimit" in seen[-1].message
    assert seen[-1].cpus == 0


def raw_job(backend: SlurmBackend, job_id: str) -> dict:
    """The job as slurmrestd answers it, in the version the backend speaks (no parsing of ours)."""
    return asyncio.run(backend.client.request("GET", f"job/{job_id}"))["jobs"][0]


def test_gpu_request_reaches_slurm_and_the_job_holds_its_gpus(backend, make_environment):
    environment = make_environment()
    flavor = make_flavor(partition="debug", resources=Resources(cpu="2", memory="1Gi", gpu=2))
    asyncio.run(backend.ensure(Launch(environment, flavor, TOKEN)))

    running = wait_for_state(backend, environment, {State.PROVISIONING, State.READY}, timeout=60)
    raw = raw_job(backend, running.reference["id"])

    # Slurm's own words: asked per node, and held (GPUs 0 and 1 of the node's four)
    assert raw["tres_per_node"] in ("gres/gpu:2", "gres:gpu:2")  # v0.0.40+; v0.0.38
    allocated = raw.get("tres_alloc_str", "").split(",")
    assert "gres/gpu=2" in allocated or raw["gres_detail"] == ["gpu:2(IDX:0-1)"], raw
    assert running.gpus == 2 and running.cpus == 2.0


def test_a_gpu_request_slurm_ignores_never_runs(backend, make_environment):
    """slurmrestd >= 24.05 ignores a `gres` field with only a warning; a backend asking that way
    (a client of the 22.05 era) gets a job without GPUs: the backend cancels it and fails."""
    from analysis_operator.backends.slurm_api import DialectV004x

    api = asyncio.run(backend.client.api())
    if not isinstance(api, DialectV004x):
        pytest.skip(f"{api.version} takes GPUs as `gres`")

    class TwentyTwoZeroFive(DialectV004x):
        def job_fields(self, request):
            fields = super().job_fields(request)
            fields["gres"] = f"gpu:{fields.pop('tres_per_node').rsplit(':', 1)[1]}"
            return fields

    backend.client._dialect = TwentyTwoZeroFive(api.version)
    environment = make_environment()
    flavor = make_flavor(partition="debug", resources=Resources(cpu="1", memory="1Gi", gpu=1))
    failed = asyncio.run(backend.ensure(Launch(environment, flavor, TOKEN)))

    assert (failed.state, failed.reason) == (State.FAILED, "SubmissionIgnored")
    assert "'gres'" in failed.message and "was cancelled" in failed.message
    (job,) = jobs_of(backend, environment.uid)
    assert job.state == "CANCELLED" and job.gpus_requested == 0


def test_the_version_spoken_is_the_newest_served(backend, slurm_settings):
    from analysis_operator.backends.slurm_api import SUPPORTED, served_versions

    api = asyncio.run(backend.client.api())
    assert api.version in SUPPORTED
    if slurm_settings.api_version == "auto":
        status, document = asyncio.run(
            backend.client._send("GET", f"{slurm_settings.url}/openapi/v3", None, backend.client.credentials.headers())
        )
        served = [version for version in served_versions(document or {}) if version in SUPPORTED]
        assert status == 200 and api.version == served[0]


def test_every_version_served_runs_a_gpu_job_and_reads_it(slurm_settings, make_environment):
    """Each version the operator speaks that this slurmrestd serves, pinned in turn: submit, read,
    GPUs held, JupyterLab answering on the port the operator reads back from the job (v0.0.40-v0.0.42
    answer the job's output path, which keys the port, with %j expanded), cancel, cancel again, an
    unknown job."""

    from analysis_operator.backends.slurm_api import SUPPORTED, served_versions

    probe = SlurmBackend(slurm_settings)
    status, document = asyncio.run(
        probe.client._send("GET", f"{slurm_settings.url}/openapi/v3", None, probe.client.credentials.headers())
    )
    served = [version for version in served_versions(document or {}) if version in SUPPORTED]
    assert served, document
    flavor = make_flavor(partition="debug", resources=Resources(cpu="1", memory="1Gi", gpu=1))
    for version in served:
        backend = SlurmBackend(dataclasses.replace(slurm_settings, api_version=version))
        asyncio.run(backend.ping())
        environment = make_environment()
        submitted = asyncio.run(backend.ensure(Launch(environment, flavor, TOKEN)))
        assert submitted.state == State.PENDING, (version, submitted)
        running = wait_for_state(backend, environment, {State.READY}, timeout=60)
        assert (running.gpus, running.cpus) == (1, 1.0) and running.reference["startedAt"], version
        job_id = running.reference["id"]
        assert asyncio.run(backend.client.job(job_id)).gpus_requested == 1
        asyncio.run(backend.client.cancel(job_id))
        wait_for(
            lambda: asyncio.run(backend.client.job(job_id)).state == "CANCELLED", timeout=30, what=f"{version} cancel"
        )
        asyncio.run(backend.client.cancel(job_id))  # ended: gone, no error
        assert asyncio.run(backend.client.job("99999999")) is None


def test_a_ping_slurmctld_refuses_is_unreachable(slurm_settings, tmp_path):
    """slurmrestd 25.05 answers the ping with 200, `responding: false` inside, when slurmctld refuses
    the token: the backend says unreachable, and why (an expired token, here)."""

    from analysis_operator.backends.slurm_auth import build_jwt

    key = pathlib.Path(slurm_settings.jwt_key_file).read_bytes()
    expired = tmp_path / "token"
    expired.write_text(build_jwt(key, slurm_settings.user, int(time.time()) - 7200, 3600))
    backend = SlurmBackend(dataclasses.replace(slurm_settings, jwt_key_file="", token_file=str(expired)))
    backend.client._dialect = asyncio.run(SlurmBackend(slurm_settings).client.api())  # /openapi/v3 needs a token
    with pytest.raises(BackendUnavailable) as raised:
        asyncio.run(backend.ping())
    assert f"the token in {expired} expired at" in str(raised.value)
    assert expired.read_text() not in str(raised.value)


def test_the_stacks_addresses_have_names_so_no_connection_waits_for_dns(slurm_environ):
    """slurmctld and slurmd name every connection they accept by its peer (getnameinfo), so an
    address no file names costs a DNS query per connection, and one the resolver drops 5 s (2.5-3.6 %
    of them here: the p99 of a request to slurmrestd was 5 s). hack/slurm.sh names both ends of the
    node's veth pair in /etc/hosts; `down` takes the names away again."""

    if os.environ.get("ANALYSIS_OPERATOR_SLURM_URL"):
        pytest.skip("a Slurm not started by hack/slurm.sh: its names are its DNS's")
    conf = pathlib.Path(slurm_environ["SLURM_CONF"]).read_text()
    addresses = re.findall(r"^SlurmctldHost=[^(\s]*\(([\d.]+)\)", conf, re.M) + re.findall(r"NodeAddr=([\d.]+)", conf)
    assert len(addresses) == 2, conf
    hosts = [line.split() for line in pathlib.Path("/etc/hosts").read_text().splitlines()]
    for address in addresses:
        named = [line[1] for line in hosts if len(line) > 1 and line[0] == address]
        assert named, f"{address} is not in /etc/hosts"
        assert socket.gethostbyaddr(address)[0] == named[0]


def extension_directory(job_id: str) -> pathlib.Path | None:
    """The private directory the job's batch script wrote JupyterLab's extension to (the first
    entry of PYTHONPATH in the environment of the job's processes, read from /proc)."""
    for environ in pathlib.Path("/proc").glob("[0-9]*/environ"):
        try:
            items = environ.read_bytes().split(b"\0")
        except OSError:
            continue  # gone, or not ours to read
        variables = dict(item.decode(errors="replace").split("=", 1) for item in items if b"=" in item)
        if variables.get("SLURM_JOB_ID") == job_id and "aenv-jupyter." in variables.get("PYTHONPATH", ""):
            return pathlib.Path(variables["PYTHONPATH"].split(":")[0])
    return None


def test_delete_cancels_and_confirms_gone(backend, make_environment):
    environment = make_environment()
    asyncio.run(backend.ensure(Launch(environment, make_flavor(), TOKEN)))
    ready = wait_for_state(backend, environment, {State.READY}, timeout=60)
    directory = extension_directory(ready.reference["id"])
    assert directory is not None and (directory / "aenv_viewers.py").is_file()

    wait_for(lambda: asyncio.run(backend.delete(environment)), timeout=30, what="delete confirmed")

    job = asyncio.run(backend.client.job(ready.reference["id"]))
    assert job.state == "CANCELLED"
    assert asyncio.run(backend.observe(environment)).state == State.FAILED
    assert ready.upstream is not None
    wait_for(
        lambda: not answers(jupyter_url(ready.upstream, environment)), timeout=30, what="JupyterLab gone with its job"
    )
    # the node keeps nothing of it: the batch script removes its directory once the server has ended
    wait_for(lambda: not directory.exists(), timeout=30, what=f"{directory} removed with its job")


def test_time_limit_expiry_reports_expired(backend, make_environment):
    environment = make_environment(lifetime=datetime.timedelta(minutes=1))
    submitted = asyncio.run(backend.ensure(Launch(environment, make_flavor(), TOKEN)))
    assert asyncio.run(backend.client.job(submitted.reference["id"])).time_limit == 1

    # slurmctld checks time limits about every 30 s after the minute is up.
    expired = wait_for_state(backend, environment, {State.EXPIRED}, timeout=150)

    assert expired.reason == "TimeLimit"
    assert expired.reference["state"] == "TIMEOUT"
    # An expired environment is reported, not resubmitted.
    again = asyncio.run(backend.ensure(Launch(environment, make_flavor(), TOKEN)))
    assert again.state == State.EXPIRED and len(jobs_of(backend, environment.uid)) == 1


def test_restarted_operator_adopts_the_running_job(slurm_settings, make_environment):
    environment = make_environment()
    first = SlurmBackend(slurm_settings)
    submitted = asyncio.run(first.ensure(Launch(environment, make_flavor(), TOKEN)))

    after_restart = SlurmBackend(slurm_settings)
    adopted = asyncio.run(after_restart.ensure(Launch(environment, make_flavor(), TOKEN)))

    assert adopted.reference["id"] == submitted.reference["id"]
    assert len(jobs_of(after_restart, environment.uid)) == 1


def test_a_second_job_of_an_environment_is_cancelled_once_a_listing_shows_it(backend, slurm_settings, make_environment):
    """Never two: a submit whose answer was lost, and that slurmctld registered only after the retry had
    looked at the queue, leaves a second job (here: one submitted by another backend object). The
    running operator observes its job by id; the orphan sweep's listing shows the other, and the next
    look cancels it and keeps the job the environment runs on. A restarted operator, which tracks
    nothing, cancels all but one on its first look."""
    environment = make_environment()

    def active() -> set[str]:
        return {job.job_id for job in jobs_of(backend, environment.uid) if job.state in ACTIVE_STATES}

    def submit_lost() -> str:
        other = SlurmBackend(slurm_settings)
        lost = asyncio.run(other._submit(Launch(environment, make_flavor(), TOKEN)))
        other.close()
        return str(lost.reference["id"])

    tracked = asyncio.run(backend.ensure(Launch(environment, make_flavor(), TOKEN))).reference["id"]
    lost = submit_lost()
    assert asyncio.run(backend.observe(environment)).reference["id"] == tracked
    assert active() == {tracked, lost}  # observed by id: not seen yet
    asyncio.run(backend.list_managed())
    assert asyncio.run(backend.observe(environment)).reference["id"] == tracked
    wait_for(lambda: active() == {tracked}, timeout=30, what=f"job {lost} cancelled, {tracked} kept")

    submit_lost()
    restarted = SlurmBackend(slurm_settings)  # tracks nothing
    asyncio.run(restarted.observe(environment))
    restarted.close()
    wait_for(lambda: len(active()) == 1, timeout=30, what="one job left")


def test_list_managed_finds_an_orphan_and_the_sweep_cancels_it(backend, make_environment):
    orphan = make_environment()
    submitted = asyncio.run(backend.ensure(Launch(orphan, make_flavor(), TOKEN)))

    managed = asyncio.run(SlurmBackend(backend.settings).list_managed())
    found = [item for item in managed if item.uid == orphan.uid]

    assert [(item.namespace, item.name, item.backend_id) for item in found] == [
        (orphan.namespace, orphan.name, submitted.reference["id"])
    ]
    wait_for(lambda: asyncio.run(backend.delete(orphan)), timeout=30, what="orphan cancelled")
    remaining = asyncio.run(backend.list_managed())
    assert orphan.uid not in {item.uid for item in remaining}


def slurmrestd_pid_file() -> pathlib.Path:
    state = pathlib.Path(os.environ.get("SLURM_STATE_DIR", "/tmp/analysis-operator-slurm"))
    return state / "run" / "slurmrestd.pid"


def test_slurmrestd_down_then_back_loses_nothing(backend, make_environment, slurm_script):
    pid_file = slurmrestd_pid_file()
    if not pid_file.exists():
        pytest.skip("slurmrestd was not started by hack/slurm.sh: cannot stop it here")
    environment = make_environment()
    submitted = asyncio.run(backend.ensure(Launch(environment, make_flavor(), TOKEN)))

    pid = int(pid_file.read_text())
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not pathlib.Path(f"/proc/{pid}").exists(), timeout=15, what="slurmrestd stopped")
    try:
        with pytest.raises(BackendUnavailable) as raised:
            asyncio.run(backend.ensure(Launch(environment, make_flavor(), TOKEN)))
        message = str(raised.value)
        assert "unreachable" in message and backend.settings.url in message
        assert TOKEN not in message
        assert pathlib.Path(backend.settings.token_file).read_text().strip() not in message
        with pytest.raises(BackendUnavailable):
            asyncio.run(backend.observe(environment))
    finally:
        slurm_script("up")

    adopted = asyncio.run(backend.ensure(Launch(environment, make_flavor(), TOKEN)))
    assert adopted.reference["id"] == submitted.reference["id"]
    assert len(jobs_of(backend, environment.uid)) == 1


def test_requests_share_one_kept_connection_and_a_restarted_slurmrestd_loses_nothing(
    backend, make_environment, slurm_script
):
    """Twenty requests in a row go over one connection, which slurmrestd keeps open; slurmrestd
    restarted under it, the next requests (a submit among them) open a new one and succeed."""
    pid_file = slurmrestd_pid_file()
    if not pid_file.exists():
        pytest.skip("slurmrestd was not started by hack/slurm.sh: cannot restart it here")
    port = urllib.parse.urlsplit(backend.settings.url).port
    environment = make_environment()

    async def scenario():
        seen, earlier = [], own_connections(port)  # left by other tests' loops until collected
        for _ in range(20):
            await backend.client.ping()
            seen.append(sorted(own_connections(port) - earlier))
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGTERM)
        while pathlib.Path(f"/proc/{pid}").exists():
            await asyncio.sleep(0.1)
        await asyncio.to_thread(slurm_script, "up")
        submitted = await backend.ensure(Launch(environment, make_flavor(), TOKEN))
        return seen, submitted, sorted(own_connections(port) - earlier)

    seen, submitted, after = asyncio.run(scenario())
    assert len(seen[0]) == 1 and all(ports == seen[0] for ports in seen), seen  # one connection, the same
    assert submitted.state == State.PENDING, submitted
    assert len(after) == 1 and after != seen[0], (seen[0], after)  # a new one after the restart
    assert [job.job_id for job in jobs_of(backend, environment.uid)] == [submitted.reference["id"]]
