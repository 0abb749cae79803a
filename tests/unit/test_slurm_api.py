"""The API versions' seam (backends/slurm_api.py): requests built per version, answers read per version.

The answers are what real slurmrestds answered (tests/unit/golden/slurm-answers/<version>/, recorded
from Slurm 25.05.8 for v0.0.40-v0.0.43 and Debian's 22.05 for v0.0.38 by
tests/integration/slurm/record_answers.py); the requests are compared whole with
tests/unit/golden/slurm-requests/<version>-gpu-job.yaml (UPDATE_GOLDEN=1 rewrites them, as in
test_golden.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
from typing import Any

import pytest
import yaml

from analysis_operator.backends.base import BackendUnavailable
from analysis_operator.backends.slurm_api import (
    AUTO,
    SUPPORTED,
    DialectV004x,
    JobRequest,
    SlurmAnswerInvalid,
    UnsupportedApi,
    choose_version,
    describe_versions,
    dialect,
    gpus_in_gres_detail,
    gpus_in_tres,
    gpus_per_node,
    ignored_fields,
    served_versions,
)
from analysis_operator.backends.slurm_auth import job_nonce
from analysis_operator.backends.slurm_rest import SlurmRequestRefused, SlurmRestClient
from analysis_operator.settings import SlurmSettings

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden"
ANSWERS = GOLDEN / "slurm-answers"
REQUESTS = GOLDEN / "slurm-requests"
UPDATE = os.environ.get("UPDATE_GOLDEN", "") not in ("", "0")
NEW = ("v0.0.40", "v0.0.41", "v0.0.42", "v0.0.43")
ALL = (*NEW, "v0.0.38")

REQUEST = JobRequest(
    name="aenv-hpc-lab.team-a",
    comment="analysis-operator/v1 namespace=team-a name=hpc-lab uid=c2d8f0e6-41b7-4a93-b5e2-7f1a6c3d9e84",
    working_directory="/scratch/carol",
    standard_output="/scratch/carol/team-a.aenv-hpc-lab.c2d8f0e6-41b7-4a93-b5e2-7f1a6c3d9e84.0a1b2c3d.%j.out",
    cpus_per_task=16,
    memory_mib=131072,
    time_limit_minutes=331,
    environment={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "JUPYTER_PORT": "23199", "ODD": "a=b c"},
    partition="gpu",
    account="p11-20231234",
    qos="normal",
    gpus=2,
)


def answer(version: str, name: str) -> tuple[int, dict[str, Any]]:
    recorded = json.loads((ANSWERS / version / f"{name}.json").read_text())
    return recorded["status"], recorded["body"]


# ---------------------------------------------------------------- which version


def test_versions_are_described_as_runs():
    assert describe_versions(SUPPORTED) == "v0.0.40-v0.0.43 and v0.0.38"
    assert describe_versions(["v0.0.36", "v0.0.37", "v0.0.38"]) == "v0.0.36-v0.0.38"
    assert describe_versions(["v0.0.44", "v0.0.41", "v0.0.39"]) == "v0.0.44, v0.0.41 and v0.0.39"
    assert describe_versions([]) == "none"


@pytest.mark.parametrize(
    "served, setting, expected",
    [
        (("v0.0.43", "v0.0.42", "v0.0.41", "v0.0.40"), AUTO, "v0.0.43"),  # 25.05
        (("v0.0.44", "v0.0.43", "v0.0.42", "v0.0.41"), AUTO, "v0.0.43"),  # 25.11
        (("v0.0.42", "v0.0.41", "v0.0.40"), AUTO, "v0.0.42"),  # 24.11
        (("v0.0.41", "v0.0.40", "v0.0.39"), AUTO, "v0.0.41"),  # 24.05
        (("v0.0.38", "v0.0.37", "v0.0.36"), AUTO, "v0.0.38"),  # 22.05
        (("v0.0.43", "v0.0.42"), "v0.0.42", "v0.0.42"),  # pinned
        ((), "v0.0.40", "v0.0.40"),  # pinned: nothing asked
    ],
)
def test_the_newest_served_version_spoken_is_chosen(served, setting, expected):
    assert choose_version(served, setting) == expected


def test_a_slurmrestd_serving_no_spoken_version_says_what_it_serves_and_what_is_spoken():
    with pytest.raises(UnsupportedApi) as raised:
        choose_version(("v0.0.39",), AUTO)  # 23.02 with its own plugin only
    assert str(raised.value) == (
        "slurmrestd serves v0.0.39; the operator speaks v0.0.40-v0.0.43 and v0.0.38: none in common"
    )
    with pytest.raises(UnsupportedApi, match="no /slurm/ API"):
        choose_version((), AUTO)


@pytest.mark.parametrize("setting", ["v0.0.39", "v0.0.44", "0.0.43", "latest"])
def test_a_pinned_version_not_spoken_is_refused(setting):
    with pytest.raises(UnsupportedApi, match=f"api_version {setting} is not a version the operator speaks"):
        choose_version(("v0.0.43",), setting)


def test_served_versions_come_from_the_openapi_paths():
    document = json.loads((ANSWERS / "openapi-v3-paths.json").read_text())
    assert served_versions(document) == ("v0.0.43", "v0.0.42", "v0.0.41", "v0.0.40")
    assert served_versions({"paths": {"/slurm/v0.0.38/ping": {}, "/slurmdb/v0.0.38/jobs": {}}}) == ("v0.0.38",)
    with pytest.raises(SlurmAnswerInvalid):
        served_versions({"openapi": "3.0.2"})


# ---------------------------------------------------------------- requests, per version


def render(body: dict[str, Any]) -> str:
    return yaml.safe_dump(body, sort_keys=True, default_flow_style=False, width=10_000)


@pytest.mark.parametrize("version", ALL)
def test_submit_request_matches_its_golden_file(version):
    body = dialect(version).submit_body(REQUEST, "#!/bin/bash\nexec jupyter lab\n")
    path = REQUESTS / f"{version}-gpu-job.yaml"
    built = render(body)
    if UPDATE and (not path.exists() or path.read_text() != built):
        REQUESTS.mkdir(exist_ok=True)
        path.write_text(built)
        pytest.fail(f"UPDATE_GOLDEN: wrote {path}; review it and run again without UPDATE_GOLDEN", pytrace=False)
    assert path.exists(), f"{path} is missing: UPDATE_GOLDEN=1 makes it"
    assert built == path.read_text()


@pytest.mark.parametrize("version", NEW)
def test_new_versions_take_gpus_as_tres_per_node_and_never_gres(version):
    job = dialect(version).submit_body(REQUEST, "s")["job"]
    assert job["tres_per_node"] == "gres/gpu:2" and "gres" not in job
    assert job["environment"] == ["PATH=/usr/bin:/bin", "LANG=C.UTF-8", "JUPYTER_PORT=23199", "ODD=a=b c"]
    assert job["time_limit"] == {"set": True, "infinite": False, "number": 331}
    assert job["memory_per_node"] == {"set": True, "infinite": False, "number": 131072}
    assert job["cpus_per_task"] == 16 and job["script"] == "s"
    assert dialect(version).time_limit_body(90) == {"time_limit": {"set": True, "infinite": False, "number": 90}}


def test_v0038_takes_what_22_05_takes():
    body = dialect("v0.0.38").submit_body(REQUEST, "s")
    assert body["script"] == "s" and body["job"]["gres"] == "gpu:2" and "tres_per_node" not in body["job"]
    assert body["job"]["environment"]["ODD"] == "a=b c" and body["job"]["time_limit"] == 331
    assert dialect("v0.0.38").time_limit_body(90) == {"time_limit": 90}


@pytest.mark.parametrize("version", ALL)
@pytest.mark.parametrize("absent", ["partition", "account", "qos", "gres", "tres_per_node"])
def test_what_the_flavor_leaves_empty_is_not_sent(version, absent):
    request = JobRequest("n", "c", "/w", "/w/o", 1, 1, 1, {})
    assert absent not in dialect(version).job_fields(request)


# ---------------------------------------------------------------- answers, per version (recorded)


@pytest.mark.parametrize("version", ALL)
def test_a_running_gpu_job_is_read_with_its_allocation(version):
    status, body = answer(version, "job-running-gpu")
    (job,) = dialect(version).parse_jobs(body)
    assert status == 200
    assert (job.state, job.reason, job.user_name) == ("RUNNING", "None", "alice")
    assert job.user_id == 20001 and job.nodes == "localhost" and job.batch_host == "localhost"
    assert (job.cpus, job.gpus, job.gpus_requested) == (2.0, 2, 2)
    assert job.start_time > 1_700_000_000 and job.time_limit == 10
    assert job.comment.startswith("analysis-operator/v1 ") and job.standard_output.endswith(".out")
    # the GPUs held: gres_detail (tres_alloc_str counts them only where slurmdbd tracks gres/gpu)
    assert job.gres_detail == ("gpu:2(IDX:0-1)",) and job.tres_alloc_str.startswith("cpu=2,")
    assert job.tres_per_node == ("gres:gpu:2" if version == "v0.0.38" else "gres/gpu:2")


@pytest.mark.parametrize("version", ALL)
def test_a_pending_job_is_read_with_its_reason(version):
    _, body = answer(version, "job-pending")
    (job,) = dialect(version).parse_jobs(body)
    assert job.state == "PENDING" and job.reason in ("PartitionTimeLimit", "PartitionConfig", "Priority")
    assert job.start_time >= 0 and job.cpus >= 1 and job.gpus == 0


@pytest.mark.parametrize("version", ALL)
def test_a_jobs_output_path_is_read_as_submitted(version):
    """v0.0.40-v0.0.42 answer the output path with %j replaced by the job id (v0.0.43 and v0.0.38 as
    written): the operator reads the job's nonce, which keys JupyterLab's port, from the path as it
    submitted it, whichever version answered."""
    _, body = answer(version, "job-pending")
    raw = body["jobs"][0]
    expanded = version in ("v0.0.40", "v0.0.41", "v0.0.42")
    assert raw["standard_output"].endswith(f".{raw['job_id']}.out" if expanded else ".%j.out")
    submitted = "/scratch/alice/team-a.aenv-lab.c2d8f0e6-41b7-4a93-b5e2-7f1a6c3d9e84.0a1b2c3d.%j.out"
    raw["standard_output"] = submitted.replace("%j", str(raw["job_id"])) if expanded else submitted
    (job,) = dialect(version).parse_jobs(body)
    assert job.standard_output == submitted and job_nonce(job) == "0a1b2c3d"


@pytest.mark.parametrize("version", ALL)
def test_a_cancelled_job_is_read_with_its_exit(version):
    _, body = answer(version, "job-cancelled")
    (job,) = dialect(version).parse_jobs(body)
    assert job.state == "CANCELLED" and job.exit_code
    if version != "v0.0.38":
        assert job.exit_code.startswith(("SIGNALED", "EXITED", "CORE_DUMPED"))


@pytest.mark.parametrize("version", ALL)
@pytest.mark.parametrize("status", [0, 1, 78])
def test_a_job_that_exited_is_read_with_its_scripts_exit_status(version, status):
    """The batch script's own status (78: its HOME was not private), from v0.0.38's wait(2) status
    or the newer versions' exit_code object; none for a signalled job (the cancelled one)."""
    _, body = answer(version, "job-cancelled")
    (cancelled,) = dialect(version).parse_jobs(body)
    assert cancelled.exit_status is None
    raw = body["jobs"][0]
    if version == "v0.0.38":
        raw["exit_code"] = status << 8
    else:
        raw["exit_code"] = {
            "status": ["SUCCESS" if status == 0 else "ERROR"],
            "return_code": {"set": True, "infinite": False, "number": status},
            "signal": {"id": {"set": False, "infinite": False, "number": 0}, "name": ""},
        }
    (job,) = dialect(version).parse_jobs(body)
    assert job.exit_status == status


@pytest.mark.parametrize("version", ALL)
def test_the_queue_is_read(version):
    _, body = answer(version, "jobs")
    jobs = dialect(version).parse_jobs(body)
    assert jobs and all(job.job_id.isdigit() and job.state != "UNKNOWN" for job in jobs)


@pytest.mark.parametrize("version", ALL)
def test_a_node_is_read_with_its_address(version):
    _, body = answer(version, "node")
    (node,) = dialect(version).parse_nodes(body)
    assert node.name == "localhost" and node.address.startswith("10.250.")


@pytest.mark.parametrize("version", ALL)
def test_ping(version):
    _, body = answer(version, "ping")
    ping = dialect(version).parse_ping(body)
    assert ping.responding and ping.detail.endswith(": UP")


@pytest.mark.parametrize("version", NEW)
def test_a_ping_with_a_bad_token_is_200_and_not_responding(version):
    status, body = answer(version, "ping-bad-token")
    assert status == 200 and not dialect(version).errors(body)
    assert dialect(version).parse_ping(body).responding is False


def test_a_ping_with_a_bad_token_is_an_error_on_v0038():
    status, body = answer("v0.0.38", "ping-bad-token")
    assert status == 500 and dialect("v0.0.38").errors(body)


@pytest.mark.parametrize("version", ALL)
def test_a_token_slurmctld_refuses_is_unreachable_with_the_reason(version, tmp_path):
    """25.05: 511 with error 1007 (Protocol authentication error); 22.05: 500, error -1."""
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJIUzI1NiJ9.eyJleHAiOjE3MDAwMDAwMDAsInN1biI6InNsdXJtIn0.c2ln")  # exp 2023-11-14
    client, _ = client_on(version, {("GET", "jobs"): "jobs-bad-token"}, api_version=version)
    client.settings = SlurmSettings(token_file=str(token), api_version=version)
    with pytest.raises(BackendUnavailable) as raised:
        asyncio.run(client.jobs())
    assert f"the token in {token} expired at 2023-11-14T22:13:20Z" in str(raised.value)
    assert token.read_text() not in str(raised.value)
    if version != "v0.0.38":
        assert "refused the credentials for GET jobs as slurm (Unable to query jobs: Protocol authentication" in str(
            raised.value
        )


@pytest.mark.parametrize("version", ALL)
def test_a_ping_with_a_bad_token_is_unreachable_through_the_client(version):
    client, _ = client_on(version, {("GET", "ping"): "ping-bad-token"}, api_version=version)
    if version == "v0.0.38":
        with pytest.raises(BackendUnavailable):
            asyncio.run(client.ping())
    else:
        assert asyncio.run(client.ping()).responding is False


@pytest.mark.parametrize("version", ALL)
def test_submit_answer(version):
    _, body = answer(version, "submit")
    submitted = dialect(version).parse_submitted(body)
    assert submitted.job_id.isdigit() and submitted.ignored == ()


@pytest.mark.parametrize("version", NEW)
def test_a_gres_field_is_ignored_with_only_a_warning(version):
    """What makes `gres` dangerous: accepted, job id given, a warning the only trace."""
    status, body = answer(version, "submit-with-gres")
    submitted = dialect(version).parse_submitted(body)
    assert status == 200 and submitted.job_id.isdigit() and not dialect(version).errors(body)
    assert submitted.ignored == ("gres",)


@pytest.mark.parametrize("version", ALL)
def test_an_unknown_job_is_invalid_job_id(version):
    status, body = answer(version, "job-unknown")
    assert status == (500 if version == "v0.0.38" else 404)
    assert 2017 in {error.code for error in dialect(version).errors(body)}


@pytest.mark.parametrize("version", ALL)
def test_cancelling_an_ended_job_is_200_with_the_error_inside_if_any(version):
    status, body = answer(version, "cancel-ended")
    errors = dialect(version).cancel_errors(body)
    assert status == 200 and not dialect(version).errors(body)
    # v0.0.42 on say why, per job, in `status`; before, nothing at all
    assert {error.code for error in errors} == ({2021} if version in ("v0.0.42", "v0.0.43") else set())


@pytest.mark.parametrize("version", ALL)
def test_an_owner_raising_her_time_limit_is_refused(version):
    status, body = answer(version, "update-refused")
    api = dialect(version)
    codes = {error.code for error in api.errors(body) + api.update_errors(body)}
    assert codes and all(2000 <= code < 6000 for code in codes), (status, body)


# ---------------------------------------------------------------- answers of another version


@pytest.mark.parametrize(
    "version, other",
    [("v0.0.43", "v0.0.38"), ("v0.0.40", "v0.0.38"), ("v0.0.38", "v0.0.43")],
)
def test_an_answer_of_another_version_is_refused_naming_the_field(version, other):
    _, body = answer(other, "job-running-gpu")
    with pytest.raises(SlurmAnswerInvalid, match="job_state") as raised:
        dialect(version).parse_jobs(body)
    assert version in str(raised.value)


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda job: job.pop("job_state"), "job_state"),
        (lambda job: job.pop("job_id"), "job_id"),
        (lambda job: job.update(cpus=2), "cpus"),  # a plain number: v0.0.38's type
        (lambda job: job.update(start_time="yesterday"), "start_time"),
        (lambda job: job.update(exit_code=0), "exit_code"),
    ],
)
def test_a_field_missing_or_of_another_type_is_named(change, field):
    _, body = answer("v0.0.43", "job-running-gpu")
    change(body["jobs"][0])
    with pytest.raises(SlurmAnswerInvalid, match=field):
        dialect("v0.0.43").parse_jobs(body)


def test_an_answer_without_its_list_is_refused():
    with pytest.raises(SlurmAnswerInvalid, match="`jobs` is missing"):
        dialect("v0.0.43").parse_jobs({"meta": {}})
    with pytest.raises(SlurmAnswerInvalid, match="responding"):
        dialect("v0.0.43").parse_ping({"pings": [{"hostname": "x", "pinged": "UP"}]})


# ---------------------------------------------------------------- pieces


@pytest.mark.parametrize(
    "flags, state",
    [
        (["RUNNING"], "RUNNING"),
        (["COMPLETED", "COMPLETING"], "COMPLETING"),
        (["PENDING", "REQUEUED"], "REQUEUED"),
        (["RUNNING", "CONFIGURING"], "CONFIGURING"),
        (["PENDING", "POWER_UP_NODE"], "PENDING"),  # a flag squeue does not name
        (["CANCELLED"], "CANCELLED"),
        ([], "UNKNOWN"),
    ],
)
def test_a_state_list_reads_as_squeue_names_it(flags, state):
    assert DialectV004x("v0.0.43")._state({"job_state": flags}, "job") == state


@pytest.mark.parametrize(
    "tres, gpus",
    [
        ("cpu=2,mem=1G,node=1,billing=2,gres/gpu=2", 2),
        ("cpu=2,gres/gpu=3,gres/gpu:a100=3", 3),  # the typed count repeats the total
        ("cpu=2,gres/gpu:a100=1,gres/gpu:h100=2", 3),
        ("cpu=2,mem=1G", 0),
        ("", 0),
    ],
)
def test_gpus_in_tres(tres, gpus):
    assert gpus_in_tres(tres) == gpus


@pytest.mark.parametrize(
    "tres_per_node, gpus",
    [("gres/gpu:2", 2), ("gres/gpu:a100:3", 3), ("gres/gpu", 1), ("gres:gpu:2", 2), ("gres/mps:100", 0), ("", 0)],
)
def test_gpus_per_node(tres_per_node, gpus):
    assert gpus_per_node(tres_per_node) == gpus


@pytest.mark.parametrize(
    "details, expected",
    [([], 0), (["gpu:2(IDX:0-1)"], 2), (["gpu:a100:3(IDX:0-2)"], 3), (["gpu:1(IDX:0)", "gpu:1(IDX:3)"], 2)],
)
def test_gpus_in_gres_detail(details, expected):
    assert gpus_in_gres_detail(details) == expected


@pytest.mark.parametrize(
    "warnings, ignored",
    [
        (['Ignoring unknown field "gres"'], ("gres",)),
        (['Ignoring unknown field "gres"', 'Ignoring unknown field "foo"'], ("gres", "foo")),
        (["Job step information ignored. Job update requests apply to whole job"], ()),
        (["v0.0.40 is deprecated"], ()),
        ([], ()),
    ],
)
def test_ignored_fields(warnings, ignored):
    assert ignored_fields(warnings) == ignored


# ---------------------------------------------------------------- the client, on recorded answers


class Recorded:
    """Serves recorded answers in place of HTTP: (method, path) -> (status, body)."""

    def __init__(self, version: str, routes: dict[tuple[str, str], str]):
        self.version, self.routes, self.sent = version, routes, []

    async def __call__(self, method, url, payload, headers):
        self.sent.append((method, url, payload))
        if url.endswith("/openapi/v3"):
            return 200, json.loads((ANSWERS / "openapi-v3-paths.json").read_text())
        path = url.split(f"/slurm/{self.version}/", 1)[1]
        return answer(self.version, self.routes[(method, path)])


def client_on(version: str, routes: dict[tuple[str, str], str], **settings) -> tuple[SlurmRestClient, Recorded]:
    client = SlurmRestClient(SlurmSettings(token_file="/dev/null", **settings))
    recorded = Recorded(version, routes)
    client._send = recorded  # type: ignore[method-assign]
    return client, recorded


def test_the_client_discovers_the_version_once():
    client, recorded = client_on("v0.0.43", {("GET", "ping"): "ping"})
    asyncio.run(client.ping())
    asyncio.run(client.ping())
    assert [url.rsplit("/", 2)[-2:] for _, url, _ in recorded.sent] == [
        ["openapi", "v3"],
        ["v0.0.43", "ping"],
        ["v0.0.43", "ping"],
    ]


def test_a_pinned_version_is_not_asked_for():
    client, recorded = client_on("v0.0.41", {("GET", "ping"): "ping"}, api_version="v0.0.41")
    assert asyncio.run(client.ping()).responding
    assert [url.rsplit("/", 2)[-2:] for _, url, _ in recorded.sent] == [["v0.0.41", "ping"]]


def test_a_pinned_version_not_spoken_is_a_clear_unavailability():
    client, _ = client_on("v0.0.43", {}, api_version="v0.0.39")
    with pytest.raises(BackendUnavailable, match=r"api_version v0\.0\.39 is not a version the operator speaks"):
        asyncio.run(client.ping())


@pytest.mark.parametrize("version", ALL)
def test_an_unknown_job_is_none(version):
    client, _ = client_on(version, {("GET", "job/999999"): "job-unknown"}, api_version=version)
    assert asyncio.run(client.job("999999")) is None


@pytest.mark.parametrize("version", ALL)
def test_cancelling_an_ended_job_counts_as_gone(version):
    client, _ = client_on(version, {("DELETE", "job/5"): "cancel-ended"}, api_version=version)
    asyncio.run(client.cancel("5"))  # no exception


@pytest.mark.parametrize("version", ALL)
def test_a_refused_time_limit_raise_is_a_refusal(version):
    client, _ = client_on(version, {("POST", "job/5"): "update-refused"}, api_version=version)
    with pytest.raises(SlurmRequestRefused):
        asyncio.run(client.update_time_limit("5", 99))


def test_an_answer_of_another_version_is_a_clear_unavailability():
    client, _ = client_on("v0.0.43", {("GET", "jobs"): "jobs"}, api_version="v0.0.43")

    async def other_version(method, url, payload, headers):
        return answer("v0.0.38", "jobs")

    client._send = other_version  # type: ignore[method-assign]
    with pytest.raises(BackendUnavailable, match=r"in a form the operator cannot read: v0\.0\.43 job .*job_state"):
        asyncio.run(client.jobs())


def test_a_version_slurmrestd_stopped_serving_is_asked_for_again():
    """An upgrade under a running operator: the discovered version answers 404; the next call asks again."""
    client, recorded = client_on("v0.0.43", {("GET", "ping"): "ping"})
    asyncio.run(client.ping())
    speaking = client._dialect

    async def gone(method, url, payload, headers):
        return 404, None  # slurmrestd's "not found" for a path it does not serve

    client._send = gone  # type: ignore[method-assign]
    with pytest.raises(BackendUnavailable, match=r"does not serve GET ping in v0\.0\.43 \(HTTP 404\)"):
        asyncio.run(client.ping())
    assert speaking is not None and client._dialect is None
    client._send = recorded  # type: ignore[method-assign]
    assert asyncio.run(client.ping()).responding and recorded.sent[-2][1].endswith("/openapi/v3")


def test_a_pinned_version_not_served_says_to_check_the_setting():
    client, _ = client_on("v0.0.38", {}, api_version="v0.0.38")

    async def gone(method, url, payload, headers):
        return 404, None

    client._send = gone  # type: ignore[method-assign]
    with pytest.raises(BackendUnavailable, match=r"check api_version \(v0\.0\.38\) against what it serves"):
        asyncio.run(client.ping())
