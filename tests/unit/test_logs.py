from __future__ import annotations

import logging

from analysis_operator.infra.logs import _not_a_refusal


def record(level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord("kopf.objects", level, __file__, 1, message, None, None)


def test_kopfs_error_line_for_an_admission_refusal_is_dropped_but_real_errors_are_kept():
    assert not _not_a_refusal(record(logging.ERROR, "Webhook 'environment-admission' failed permanently: no budget"))
    assert _not_a_refusal(record(logging.ERROR, "Handler 'on_environment' failed with an exception. Will retry."))
    assert _not_a_refusal(record(logging.INFO, "Webhook 'x' failed permanently: but only info"))


def test_a_planned_retry_is_not_an_error():
    retry = record(logging.ERROR, "Handler 'on_environment' failed temporarily: waiting for the finalizer")
    assert _not_a_refusal(retry) and retry.levelno == logging.INFO and retry.levelname == "INFO"


def allocator_of_a_fresh_python(**environment: str) -> str:
    """What `allocator()` says in a new interpreter started with these variables (as the image starts it)."""
    import os
    import subprocess
    import sys

    code = "from analysis_operator.infra.logs import allocator; print(allocator())"
    run = subprocess.run(
        [sys.executable, "-c", code],
        env={**{k: v for k, v in os.environ.items() if k not in ("PYTHONMALLOC", "LD_PRELOAD")}, **environment},
        capture_output=True,
        text=True,
        check=True,
    )
    return run.stdout.strip()


def test_the_start_line_names_the_allocator_python_really_uses():
    # The image's settings (Dockerfile); hack/install-deps.sh installs libjemalloc2 on the test machine.
    assert allocator_of_a_fresh_python(PYTHONMALLOC="malloc", LD_PRELOAD="libjemalloc.so.2") == "jemalloc"
    assert allocator_of_a_fresh_python(PYTHONMALLOC="malloc") == "malloc"  # the C library's, no jemalloc loaded
    assert allocator_of_a_fresh_python(LD_PRELOAD="libjemalloc.so.2") == "pymalloc"  # loaded, but Python's own used
    assert allocator_of_a_fresh_python() == "pymalloc"
