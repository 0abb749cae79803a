"""infra/logs.py tune_gc: the collector's thresholds raised, what the imports made frozen, and a long
pause logged (run in a process of its own: it changes process-wide state)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

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


@pytest.mark.parametrize(
    "deleted, live, due",
    [
        (0, 0, False),
        (99, 0, False),
        (100, 0, True),  # a few environments left: every 100 deletions
        (100, 999, True),
        (100, 5_000, False),  # 5,000 still there: a tenth of them first
        (499, 5_000, False),
        (500, 5_000, True),
        (1_000, 10_000, True),
    ],
)
def test_a_full_collection_follows_deletions_in_proportion_to_what_is_left(deleted, live, due):
    from analysis_operator.infra.logs import full_collection_due

    assert full_collection_due(deleted, live) is due


def test_deleting_environments_leaves_garbage_only_a_full_collection_frees():
    """What the sweep's collection is for: an object in a reference cycle that lived through two
    younger collections is in the oldest generation, and only a full collection frees it."""
    import gc
    import weakref

    class Held:
        pass

    gc.collect()
    held = Held()
    held.cycle = held  # the way kopf's per-object memory, tasks and locks refer to each other
    gone = weakref.ref(held)
    gc.collect(0)
    gc.collect(1)  # survived both: now in the oldest generation
    del held
    gc.collect(0)
    gc.collect(1)
    assert gone() is not None  # the younger collections do not see it
    gc.collect()
    assert gone() is None
