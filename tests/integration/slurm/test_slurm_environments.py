"""The "JupyterLab Cluster" card end to end: AnalysisEnvironment -> operator -> real Slurm."""

from __future__ import annotations

import time

import pytest

from tests.integration.slurm.conftest import slurm_commands_path
from tests.integration.slurm.test_slurm_backend import answers, jupyter_status, jupyter_url, upstream_of
from tests.waiting import wait_for


def test_cluster_card_runs_jupyter_in_a_slurm_job_and_cancels_it_on_delete(slurm_environments, slurm_environ, backend):
    environments = slurm_environments
    created = environments.create("hpc", flavor="jupyter-cluster", lifetime="1h")
    metadata = environments.get("hpc")["metadata"]
    wait_for(
        lambda: "analysis.panosc.eu/finalizer" in (environments.get("hpc")["metadata"].get("finalizers") or []),
        timeout=30,
        what="the finalizer",
    )
    ready = environments.wait_phase("hpc", "Ready", timeout=90)
    status = ready["status"]
    assert status["backend"]["kind"] == "slurm" and status["backend"]["id"].isdigit()
    # the job's JupyterLab really answers, on its node's address under its base path (token required)
    environment, upstream = upstream_of(backend, ready)
    assert status["backend"]["addresses"] == [upstream.address]
    assert jupyter_status(upstream, environment)[0] == 403
    job_id = status["backend"]["id"]

    environments.delete("hpc")
    wait_for(lambda: not environments.exists("hpc"), timeout=60, what="the environment to be gone after its job")
    wait_for(lambda: not answers(jupyter_url(upstream, environment)), timeout=30, what="JupyterLab gone")
    assert created["metadata"]["uid"] == metadata["uid"] and job_id


def active_jobs_of(backend, uid: str) -> list[str]:
    import asyncio

    return [item.backend_id for item in asyncio.run(backend.list_managed()) if item.uid == uid]


def test_suspend_cancels_the_job_and_resume_submits_a_new_one(slurm_environments, backend):
    """Case 8: suspend then resume of a Slurm environment, through the operator."""
    environments = slurm_environments
    environments.create("pause", flavor="jupyter-cluster", lifetime="1h")
    ready = environments.wait_phase("pause", "Ready", timeout=90)
    uid, first_job = ready["metadata"]["uid"], ready["status"]["backend"]["id"]
    assert active_jobs_of(backend, uid) == [first_job]

    environments.patch_spec("pause", suspend=True)
    suspended = environments.wait_phase("pause", "Suspended", timeout=60)["status"]
    wait_for(lambda: active_jobs_of(backend, uid) == [], timeout=30, what="the job cancelled by the suspend")
    wait_for(
        lambda: environments.get("pause")["status"]["backend"].get("state") not in ("RUNNING", "PENDING"),
        timeout=30,
        what="status.backend.state to stop saying the job runs",
    )
    assert suspended["backend"]["id"] == first_job

    environments.patch_spec("pause", suspend=False)
    resumed = environments.wait_phase("pause", "Ready", timeout=90)["status"]
    second_job = resumed["backend"]["id"]
    assert second_job != first_job and second_job.isdigit()
    assert active_jobs_of(backend, uid) == [second_job]
    environment, upstream = upstream_of(backend, environments.get("pause"))
    assert jupyter_status(upstream, environment)[0] == 403  # the new job's JupyterLab answers


def test_a_job_runs_as_its_owner_and_a_changed_comment_makes_no_second_job(slurm_environments, backend, slurm_environ):
    """Cases 6 and 7 through the operator: the job is alice's; alice rewrites its comment from inside it;
    the environment keeps its one job and its URL."""
    import asyncio
    import os
    import subprocess

    environments = slurm_environments
    environments.create("mine", flavor="jupyter-cluster", lifetime="1h", owner="alice")
    ready = environments.wait_phase("mine", "Ready", timeout=90)
    uid, job_id = ready["metadata"]["uid"], ready["status"]["backend"]["id"]
    job = asyncio.run(backend.client.job(job_id))
    assert job.user_name == "alice"

    rewrite = subprocess.run(
        [
            "/usr/sbin/runuser",
            "-u",
            "alice",
            "--",
            "srun",
            f"--jobid={job_id}",
            "--overlap",
            "scontrol",
            "update",
            f"JobId={job_id}",
            "Comment=x",
        ],
        env={
            "PATH": slurm_commands_path(slurm_environ),
            "SLURM_CONF": slurm_environ["SLURM_CONF"],
            "HOME": os.path.expanduser("~alice"),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert rewrite.returncode == 0, rewrite.stderr
    assert asyncio.run(backend.client.job(job_id)).comment == "x"

    # several sweeps later (1 s apart in tests): still one job, the same, and still Ready
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        assert active_jobs_of(backend, uid) == [job_id]
        assert environments.phase("mine") == "Ready"
        time.sleep(1)
    assert environments.get("mine")["status"]["backend"]["id"] == job_id


def test_operator_cancels_a_job_whose_environment_is_gone(slurm_environments, backend, make_environment):
    """A job left behind (its environment deleted while the operator was down) is swept."""
    import asyncio

    from analysis_operator.backends.base import Launch
    from analysis_operator.model.domain import Flavor

    orphan = make_environment()  # an identity no AnalysisEnvironment has
    flavor = Flavor.from_body(
        "orphan", {"backend": "slurm", "resources": {"cpu": 1, "memory": "1Gi"}, "slurm": {"partition": "debug"}}
    )
    asyncio.run(backend.ensure(Launch(orphan, flavor, "not-a-real-token-0123456789abcdef")))
    assert any(managed.uid == orphan.uid for managed in asyncio.run(backend.list_managed()))
    # The operator sweeps orphans every 10th sweep (1 s apart in tests).
    wait_for(
        lambda: all(managed.uid != orphan.uid for managed in asyncio.run(backend.list_managed())),
        timeout=60,
        what="the operator to cancel the orphaned job",
    )


def test_cluster_usage_is_charged_from_slurms_allocation_and_start_time(operator, slurm_environ, environments, custom):
    """CPU-hours of a Slurm environment are Slurm's allocated CPUs x time since the job started,
    so the budget agrees with the facility's Slurm accounting (queue time is free)."""
    import datetime
    import uuid

    group, version = "analysis.panosc.eu", "v1alpha1"
    operator.configure(
        **{
            key: value
            for key, value in slurm_environ.items()
            if key.startswith("ANALYSIS_OPERATOR_SLURM_") or key == "SLURM_CONF"
        },
        ANALYSIS_OPERATOR_BUDGETS_CHARGE_INTERVAL_SECONDS="1",
    )
    # carol: a Unix account on the local cluster (hack/slurm.sh) that no other test charges
    owner, budget = "carol", f"b-{uuid.uuid4().hex[:8]}"
    custom.create_cluster_custom_object(
        group,
        version,
        "computebudgets",
        {
            "apiVersion": f"{group}/{version}",
            "kind": "ComputeBudget",
            "metadata": {"name": budget},
            "spec": {"user": owner, "limits": {"cpuHours": 100}},
        },
    )
    try:
        wait_for(
            lambda: (
                custom.get_cluster_custom_object(group, version, "computebudgets", budget).get("status") or {}
            ).get("display"),
            timeout=20,
            what="the operator to see the budget",
        )
        environments.create("charged", flavor="jupyter-cluster", owner=owner, lifetime="1h")
        backend = environments.wait_phase("charged", "Ready", timeout=90)["status"]["backend"]
        assert backend["allocatedCpus"] >= 1 and backend["startedAt"]

        def entry() -> dict:
            ledger = custom.get_cluster_custom_object(group, version, "computebudgets", budget)["status"]
            return next(iter((ledger.get("environments") or {}).values()), {})

        def seconds(text: str) -> float:
            return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").timestamp()

        wait_for(
            lambda: (
                entry().get("chargedUntil") and seconds(entry()["chargedUntil"]) >= seconds(backend["startedAt"]) + 3
            ),
            timeout=30,
            what="charges while the job runs",
        )
        charged = entry()
        assert charged["cpus"] == backend["allocatedCpus"]
        expected = backend["allocatedCpus"] * (seconds(charged["chargedUntil"]) - seconds(backend["startedAt"]))
        assert charged["cpuHours"] * 3600 == pytest.approx(expected, abs=0.05)
        environments.delete("charged")
        wait_for(lambda: not environments.exists("charged"), timeout=60, what="the environment to be gone")
    finally:
        custom.delete_cluster_custom_object(group, version, "computebudgets", budget)
