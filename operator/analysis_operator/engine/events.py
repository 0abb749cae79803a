"""Kubernetes Events: the one poster everything uses (kopf posts only from inside its own handlers)."""

from __future__ import annotations

from typing import Any

import structlog

from analysis_operator.infra.kube import KubeClient
from analysis_operator.model.domain import API_VERSION, Environment

log = structlog.get_logger("analysis_operator.events")


def environment_reference(environment: Environment) -> dict[str, Any]:
    """Enough of an AnalysisEnvironment to post an Event about it."""
    return {
        "apiVersion": API_VERSION,
        "kind": "AnalysisEnvironment",
        "metadata": {"namespace": environment.namespace, "name": environment.name, "uid": environment.uid},
    }


async def post_event(kube: KubeClient, involved: dict[str, Any], type_: str, reason: str, message: str) -> None:
    """Post, never raise: an Event lost must not undo the decision it reports (the log has it)."""
    try:
        await kube.post_event(involved, type_, reason, message)
    except Exception as error:
        metadata = involved.get("metadata") or {}
        log.warning(
            "event.not_posted",
            object=f"{metadata.get('namespace', '')}/{metadata.get('name', '')}".lstrip("/"),
            reason=reason,
            error=repr(error),
        )
