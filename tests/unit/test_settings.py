"""Settings: defaults, then a YAML file, then environment variables (later wins)."""

from __future__ import annotations

import pytest

from analysis_operator.infra import render
from analysis_operator.settings import OpenStackSettings, Settings, SlurmSettings, load_settings


def test_defaults_without_file_or_variables():
    settings = load_settings({})
    assert settings == Settings()
    assert settings.standalone is True
    assert settings.sweep_interval_seconds == 10.0
    assert settings.slurm == SlurmSettings() and settings.slurm.enabled is False
    assert settings.openstack == OpenStackSettings() and settings.openstack.enabled is False


def test_default_templates_are_the_packaged_templates():
    """An empty templates_dir means the package's own templates (render.py): an installed wheel finds them."""
    assert Settings().templates_dir == render.PACKAGED_TEMPLATES == ""
    assert load_settings({}).templates_dir == ""
    assert load_settings({"ANALYSIS_OPERATOR_TEMPLATES_DIR": "/etc/site"}).templates_dir == "/etc/site"


@pytest.mark.parametrize(
    "variable, value, path, expected",
    [
        ("ANALYSIS_OPERATOR_SWEEP_INTERVAL_SECONDS", "2.5", ("sweep_interval_seconds",), 2.5),
        ("ANALYSIS_OPERATOR_STANDALONE", "false", ("standalone",), False),
        ("ANALYSIS_OPERATOR_STANDALONE", "0", ("standalone",), False),
        ("ANALYSIS_OPERATOR_OPENSTACK_ENABLED", " TRUE ", ("openstack", "enabled"), True),
        ("ANALYSIS_OPERATOR_OPENSTACK_ENABLED", "yes", ("openstack", "enabled"), True),
        ("ANALYSIS_OPERATOR_JUPYTER_PORT", "9000", ("jupyter_port",), 9000),
        ("ANALYSIS_OPERATOR_NAMESPACE", "team-a", ("namespace",), "team-a"),
        ("ANALYSIS_OPERATOR_SLURM_URL", "http://slurm:6820", ("slurm", "url"), "http://slurm:6820"),
        ("ANALYSIS_OPERATOR_SLURM_ENABLED", "true", ("slurm", "enabled"), True),
        ("ANALYSIS_OPERATOR_SLURM_EXECUTOR_WORKERS", "2", ("slurm", "executor_workers"), 2),
        ("ANALYSIS_OPERATOR_OPENSTACK_CLOUD", "site", ("openstack", "cloud"), "site"),
    ],
)
def test_environment_variables_override_defaults(variable, value, path, expected):
    settings = load_settings({variable: value})
    found = settings
    for name in path:
        found = getattr(found, name)
    assert found == expected
    assert type(found) is type(expected)  # typed like the field, not left as text
    assert found != _field(Settings(), path)  # really an override, not the default


def _field(settings, path):
    for name in path:
        settings = getattr(settings, name)
    return settings


@pytest.mark.parametrize(
    "variable, value",
    [
        ("ANALYSIS_OPERATOR_JUPYTER_PORT", "many"),
        ("ANALYSIS_OPERATOR_SWEEP_INTERVAL_SECONDS", "soon"),
    ],
)
def test_malformed_numbers_fail_at_startup(variable, value):
    with pytest.raises(ValueError):
        load_settings({variable: value})


def test_unrelated_variables_are_ignored():
    assert load_settings({"SLURM_URL": "http://elsewhere", "ANALYSIS_OPERATOR_SLURMURL": "x"}) == Settings()


def write_config(tmp_path, text: str) -> dict[str, str]:
    path = tmp_path / "operator.yaml"
    path.write_text(text)
    return {"ANALYSIS_OPERATOR_CONFIG": str(path)}


def test_config_file(tmp_path):
    environ = write_config(
        tmp_path,
        """
log_level: DEBUG
standalone: false
sweep_interval_seconds: 30.5
slurm:
  enabled: true
  url: http://slurm.facility.eu:6820
openstack:
  cloud: facility
""",
    )
    settings = load_settings(environ)
    assert settings.log_level == "DEBUG"
    assert settings.standalone is False
    assert settings.sweep_interval_seconds == 30.5
    assert settings.slurm.enabled is True
    assert settings.slurm.url == "http://slurm.facility.eu:6820"
    assert settings.slurm.user == SlurmSettings().user  # untouched fields keep their defaults
    assert settings.openstack.cloud == "facility"
    assert settings.jupyter_port == Settings().jupyter_port


@pytest.mark.parametrize("text", ["", "slurm:\n", "# nothing\n"])
def test_empty_config_file_means_defaults(tmp_path, text):
    assert load_settings(write_config(tmp_path, text)) == Settings()


def test_environment_beats_file(tmp_path):
    environ = write_config(tmp_path, "log_level: DEBUG\nslurm: {url: http://from-file:1}\njupyter_port: 7000\n")
    environ.update({"ANALYSIS_OPERATOR_LOG_LEVEL": "WARNING", "ANALYSIS_OPERATOR_SLURM_URL": "http://from-env:2"})
    settings = load_settings(environ)
    assert settings.log_level == "WARNING"
    assert settings.slurm.url == "http://from-env:2"
    assert settings.jupyter_port == 7000  # the file still counts where the environment is silent


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_settings({"ANALYSIS_OPERATOR_CONFIG": str(tmp_path / "absent.yaml")})


@pytest.mark.parametrize(
    "text, path, expected",
    [
        ('standalone: "false"\n', ("standalone",), False),  # a quoted word must not become a truthy string
        ("slurm: {enabled: 'no'}\n", ("slurm", "enabled"), False),
        ('jupyter_port: "9000"\n', ("jupyter_port",), 9000),
    ],
)
def test_config_file_values_are_typed_like_the_fields(tmp_path, text, path, expected):
    found = _field(load_settings(write_config(tmp_path, text)), path)
    assert found == expected
    assert type(found) is type(expected)
