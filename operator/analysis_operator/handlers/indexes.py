"""In-memory views kopf keeps current from its watch streams.

Handlers read these instead of listing: flavors by name, environments by
(namespace, name), and the operator's pods by (namespace, environment).
Values are small frozen records, so 10,000 environments stay cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from analysis_operator.backends.kubernetes import PodSummary, summarize_pod
from analysis_operator.engine.views import EnvironmentRecord
from analysis_operator.model.domain import GROUP, LABEL_ENVIRONMENT, LABEL_MANAGED_BY, MANAGER, VERSION, Environment, \
    Flavor

MANAGED = {LABEL_MANAGED_BY: MANAGER}


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


@kopf.index("pods", labels=MANAGED)
def pods(namespace: str, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> dict[tuple[str, str], PodSummary]:
    """The Kubernetes backend reads its pods from here (backends/kubernetes.py)."""
    return {(namespace, labels.get(LABEL_ENVIRONMENT, "")): summarize_pod(body)}
