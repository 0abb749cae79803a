"""Slurm backend: JupyterLab in a batch job, driven through slurmrestd.

Jobs run as their owner's Unix account (backends/slurm_auth.py: per-user JWTs
minted from the cluster's key). Which job stands for which environment is
never decided by text a user can write:

- the operator records the job id it submitted (in memory, and on the status as
  status.backend.id) and, on every later look, checks the job's user, which
  Slurm authenticated and nobody can change;
- to find its jobs again after a restart it reads the identity it wrote into
  the comment, signed with a key derived from the JWT key and bound to the job's
  user (a user can erase it, never forge it or move it to someone else's job),
  or the output path it chose, which Slurm freezes once the job runs;
- the address is the node Slurm placed the job on and a port the operator chose
  (JUPYTER_PORT, keyed with a per-job nonce kept in the output path, so other users
  cannot predict it): the job writes nothing back. The node's IP address (Slurm's
  NodeAddr, resolved) and that port are the upstream a gateway routes to; JupyterLab
  serves under the environment's base path (JUPYTER_BASE_URL), the same behind the
  gateway and on the node.

slurmrestd 22.05 (v0.0.38) cannot set admin_comment ("Unknown key"), so no
field is both admin-only and settable; Slurm >= 23.02 could carry the identity there.

The backend speaks every API version the same way: requests and answers are typed at one seam,
backends/slurm_api.py (JobRequest in, SlurmJob out, one Dialect per version). The REST client
is backends/slurm_rest.py, the credentials backends/slurm_auth.py.

A job runs with exactly what the flavor asked or not at all: a submission Slurm answers with a
warning that it ignored a field, or a GPU job whose GPUs Slurm did not take as asked, is
cancelled at once and the environment fails with the reason.
"""

from __future__ import annotations

import datetime
import math
import posixpath
import re
import secrets
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from typing import Any

from analysis_operator import jupyter
from analysis_operator.backends.base import (
    BackendUnavailable,
    Charging,
    Launch,
    ManagedObject,
    Observation,
    State,
    Upstream,
)
from analysis_operator.backends.slurm_api import (
    AUTO,
    NEWEST,
    UNKNOWN_USER,
    Dialect,
    JobRequest,
    SlurmJob,
    SlurmNode,
    dialect,
)
from analysis_operator.backends.slurm_auth import (
    SlurmCredentials,
    build_account,
    build_identity_comment,
    build_jupyter_port,
    build_output_path,
    build_working_directory,
    job_identity,
    job_nonce,
    marked_for,
)
from analysis_operator.backends.slurm_rest import (
    KeptAlive,
    SlurmRequestRefused,
    SlurmRestClient,
    endpoint_answers,
    http_url,
    resolve_address,
)
from analysis_operator.infra.render import render_text
from analysis_operator.infra.server_tls import ID_BYTES, ServerCertificate, certificate_id, server_name
from analysis_operator.model.domain import BackendKind, Dataset, Environment, Flavor, Mount, format_time
from analysis_operator.policy import opening
from analysis_operator.policy.access import DATA_ROOT
from analysis_operator.policy.refusal import Refusal
from analysis_operator.settings import SlurmSettings

TOKEN_ENV_NAME = "JUPYTER_TOKEN"
NODE_ADDRESS_SECONDS = 60.0  # how long a node's resolved address is reused before Slurm is asked again
# What JupyterLab needs behind a gateway: requests arrive with the gateway's Host (allow_remote_access)
# and X-Forwarded-Proto (trust_xheaders: the scheme the browser used; no login cookie is set, see
# jupyter/aenv_viewers.py). The XSRF check
# stays on (never disable_check_xsrf); root is refused (no --allow-root); no browser.
JUPYTER_FLAGS = (
    ' --no-browser --ip="$JUPYTER_HOST" --port="$JUPYTER_PORT" --ServerApp.port_retries=0'
    ' --ServerApp.base_url="$JUPYTER_BASE_URL" --ServerApp.allow_remote_access=True'
    " --ServerApp.trust_xheaders=True"
)

# A job submitted with a certificate of its own (infra/server_tls.py) has a longer nonce in its output
# path than the 8 hex digits of one without: its JupyterLab speaks TLS, and whoever connects checks it.
# Read from the path, which Slurm lets nobody change once the job runs. The nonce is the certificate's
# id (32 digits), so the operator knows which certificate the job holds, and 8 random digits, so that
# the port is not known from the certificate (which anyone who may read the namespace reads) where the
# port is not keyed (single-token mode); 24 random digits were given by the version before (TLS, the
# certificate not known).
TLS_NONCE_LENGTHS = (2 * ID_BYTES + 8, 24)
TLS_CERT_ENV = "AENV_TLS_CERT"
TLS_KEY_ENV = "AENV_TLS_KEY"

_TOKEN_VARIABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# The batch script's exit status when the job's HOME is not its owner's alone (sysexits' EX_CONFIG):
# JupyterLab was not started there.
HOME_NOT_PRIVATE_EXIT = 78

# Slurm job states that still hold, or will hold, resources on the cluster.
ACTIVE_STATES = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "SUSPENDED",
        "REQUEUED",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "SPECIAL_EXIT",
        "RESV_DEL_HOLD",
        "POWER_UP_NODE",
    }
)
_WAITING_STATES = frozenset(
    {"PENDING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SPECIAL_EXIT", "RESV_DEL_HOLD"}
)


# ---------------------------------------------------------------- pure builders


def base_path(environment: Environment, prefix: str = "/env") -> str:
    """The path the environment's JupyterLab serves under, with a trailing slash (pure): the same
    behind the gateway (`<gateway URL>/env/<namespace>/<name>/`, policy/opening.py) and on the node."""
    return opening.base_path(prefix, environment.namespace, environment.name)


def build_account_mismatch(job: SlurmJob, account: str, uid: int | None) -> tuple[str, str] | None:
    """(reason, message) when the submitted job does not run as the account and the directory's uid
    decided (None: any uid) (pure).

    slurmctld accepts a token for a name it cannot resolve and runs the job as nobody; and a
    cluster whose uid for the name differs from the directory's would apply other permissions."""
    if job.user_name != account:
        return (
            "UnknownUnixAccount",
            f"the Slurm cluster does not know the Unix account {account!r} (the job ran as {job.user_name!r})",
        )
    if uid is not None and job.user_id is not None and job.user_id != uid:
        return (
            "UnixAccountMismatch",
            f"the Slurm cluster's {account!r} has uid {job.user_id}, the facility's "
            f"directory says {uid}: ask IT to align the two",
        )
    return None


def build_node_host(node: SlurmNode) -> str:
    """Where Slurm itself reaches a node (its NodeAddr, else its host name or name); may be a name (pure)."""
    return node.address or node.hostname or node.name


def build_endpoint(job: SlurmJob, port: int, settings: SlurmSettings) -> str:
    """node:port of a running job: the batch host as Slurm says, the port the operator chose (pure)."""
    node = job.batch_host
    if job.state != "RUNNING" or not node:
        return ""
    return f"{node}.{settings.node_domain}:{port}" if settings.node_domain else f"{node}:{port}"


def build_time_limit_extension(job: SlurmJob, until: datetime.datetime, now: datetime.datetime) -> int | None:
    """The time limit (minutes) that lets an active job run until `until`, if higher than its own (pure).

    A running job ends at start + limit; a pending one gets its limit from when it starts, so
    it needs at least what is left from now."""
    if job.state not in ACTIVE_STATES:
        return None
    since = (
        datetime.datetime.fromtimestamp(job.start_time, datetime.UTC)
        if job.state not in _WAITING_STATES and job.start_time > 0
        else now
    )
    needed = math.ceil((until - since).total_seconds() / 60)
    current = job.time_limit
    return needed if current and needed > current else None


def build_time_limit_minutes(
    environment: Environment, flavor: Flavor, remaining: datetime.timedelta | None = None
) -> int:
    """The shortest of the flavor's limit, the lifetime asked for and what is left of it."""
    limits = [flavor.max_lifetime]
    if flavor.slurm.time_limit_minutes:
        limits.append(datetime.timedelta(minutes=flavor.slurm.time_limit_minutes))
    if environment.lifetime:
        limits.append(environment.lifetime)
    if remaining is not None:
        limits.append(remaining)
    return max(1, math.ceil(min(limits).total_seconds() / 60))


def build_data_directory(environment: Environment, settings: SlurmSettings, user: str = "") -> str:
    """Where the job finds its datasets: one directory per environment, next to its output,
    in its owner's working directory (mode 0700: no other user reads the links)."""
    return (
        f"{build_working_directory(settings, user or settings.user)}/"
        f"{environment.namespace}.{environment.child_name}.data"
    )


def build_dataset_environment(
    environment: Environment, settings: SlurmSettings, mounts: Sequence[Mount], user: str = ""
) -> dict[str, str]:
    """The granted datasets as job environment variables; the batch script links each
    AENV_DATASET_<i>_PATH (the data as the cluster sees it) to $AENV_DATA_DIR/<LINK>,
    LINK being the mount path below /data. Variables, not script text, so no
    path ever becomes part of a shell line. Read-only is the cluster file
    system's own permissions (the facility's ACLs); the job sees only what is listed.
    AENV_DATA_DIR also without datasets: the script removes the links an earlier
    environment of the same name left there."""
    variables = {
        "AENV_DATA_DIR": build_data_directory(environment, settings, user),
        "AENV_DATASET_COUNT": str(len(mounts)),
    }
    for index, mount in enumerate(mounts):
        variables[f"AENV_DATASET_{index}_PATH"] = mount.dataset.storage.path
        variables[f"AENV_DATASET_{index}_LINK"] = mount.path.removeprefix(DATA_ROOT + "/")
        variables[f"AENV_DATASET_{index}_PID"] = mount.dataset.pid
    return variables


def build_job_request(
    environment: Environment,
    flavor: Flavor,
    settings: SlurmSettings,
    remaining: datetime.timedelta | None = None,
    mounts: Sequence[Mount] = (),
    user: str = "",
    key: bytes | None = None,
    nonce: str = "",
    path_prefix: str = "/env",
) -> JobRequest:
    """The job to submit for `user` (default: the operator's account), in no API version's words and
    without the token; `key` signs the identity and, with the job's `nonce`, keys the port."""
    user = user or settings.user
    resources = flavor.resources
    return JobRequest(
        name=f"{environment.child_name}.{environment.namespace}",
        comment=build_identity_comment(environment, user, key),
        working_directory=build_working_directory(settings, user),
        standard_output=build_output_path(environment, settings, user, nonce, key),
        cpus_per_task=max(1, math.ceil(resources.cpus)),
        # Without a memory request Slurm hands the job the whole node.
        memory_mib=max(1, resources.memory_mib),
        time_limit_minutes=build_time_limit_minutes(environment, flavor, remaining),
        # A full environment replaces the submitter's: only what the script needs. HOME: the user's
        # working directory, where JupyterLab keeps its settings and runtime files.
        environment={
            "PATH": settings.job_path,
            "LANG": "C.UTF-8",
            "HOME": build_working_directory(settings, user),
            "JUPYTER_PORT": str(build_jupyter_port(environment, settings, key, nonce)),
            "JUPYTER_BASE_URL": base_path(environment, path_prefix),
            **build_dataset_environment(environment, settings, mounts, user),
        },
        partition=flavor.slurm.partition,
        account=flavor.slurm.account,
        qos=flavor.slurm.qos,
        gpus=resources.gpu,
    )


def settings_dialect(settings: SlurmSettings) -> Dialect:
    """The dialect settings pin, else the newest spoken (for building without a server) (pure)."""
    return NEWEST if (settings.api_version or AUTO) == AUTO else dialect(settings.api_version)


def build_job_submission(
    environment: Environment,
    flavor: Flavor,
    settings: SlurmSettings,
    remaining: datetime.timedelta | None = None,
    mounts: Sequence[Mount] = (),
    user: str = "",
    key: bytes | None = None,
    nonce: str = "",
    path_prefix: str = "/env",
    api: Dialect | None = None,
) -> dict[str, Any]:
    """The `job` of a submit request in `api`'s words (default: the version settings pin, else the
    newest), without the script and the token."""
    request = build_job_request(environment, flavor, settings, remaining, mounts, user, key, nonce, path_prefix)
    return (api or settings_dialect(settings)).job_fields(request)


def serves_tls(nonce: str) -> bool:
    """Whether the job with this nonce was given a certificate (pure). An owner who changes the output
    path of their job while it waits changes its nonce, and with it the port the operator looks at
    (keyed by it, build_jupyter_port): their JupyterLab is then found nowhere, in plain HTTP or not."""
    return len(nonce) in TLS_NONCE_LENGTHS


def held_certificate(nonce: str) -> str:
    """The id of the certificate a job was given, from its nonce ("" when its nonce does not say: no
    certificate, or one from before ids were kept) (pure)."""
    return nonce[: 2 * ID_BYTES] if len(nonce) == TLS_NONCE_LENGTHS[0] else ""


def tls_environment(certificate: ServerCertificate | None) -> dict[str, str]:
    """The job's environment for its server's certificate and key (the batch script writes them to files
    only its account can read, and takes them out of the environment before JupyterLab starts)."""
    if certificate is None:
        return {}
    return {TLS_CERT_ENV: certificate.certificate, TLS_KEY_ENV: certificate.key}


def build_jupyter_command(settings: SlurmSettings) -> str:
    """The site's command line (trusted configuration, not user input).

    A command that does not place itself ($JUPYTER_PORT) gets JupyterLab's flags (JUPYTER_FLAGS);
    JupyterLab must not move to another port when its own is taken (the operator would not find it).
    """
    command = settings.jupyter_command.strip()
    if "JUPYTER_PORT" not in command:
        command += JUPYTER_FLAGS
    return command


def build_batch_script(
    environment: Environment, flavor: Flavor, token_env_name: str, settings: SlurmSettings, templates_dir: str = ""
) -> str:
    if not _TOKEN_VARIABLE.match(token_env_name):
        raise ValueError(f"token_env_name {token_env_name!r} is not a shell variable name")
    return render_text(
        templates_dir,
        "sbatch.sh.j2",
        token_env_name=token_env_name,
        modules=list(flavor.slurm.modules),
        jupyter_command=build_jupyter_command(settings),
        home_not_private_exit=HOME_NOT_PRIVATE_EXIT,
        extension_module=jupyter.MODULE,
        extension_source=jupyter.extension_source(),
        extension_config=jupyter.CONFIG,
        extension_config_file=jupyter.CONFIG_FILE,
        tls_cert_env=TLS_CERT_ENV,
        tls_key_env=TLS_KEY_ENV,
    )


def _camel(state: str) -> str:
    return "".join(part.capitalize() for part in state.split("_"))


def build_observation(
    job: SlurmJob,
    endpoint_answers: bool,
    endpoint: str = "",
    suspended: bool = False,
    upstream: Upstream | None = None,
    path: str = "/",
) -> Observation:
    """What a Slurm job means for the environment (pure: the endpoint, the node's address and the
    probe's result are passed in; `suspended`: the operator cancelled it for spec.suspend).

    `url` is the node's name and port with JupyterLab's base `path`; `upstream` (the node's IP
    address and the port, for a gateway) is reported while the job runs on a node whose address
    is known."""
    state, slurm_reason, job_id = job.state, job.reason or "None", job.job_id
    reference: dict[str, Any] = {"id": job_id, "state": state, "node": job.nodes}
    if state in _WAITING_STATES:
        reason = slurm_reason if slurm_reason != "None" else "Queued"
        return Observation(
            State.PENDING,
            reason=reason,
            reference=reference,
            message=f"Slurm job {job_id} is {state.lower()}: {reason}",
        )
    if state in ACTIVE_STATES:
        cpus, gpus = job.cpus, job.gpus
        if job.start_time > 0:
            reference["startedAt"] = format_time(datetime.datetime.fromtimestamp(job.start_time, datetime.UTC))
        upstream = upstream if state == "RUNNING" else None
        if upstream is not None:
            reference["addresses"] = [upstream.address]
        if state == "RUNNING" and endpoint and endpoint_answers:
            scheme = "https" if upstream is not None and upstream.server_name else "http"
            return Observation(
                State.READY,
                reason="JupyterAnswering",
                reference=reference,
                url=f"{scheme}://{endpoint}{path}",
                cpus=cpus,
                gpus=gpus,
                message=f"JupyterLab answers in Slurm job {job_id}",
                upstream=upstream,
            )
        return Observation(
            State.PROVISIONING,
            reason="JupyterStarting",
            reference=reference,
            cpus=cpus,
            gpus=gpus,
            message=f"Slurm job {job_id} is {state.lower()}, JupyterLab is not answering yet",
            upstream=upstream,
        )
    if suspended and state == "CANCELLED":
        return Observation(
            State.SUSPENDED,
            reason="Suspended",
            reference=reference,
            message=f"Slurm job {job_id} was cancelled for the suspend; resuming submits a new one",
        )
    detail = f"Slurm job {job_id} ended {state} (reason {slurm_reason}, exit code {job.exit_code or 'unknown'})"
    if state == "FAILED" and job.exit_status == HOME_NOT_PRIVATE_EXIT:
        directory = posixpath.dirname(job.standard_output) or "its working directory"
        return Observation(
            State.FAILED,
            reason="WorkingDirectoryNotPrivate",
            reference=reference,
            message=(
                f"Slurm job {job_id} did not start JupyterLab: {directory} (its HOME) is not {job.user_name}'s "
                "alone (it must be their own directory, not a link, not writable by group or others, not below "
                "a directory everyone can write to without the sticky bit); ask the cluster's administrators "
                "(slurm.working_directory)"
            ),
        )
    if state == "TIMEOUT":
        return Observation(State.EXPIRED, reason="TimeLimit", reference=reference, message=detail)
    return Observation(State.FAILED, reason=f"Job{_camel(state)}", reference=reference, message=detail)


def _newest(jobs: Sequence[SlurmJob]) -> SlurmJob | None:
    return max(jobs, key=lambda job: int(job.job_id) if job.job_id.isdigit() else 0, default=None)


def choose_job(jobs: Sequence[SlurmJob], include_cancelled: bool = True) -> SlurmJob | None:
    """The job that stands for an environment: an active one first, else the newest ended one."""
    active = [job for job in jobs if job.state in ACTIVE_STATES]
    if active:
        return _newest(active)
    if not include_cancelled:
        jobs = [job for job in jobs if job.state != "CANCELLED"]
    return _newest(jobs)


def build_cancelled(job_id: str, problem: tuple[str, str]) -> Observation:
    """The environment fails with the (reason, message) its job was cancelled for at once (pure)."""
    return Observation(
        State.FAILED,
        reason=problem[0],
        reference={"id": job_id},
        message=f"{problem[1]}; Slurm job {job_id} was cancelled",
    )


def build_submission_problem(job: SlurmJob | None, flavor: Flavor, ignored: Sequence[str]) -> tuple[str, str] | None:
    """(reason, message) when Slurm took the job otherwise than asked (pure): it said it ignored a
    field (every field the operator sends is a resource, a limit, where output goes or what runs),
    or a GPU flavor's job does not ask Slurm for the flavor's GPUs (it would run without them)."""
    if ignored:
        return (
            "SubmissionIgnored",
            f"Slurm accepted the job but ignored {', '.join(repr(name) for name in ignored)}; "
            "a job without what the flavor asks for is not run",
        )
    wanted = flavor.resources.gpu
    if wanted and (job is None or job.gpus_requested != wanted):
        asked = "nothing Slurm could show" if job is None else f"{job.gpus_requested} ({job.tres_per_node or 'none'})"
        return (
            "GpuRequestIgnored",
            f"flavor {flavor.name} asks for {wanted} GPUs but the Slurm job asks for {asked}; "
            "a GPU environment never runs without its GPUs",
        )
    return None


# ---------------------------------------------------------------- the backend


@dataclass
class _Tracked:
    """A job the operator submitted or adopted, by id: found again by id whatever its text says."""

    job_id: str
    user: str
    namespace: str
    name: str
    job: SlurmJob  # as last seen (for extend, without asking again)
    # False while the account check of a submit whose read-back was lost is still to be made (on the
    # first read of the job that succeeds): until then the job is ours by its id and the operator's mark
    # whatever user it runs as (holds).
    verified: bool = True
    uid: int | None = None  # the directory's uid it must run with (None: any), for that check

    def holds(self, job: SlurmJob, key: bytes | None, environment_uid: str) -> bool:
        """Whether `job`, found by the tracked id, is still this one: Slurm has it for the same user, or,
        while the account is not checked yet (that check decides: _account_mismatch), for another
        user with the operator's mark for this environment and account (a slurmctld that lost its
        state gives the id to another user's job, which must not be taken for ours and cancelled)."""
        if job.job_id != self.job_id:
            return False
        if job.user_name == self.user:
            return True
        return not self.verified and (marked_for(job, self.user, key) or {}).get("uid") == environment_uid


class SlurmBackend:
    kind = BackendKind.SLURM
    needs_finalizer = True  # a job outside Kubernetes: cancelled before the environment goes
    polled = True  # slurmrestd pushes nothing: the sweep observes every round
    charging = Charging.ALLOCATION  # what Slurm allocated, from the job's start time

    def __init__(self, settings: SlurmSettings, templates_dir: str = "", path_prefix: str = "/env") -> None:
        self.settings = settings
        self.templates_dir = templates_dir
        self.path_prefix = path_prefix  # the gateway's (settings.gateway.path_prefix)
        self.http = KeptAlive()  # to slurmrestd and to the nodes' JupyterLab (the readiness probe)
        self.client = SlurmRestClient(settings, self.http)
        self.credentials = SlurmCredentials(settings)
        self._tracked: dict[str, _Tracked] = {}  # environment uid -> its job
        self._suspended: set[str] = set()  # environment uids whose job was cancelled for a suspend
        # environment uid -> ids of other active jobs of it the last queue listing showed besides its tracked
        # job (list_managed), cancelled by its next observe
        self._duplicates: dict[str, set[str]] = {}
        self._node_addresses: dict[str, tuple[str, float]] = {}  # node name -> (IP address, when resolved)

    def validate(self, environment: Environment, flavor: Flavor) -> Refusal | None:
        return None  # JupyterLab comes from the cluster's software stack (jupyter_command)

    def dataset_problem(self, dataset: Dataset) -> str | None:
        if not dataset.storage.path:
            return f"dataset {dataset.name!r} has no spec.storage.path on the Slurm cluster"
        return None

    async def ensure(self, launch: Launch) -> Observation:
        """Adopt the environment's job, or submit one; never two.

        A job that ended on its own (time limit, failure) is reported, not
        replaced; one that was cancelled (suspend) is replaced on resume; one
        holding `launch.stale_certificate` is replaced now (_replace).
        """
        jobs = await self._jobs_of(launch.environment)
        existing = choose_job(jobs, include_cancelled=False)
        if existing is None:
            return await self._submit(launch)
        if launch.stale_certificate and held_certificate(job_nonce(existing)) == launch.stale_certificate:
            return await self._replace(launch, existing)
        return await self._adopt(launch, jobs, existing)

    async def _replace(self, launch: Launch, stale: SlurmJob) -> Observation:
        """A new job first, then the one holding a certificate that is not the stored one cancelled: a
        failure between the two leaves that one running (replaced at the next pass) or both (the next
        look keeps the newer, the one tracked), never the environment without a job of its own. Where
        Slurm refuses a second job (a limit on the jobs a user may submit), as a suspend and a resume:
        cancelled first, then submitted (a submission that fails is tried again from the suspension)."""
        observation = await self._submit(launch)
        if observation.state is State.FAILED and observation.reason == "SubmissionRefused":
            await self.suspend(launch.environment)
            return await self.resume(launch)
        if observation.state is not State.FAILED:
            await self.client.cancel(stale.job_id)
        return observation

    async def resume(self, launch: Launch) -> Observation:
        """Adopt an active job (a resume seen twice), else submit a new one: the cancelled
        job of the suspend, or any ended one, does not stand for the environment any more; nor
        one still COMPLETING (the suspend's, when the resume follows at once: adopted, it ended
        the environment Failed a moment later, JobCancelled). The environment stays suspended until a job
        is submitted or adopted: a submission that fails (slurmrestd restarting) is tried again, not the
        cancelled job read as ended."""
        jobs = await self._jobs_of(launch.environment)
        job = _newest([job for job in jobs if job.state in ACTIVE_STATES and job.state != "COMPLETING"])
        if job is None:
            return await self._submit(launch)  # which ends the suspension once submitted
        self._suspended.discard(launch.environment.uid)
        return await self._adopt(launch, jobs, job)

    async def suspend(self, environment: Environment) -> Observation:
        """Cancel the job; resuming submits a new one (Slurm keeps nothing of a cancelled job)."""
        self._suspended.add(environment.uid)
        await self._cancel_all(environment)
        return await self.observe(environment)

    async def observe(self, environment: Environment) -> Observation:
        """The tracked job, asked for by id; without one (after a restart), the one the queue shows for
        the environment. Never two (a submit whose answer was lost, and the retry's): any other active
        job is cancelled, as soon as a listing shows it (this one, or the orphan sweep's: list_managed)."""
        job = await self._tracked_job(environment)
        if job is None:
            jobs = await self._jobs_of(environment)
            job = choose_job(jobs)
            if job is not None:
                await self._cancel_others(jobs, job)
        else:
            await self._cancel_duplicates(environment, job)
        if job is None:
            return Observation(State.GONE, reason="NoJob", message="no Slurm job for this environment")
        return await self._observe_job(environment, job)

    async def delete(self, environment: Environment) -> bool:
        """Cancel every active job of the environment; True once none is left."""
        gone = await self._cancel_all(environment)
        if gone:
            self._tracked.pop(environment.uid, None)
            self._suspended.discard(environment.uid)
            self._duplicates.pop(environment.uid, None)
        return gone

    async def extend(
        self, environment: Environment, until: datetime.datetime, now: datetime.datetime | None = None
    ) -> bool:
        """Raise the active job's time limit so that it runs until `until` (an approved lifetime
        extension), as the operator: a job's owner can only lower it. True if it was raised.

        Cheap on every sweep: decided from the job as `observe` last saw it."""
        now = now or datetime.datetime.now(datetime.UTC)
        if environment.uid not in self._tracked:
            await self.observe(environment)
        tracked = self._tracked.get(environment.uid)
        if tracked is None:
            return False
        limit = build_time_limit_extension(tracked.job, until, now)
        if limit is None:
            return False
        try:
            await self.client.update_time_limit(tracked.job_id, limit)
        except SlurmRequestRefused:
            return False  # e.g. above the partition's MaxTime: the job ends at its limit (EXPIRED TimeLimit)
        tracked.job = replace(tracked.job, time_limit=limit)
        return True

    async def list_managed(self) -> list[ManagedObject]:
        """Active jobs this operator made: those it tracks by id, and those carrying its own marks
        (signed comment or output path, for the job's own user). A job whose text names an
        environment is never enough. A marked job of an environment whose tracked job is another is
        noted as its duplicate: its next observe cancels it (this is the one listing of the whole
        queue while a job is tracked; observe asks for the tracked job by id)."""
        key = self._key()
        by_id = {tracked.job_id: (uid, tracked) for uid, tracked in self._tracked.items()}
        self._duplicates = {}
        managed = []
        for job in await self.client.jobs():
            if job.state not in ACTIVE_STATES:
                continue
            job_id = job.job_id
            uid, tracked = by_id.get(job_id, ("", None))
            if tracked is not None and tracked.holds(job, key, uid):
                await self._account_mismatch(tracked, job)  # cancelled if it is one; its observe reports it
                managed.append(ManagedObject(tracked.namespace, tracked.name, uid, job_id))
            elif (identity := job_identity(job, self.settings, key)) is not None:
                managed.append(ManagedObject(identity["namespace"], identity["name"], identity["uid"], job_id))
                if identity["uid"] in self._tracked:
                    self._duplicates.setdefault(identity["uid"], set()).add(job_id)
        return managed

    async def ping(self) -> None:
        """Raise BackendUnavailable unless slurmrestd and slurmctld answer: by what the ping says, not
        its status code (slurmrestd 25.05 answers 200 when no controller responded, or with a bad token);
        nor with settings no job can be submitted with."""
        self._check_settings()
        ping = await self.client.ping()
        if not ping.responding:
            raise BackendUnavailable(
                f"slurmrestd at {self.settings.url} answers, but no slurmctld responded to its ping for "
                f"{self.settings.user} ({ping.detail}): slurmctld is down or unreachable from slurmrestd, "
                f"or it refused the operator's token; {self.credentials.diagnose()}"
            )

    def close(self) -> None:
        self.http.close()

    def forget(self, uids: Collection[str]) -> None:
        """Nothing is kept per environment here."""

    async def repair(self, live: Collection[str]) -> None:
        """Nothing is set up per namespace here."""

    # ---------------------------------------------------------------- inside

    def _key(self) -> bytes | None:
        return self.credentials.purpose_key("jobs")

    def _check_settings(self) -> None:
        """Raise BackendUnavailable, naming the setting, for settings no job is submitted with (as for an
        unreadable key): environments wait with the reason until the site fixes them."""
        problem = self.settings.working_directory_problem()
        if problem:
            raise BackendUnavailable(problem)

    async def _submit(self, launch: Launch) -> Observation:
        """A new job, whose TimeLimit is at most what is left of the environment's lifetime: a job
        submitted at a resume does not run a whole lifetime past expiresAt if the operator is away then."""
        environment, flavor = launch.environment, launch.flavor
        self._check_settings()
        now = datetime.datetime.now(datetime.UTC)
        remaining = launch.expires_at - now if launch.expires_at is not None else None
        try:
            account = build_account(environment, launch.identity, self.settings)
        except ValueError as error:
            return Observation(State.FAILED, reason="NoUnixAccount", message=f"cannot run on Slurm: {error}")
        certificate = None
        if self.settings.server_tls and launch.certificate is not None:
            certificate = await launch.certificate()
        request = build_job_request(
            environment,
            flavor,
            self.settings,
            remaining,
            mounts=launch.mounts,
            user=account,
            key=self._key(),
            nonce=(certificate_id(certificate.certificate) if certificate is not None else "") + secrets.token_hex(4),
            path_prefix=self.path_prefix,
        ).with_environment(**{TOKEN_ENV_NAME: launch.token}, **tls_environment(certificate))
        script = build_batch_script(environment, flavor, TOKEN_ENV_NAME, self.settings, self.templates_dir)
        try:
            answer = await self.client.submit(request, script, user=account)
        except SlurmRequestRefused as refusal:
            if refusal.codes & UNKNOWN_USER:
                return Observation(
                    State.FAILED,
                    reason="UnknownUnixAccount",
                    message=f"the Slurm cluster does not know the Unix account {account!r} (Slurm said: {refusal})",
                )
            return Observation(
                State.FAILED,
                reason="SubmissionRefused",
                message=f"Slurm refused the job for flavor {flavor.name} as {account}: {refusal}",
            )
        job_id, uid = answer.job_id, launch.identity.uid if launch.identity else None
        try:
            found = await self.client.job(job_id)
        except BackendUnavailable:  # slurmrestd restarting: the job is checked at its first read instead
            found = None
        # A lost read-back (slurmrestd restarted, the job not visible yet) leaves the account unchecked: the
        # first read of the job that succeeds checks it (_account_mismatch).
        submitted = found or SlurmJob(job_id=job_id, user_name=account)
        self._track(environment, submitted, account, verified=found is not None, uid=uid)
        self._suspended.discard(environment.uid)
        problem = build_submission_problem(found, flavor, answer.ignored)
        mismatch = problem or (build_account_mismatch(found, account, uid) if found is not None else None)
        if mismatch is not None:
            await self.client.cancel(job_id)
            return build_cancelled(job_id, mismatch)
        return Observation(
            State.PENDING,
            reason="Submitted",
            reference={"id": job_id},
            message=f"submitted Slurm job {job_id} as {account}",
        )

    def _track(
        self, environment: Environment, job: SlurmJob, user: str = "", verified: bool = True, uid: int | None = None
    ) -> None:
        self._tracked[environment.uid] = _Tracked(
            job.job_id, user or job.user_name, environment.namespace, environment.name, job, verified, uid
        )

    async def _tracked_job(self, environment: Environment) -> SlurmJob | None:
        """The job recorded for the environment, if Slurm still has it for the same user (or for any
        user while its account is not checked yet: _account_mismatch)."""
        tracked = self._tracked.get(environment.uid)
        if tracked is None:
            return None
        job = await self.client.job(tracked.job_id)
        if job is None or not tracked.holds(job, self._key(), environment.uid):
            self._tracked.pop(environment.uid, None)
            return None
        return job

    async def _account_mismatch(self, tracked: _Tracked, job: SlurmJob) -> tuple[str, str] | None:
        """The check _submit makes, made on the first read of a job whose read-back was lost there: a
        mismatch cancels it (ours: submitted by us, found by its id) and stays until the environment
        ends (every later read reports it); a match is remembered."""
        if tracked.verified or tracked.job_id != job.job_id:
            return None
        mismatch = build_account_mismatch(job, tracked.user, tracked.uid)
        if mismatch is None:
            tracked.verified = True
        else:
            await self.client.cancel(job.job_id)
        return mismatch

    async def _jobs_of(self, environment: Environment) -> list[SlurmJob]:
        """The environment's jobs: the one recorded by id, and those carrying the operator's marks for it."""
        key, tracked = self._key(), self._tracked.get(environment.uid)
        found = []
        for job in await self.client.jobs():
            if tracked is not None and job.job_id == tracked.job_id:
                if tracked.holds(job, key, environment.uid):
                    found.append(job)
            elif (job_identity(job, self.settings, key) or {}).get("uid") == environment.uid:
                found.append(job)
        return found

    async def _adopt(self, launch: Launch, jobs: list[SlurmJob], job: SlurmJob) -> Observation:
        """The environment's job, found again (after a restart, or a submit whose answer was lost):
        the only active one, and only if it asks for what the flavor asks (its GPUs)."""
        await self._cancel_others(jobs, job)
        problem = build_submission_problem(job, launch.flavor, ()) if job.state in ACTIVE_STATES else None
        if problem is not None:
            await self.client.cancel(job.job_id)
            return build_cancelled(job.job_id, problem)
        return await self._observe_job(launch.environment, job)

    async def _cancel_others(self, jobs: list[SlurmJob], keep: SlurmJob) -> None:
        """Never two: any other active job of the environment goes."""
        for job in jobs:
            if job.state in ACTIVE_STATES and job.job_id != keep.job_id:
                await self.client.cancel(job.job_id)

    async def _cancel_duplicates(self, environment: Environment, keep: SlurmJob) -> None:
        """The duplicates the last listing noted for the environment, other than the job it runs on now
        (decided under its converge lock: a resume's new job noted while the suspended one was tracked is
        kept). Cancelling a job that ended meanwhile is done already."""
        for job_id in sorted(self._duplicates.pop(environment.uid, set()) - {keep.job_id}):
            await self.client.cancel(job_id)

    async def _cancel_all(self, environment: Environment) -> bool:
        for job in await self._jobs_of(environment):
            if job.state in ACTIVE_STATES:
                await self.client.cancel(job.job_id)
        return not [job for job in await self._jobs_of(environment) if job.state in ACTIVE_STATES]

    async def _node_address(self, node: str) -> str:
        """The IP address of a node as Slurm reaches it (NodeAddr, resolved; "" if unknown),
        reused for NODE_ADDRESS_SECONDS (a cloud node may come back with another address)."""
        known = self._node_addresses.get(node)
        if known is not None and time.monotonic() - known[1] < NODE_ADDRESS_SECONDS:
            return known[0]
        info = await self.client.node(node)
        address = await resolve_address(build_node_host(info), self.settings.node_domain) if info else ""
        if address:
            self._node_addresses[node] = (address, time.monotonic())
        return address

    async def _observe_job(self, environment: Environment, job: SlurmJob) -> Observation:
        tracked = self._tracked.get(environment.uid)
        if tracked is not None and (mismatch := await self._account_mismatch(tracked, job)) is not None:
            return build_cancelled(job.job_id, mismatch)
        self._track(environment, job, tracked.user if tracked and tracked.job_id == job.job_id else "")
        nonce = job_nonce(job)
        port = build_jupyter_port(environment, self.settings, self._key(), nonce)
        endpoint = build_endpoint(job, port, self.settings)
        path, upstream = base_path(environment, self.path_prefix), None
        name = server_name(environment) if serves_tls(nonce) else ""
        scheme = "https" if name else "http"
        if endpoint:
            address = await self._node_address(job.batch_host)
            held = held_certificate(nonce)
            upstream = (
                Upstream(address=address, port=port, landing="lab", server_name=name, certificate_id=held)
                if address
                else None
            )
        # Probed where the gateway will connect (the node's address), else at the node's name: whether
        # anything answers there (its certificate is not checked: nothing is sent but the path).
        probe = http_url(upstream.address, port, path, scheme) if upstream else f"{scheme}://{endpoint}{path}"
        answers = bool(endpoint) and await endpoint_answers(self.http, probe)
        return build_observation(
            job, answers, endpoint, suspended=environment.uid in self._suspended, upstream=upstream, path=path
        )
