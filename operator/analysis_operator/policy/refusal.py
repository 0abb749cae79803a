"""The one shape of "no" across the policies: why, in words, and where the environment ends."""

from __future__ import annotations

from dataclasses import dataclass

from analysis_operator.model.domain import Phase


@dataclass(frozen=True)
class Refusal:
    reason: str  # CamelCase, for status, Events and metrics
    message: str  # says what is wrong and what to do
    phase: Phase = Phase.REJECTED  # where a refused environment ends (Stopped when access is revoked, ...)
    subject: str = ""  # what was refused, as the user named it (a dataset, a flavor), for audit records
