#!/usr/bin/env python3
"""What one of the operator's own log lines costs: rendered by structlog and written directly (as
infra/logs.configure_logging does now), against the same line through the stdlib logging module (as
it did before: structlog's stdlib bridge, a LogRecord, the handler, ProcessorFormatter). Each in a
process of its own, writing to /dev/null, ROUNDS rounds of LINES lines alternating; medians.

    .venv/bin/python bench/log_lines.py
"""

from __future__ import annotations

import os
import pathlib
import platform
import statistics
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
LINES, ROUNDS = 20_000, 5

CHILD = """
import logging, os, sys, time
import structlog
sys.stderr = open(os.devnull, "w")
from analysis_operator.infra.logs import configure_logging
if sys.argv[1] == "stdlib":  # the configuration before this change, for comparison
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, structlog.processors.JSONRenderer()],
    ))
    logging.getLogger().handlers[:] = [handler]
    logging.getLogger().setLevel("INFO")
else:
    configure_logging("json", "INFO")
log = structlog.get_logger("analysis_operator.admission")
lines = int(sys.argv[2])
started = time.perf_counter()
for _ in range(lines):
    log.info("admission.identity", environment="ns/name-1", owner="alice", requester="alice",
             decision="allowed", reason=None)
print((time.perf_counter() - started) / lines * 1e6)
"""


def one(mode: str) -> float:
    environment = {**os.environ, "PYTHONPATH": str(REPO / "operator")}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(LINES)], env=environment, capture_output=True, text=True, check=True
    )
    return float(done.stdout.strip())


def main() -> None:
    times: dict[str, list[float]] = {"stdlib": [], "direct": []}
    for _ in range(ROUNDS):
        for mode in times:
            times[mode].append(one(mode))
    print(f"machine: {os.cpu_count()} cores, {platform.platform()}, python {platform.python_version()}")
    for mode, values in times.items():
        print(f"{mode}: median {statistics.median(values):.1f} us a line ({', '.join(f'{v:.1f}' for v in values)})")
    ratio = statistics.median(times["stdlib"]) / statistics.median(times["direct"])
    print(f"stdlib / direct: {ratio:.1f}x")


if __name__ == "__main__":
    main()
