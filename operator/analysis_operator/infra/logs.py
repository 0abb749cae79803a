"""Structured logs: JSON in production, readable in a terminal.

structlog renders our own events and, through the stdlib bridge, kopf's
log records too, so one stream has one format.
"""

from __future__ import annotations

import logging
import os
import pathlib
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog


def _kopf_object(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    record = event.get("_record")
    reference = getattr(record, "k8s_ref", None) if record is not None else None
    if reference:
        event.setdefault("object", f"{reference.get('namespace') or ''}/{reference.get('name')}".lstrip("/"))
    return event


def _not_a_refusal(record: logging.LogRecord) -> bool:
    """kopf logs every webhook refusal as an error ("Webhook ... failed permanently"); a refusal is a
    decision, and our own admission/audit events already record it with who and why. A handler's
    planned retry ("failed temporarily": waiting for a finalizer, a backend down, which our own
    warnings name) is not an error either: it is kept at INFO."""
    message = record.getMessage()
    if record.levelno == logging.ERROR and message.startswith("Webhook '") and "failed permanently" in message:
        return False
    if record.levelno == logging.ERROR and message.startswith("Handler '") and "failed temporarily" in message:
        record.levelno, record.levelname = logging.INFO, "INFO"
    return True


class _NamedWriter(structlog.WriteLogger):
    """Writes a rendered line to stderr; its name is the event's `logger` (add_logger_name)."""

    def __init__(self, name: str = "") -> None:
        super().__init__(sys.stderr)
        self.name = name


def _named_writer(*args: Any) -> _NamedWriter:
    return _NamedWriter(str(args[0]) if args else "")


def configure_logging(log_format: str = "auto", level: str = "INFO") -> None:
    """Our own events are rendered by structlog and written as they are, below `level` dropped at the
    call: a third of the cost of going through the stdlib logging module (9.3 against 26.5 us a line,
    bench/log_lines.py; logging was 8 % of the loop in a 1,000-create admission burst). kopf's and the
    libraries' records come through the stdlib bridge into the same stream, in the same format."""
    json_output = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderer = structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer()
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        logger_factory=_named_writer,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, _kopf_object],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    handler.addFilter(_not_a_refusal)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # kopf narrates every watch event at DEBUG and every handler at INFO; keep its noise down.
    logging.getLogger("kopf").setLevel(
        max(logging.getLevelName(level.upper()), logging.WARNING) if level.upper() != "DEBUG" else logging.DEBUG
    )
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # one line per webhook call: the audit log says more


GC_PAUSE_LOGGED_SECONDS = 0.1
# The cyclic garbage collector's thresholds. Python's default (700, 10, 10) ran a full collection
# every 5-20 s during a 1,000-environment burst, each 0.4-1.4 s with every thread stopped (the
# forward-auth's too: its p99), 10 % of the operator's time (bench/RESULTS.md). Reference counting
# frees almost everything here; the collector only has cycles to find, so it runs far less often.
GC_THRESHOLDS = (5_000, 20, 100)
# A deleted environment leaves cyclic garbage that lived long enough to reach the oldest generation
# (about 300 objects each; which ones was not examined), which GC_THRESHOLDS make the collector visit
# rarely: after 1,000 deletions a full collection found 300,481 objects and
# gave back 29 MiB, and without one the memory grew with every batch made and deleted (bench/RESULTS.md).
COLLECT_AFTER_DELETED = 100


def full_collection_due(deleted: int, live: int) -> bool:
    """Collect every generation once this many environments went since the last time: at least
    COLLECT_AFTER_DELETED, and a tenth of those still there, so the pause (0.3 s after 1,000 deletions;
    Python's own took 3.2 s at 10,000 environments) stays in proportion to what it frees (pure)."""
    return deleted >= max(COLLECT_AFTER_DELETED, live // 10)


def allocator() -> str:
    """Where Python's objects come from, for the start log line: "jemalloc" as the image runs it
    (PYTHONMALLOC=malloc, LD_PRELOAD=libjemalloc.so.2), "malloc" (the C library's), or "pymalloc"
    (Python's own, which gives an arena back only when every object in it is gone)."""
    if os.environ.get("PYTHONMALLOC") not in ("malloc", "malloc_debug"):
        return "pymalloc"
    try:
        return "jemalloc" if "/libjemalloc" in pathlib.Path("/proc/self/maps").read_text() else "malloc"
    except OSError:
        return "malloc"


def tune_gc(threshold: float = GC_PAUSE_LOGGED_SECONDS) -> None:
    """Collect cycles less often (GC_THRESHOLDS), and log the collector's long pauses (`gc.pause`):
    while it runs every thread waits, the forward-auth's too. Called once the handlers are imported."""
    import gc
    import time

    gc.freeze()  # what the imports made lives as long as the process: never scanned again
    gc.set_threshold(*GC_THRESHOLDS)
    log = structlog.get_logger("analysis_operator.gc")
    started: list[float] = [0.0]

    def observe(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        seconds = time.perf_counter() - started[0]
        if seconds >= threshold:
            log.info(
                "gc.pause",
                generation=info.get("generation"),
                seconds=round(seconds, 3),
                collected=info.get("collected"),
            )

    gc.callbacks.append(observe)
