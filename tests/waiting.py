"""Wait on a condition with a deadline: tests never sleep a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(
    condition: Callable[[], object], *, timeout: float, what: str | Callable[[], str], interval: float = 0.1
) -> object:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            description = what() if callable(what) else what
            raise TimeoutError(f"timed out after {timeout}s waiting for {description}")
        time.sleep(interval)
