"""infra/logs.py tune_gc: the collector's thresholds raised, what the imports made frozen, and a long
pause logged (run in a process of its own: it changes process-wide state)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

OPERATOR = pathlib.Path(__file__).resolve().parents[2] / "operator"

SCRIPT = """
import gc
from analysis_operator.infra.logs import GC_THRESHOLDS, configure_logging, tune_gc
configure_logging("json", "INFO")
before = gc.get_freeze_count()
tune_gc(threshold=0.0)  # every collection counts as long here
assert gc.get_threshold() == GC_THRESHOLDS, gc.get_threshold()
assert gc.get_freeze_count() > before
gc.collect()
"""


def test_thresholds_are_raised_imports_frozen_and_a_long_pause_is_logged():
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env={"PYTHONPATH": str(OPERATOR)}, check=True
    )
    pauses = [json.loads(line) for line in done.stdout.splitlines() + done.stderr.splitlines() if "gc.pause" in line]
    assert pauses and pauses[-1]["generation"] == 2 and pauses[-1]["seconds"] >= 0
