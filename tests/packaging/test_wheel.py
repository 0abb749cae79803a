"""The wheel is the whole operator: built from the source, installed away from this checkout,
it imports, renders its own templates (package data) and declares what it imports.

No servers and no downloads: the wheel is built with the project environment's setuptools
(--no-build-isolation), and the fresh environment it goes into sees the project
environment's packages for its dependencies, never the checkout.
"""

from __future__ import annotations

import ast
import email.parser
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TEMPLATES = {"cloud-init.yaml.j2", "pod.yaml.j2", "sbatch.sh.j2", "service.yaml.j2"}
PIP = (sys.executable, "-m", "pip")
OFFLINE = ("--quiet", "--no-deps", "--no-index", "--disable-pip-version-check")

# Runs in the fresh environment: the pod template through the default settings, as the operator does.
# Variables the template gained since this was written get None (absent optional parts), so the test
# follows the template instead of pinning its interface; the builders' own tests pin that.
RENDER_POD = """
import json
import jinja2.meta
import analysis_operator
from analysis_operator.infra import render
from analysis_operator.settings import Settings

environment = render._environment(Settings().templates_dir)
source, _, _ = environment.loader.get_source(environment, "pod.yaml.j2")
sample = dict(
    name="aenv-demo", namespace="default", labels={"app.kubernetes.io/managed-by": "analysis-operator"},
    owner_references=[], image="quay.io/jupyter/base-notebook:2025-10-20", port=8888,
    secret_name="aenv-demo", environment_name="demo", owner="alice",
    requests={"cpu": "1", "memory": "16Gi"}, limits={"cpu": "1", "memory": "16Gi"}, gpu=0,
    dataset_volumes=[], dataset_mounts=[], home_claim="",
    extension_dir="/opt/analysis-environment", extension_config_map="aenv-jupyter",
    extension_items=[{"key": "aenv_viewers.py", "path": "aenv_viewers.py"}],
)
context = {**dict.fromkeys(jinja2.meta.find_undeclared_variables(environment.parse(source))), **sample}
pod = render.render_yaml(Settings().templates_dir, "pod.yaml.j2", **context)
templates = sorted(environment.list_templates())
from analysis_operator import jupyter
extension = jupyter.extension_source()
print(json.dumps({"package": analysis_operator.__file__, "templates": templates, "pod": pod, "extension": extension}))
"""


def run(*command: str | pathlib.Path, cwd: pathlib.Path, env: dict[str, str] | None = None) -> str:
    completed = subprocess.run(
        [str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=240
    )
    assert completed.returncode == 0, f"{command} failed:\n{completed.stdout}\n{completed.stderr}"
    return completed.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    # pip builds in the source tree (build/, *.egg-info, stale files kept between builds): build
    # from a copy of what the Dockerfile copies, so the checkout stays clean and the copy is enough.
    root = tmp_path_factory.mktemp("build")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(
        REPO / "operator",
        source / "operator",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build"),
    )
    # The project environment's setuptools builds it: no download (the build-system pin is checked).
    build_here = ("--no-build-isolation", "--check-build-dependencies")
    run(*PIP, "wheel", *OFFLINE, *build_here, "--wheel-dir", root / "dist", source, cwd=root)
    [built] = (root / "dist").glob("analysis_operator-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> pathlib.Path:
    """A fresh virtual environment holding the wheel; dependencies come from this test's environment."""
    venv = tmp_path_factory.mktemp("installed") / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=venv.parent)
    python = venv / "bin" / "python"
    site_packages = pathlib.Path(
        run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=venv.parent).strip()
    )
    # Only directories: the .pth files in them (the editable install's path to this checkout) are not read.
    dependencies = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site_packages / "project-dependencies.pth").write_text("".join(f"{path}\n" for path in dependencies))
    run(*PIP, "--python", python, "install", *OFFLINE, wheel, cwd=venv.parent)
    return venv


def outside_the_checkout() -> dict[str, str]:
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE")
    }
    return {**environment, "PYTHONNOUSERSITE": "1"}


def test_the_wheel_holds_the_templates(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {
        name.removeprefix("analysis_operator/templates/")
        for name in names
        if name.startswith("analysis_operator/templates/")
    } == TEMPLATES


def test_the_installed_package_renders_its_own_templates(installed, tmp_path):
    result = json.loads(run(installed / "bin" / "python", "-c", RENDER_POD, cwd=tmp_path, env=outside_the_checkout()))
    package = pathlib.Path(result["package"]).resolve()
    assert package.is_relative_to(installed.resolve()) and not package.is_relative_to(REPO)
    assert set(result["templates"]) == TEMPLATES
    pod = result["pod"]
    assert pod["kind"] == "Pod" and pod["metadata"]["name"] == "aenv-demo"
    [container] = pod["spec"]["containers"]
    assert container["image"] == "quay.io/jupyter/base-notebook:2025-10-20"
    assert container["resources"]["limits"] == {"cpu": "1", "memory": "16Gi"}
    assert pod["spec"]["volumes"][0] == {"name": "home", "emptyDir": {"sizeLimit": "10Gi"}}
    assert pod["spec"]["volumes"][1]["configMap"]["name"] == "aenv-jupyter"
    assert "def _load_jupyter_server_extension" in result["extension"]  # shipped to the JupyterLab servers


def test_the_installed_command_starts(installed, tmp_path):
    usage = run(installed / "bin" / "analysis-operator", "--help", cwd=tmp_path, env=outside_the_checkout())
    assert usage.startswith("usage: analysis-operator")


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_third_party_import_is_a_declared_dependency(wheel):
    """An import that works only because something else pulled its distribution in breaks on upgrade."""
    with zipfile.ZipFile(wheel) as archive:
        # analysis_operator/jupyter/aenv_viewers.py runs inside JupyterLab (tornado, jupyter_server there),
        # read here as text only: no module of the operator imports it (checked below)
        shipped = "analysis_operator/jupyter/aenv_viewers.py"
        sources = {name: archive.read(name) for name in archive.namelist() if name.endswith(".py") and name != shipped}
        assert shipped in archive.namelist()
        assert not any(
            b"aenv_viewers import" in source or b"import aenv_viewers" in source for source in sources.values()
        )
        [metadata_name] = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
        requires = email.parser.Parser().parsestr(archive.read(metadata_name).decode()).get_all("Requires-Dist")
    declared = {
        _normalized(re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0])
        for requirement in requires
        if "extra ==" not in requirement
    }
    imported = set()
    for source in sources.values():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                imported |= {alias.name.partition(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.partition(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"analysis_operator", "__future__"}
    distributions = metadata.packages_distributions()
    undeclared = {
        module: distributions.get(module)
        for module in third_party
        if not {_normalized(name) for name in distributions.get(module, [])} & declared
    }
    assert third_party and not undeclared, f"imported but not in [project] dependencies: {undeclared}"
