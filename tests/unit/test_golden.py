"""Whole-object ("golden") tests of the pure builders, beside the focused ones.

Each case builds one object from fixed inputs (uids, names, tokens, settings)
and compares it, whole, with a file under tests/unit/golden/: dicts as YAML
(sorted keys, block style, multi-line strings as literal blocks), the batch
script and cloud-init as the raw text the builder returns. Any change in any
field fails with a unified diff of golden file against built output.

When a change is intended, regenerate and review:

    UPDATE_GOLDEN=1 PYTHONPATH=operator:. python3 -m pytest -q tests/unit/test_golden.py
    git diff tests/unit/golden/

With UPDATE_GOLDEN=1 a golden file that differs (or is missing) is rewritten
and its test FAILS once, saying so, so that a CI job run with the variable set
can never pass over a change; files that already match pass. Run again
without the variable: everything passes. Without UPDATE_GOLDEN a missing
golden file is a failure, never a silent pass.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import os
import pathlib
from collections.abc import Callable
from typing import Any

import pytest
import yaml

# ---- the builders under test: the one block to edit when modules move ----
import analysis_operator
from analysis_operator.backends.kubernetes import build_dataset_volumes, build_home_claim, build_pod, build_service
from analysis_operator.backends.openstack import build_server_request, build_user_data
from analysis_operator.backends.slurm import TOKEN_ENV_NAME, build_batch_script, build_job_submission
from analysis_operator.engine.tokens import build_token_secret
from analysis_operator.model.domain import (
    BackendKind,
    Dataset,
    DatasetRef,
    DatasetStorage,
    Environment,
    Flavor,
    Mount,
    OpenStackSpec,
    Resources,
    SlurmSpec,
)
from analysis_operator.model.identity import PosixIdentity
from analysis_operator.settings import HomeSettings, OpenStackSettings, Settings, SlurmSettings

# ---------------------------------------------------------------------------

GOLDEN_DIR = pathlib.Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("UPDATE_GOLDEN", "") not in ("", "0")
HOURS = datetime.timedelta(hours=1)
TOKEN = "golden-token-0123456789abcdefghijklmnopqrstuv"  # fixed, never a real one


def find_templates_dir() -> str:
    """The templates as they are now: the settings default, else the package's or the repository's
    templates/ (the directory is moving into the package; the output must not change with it)."""
    candidates = (
        pathlib.Path(Settings().templates_dir),
        pathlib.Path(analysis_operator.__file__).resolve().parent / "templates",
        pathlib.Path(__file__).resolve().parents[2] / "templates",
    )
    for candidate in candidates:
        if (candidate / "pod.yaml.j2").is_file():
            return str(candidate)
    raise FileNotFoundError(f"no pod.yaml.j2 in any of {[str(c) for c in candidates]}")


# Every setting a builder reads, spelled out: nothing comes from the environment.
SETTINGS = dataclasses.replace(
    Settings(),
    templates_dir=find_templates_dir(),
    jupyter_port=8888,
    cluster_domain="cluster.local",
    home=HomeSettings(claims=False, size="10Gi", storage_class="", access_mode="ReadWriteMany"),
    slurm=SlurmSettings(
        enabled=True,
        url="http://slurmrestd.facility.eu:6820",
        api_version="v0.0.38",
        user="slurm",
        token_file="/etc/slurm/jwt",
        working_directory="/scratch/aenv",
        jupyter_command="jupyter lab",
        executor_workers=4,
    ),
    openstack=OpenStackSettings(
        enabled=True, cloud="analysis", clouds_yaml="/etc/openstack/clouds.yaml", executor_workers=8
    ),
)
SETTINGS_WITH_HOME_CLAIMS = dataclasses.replace(
    SETTINGS, home=HomeSettings(claims=True, size="50Gi", storage_class="cephfs", access_mode="ReadWriteMany")
)


# ---------------------------------------------------------------- fixed inputs


def make_environment(**overrides: Any) -> Environment:
    values = dict(
        namespace="team-a", name="lab", uid="3f6c1a52-8d0e-4b7a-9c21-5e4f0d7b2a10", owner="alice", flavor="small"
    )
    values.update(overrides)
    return Environment(**values)


def dataset(name: str, **storage: str) -> Dataset:
    return Dataset(
        name=name, pid=f"10.5072/{name}", title=f"Dataset {name}", size="1.2Ti", storage=DatasetStorage(**storage)
    )


# Kubernetes: one dataset on a claim with a subPath, one on an NFS export.
POD_MOUNTS = (
    Mount(
        dataset("p11-beamtime-20231234", claim_name="beamtime-p11", sub_path="raw/20231234"),
        "/data/p11-beamtime-20231234",
        "team member",
    ),
    Mount(
        dataset("lysozyme-reference", nfs_server="nfs.facility.eu", nfs_path="/exports/reference/lysozyme"),
        "/data/refs/lysozyme",
        "public",
    ),
)
# Slurm: the same data as paths on the cluster's nodes.
SLURM_MOUNTS = (
    Mount(
        dataset("p11-beamtime-20231234", path="/gpfs/exfel/p11/20231234/raw"),
        "/data/p11-beamtime-20231234",
        "team member",
    ),
    Mount(dataset("lysozyme-reference", path="/gpfs/public/reference/lysozyme"), "/data/refs/lysozyme", "public"),
)
# VMs: NFS shares only.
VM_MOUNTS = (
    Mount(
        dataset("p11-beamtime-20231234", nfs_server="nfs.facility.eu", nfs_path="/exports/p11/20231234/raw"),
        "/data/p11-beamtime-20231234",
        "team member",
    ),
    Mount(
        dataset("lysozyme-reference", nfs_server="nfs.facility.eu", nfs_path="/exports/reference/lysozyme"),
        "/data/refs/lysozyme",
        "public",
    ),
)
DATASET_REFS = (
    DatasetRef(name="p11-beamtime-20231234"),
    DatasetRef(name="lysozyme-reference", mount_path="/data/refs/lysozyme"),
)

BASIC_ENVIRONMENT = make_environment()
BASIC_FLAVOR = Flavor(
    name="small",
    backend=BackendKind.KUBERNETES,
    image="jupyter/scipy-notebook:2024-01-15",
    resources=Resources(cpu="2", memory="8Gi"),
)

GPU_ENVIRONMENT = make_environment(
    name="gpu-lab",
    uid="9a7e2b14-0c3d-4f58-8e61-2d9b7c4a1f03",
    owner="bob",
    flavor="gpu-large",
    image="registry.facility.eu/p11/pytorch-notebook:2.3.0",
    datasets=DATASET_REFS,
    lifetime=4 * HOURS,
)
GPU_FLAVOR = Flavor(
    name="gpu-large",
    backend=BackendKind.KUBERNETES,
    image="jupyter/pytorch-notebook:2024-01-15",
    allow_custom_image=True,
    resources=Resources(cpu="8", memory="64Gi", gpu=2),
)

SLURM_ENVIRONMENT = make_environment(
    name="hpc-lab",
    uid="c2d8f0e6-41b7-4a93-b5e2-7f1a6c3d9e84",
    owner="carol",
    flavor="cluster-gpu",
    datasets=DATASET_REFS,
    lifetime=6 * HOURS,
)
SLURM_FLAVOR = Flavor(
    name="cluster-gpu",
    backend=BackendKind.SLURM,
    max_lifetime=12 * HOURS,
    resources=Resources(cpu="16", memory="128Gi", gpu=2),
    slurm=SlurmSpec(
        partition="gpu",
        account="p11-20231234",
        time_limit_minutes=720,
        qos="normal",
        modules=("cuda/12.2", "anaconda3/2024.02"),
    ),
)
SLURM_REMAINING = datetime.timedelta(hours=5, minutes=30, seconds=10)

VM_ENVIRONMENT = make_environment(
    name="desk", uid="71b5e3c9-2a4f-4d86-9b07-e8c1f5a2d634", owner="dave", flavor="vm-desktop", datasets=DATASET_REFS
)
VM_FLAVOR = Flavor(
    name="vm-desktop",
    backend=BackendKind.OPENSTACK,
    image="analysis-desktop",
    resources=Resources(cpu="8", memory="32Gi", gpu=1),
    openstack=OpenStackSpec(
        flavor="aenv.gpu.large", image="analysis-desktop-2024.01", network="science-net", key_name="ops"
    ),
)


# POSIX identities (policy/identity.py decides them from FacilityUser and FacilityGroup gids).
ALICE = PosixIdentity(user="alice", uid=20001, gid=20001)
BOB = PosixIdentity(
    user="bob", uid=20002, gid=20002, groups=(5001, 5002), group_names=("proposal-20231234", "p11-beamline")
)
DAVE = PosixIdentity(user="dave", uid=20004, gid=20004, groups=(5001,), group_names=("proposal-20231234",))


def gpu_pod(identity: PosixIdentity | None = None) -> dict[str, Any]:
    volumes, volume_mounts = build_dataset_volumes(POD_MOUNTS)
    return build_pod(GPU_ENVIRONMENT, GPU_FLAVOR, SETTINGS_WITH_HOME_CLAIMS, volumes, volume_mounts, identity)


# golden file name -> how to build it; .yaml for dicts, anything else is raw text.
CASES: dict[str, Callable[[], Any]] = {
    "pod-basic.yaml": lambda: build_pod(BASIC_ENVIRONMENT, BASIC_FLAVOR, SETTINGS),
    "pod-gpu-datasets-home-claim.yaml": gpu_pod,
    "pod-basic-identity.yaml": lambda: build_pod(BASIC_ENVIRONMENT, BASIC_FLAVOR, SETTINGS, identity=ALICE),
    "pod-gpu-datasets-home-claim-identity.yaml": lambda: gpu_pod(BOB),
    "home-claim.yaml": lambda: build_home_claim(GPU_ENVIRONMENT, SETTINGS_WITH_HOME_CLAIMS),
    "service.yaml": lambda: build_service(BASIC_ENVIRONMENT, SETTINGS),
    "token-secret.yaml": lambda: build_token_secret(BASIC_ENVIRONMENT, TOKEN),
    "slurm-gpu-job-submission.yaml": lambda: build_job_submission(
        SLURM_ENVIRONMENT, SLURM_FLAVOR, SETTINGS.slurm, SLURM_REMAINING, SLURM_MOUNTS
    ),
    "slurm-gpu-batch-script.sh": lambda: build_batch_script(
        SLURM_ENVIRONMENT, SLURM_FLAVOR, TOKEN_ENV_NAME, SETTINGS.slurm, SETTINGS.templates_dir
    ),
    "vm-server-request.yaml": lambda: build_server_request(VM_ENVIRONMENT, VM_FLAVOR, TOKEN, SETTINGS, VM_MOUNTS),
    "vm-cloud-init.yaml": lambda: build_user_data(VM_ENVIRONMENT, TOKEN, SETTINGS, VM_MOUNTS),
    "vm-cloud-init-identity.yaml": lambda: build_user_data(VM_ENVIRONMENT, TOKEN, SETTINGS, VM_MOUNTS, DAVE),
    "vm-server-request-identity.yaml": lambda: build_server_request(
        VM_ENVIRONMENT, VM_FLAVOR, TOKEN, SETTINGS, VM_MOUNTS, DAVE
    ),
}
RAW_TEXT = {"slurm-gpu-batch-script.sh", "vm-cloud-init.yaml", "vm-cloud-init-identity.yaml"}


# ---------------------------------------------------------------- rendering and comparing


class _GoldenDumper(yaml.SafeDumper):
    """Block style everywhere; multi-line strings (user_data) as literal blocks, readable in a diff."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None  # PyYAML falls back to quoting where a block cannot be exact
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_GoldenDumper.add_representer(str, _represent_str)


def render_golden(name: str, built: Any) -> str:
    if name in RAW_TEXT:
        assert isinstance(built, str), f"{name}: expected text, the builder returned {type(built).__name__}"
        return built
    text = yaml.dump(
        built,
        Dumper=_GoldenDumper,
        sort_keys=True,
        default_flow_style=False,
        allow_unicode=True,
        width=10_000,
        indent=2,
    )
    assert yaml.safe_load(text) == built, f"{name}: the YAML rendering does not read back as the built object"
    return text


def unified_diff(expected: str, actual: str, name: str) -> str:
    diff = "\n".join(
        difflib.unified_diff(
            expected.splitlines(),
            actual.splitlines(),
            fromfile=f"tests/unit/golden/{name} (golden)",
            tofile=f"{name} (built now)",
            lineterm="",
        )
    )
    if not diff:  # same lines: the difference is in line endings or the final newline
        diff = f"golden ends {expected[-40:]!r}\nbuilt  ends {actual[-40:]!r}"
    return diff


def check_golden(name: str, actual: str) -> None:
    path = GOLDEN_DIR / name
    expected = path.read_bytes().decode("utf-8") if path.exists() else None
    if expected == actual:
        return
    if UPDATE:
        GOLDEN_DIR.mkdir(exist_ok=True)
        path.write_bytes(actual.encode("utf-8"))
        pytest.fail(
            f"UPDATE_GOLDEN: {'rewrote' if expected is not None else 'created'} {path}; "
            "review `git diff tests/unit/golden/` and run again without UPDATE_GOLDEN",
            pytrace=False,
        )
    if expected is None:
        pytest.fail(f"golden file {path} is missing; create it with UPDATE_GOLDEN=1 and review it", pytrace=False)
    pytest.fail(
        f"{name} differs from its golden file (an intended change? UPDATE_GOLDEN=1, then review):\n"
        f"{unified_diff(expected, actual, name)}",
        pytrace=False,
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_builder_output_matches_golden_file(name):
    check_golden(name, render_golden(name, CASES[name]()))


def test_every_golden_file_has_a_case():
    """A golden file nobody checks any more would rot silently."""
    assert sorted(path.name for path in GOLDEN_DIR.glob("*") if path.is_file()) == sorted(CASES)


def test_a_difference_shows_as_a_unified_diff():
    diff = unified_diff("a: 1\nb: 2\n", "a: 1\nb: 3\n", "x.yaml")
    assert "-b: 2" in diff and "+b: 3" in diff and "@@" in diff
    assert "ends" in unified_diff("a\n", "a", "x")  # only the final newline differs
