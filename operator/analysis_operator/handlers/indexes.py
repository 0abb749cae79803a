"""In-memory views kopf keeps current from its watch streams.

Handlers read these instead of listing: flavors by name, environments by
(namespace, name), and the operator's pods by (namespace, environment).
Values are small frozen records, so 10,000 environments stay cheap.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import kopf

from analysis_operator.backends.kubernetes import PodSummary, summarize_pod
from analysis_operator.domain import GROUP, LABEL_ENVIRONMENT, LABEL_MANAGED_BY, MANAGER, VERSION, Environment, Flavor

MANAGED = {LABEL_MANAGED_BY: MANAGER}


@dataclass(frozen=True)
class EnvironmentRecord:
    environment: Environment
    status: Mapping[str, Any]


@kopf.index(GROUP, VERSION, "environmentflavors")
def flavors(name: str, spec: Mapping[str, Any], **_: Any) -> dict[str, Flavor]:
    return {name: Flavor.from_body(name, spec)}


@kopf.index(GROUP, VERSION, "analysisenvironments")
def environments(body: kopf.Body, **_: Any) -> dict[tuple[str, str], EnvironmentRecord]:
    environment = Environment.from_body(body)
    record = EnvironmentRecord(environment, dict(body.get("status") or {}))
    return {(environment.namespace, environment.name): record}


@kopf.index(GROUP, VERSION, "facilitygroups")
def groups(name: str, spec: Mapping[str, Any], **_: Any) -> dict[str, frozenset[str]]:
    """FacilityGroup name -> its members: the one source of group membership."""
    return {name: frozenset(spec.get("members") or ())}


def member_of(groups_index: kopf.Index, group: str, user: str) -> bool:
    return any(user in members for members in groups_index.get(group, ()))


@kopf.index("pods", labels=MANAGED)
def pods(namespace: str, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> dict[tuple[str, str], PodSummary]:
    return {(namespace, labels.get(LABEL_ENVIRONMENT, "")): summarize_pod(body)}


def first(index: kopf.Index, key: Any) -> Any:
    for value in index.get(key, ()):
        return value
    return None
