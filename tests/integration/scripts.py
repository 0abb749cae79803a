"""Run the project's hack/*.sh stack scripts from tests."""

from __future__ import annotations

import pathlib
import shlex
import subprocess

HACK = pathlib.Path(__file__).resolve().parents[2] / "hack"


def run_script(script: str, *arguments: str, timeout: float = 300) -> str:
    """hack/<script> with arguments; its stdout, or an error carrying its stderr."""
    completed = subprocess.run([str(HACK / script), *arguments], capture_output=True, text=True, timeout=timeout)
    if completed.returncode != 0:
        raise RuntimeError(f"hack/{script} {' '.join(arguments)} failed:\n{completed.stderr}")
    return completed.stdout


def parse_exports(text: str) -> dict[str, str]:
    """`export NAME=value` lines (bash %q quoting), as `hack/*.sh env` prints them, as a dict."""
    values = {}
    for line in text.splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export":
            name, _, value = words[1].partition("=")
            values[name] = value
    return values
