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
from typing import Any

import jinja2
import yaml

# Characters YAML would not take literally inside a double-quoted scalar
# (C1 controls, Unicode line breaks, BOM, non-characters): keep them escaped.
_YAML_UNSAFE = re.compile("[\x7f-\x9f\u2028\u2029\ufeff\ufffe\uffff]")


def to_yaml_json(value: Any) -> str:
    """JSON that YAML reads back exactly: unlike Jinja's own tojson, characters
    beyond the Basic Plane stay whole (PyYAML splits escaped surrogate pairs)."""
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
    return yaml.load(render_text(templates_dir, template, **context), Loader=_LOADER)  # a safe loader (C or Python)
