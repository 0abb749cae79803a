"""Faults injected around a real client: the server stays real, one answer is lost on the way."""

from __future__ import annotations

from typing import Any


def lose_the_next_read(client: Any, error: Exception | None = None) -> None:
    """The client's next job() answers None (the job not visible yet), or raises `error` (slurmrestd
    restarting: BackendUnavailable); later ones are read."""
    read = client.job

    async def lost(job_id: str) -> None:
        client.job = read
        if error is not None:
            raise error
        return None

    client.job = lost
