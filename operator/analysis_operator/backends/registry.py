"""The backends this operator runs, by the kind flavors name in spec.backend.

The one place that knows every backend: a new one is a module in backends/
and a line here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from analysis_operator.backends.base import Backend
from analysis_operator.backends.kubernetes import KubernetesBackend
from analysis_operator.infra.kube import KubeClient
from analysis_operator.settings import Settings


def build_backends(settings: Settings, kube: KubeClient, pods_index: Mapping[Any, Any]) -> dict[str, Backend]:
    """The enabled backends. Slurm and OpenStack are imported only when enabled (openstacksdk is slow to load)."""
    backends: list[Backend] = [KubernetesBackend(kube, settings, pods_index)]
    if settings.slurm.enabled:
        from analysis_operator.backends.slurm import SlurmBackend

        backends.append(SlurmBackend(settings.slurm, settings.templates_dir, settings.gateway.path_prefix))
    if settings.openstack.enabled:
        from analysis_operator.backends.openstack import OpenStackBackend

        backends.append(OpenStackBackend(settings))
    return {backend.kind: backend for backend in backends}
