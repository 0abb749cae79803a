"""slurmrestd's API versions at one seam: what the operator asks for and what it reads, per version.

The backend (backends/slurm.py) speaks in version-free terms: a `JobRequest` to submit, a `SlurmJob`,
a `SlurmNode`, a `Ping`, `SlurmError`s. Each API version the operator speaks has one `Dialect`
that turns those requests into that version's request bodies and that version's answers into
those terms (pure; no I/O). Nothing else in the operator looks at an API version.

Versions spoken (SUPPORTED, the newest served is preferred):

- v0.0.40-v0.0.43: Slurm 24.05-25.05 (25.05 serves all four; 24.11 adds v0.0.42, 25.11 drops v0.0.40
  and adds v0.0.44). One shape for everything the operator uses, checked against the answers of
  a real 25.05 (tests/unit/slurm_answers/): the job environment a list of "K=V", numbers
  `{set, infinite, number}`, `job_state` a list of flags, `exit_code` an object, GPUs requested
  as `tres_per_node: "gres/gpu:N"` (a `gres` field is ignored with only a warning, and the job
  would run without GPUs). Differences: the ping says `responding` from v0.0.42 on (`pinged`
  before).
- v0.0.38: Slurm 22.05 (Debian 12), the local stack's other Slurm (hack/slurm.sh
  SLURM_VERSION=22.05). Environment a dict, plain numbers, `job_state` a string, `gres: "gpu:N"`.

v0.0.39 and v0.0.44 are not spoken: v0.0.39 was served only by 23.02/23.11, v0.0.44 is served
together with v0.0.43 by every Slurm that has it.

An answer that lacks a field the operator needs, or holds another version's type for it, raises
SlurmAnswerInvalid naming the field, the version and what came: never a guess.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

AUTO = "auto"  # SlurmSettings.api_version: discover what slurmrestd serves (GET /openapi/v3)
SUPPORTED: tuple[str, ...] = ("v0.0.43", "v0.0.42", "v0.0.41", "v0.0.40", "v0.0.38")  # preferred first

# Slurm's error numbers the backend acts on (slurm_errno.h).
INVALID_JOB_ID = 2017  # ESLURM_INVALID_JOB_ID: unknown job (never existed, or purged after MinJobAge)
ALREADY_DONE = 2021  # ESLURM_ALREADY_DONE: the job has already finished
# The submitting user is not a user slurmctld knows (25.05 refuses the job; 22.05 ran it as nobody).
UNKNOWN_USER = frozenset({2010, 2165, 2166})  # ESLURM_USER_ID_MISSING, _INVALID, _UNKNOWN

# Flags that name a job's state before its base state, in squeue's order (job_state_string()).
_STATE_FLAGS = (
    "COMPLETING",
    "STAGE_OUT",
    "CONFIGURING",
    "RESIZING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "SPECIAL_EXIT",
    "STOPPED",
    "REVOKED",
    "RESV_DEL_HOLD",
    "SIGNALING",
)
_BASE_STATES = frozenset(
    {
        "PENDING",
        "RUNNING",
        "SUSPENDED",
        "COMPLETED",
        "CANCELLED",
        "FAILED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
        "OUT_OF_MEMORY",
    }
)
_VERSION = re.compile(r"^/slurm/(v\d+\.\d+\.\d+)/")
# Warnings about fields Slurm did not apply: "Ignoring unknown field \"gres\"", "... field ignored".
_IGNORED_FIELD = re.compile(r"(?:ignor\w*|unknown)\b[^\"']*[\"']([A-Za-z_][\w/]*)[\"']", re.IGNORECASE)
# GPUs in TRES text: tres_alloc_str / tres_req_str "gres/gpu=2" or "gres/gpu:a100=2";
# tres_per_node "gres/gpu:2", "gres/gpu:a100:2", "gres/gpu" (one); 22.05 "gres:gpu:2".
_TRES_COUNT = re.compile(r"^gres/gpu(?::(?P<type>[^=,]+))?=(?P<count>\d+)$")
_TRES_PER_NODE = re.compile(r"^gres[/:]gpu(?::(?P<rest>[^,]*))?$")
_GRES_DETAIL = re.compile(r"^gpu(?::[^:(]+)?:(\d+)")


class SlurmAnswerInvalid(ValueError):
    """An answer that is not what its API version answers: a field missing or of another version's type."""


class UnsupportedApi(ValueError):
    """slurmrestd serves none of the versions the operator speaks (or the pinned one is not spoken)."""


def describe_versions(versions: Iterable[str]) -> str:
    """'v0.0.40-v0.0.43 and v0.0.38' for a set of versions (pure): runs of minor versions joined."""
    numbers = sorted({_number_of(version) for version in versions})
    runs: list[list[tuple[int, ...]]] = []
    for number in numbers:
        if runs and runs[-1][-1][:2] == number[:2] and runs[-1][-1][2] + 1 == number[2]:
            runs[-1].append(number)
        else:
            runs.append([number])
    text = [_version_of(run[0]) if len(run) == 1 else f"{_version_of(run[0])}-{_version_of(run[-1])}" for run in runs]
    text.reverse()  # newest first
    return " and ".join([", ".join(text[:-1]), text[-1]]) if len(text) > 1 else (text[0] if text else "none")


def _number_of(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.removeprefix("v").split("."))


def _version_of(number: tuple[int, ...]) -> str:
    return "v" + ".".join(str(part) for part in number)


def served_versions(openapi: Mapping[str, Any]) -> tuple[str, ...]:
    """The /slurm/<version>/ API versions an OpenAPI document (GET /openapi/v3) lists, newest first (pure)."""
    paths = openapi.get("paths") if isinstance(openapi, Mapping) else None
    if not isinstance(paths, Mapping):
        raise SlurmAnswerInvalid("GET /openapi/v3 answered a document without `paths`: is this slurmrestd?")
    found = {match.group(1) for path in paths if (match := _VERSION.match(str(path)))}
    return tuple(sorted(found, key=_number_of, reverse=True))


def choose_version(served: Sequence[str], setting: str = AUTO) -> str:
    """The version to speak: the pinned one, else the newest served that the operator speaks (pure)."""
    spoken = describe_versions(SUPPORTED)
    if setting and setting != AUTO:
        if setting not in SUPPORTED:
            raise UnsupportedApi(
                f"api_version {setting} is not a version the operator speaks ({spoken}); set one of them, or auto"
            )
        return setting
    for version in SUPPORTED:
        if version in served:
            return version
    serves = describe_versions(served) if served else "no /slurm/ API"
    raise UnsupportedApi(f"slurmrestd serves {serves}; the operator speaks {spoken}: none in common")


# ---------------------------------------------------------------- the version-free terms


@dataclass(frozen=True)
class JobRequest:
    """What the operator asks Slurm to run (its resources, where, as what), in no version's words."""

    name: str
    comment: str
    working_directory: str
    standard_output: str
    cpus_per_task: int
    memory_mib: int
    time_limit_minutes: int
    environment: Mapping[str, str] = field(default_factory=dict)
    partition: str = ""
    account: str = ""
    qos: str = ""
    gpus: int = 0

    def with_environment(self, **variables: str) -> JobRequest:
        return replace(self, environment={**self.environment, **variables})


@dataclass(frozen=True)
class SlurmJob:
    """A job as the operator reads it, whatever version said it."""

    job_id: str
    state: str = "UNKNOWN"  # one name as squeue shows it: a flag (COMPLETING, ...) before the base state
    reason: str = "None"  # state_reason
    user_name: str = ""
    user_id: int | None = None
    comment: str = ""
    standard_output: str = ""
    nodes: str = ""
    batch_host: str = ""
    cpus: float = 0.0  # allocated while it runs (tres_alloc_str), else what it asks
    gpus: int = 0  # allocated (tres_alloc_str, else gres_detail)
    gpus_requested: int = 0  # asked for (tres_per_node, else tres_req_str)
    start_time: int = 0  # seconds since the epoch; 0: not started (or not known)
    time_limit: int = 0  # minutes; 0: none
    exit_code: str = ""  # for people: "0", "1", "SIGNALED TERM"
    exit_status: int | None = None  # the batch script's own exit status; None: signalled, or not known
    tres_alloc_str: str = ""
    tres_per_node: str = ""
    gres_detail: tuple[str, ...] = ()


@dataclass(frozen=True)
class SlurmNode:
    name: str
    address: str = ""  # NodeAddr
    hostname: str = ""


@dataclass(frozen=True)
class Ping:
    responding: bool  # a slurmctld answered the ping (for this request's user and token)
    detail: str  # for people: "localhost: UP"


@dataclass(frozen=True)
class SlurmError:
    code: int
    text: str


@dataclass(frozen=True)
class Submitted:
    job_id: str
    ignored: tuple[str, ...] = ()  # request fields Slurm says it ignored
    warnings: tuple[str, ...] = ()


# ---------------------------------------------------------------- shared parsing


def _require(raw: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in raw:
        raise SlurmAnswerInvalid(f"{where}: `{key}` is missing")
    value = raw[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in kinds):
        raise SlurmAnswerInvalid(f"{where}: `{key}` is {value!r}, expected {_kind_name(kind)}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object", bool: "a boolean"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds))


def _text(raw: Mapping[str, Any], key: str) -> str:
    value = raw.get(key)
    return "" if value is None else str(value)


def _errors(answer: Mapping[str, Any]) -> list[SlurmError]:
    found = []
    for error in answer.get("errors") or ():
        if not isinstance(error, Mapping) or not error:
            continue
        code = error.get("error_number", error.get("error_code", error.get("errno", -1)))
        said = [str(text) for text in (error.get("description"), error.get("error")) if text]
        text = ": ".join(dict.fromkeys(said)) or f"error {code}"  # "Batch job submission failed: Invalid user ID"
        found.append(SlurmError(int(code) if isinstance(code, int) else -1, text))
    return found


def _warnings(answer: Mapping[str, Any]) -> list[str]:
    found = []
    for warning in answer.get("warnings") or ():
        if isinstance(warning, Mapping):
            text = warning.get("description") or warning.get("source")
            if text:
                found.append(str(text))
        elif warning:
            found.append(str(warning))
    return found


def ignored_fields(warnings: Iterable[str]) -> tuple[str, ...]:
    """The request fields a submit answer's warnings say Slurm ignored (pure)."""
    return tuple(dict.fromkeys(match.group(1) for text in warnings for match in _IGNORED_FIELD.finditer(text)))


def gpus_in_tres(tres: str) -> int:
    """GPUs in a TRES count list (tres_alloc_str, tres_req_str): `gres/gpu=N`, else the typed ones summed."""
    untyped, typed = None, 0
    for item in (tres or "").split(","):
        match = _TRES_COUNT.match(item.strip())
        if match is None:
            continue
        if match.group("type") is None:
            untyped = int(match.group("count"))
        else:
            typed += int(match.group("count"))
    return untyped if untyped is not None else typed


def gpus_per_node(tres_per_node: str) -> int:
    """GPUs a job asks per node (tres_per_node `gres/gpu:N`, `gres/gpu:type:N`, `gres/gpu`)."""
    total = 0
    for item in (tres_per_node or "").split(","):
        match = _TRES_PER_NODE.match(item.strip())
        if match is None:
            continue
        rest = (match.group("rest") or "").split(":")
        total += int(rest[-1]) if rest[-1].isdigit() else 1
    return total


def gpus_in_gres_detail(details: Iterable[str]) -> int:
    """GPUs in gres_detail such as 'gpu:2(IDX:0-1)' or 'gpu:a100:3(IDX:0-2)'."""
    total = 0
    for detail in details or ():
        match = _GRES_DETAIL.match(str(detail))
        total += int(match.group(1)) if match else 0
    return total


def _cpus_in_tres(tres: str) -> float | None:
    for item in (tres or "").split(","):
        name, _, count = item.strip().partition("=")
        if name == "cpu" and count.isdigit():
            return float(count)
    return None


def _output_as_submitted(path: str, job_id: int) -> str:
    """A job's output path as the operator submitted it: slurmrestd v0.0.40-v0.0.42 answer it with
    `%j` replaced by the job's id (v0.0.43 and v0.0.38 as written). The operator reads the job's
    environment and nonce back from that path (backends/slurm_auth.py)."""
    expanded = f".{job_id}.out"
    return f"{path.removesuffix(expanded)}.%j.out" if path.endswith(expanded) else path


def _list_of(answer: Mapping[str, Any], key: str, where: str) -> list[Mapping[str, Any]]:
    items: list[Mapping[str, Any]] = []
    for item in _require(answer, key, list, where):
        if not isinstance(item, Mapping):
            raise SlurmAnswerInvalid(f"{where}: an item of `{key}` is {item!r}, expected an object")
        items.append(item)
    return items


# ---------------------------------------------------------------- the dialects


class Dialect:
    """One API version's requests and answers. Subclasses fill in what differs."""

    version: str = ""

    # -- requests

    def job_fields(self, request: JobRequest) -> dict[str, Any]:
        """The submitted job's description (without the script)."""
        raise NotImplementedError

    def submit_body(self, request: JobRequest, script: str) -> dict[str, Any]:
        raise NotImplementedError

    def time_limit_body(self, minutes: int) -> dict[str, Any]:
        raise NotImplementedError

    # -- answers

    def errors(self, answer: Mapping[str, Any]) -> list[SlurmError]:
        return _errors(answer)

    def warnings(self, answer: Mapping[str, Any]) -> list[str]:
        return _warnings(answer)

    def parse_submitted(self, answer: Mapping[str, Any]) -> Submitted:
        where = f"{self.version} submit answer"
        job_id = _require(answer, "job_id", (int, str), where)
        warnings = tuple(self.warnings(answer))
        return Submitted(str(job_id), ignored_fields(warnings), warnings)

    def parse_jobs(self, answer: Mapping[str, Any]) -> list[SlurmJob]:
        return [self.parse_job(job) for job in _list_of(answer, "jobs", f"{self.version} jobs answer")]

    def parse_nodes(self, answer: Mapping[str, Any]) -> list[SlurmNode]:
        where = f"{self.version} nodes answer"
        return [
            SlurmNode(
                name=str(_require(node, "name", str, where)),
                address=_text(node, "address"),
                hostname=_text(node, "hostname"),
            )
            for node in _list_of(answer, "nodes", where)
        ]

    def parse_ping(self, answer: Mapping[str, Any]) -> Ping:
        raise NotImplementedError

    def parse_job(self, raw: Mapping[str, Any]) -> SlurmJob:
        raise NotImplementedError

    def cancel_errors(self, answer: Mapping[str, Any]) -> list[SlurmError]:
        """Errors a cancel's answer holds besides `errors` (v0.0.40+: per job, in `status`)."""
        return []

    def update_errors(self, answer: Mapping[str, Any]) -> list[SlurmError]:
        """Errors an update's answer holds besides `errors`."""
        return []


class DialectV0038(Dialect):
    """Slurm 22.05's v0.0.38."""

    version = "v0.0.38"

    def job_fields(self, request: JobRequest) -> dict[str, Any]:
        job: dict[str, Any] = {
            "name": request.name,
            "comment": request.comment,
            "current_working_directory": request.working_directory,
            "standard_output": request.standard_output,
            "cpus_per_task": request.cpus_per_task,
            "memory_per_node": request.memory_mib,
            "time_limit": request.time_limit_minutes,
            "environment": dict(request.environment),
        }
        optional = {
            "partition": request.partition,
            "account": request.account,
            "qos": request.qos,
            # v0.0.38 has no tres_per_node for submission: `gres` is how 22.05 takes GPUs.
            "gres": f"gpu:{request.gpus}" if request.gpus else "",
        }
        job.update({key: value for key, value in optional.items() if value})
        return job

    def submit_body(self, request: JobRequest, script: str) -> dict[str, Any]:
        return {"job": self.job_fields(request), "script": script}

    def time_limit_body(self, minutes: int) -> dict[str, Any]:
        return {"time_limit": minutes}

    def parse_ping(self, answer: Mapping[str, Any]) -> Ping:
        pings = _list_of(answer, "pings", "v0.0.38 ping answer")
        up = [str(ping.get("hostname") or "?") for ping in pings if ping.get("ping") == "UP"]
        detail = ", ".join(f"{ping.get('hostname') or '?'}: {ping.get('ping') or '?'}" for ping in pings)
        return Ping(bool(up), detail or "no controller in the answer")

    def parse_job(self, raw: Mapping[str, Any]) -> SlurmJob:
        job_id = _require(raw, "job_id", int, "v0.0.38 job")
        where = f"v0.0.38 job {job_id}"
        state = _require(raw, "job_state", str, where)
        tres_alloc = _text(raw, "tres_alloc_str")
        details = tuple(str(detail) for detail in raw.get("gres_detail") or ())
        cpus, asked = _cpus_in_tres(tres_alloc), _plain_number(raw, "cpus", where)
        return SlurmJob(
            job_id=str(job_id),
            state=state,
            reason=_text(raw, "state_reason") or "None",
            user_name=_text(raw, "user_name"),
            user_id=raw.get("user_id") if isinstance(raw.get("user_id"), int) else None,
            comment=_text(raw, "comment"),
            standard_output=_text(raw, "standard_output"),
            nodes=_text(raw, "nodes"),
            batch_host=_text(raw, "batch_host"),
            cpus=cpus if cpus is not None else float(asked),
            gpus=gpus_in_tres(tres_alloc) or gpus_in_gres_detail(details),
            gpus_requested=gpus_per_node(_text(raw, "tres_per_node")) or gpus_in_tres(_text(raw, "tres_req_str")),
            start_time=_plain_number(raw, "start_time", where),
            time_limit=_plain_number(raw, "time_limit", where),
            exit_code=_text(raw, "exit_code"),
            exit_status=_wait_status_exit(raw.get("exit_code")),
            tres_alloc_str=tres_alloc,
            tres_per_node=_text(raw, "tres_per_node"),
            gres_detail=details,
        )


def _wait_status_exit(value: Any) -> int | None:
    """The exit status in v0.0.38's `exit_code`, a wait(2) status as slurmctld keeps it (None if
    the job was signalled, or there is none)."""
    if not isinstance(value, int) or isinstance(value, bool) or value & 0x7F:
        return None
    return (value >> 8) & 0xFF


def _plain_number(raw: Mapping[str, Any], key: str, where: str) -> int:
    value = raw.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SlurmAnswerInvalid(f"{where}: `{key}` is {value!r}, expected a number (v0.0.38)")
    return int(value)


class DialectV004x(Dialect):
    """Slurm 24.05-25.05's v0.0.40-v0.0.43: one shape for what the operator uses."""

    def __init__(self, version: str) -> None:
        self.version = version

    @staticmethod
    def _number(value: int) -> dict[str, Any]:
        return {"set": True, "infinite": False, "number": value}

    def job_fields(self, request: JobRequest) -> dict[str, Any]:
        job: dict[str, Any] = {
            "name": request.name,
            "comment": request.comment,
            "current_working_directory": request.working_directory,
            "standard_output": request.standard_output,
            "cpus_per_task": request.cpus_per_task,
            "memory_per_node": self._number(request.memory_mib),
            "time_limit": self._number(request.time_limit_minutes),
            "environment": [f"{name}={value}" for name, value in request.environment.items()],
        }
        optional = {
            "partition": request.partition,
            "account": request.account,
            "qos": request.qos,
            # Never `gres`: these versions ignore it with only a warning, and the job runs without GPUs.
            "tres_per_node": f"gres/gpu:{request.gpus}" if request.gpus else "",
        }
        job.update({key: value for key, value in optional.items() if value})
        return job

    def submit_body(self, request: JobRequest, script: str) -> dict[str, Any]:
        return {"job": {**self.job_fields(request), "script": script}}

    def time_limit_body(self, minutes: int) -> dict[str, Any]:
        return {"time_limit": self._number(minutes)}

    def parse_ping(self, answer: Mapping[str, Any]) -> Ping:
        where = f"{self.version} ping answer"
        pings = _list_of(answer, "pings", where)
        # v0.0.42 on: `responding` (required); before: `pinged` "UP"/"DOWN".
        key = "responding" if _number_of(self.version) >= (0, 0, 42) else "pinged"
        states = []
        for ping in pings:
            value = _require(ping, key, bool if key == "responding" else str, where)
            states.append((str(ping.get("hostname") or "?"), value is True or value == "UP"))
        detail = ", ".join(f"{host}: {'UP' if up else 'not responding'}" for host, up in states)
        return Ping(any(up for _, up in states), detail or "no controller in the answer")

    def _no_val(self, raw: Mapping[str, Any], key: str, where: str) -> int | None:
        """A {set, infinite, number} field: its number, None when not set or infinite."""
        value = raw.get(key)
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise SlurmAnswerInvalid(
                f"{where}: `{key}` is {value!r}, expected {{set, infinite, number}} ({self.version})"
            )
        if not value.get("set") or value.get("infinite"):
            return None
        number = value.get("number")
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise SlurmAnswerInvalid(f"{where}: `{key}.number` is {number!r}, expected a number")
        return int(number)

    def _state(self, raw: Mapping[str, Any], where: str) -> str:
        flags = _require(raw, "job_state", list, where)
        names = [str(flag) for flag in flags]
        for flag in _STATE_FLAGS:
            if flag in names:
                return flag
        base = [name for name in names if name in _BASE_STATES]
        return base[0] if base else (names[0] if names else "UNKNOWN")

    def _exit_code(self, raw: Mapping[str, Any], where: str) -> str:
        value = raw.get("exit_code")
        if value is None:
            return ""
        if not isinstance(value, Mapping):
            raise SlurmAnswerInvalid(f"{where}: `exit_code` is {value!r}, expected an object ({self.version})")
        status = " ".join(str(item) for item in value.get("status") or ())
        signal = value.get("signal")
        if "SIGNALED" in status and isinstance(signal, Mapping) and signal.get("name"):
            return f"{status} {signal['name']}"
        code = self._no_val(value, "return_code", where)
        return f"{status} {code}".strip() if code is not None else status

    def _exit_status(self, raw: Mapping[str, Any], where: str) -> int | None:
        """The return code in `exit_code` when the job exited (not signalled; status ERROR or SUCCESS)."""
        value = raw.get("exit_code")
        if not isinstance(value, Mapping) or "SIGNALED" in (value.get("status") or ()):
            return None
        return self._no_val(value, "return_code", where)

    def parse_job(self, raw: Mapping[str, Any]) -> SlurmJob:
        job_id = _require(raw, "job_id", int, f"{self.version} job")
        where = f"{self.version} job {job_id}"
        state = self._state(raw, where)
        tres_alloc = _text(raw, "tres_alloc_str")
        details = tuple(str(detail) for detail in raw.get("gres_detail") or ())
        cpus, asked = _cpus_in_tres(tres_alloc), self._no_val(raw, "cpus", where)
        user_id = raw.get("user_id")
        return SlurmJob(
            job_id=str(job_id),
            state=state,
            reason=_text(raw, "state_reason") or "None",
            user_name=_text(raw, "user_name"),
            user_id=user_id if isinstance(user_id, int) and not isinstance(user_id, bool) else None,
            comment=_text(raw, "comment"),
            standard_output=_output_as_submitted(_text(raw, "standard_output"), job_id),
            nodes=_text(raw, "nodes"),
            batch_host=_text(raw, "batch_host"),
            cpus=cpus if cpus is not None else float(asked or 0),
            gpus=gpus_in_tres(tres_alloc) or gpus_in_gres_detail(details),
            gpus_requested=gpus_per_node(_text(raw, "tres_per_node")) or gpus_in_tres(_text(raw, "tres_req_str")),
            start_time=self._no_val(raw, "start_time", where) or 0,
            time_limit=self._no_val(raw, "time_limit", where) or 0,
            exit_code=self._exit_code(raw, where),
            exit_status=self._exit_status(raw, where),
            tres_alloc_str=tres_alloc,
            tres_per_node=_text(raw, "tres_per_node"),
            gres_detail=details,
        )

    def cancel_errors(self, answer: Mapping[str, Any]) -> list[SlurmError]:
        found = []
        for item in answer.get("status") or ():
            error = item.get("error") if isinstance(item, Mapping) else None
            if not isinstance(error, Mapping):
                continue
            code = error.get("code")
            if isinstance(code, int) and code != 0:
                found.append(SlurmError(code, str(error.get("message") or error.get("string") or f"error {code}")))
        return found

    def update_errors(self, answer: Mapping[str, Any]) -> list[SlurmError]:
        # slurmrestd passes a refused update of one job on as a warning with the return code.
        found = []
        for text in self.warnings(answer):
            match = re.search(r"non-zero return-code\[(\d+)\]:?\s*(.*)", text)
            if match:
                found.append(SlurmError(int(match.group(1)), match.group(2) or text))
        return found


def dialect(version: str) -> Dialect:
    """The dialect of a version the operator speaks; UnsupportedApi for any other."""
    if version == "v0.0.38":
        return DialectV0038()
    if version in SUPPORTED:
        return DialectV004x(version)
    raise UnsupportedApi(f"{version} is not a version the operator speaks ({describe_versions(SUPPORTED)})")


NEWEST = dialect(SUPPORTED[0])
