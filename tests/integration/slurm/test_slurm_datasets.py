"""Datasets in a real Slurm job: exactly the granted ones, linked into the job's data directory."""

from __future__ import annotations

import os
import pathlib
import pwd

import pytest

from analysis_operator.backends.slurm_auth import build_working_directory
from tests.integration.test_datasets import PUBLIC, catalogue, embargoed  # noqa: F401 (fixture)
from tests.waiting import wait_for


@pytest.fixture
def cluster_data(tmp_path_factory) -> pathlib.Path:
    """Two datasets on the "cluster file system" (this host), readable by the job's user."""
    root = tmp_path_factory.mktemp("gpfs")
    for name in ("raw", "reference", "unrelated"):
        (root / name).mkdir()
        (root / name / "frames.h5").write_text(name)
    for path in (root, *root.iterdir(), *root.rglob("*.h5")):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    os.chmod(root.parent, 0o755)
    return root


def test_a_slurm_job_sees_exactly_its_granted_datasets(
    slurm_environments,
    slurm_settings,
    catalogue,
    namespace,
    cluster_data,
):
    raw = catalogue.dataset("raw", embargoed(members=("alice",)), storage={"path": str(cluster_data / "raw")})
    reference = catalogue.dataset("reference", PUBLIC, storage={"path": str(cluster_data / "reference")})
    unrelated = catalogue.dataset("unrelated", PUBLIC, storage={"path": str(cluster_data / "unrelated")})
    slurm_environments.create(
        "hpc-data",
        flavor="jupyter-cluster",
        lifetime="1h",
        owner="alice",
        datasets=[{"name": raw, "mountPath": "/data/beamtime/raw"}, {"name": reference}],
    )
    slurm_environments.wait_phase("hpc-data", "Ready", timeout=90)

    data = pathlib.Path(build_working_directory(slurm_settings, "alice")) / f"{namespace}.aenv-hpc-data.data"
    assert data.stat().st_uid == pwd.getpwnam("alice").pw_uid and data.stat().st_mode & 0o077 == 0

    def links() -> dict[str, str]:
        return {str(path.relative_to(data)): os.readlink(path) for path in data.rglob("*") if path.is_symlink()}

    assert links() == {"beamtime/raw": str(cluster_data / "raw"), reference: str(cluster_data / "reference")}
    assert (data / "beamtime" / "raw" / "frames.h5").read_text() == "raw"

    # Deleted, then made again under the same name with another dataset: the job links only that
    # one (the directory is the name's; the earlier environment's embargoed link must not stay).
    slurm_environments.delete("hpc-data")
    wait_for(lambda: not slurm_environments.exists("hpc-data"), timeout=60, what="hpc-data deleted")
    slurm_environments.create(
        "hpc-data", flavor="jupyter-cluster", lifetime="1h", owner="alice", datasets=[{"name": unrelated}]
    )
    slurm_environments.wait_phase("hpc-data", "Ready", timeout=90)
    assert links() == {unrelated: str(cluster_data / "unrelated")}
