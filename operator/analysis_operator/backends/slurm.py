"""Slurm backend: JupyterLab in a batch job, driven through slurmrestd.

The job's comment carries the environment's identity (namespace, name, uid),
so the operator finds its jobs again after a restart and sweeps orphans
without any state of its own. The batch script appends the address JupyterLab
listens on to that comment (`scontrol update` by the job's owner), because
slurmrestd on 22.05 cannot carry it back and the job holds no REST token.

REST paths are built from `settings.api_version`; the token file is read on
every request, so a site can rotate the token without restarting anything.
"""
from __future__ import annotations

import datetime
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import aiohttp

from analysis_operator.backends.base import BackendUnavailable, Charging, Launch, ManagedObject, Observation, State
from analysis_operator.model.domain import BackendKind, Dataset, Environment, Flavor, Mount, format_time
from analysis_operator.policy.access import DATA_ROOT
from analysis_operator.render import render_text
from analysis_operator.policy.refusal import Refusal
from analysis_operator.settings import SlurmSettings

TOKEN_ENV_NAME = "JUPYTER_TOKEN"
IDENTITY_MARKER = "analysis-operator/v1"
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=15)
PROBE_TIMEOUT = aiohttp.ClientTimeout(total=3)
JOB_PATH = "/usr/local/bin:/usr/bin:/bin"

_IDENTITY = re.compile(
    re.escape(IDENTITY_MARKER) + r" namespace=(?P<namespace>\S+) name=(?P<name>\S+) uid=(?P<uid>\S+)")
_ENDPOINT = re.compile(r"\bendpoint=(?P<endpoint>[A-Za-z0-9.\-]+:\d+)\b")
_GPU_DETAIL = re.compile(r"^gpu(?::[^:(]+)?:(\d+)")
_TOKEN_VARIABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Slurm job states that still hold, or will hold, resources on the cluster.
ACTIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED",
                           "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING",
                           "STAGE_OUT", "SPECIAL_EXIT", "RESV_DEL_HOLD", "POWER_UP_NODE"})
_WAITING_STATES = frozenset({"PENDING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                             "SPECIAL_EXIT", "RESV_DEL_HOLD"})
# ESLURM_INVALID_JOB_ID: the job is unknown (never existed, or purged after MinJobAge).
_INVALID_JOB_ID = 2017


# ---------------------------------------------------------------- pure builders


def build_identity_comment(environment: Environment) -> str:
    return (f"{IDENTITY_MARKER} namespace={environment.namespace} "
            f"name={environment.name} uid={environment.uid}")


def parse_identity(comment: str) -> dict[str, str] | None:
    match = _IDENTITY.search(comment or "")
    return match.groupdict() if match else None


def parse_endpoint(comment: str) -> str:
    match = _ENDPOINT.search(comment or "")
    return match.group("endpoint") if match else ""


def build_time_limit_minutes(environment: Environment, flavor: Flavor,
                             remaining: datetime.timedelta | None = None) -> int:
    """The shortest of the flavor's limit, the lifetime asked for and what is left of it."""
    limits = [flavor.max_lifetime]
    if flavor.slurm.time_limit_minutes:
        limits.append(datetime.timedelta(minutes=flavor.slurm.time_limit_minutes))
    if environment.lifetime:
        limits.append(environment.lifetime)
    if remaining is not None:
        limits.append(remaining)
    return max(1, math.ceil(min(limits).total_seconds() / 60))


def build_data_directory(environment: Environment, settings: SlurmSettings) -> str:
    """Where the job finds its datasets: one directory per environment, next to its output."""
    return f"{settings.working_directory}/{environment.namespace}.{environment.child_name}.data"


def build_dataset_environment(environment: Environment, settings: SlurmSettings,
                              mounts: Sequence[Mount]) -> dict[str, str]:
    """The granted datasets as job environment variables; the batch script links each
    AENV_DATASET_<i>_PATH (the data as the cluster sees it) to $AENV_DATA_DIR/<LINK>,
    LINK being the mount path below /data. Variables, not script text, so no
    path ever becomes part of a shell line. Read-only is the cluster file
    system's own permissions (the facility's ACLs); the job sees only what is listed."""
    if not mounts:
        return {}
    variables = {"AENV_DATA_DIR": build_data_directory(environment, settings),
                 "AENV_DATASET_COUNT": str(len(mounts))}
    for index, mount in enumerate(mounts):
        variables[f"AENV_DATASET_{index}_PATH"] = mount.dataset.storage.path
        variables[f"AENV_DATASET_{index}_LINK"] = mount.path.removeprefix(DATA_ROOT + "/")
        variables[f"AENV_DATASET_{index}_PID"] = mount.dataset.pid
    return variables


def build_job_submission(environment: Environment, flavor: Flavor, settings: SlurmSettings,
                         remaining: datetime.timedelta | None = None,
                         mounts: Sequence[Mount] = ()) -> dict[str, Any]:
    """The `job` part of a v0.0.38 submit request, without the token."""
    resources = flavor.resources
    job: dict[str, Any] = {
        "name": f"{environment.child_name}.{environment.namespace}",
        "comment": build_identity_comment(environment),
        "current_working_directory": settings.working_directory,
        "standard_output": (f"{settings.working_directory}/"
                            f"{environment.namespace}.{environment.child_name}.%j.out"),
        "cpus_per_task": max(1, math.ceil(resources.cpus)),
        # Without a memory request Slurm hands the job the whole node.
        "memory_per_node": max(1, resources.memory_mib),
        "time_limit": build_time_limit_minutes(environment, flavor, remaining),
        # A full environment replaces the submitter's: only what the script needs.
        "environment": {"PATH": JOB_PATH, "LANG": "C.UTF-8",
                        "AENV_IDENTITY": build_identity_comment(environment),
                        **build_dataset_environment(environment, settings, mounts)},
    }
    optional = {"partition": flavor.slurm.partition, "account": flavor.slurm.account,
                "qos": flavor.slurm.qos, "gres": f"gpu:{resources.gpu}" if resources.gpu else ""}
    job.update({key: value for key, value in optional.items() if value})
    return job


def build_jupyter_command(settings: SlurmSettings) -> str:
    """The site's command line (trusted configuration, not user input).

    A command that does not place itself ($JUPYTER_PORT) gets JupyterLab's flags.
    """
    command = settings.jupyter_command.strip()
    if "JUPYTER_PORT" not in command:
        command += ' --no-browser --ip="$JUPYTER_HOST" --port="$JUPYTER_PORT"'
    return command


def build_batch_script(environment: Environment, flavor: Flavor, token_env_name: str,
                       settings: SlurmSettings, templates_dir: str = "") -> str:
    if not _TOKEN_VARIABLE.match(token_env_name):
        raise ValueError(f"token_env_name {token_env_name!r} is not a shell variable name")
    return render_text(templates_dir, "sbatch.sh.j2",
                       token_env_name=token_env_name,
                       modules=list(flavor.slurm.modules),
                       jupyter_command=build_jupyter_command(settings))


def allocated_gpus(job: Mapping[str, Any]) -> int:
    """GPUs held by a running job, from gres_detail such as 'gpu:2(IDX:0-1)'."""
    total = 0
    for detail in job.get("gres_detail") or ():
        match = _GPU_DETAIL.match(detail)
        total += int(match.group(1)) if match else 0
    return total


def _camel(state: str) -> str:
    return "".join(part.capitalize() for part in state.split("_"))


def build_observation(job: Mapping[str, Any], endpoint_answers: bool) -> Observation:
    """What a Slurm job means for the environment (pure: the probe result is passed in)."""
    state = str(job.get("job_state", "UNKNOWN"))
    slurm_reason = str(job.get("state_reason") or "None")
    job_id = str(job.get("job_id", ""))
    reference = {"id": job_id, "state": state, "node": job.get("nodes") or ""}
    if state in _WAITING_STATES:
        reason = slurm_reason if slurm_reason != "None" else "Queued"
        return Observation(State.PENDING, reason=reason, reference=reference,
                           message=f"Slurm job {job_id} is {state.lower()}: {reason}")
    if state in ACTIVE_STATES:
        cpus, gpus = float(job.get("cpus") or 0), allocated_gpus(job)
        if int(job.get("start_time") or 0) > 0:
            reference["startedAt"] = format_time(
                datetime.datetime.fromtimestamp(int(job["start_time"]), datetime.timezone.utc))
        endpoint = parse_endpoint(str(job.get("comment", "")))
        if state == "RUNNING" and endpoint and endpoint_answers:
            return Observation(State.READY, reason="JupyterAnswering", reference=reference,
                               url=f"http://{endpoint}/", cpus=cpus, gpus=gpus,
                               message=f"JupyterLab answers in Slurm job {job_id}")
        return Observation(State.PROVISIONING, reason="JupyterStarting", reference=reference,
                           cpus=cpus, gpus=gpus, message=f"Slurm job {job_id} is {state.lower()}, "
                                           "JupyterLab is not answering yet")
    detail = f"Slurm job {job_id} ended {state} (reason {slurm_reason}, exit code {job.get('exit_code')})"
    if state == "TIMEOUT":
        return Observation(State.EXPIRED, reason="TimeLimit", reference=reference, message=detail)
    return Observation(State.FAILED, reason=f"Job{_camel(state)}", reference=reference, message=detail)


def _newest(jobs: list[dict[str, Any]]) -> dict[str, Any] | None:
    return max(jobs, key=lambda job: int(job.get("job_id", 0)), default=None)


def choose_job(jobs: list[dict[str, Any]], include_cancelled: bool = True) -> dict[str, Any] | None:
    """The job that stands for an environment: an active one first, else the newest ended one."""
    active = [job for job in jobs if job.get("job_state") in ACTIVE_STATES]
    if active:
        return _newest(active)
    if not include_cancelled:
        jobs = [job for job in jobs if job.get("job_state") != "CANCELLED"]
    return _newest(jobs)


# ---------------------------------------------------------------- REST client


class SlurmRequestRefused(Exception):
    """slurmrestd answered and said no (bad partition, invalid job, ...)."""

    def __init__(self, errors: list[dict[str, Any]]):
        self.codes = {int(error.get("error_number", error.get("error_code", -1))) for error in errors}
        super().__init__("; ".join(str(error.get("description") or error.get("error")) for error in errors))


def _is_refusal(code: int) -> bool:
    # ESLURM_* codes from 2000 up are answers about the request; lower ones and
    # the auth range (6000+) mean the controller or the token could not be used.
    return 2000 <= code < 6000


@dataclass
class SlurmRestClient:
    settings: SlurmSettings

    def _headers(self) -> dict[str, str]:
        try:
            with open(self.settings.token_file, encoding="utf-8") as token_file:
                token = token_file.read().strip()
        except OSError as error:
            raise BackendUnavailable(
                f"cannot read the Slurm token file {self.settings.token_file}: {error.strerror}") from None
        token = token.removeprefix("SLURM_JWT=")
        return {"X-SLURM-USER-NAME": self.settings.user, "X-SLURM-USER-TOKEN": token}

    def _url(self, path: str) -> str:
        return f"{self.settings.url.rstrip('/')}/slurm/{self.settings.api_version}/{path}"

    async def request(self, method: str, path: str, payload: Any = None) -> dict[str, Any]:
        headers = self._headers()
        try:
            async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
                async with session.request(method, self._url(path), json=payload, headers=headers) as response:
                    body = await response.json(content_type=None)
                    status = response.status
        except (aiohttp.ClientError, TimeoutError) as error:
            raise BackendUnavailable(
                f"slurmrestd at {self.settings.url} is unreachable ({type(error).__name__}); "
                "will retry: check that slurmrestd runs and the URL is right") from None
        except ValueError:
            raise BackendUnavailable(
                f"{self.settings.url} answered {method} {path} with something that is not JSON: "
                "is it slurmrestd, and is api_version right?") from None
        errors = [error for error in (body or {}).get("errors") or () if error]
        if status < 400 and not errors:
            answer: dict[str, Any] = body
            return answer
        refusal = SlurmRequestRefused(errors or [{"error": f"HTTP {status}"}])
        if any(_is_refusal(code) for code in refusal.codes):
            raise refusal
        raise BackendUnavailable(
            f"slurmrestd at {self.settings.url} could not serve {method} {path} for user "
            f"{self.settings.user} ({refusal}); check slurmctld and the token in {self.settings.token_file}")

    async def ping(self) -> None:
        await self.request("GET", "ping")

    async def jobs(self) -> list[dict[str, Any]]:
        return list((await self.request("GET", "jobs")).get("jobs") or ())

    async def job(self, job_id: str) -> dict[str, Any] | None:
        try:
            found = (await self.request("GET", f"job/{job_id}")).get("jobs") or ()
        except SlurmRequestRefused as refusal:
            if _INVALID_JOB_ID in refusal.codes:
                return None
            raise
        return found[0] if found else None

    async def submit(self, job: dict[str, Any], script: str) -> str:
        answer = await self.request("POST", "job/submit", {"job": job, "script": script})
        return str(answer["job_id"])

    async def cancel(self, job_id: str) -> None:
        try:
            await self.request("DELETE", f"job/{job_id}")
        except SlurmRequestRefused as refusal:
            if _INVALID_JOB_ID not in refusal.codes:
                raise


async def endpoint_answers(endpoint: str) -> bool:
    """Whether anything answers HTTP there (any status: JupyterLab may redirect to login)."""
    try:
        async with aiohttp.ClientSession(timeout=PROBE_TIMEOUT) as session:
            async with session.get(f"http://{endpoint}/", allow_redirects=False):
                return True
    except (aiohttp.ClientError, TimeoutError):
        return False


# ---------------------------------------------------------------- the backend


class SlurmBackend:
    kind = BackendKind.SLURM
    needs_finalizer = True  # a job outside Kubernetes: cancelled before the environment goes
    polled = True  # slurmrestd pushes nothing: the sweep observes every round
    charging = Charging.ALLOCATION  # what Slurm allocated, from the job's start time

    def __init__(self, settings: SlurmSettings, templates_dir: str = "") -> None:
        self.settings = settings
        self.templates_dir = templates_dir
        self.client = SlurmRestClient(settings)
        # uid -> job id, so observe() asks for one job instead of listing the queue.
        self._job_ids: dict[str, str] = {}

    def validate(self, environment: Environment, flavor: Flavor) -> Refusal | None:
        return None  # JupyterLab comes from the cluster's software stack (jupyter_command)

    def dataset_problem(self, dataset: Dataset) -> str | None:
        if not dataset.storage.path:
            return f"dataset {dataset.name!r} has no spec.storage.path on the Slurm cluster"
        return None

    async def ensure(self, launch: Launch) -> Observation:
        """Adopt the environment's job, or submit one; never two.

        A job that ended on its own (time limit, failure) is reported, not
        replaced; one that was cancelled (suspend) is replaced on resume.
        """
        existing = choose_job(await self._jobs_of(launch.environment), include_cancelled=False)
        if existing is not None:
            self._job_ids[launch.environment.uid] = str(existing["job_id"])
            return await self._observe_job(existing)
        return await self._submit(launch)

    async def _submit(self, launch: Launch) -> Observation:
        environment, flavor = launch.environment, launch.flavor
        job = build_job_submission(environment, flavor, self.settings, mounts=launch.mounts)
        job["environment"][TOKEN_ENV_NAME] = launch.token
        script = build_batch_script(environment, flavor, TOKEN_ENV_NAME, self.settings, self.templates_dir)
        try:
            job_id = await self.client.submit(job, script)
        except SlurmRequestRefused as refusal:
            return Observation(State.FAILED, reason="SubmissionRefused",
                               message=f"Slurm refused the job for flavor {flavor.name}: {refusal}")
        self._job_ids[environment.uid] = job_id
        return Observation(State.PENDING, reason="Submitted", reference={"id": job_id},
                           message=f"submitted Slurm job {job_id}")

    async def suspend(self, environment: Environment) -> Observation:
        """Cancel the job; resuming submits a new one (Slurm keeps nothing of a cancelled job)."""
        await self.delete(environment)
        return await self.observe(environment)

    async def resume(self, launch: Launch) -> Observation:
        """Adopt an active job (a resume seen twice), else submit a new one: the cancelled
        job of the suspend, or any ended one, does not stand for the environment any more."""
        jobs = await self._jobs_of(launch.environment)
        job = _newest([job for job in jobs if job.get("job_state") in ACTIVE_STATES])
        if job is not None:
            self._job_ids[launch.environment.uid] = str(job["job_id"])
            return await self._observe_job(job)
        return await self._submit(launch)

    async def observe(self, environment: Environment) -> Observation:
        job = await self._cached_job(environment)
        if job is None:
            job = choose_job(await self._jobs_of(environment))
        if job is None:
            return Observation(State.GONE, reason="NoJob", message="no Slurm job for this environment")
        self._job_ids[environment.uid] = str(job["job_id"])
        return await self._observe_job(job)

    async def delete(self, environment: Environment) -> bool:
        """Cancel every active job of the environment; True once none is left."""
        for job in await self._jobs_of(environment):
            if job.get("job_state") in ACTIVE_STATES:
                await self.client.cancel(str(job["job_id"]))
        still_active = [job for job in await self._jobs_of(environment)
                        if job.get("job_state") in ACTIVE_STATES]
        if not still_active:
            self._job_ids.pop(environment.uid, None)
        return not still_active

    async def list_managed(self) -> list[ManagedObject]:
        """Active jobs carrying the operator's identity (ended jobs hold nothing to sweep)."""
        managed = []
        for job in await self.client.jobs():
            identity = parse_identity(str(job.get("comment", "")))
            if identity and job.get("job_state") in ACTIVE_STATES:
                managed.append(ManagedObject(namespace=identity["namespace"], name=identity["name"],
                                             uid=identity["uid"], backend_id=str(job["job_id"])))
        return managed

    async def ping(self) -> None:
        """Raise BackendUnavailable unless slurmrestd and slurmctld answer."""
        await self.client.ping()

    def close(self) -> None:
        """Nothing held between requests (a session per request)."""

    async def _jobs_of(self, environment: Environment) -> list[dict[str, Any]]:
        return [job for job in await self.client.jobs()
                if (parse_identity(str(job.get("comment", ""))) or {}).get("uid") == environment.uid]

    async def _cached_job(self, environment: Environment) -> dict[str, Any] | None:
        job_id = self._job_ids.get(environment.uid)
        if job_id is None:
            return None
        job = await self.client.job(job_id)
        identity = parse_identity(str((job or {}).get("comment", ""))) or {}
        return job if identity.get("uid") == environment.uid else None

    async def _observe_job(self, job: Mapping[str, Any]) -> Observation:
        endpoint = parse_endpoint(str(job.get("comment", "")))
        answers = bool(endpoint) and job.get("job_state") == "RUNNING" and await endpoint_answers(endpoint)
        return build_observation(job, answers)
