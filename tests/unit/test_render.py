"""Template rendering: missing values are errors, shell text is quoted."""

from __future__ import annotations

import shlex

import jinja2
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from analysis_operator.infra import render

HOSTILE = [
    "'; rm -rf / #",
    "$(reboot) `id` && halt",
    "a\nb; echo pwned",
    "quote \" and ' both",
    "*.txt ~ ${HOME} !!",
    "",
]


@pytest.fixture
def templates(tmp_path):
    (tmp_path / "greeting.txt.j2").write_text("hello {{ name }}\n")
    (tmp_path / "command.sh.j2").write_text("echo {{ value | shquote }}\n")
    (tmp_path / "doc.yaml.j2").write_text("name: {{ name | tojson }}\nitems: {{ items | tojson }}\n")
    return str(tmp_path)


def test_missing_variable_is_an_error(templates):
    with pytest.raises(jinja2.UndefinedError, match="name"):
        render.render_text(templates, "greeting.txt.j2")


def test_missing_variable_is_an_error_for_yaml_too(templates):
    # through `tojson` the undefined value fails in json.dumps (TypeError), not as UndefinedError;
    # either way nothing renders with an empty value
    with pytest.raises((jinja2.UndefinedError, TypeError)):
        render.render_yaml(templates, "doc.yaml.j2", name="x")


def test_given_variables_render(templates):
    assert render.render_text(templates, "greeting.txt.j2", name="world") == "hello world\n"


@pytest.mark.parametrize("value", HOSTILE)
def test_shquote_keeps_hostile_text_one_word(templates, value):
    line = render.render_text(templates, "command.sh.j2", value=value)
    assert shlex.split(line) == ["echo", value]


@pytest.mark.parametrize("value", [42, 1.5, None])
def test_shquote_takes_non_strings(templates, value):
    assert shlex.split(render.render_text(templates, "command.sh.j2", value=value)) == ["echo", str(value)]


@hypothesis_settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)  # the fixture is read-only
@given(value=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")))
def test_shquote_round_trips_any_text(templates, value):
    assert shlex.split(render.render_text(templates, "command.sh.j2", value=value)) == ["echo", value]


@pytest.mark.parametrize("value", HOSTILE + ["key: value\n- item", "{a: 1}", "&x *x !!binary"])
def test_yaml_values_through_tojson_stay_values(templates, value):
    document = render.render_yaml(templates, "doc.yaml.j2", name=value, items=[value, {"k": value}])
    assert document == {"name": value, "items": [value, {"k": value}]}


PACKAGED = {"pod.yaml.j2", "service.yaml.j2", "sbatch.sh.j2", "cloud-init.yaml.j2"}


def test_empty_templates_dir_means_the_packaged_templates():
    assert set(render._environment(render.PACKAGED_TEMPLATES).list_templates()) == PACKAGED
    service = render.render_yaml(
        "",
        "service.yaml.j2",
        name="aenv-demo",
        namespace="default",
        labels={"app": "x"},
        owner_references=[],
        selector={"app": "x"},
        port=8888,
    )
    assert service["kind"] == "Service" and service["metadata"]["name"] == "aenv-demo"


def test_a_templates_dir_is_a_site_directory_not_the_packaged_one(templates):
    assert "pod.yaml.j2" not in render._environment(templates).list_templates()
    with pytest.raises(jinja2.TemplateNotFound):
        render.render_text(templates, "pod.yaml.j2")
