"""Jinja2 rendering of the templates: pod specs, cloud-init, batch scripts.

templates_dir "" (the default) means the templates shipped inside this package
(analysis_operator/templates/, package data in the wheel), found through the
import system wherever the package is installed; any other value is a site's
own directory of templates on disk.

StrictUndefined so a missing value is an error, not an empty string. YAML
templates are rendered then parsed; user-controlled values go through the
`tojson` filter (JSON is YAML), so they can never break the structure.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import re
import shlex
from collections.abc import Iterator, Mapping
from typing import Any

import jinja2
import yaml

# Characters YAML would not take literally inside a double-quoted scalar
# (C1 controls, Unicode line breaks, BOM, non-characters): keep them escaped.
_YAML_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\ufeff\ufffe\uffff]")


def to_yaml_json(value: Any) -> str:
    """JSON that YAML reads back exactly: unlike Jinja's own tojson, characters
    beyond the Basic Plane stay whole (PyYAML splits escaped surrogate pairs)."""
    if isinstance(value, str) and value.isprintable() and '"' not in value and "\\" not in value:
        return f'"{value}"'  # what json.dumps gives for it, without its machinery (a pod has dozens)
    text = json.dumps(value, ensure_ascii=False)
    return _YAML_UNSAFE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


PACKAGED_TEMPLATES = ""  # templates_dir for the package's own templates (Settings' default)
# libyaml's loader (8x faster than PyYAML's Python one on a pod) where PyYAML was built with it.
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _loader(templates_dir: str) -> jinja2.BaseLoader:
    if templates_dir == PACKAGED_TEMPLATES:
        # importlib.resources, not a path relative to this file: right from a wheel too.
        return jinja2.FileSystemLoader(str(importlib.resources.files("analysis_operator") / "templates"))
    return jinja2.FileSystemLoader(templates_dir)


@functools.lru_cache(maxsize=8)
def _environment(templates_dir: str) -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=_loader(templates_dir),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        # The package's templates never change under a running operator: no stat() per render.
        auto_reload=templates_dir != PACKAGED_TEMPLATES,
    )
    environment.filters["shquote"] = lambda value: shlex.quote(str(value))
    environment.filters["tojson"] = to_yaml_json
    return environment


def render_text(templates_dir: str, template: str, /, **context: Any) -> str:
    return _environment(templates_dir).get_template(template).render(**context)


def render_yaml(templates_dir: str, template: str, /, **context: Any) -> Any:
    """The rendered YAML, parsed. Parsing is most of the cost of a pod (PyYAML's constructor, even with
    libyaml's parser: 12 % of the operator's CPU in a burst, bench/RESULTS.md), and the pods of one
    flavor differ only in the values written through `tojson`. So the text is parsed with those values
    masked (each string of the context, where the text has it as a whole JSON string, replaced by a
    marker), once per distinct masked text, and each render puts its own values into a copy of that
    tree. The masked tree is used only when every marker in it is a whole string, as often as it was
    put into the text: then the values were whole double-quoted scalars, which YAML reads the same
    whatever they hold (see _masked_tree); otherwise the text itself is parsed, as before."""
    text = render_text(templates_dir, template, **context)
    masked = text
    markers: dict[str, str] = {}
    for value in dict.fromkeys(_strings(context)):
        token = to_yaml_json(value)
        if value and len(token) <= _MASKED_LENGTH and token in masked:
            marker = _MARKER.format(len(markers))
            markers[marker] = value
            masked = masked.replace(token, to_yaml_json(marker))
    tree = _masked_tree(masked, tuple(markers))
    if tree is None:
        return yaml.load(text, Loader=_LOADER)  # a safe loader (C or Python)
    return _filled(tree, markers)


_MARKER = "@@analysis-operator-value-{}@@"
_MARKER_TEXT = _MARKER.split("{", 1)[0]
_MASKED_LENGTH = 1000  # longer JSON strings are not masked (YAML takes a quoted mapping key up to 1024 characters)


def _strings(value: Any) -> Iterator[str]:
    """Every string in the context, in mappings (keys too) and sequences at any depth."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


@functools.lru_cache(maxsize=64)
def _masked_tree(masked: str, markers: tuple[str, ...]) -> Any:
    """The parsed masked text, or None when a marker is not a whole string of it exactly as often as it
    is in the text (it was not a whole double-quoted scalar there: in a comment, a block scalar, part
    of a longer string), or a marker is in the text that was not put there."""
    try:
        tree = yaml.load(masked, Loader=_LOADER)
    except yaml.YAMLError:
        return None  # the text itself is parsed, and says what is wrong with it
    found: dict[str, int] = {}
    for text in _strings(tree):
        if text in markers:
            found[text] = found.get(text, 0) + 1
        elif _MARKER_TEXT in text:
            return None
    if any(found.get(marker, 0) != masked.count(to_yaml_json(marker)) for marker in markers):
        return None
    if masked.count(_MARKER_TEXT) != sum(found.values()):
        return None
    return tree


def _filled(node: Any, markers: Mapping[str, str]) -> Any:
    """A copy of the tree with each marker replaced by its value."""
    if isinstance(node, str):
        return markers.get(node, node)
    if isinstance(node, dict):
        return {_filled(key, markers): _filled(item, markers) for key, item in node.items()}
    if isinstance(node, list):
        return [_filled(item, markers) for item in node]
    return node
