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
