"""Template rendering: missing values are errors, shell text is quoted."""

from __future__ import annotations

import json
import shlex

import jinja2
import pytest
import yaml
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


# What backends/kubernetes.py build_pod gives the pod template, with values that could be anyone's.
POD_CONTEXT = {
    "name": "aenv-demo",
    "namespace": "default",
    "labels": {"app": "x"},
    "owner_references": [],
    "image": "jupyter/scipy-notebook:2024-01",
    "port": 8888,
    "base_url": "/environments/default/demo/",
    "base_url_argument": "--ServerApp.base_url=/environments/default/demo/",
    "readiness_path": "/environments/default/demo/api",
    "secret_name": "aenv-demo",
    "environment_name": "demo",
    "owner": "alice",
    "requests": {"cpu": "2", "memory": "8Gi"},
    "limits": {"cpu": "2", "memory": "8Gi"},
    "gpu": 0,
    "dataset_volumes": [{"name": "d0", "persistentVolumeClaim": {"claimName": "raw", "readOnly": True}}],
    "dataset_mounts": [{"name": "d0", "mountPath": "/data/raw", "readOnly": True}],
    "home_claim": "home-alice",
    "identity": {"uid": 1000, "gid": 100, "groups": [100, 2000], "strict_groups": True, "fs_group": 100},
    "extension_dir": "/opt/analysis-environment",
    "extension_config_map": "aenv-jupyter",
    "extension_items": [{"key": "a.py", "path": "a.py"}],
}
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


def parsed_directly(templates_dir: str, template: str, **context) -> object:
    """What render_yaml gave before its masked-tree cache: the rendered text, parsed."""
    return yaml.load(render.render_text(templates_dir, template, **context), Loader=yaml.SafeLoader)


TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)


@hypothesis_settings(max_examples=200, deadline=None)
@given(value=TEXT)
def test_yaml_json_is_json_dumps_with_yaml_s_unsafe_characters_escaped(value):
    expected = render._YAML_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(value, ensure_ascii=False))
    assert render.to_yaml_json(value) == expected


@hypothesis_settings(max_examples=150, deadline=None)
@given(name=TEXT, owner=TEXT, image=TEXT, uid=TEXT)
def test_a_pod_is_what_parsing_its_text_gives_whatever_its_values(name, owner, image, uid):
    """The masked-tree cache (render.render_yaml) against parsing every rendered text, twice: the second
    render of the same shape is answered from the cache."""
    for suffix in ("", "-again"):
        context = {
            **POD_CONTEXT,
            "name": name + suffix,
            "owner": owner,
            "image": image,
            "labels": {"analysis.panosc.eu/environment-uid": uid + suffix, "app": name},
            "owner_references": [{"apiVersion": "v1", "kind": "X", "name": name, "uid": uid + suffix}],
        }
        assert render.render_yaml("", "pod.yaml.j2", **context) == parsed_directly("", "pod.yaml.j2", **context)


def test_pods_of_one_shape_are_parsed_once():
    render._masked_tree.cache_clear()
    for index in range(5):
        pod = render.render_yaml("", "pod.yaml.j2", **{**POD_CONTEXT, "name": f"aenv-{index}", "owner": f"u{index}"})
        assert pod["metadata"]["name"] == f"aenv-{index}"
    info = render._masked_tree.cache_info()
    assert (info.misses, info.hits) == (1, 4)


@pytest.mark.parametrize(
    "template",
    [
        "# about {{ name | tojson }}\nname: {{ name | tojson }}\n",  # in a comment too
        "name: {{ name | tojson }}\nnote: |\n  {{ name | tojson }} in a block\n",  # in a block scalar
        "name: {{ name | tojson }}\nmarker: '@@analysis-operator-value-0@@'\n",  # the marker's text itself
        "name: {{ name | tojson }}\nplain: {{ name }}\n",  # without tojson, a plain scalar
        "{{ name | tojson }}: {{ name | tojson }}\n",  # as a key
    ],
)
def test_a_value_that_is_not_only_a_whole_quoted_scalar_gives_what_parsing_gives(tmp_path, template):
    (tmp_path / "t.yaml.j2").write_text(template)
    for name in ("x", "y", "a b", "1"):
        assert render.render_yaml(str(tmp_path), "t.yaml.j2", name=name) == parsed_directly(
            str(tmp_path), "t.yaml.j2", name=name
        )


def test_a_value_too_long_for_a_yaml_key_fails_as_parsing_fails(tmp_path):
    """A quoted mapping key may be at most 1024 characters: 200 characters escaped six-fold as JSON make
    the rendered text invalid, and the masked tree must not make it valid."""
    (tmp_path / "k.yaml.j2").write_text("{{ name | tojson }}: 1\n")
    name = "\x01" * 200
    with pytest.raises(yaml.YAMLError):
        parsed_directly(str(tmp_path), "k.yaml.j2", name=name)
    with pytest.raises(yaml.YAMLError):
        render.render_yaml(str(tmp_path), "k.yaml.j2", name=name)
